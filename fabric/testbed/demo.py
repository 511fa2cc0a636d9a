"""``fabric demo``: a whole fabric and a stock client in throwaway namespaces.

Creates a server namespace and one client namespace (fabric.testnet), runs
``fabric up`` in the server namespace with a temporary state directory, adds a
peer, connects a wireguard-go client with the printed config, pings, runs
iperf3 both ways, prints a summary and ``fabric status``, then removes
everything again.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import FrameType

from fabric.testbed.testnet import (
    FabricCluster,
    IperfError,
    IperfResult,
    Topology,
    TopologyError,
    WgClient,
    iperf3,
    missing_tools,
)

ADDRESS = "198.19.100.1/24"
LISTEN_PORT = 51820


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edges", type=int, default=2, help="edge processes (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="iperf3 duration per direction (default 3)"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the temporary directory with all logs"
    )


class _Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        # progress of the long setup steps goes to stderr; results stay on stdout
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("fabric demo needs root (network namespaces, TUN devices): try sudo", file=sys.stderr)
        return 2
    missing = missing_tools(("ip", "ss", "wireguard-go", "wg", "ping", "iperf3"))
    if missing:
        print(f"fabric demo: missing {', '.join(missing)}; run scripts/setup.sh", file=sys.stderr)
        return 2
    step = _Progress()
    old = signal.signal(signal.SIGTERM, _sigterm)
    topo = Topology(clients=1, keep_workdir=bool(args.keep_logs))
    cluster: FabricCluster | None = None
    try:
        step(
            f"creating namespaces {topo.server_ns} and {topo.client_ns[0]} (veth, 198.18.1.0/24)..."
        )
        topo.setup()
        step(
            f"starting fabric up ({args.edges} edges, {args.workers} workers) "
            f"in {topo.server_ns}, tunnel {ADDRESS}, UDP port {LISTEN_PORT}..."
        )
        cluster = FabricCluster(
            topo,
            address=ADDRESS,
            listen_port=LISTEN_PORT,
            edges=args.edges,
            workers=args.workers,
            mode="up",
        )
        cluster.start()
        endpoint = f"{topo.server_underlay(1)}:{LISTEN_PORT}"
        step(f"fabric peer add demo --endpoint {endpoint}")
        conf = cluster.peer_add("demo", endpoint=endpoint)
        print("\n".join(f"    {line}".rstrip() for line in conf.strip().splitlines()), flush=True)
        client = WgClient(topo, topo.ns_of_client(1), topo.ifname("w1"), conf)
        step(f"starting wireguard-go client {client.ifname} in {client.ns}...")
        client.start()
        server_ip = cluster.server_ip
        step(f"waiting for the handshake (ping {server_ip})...")
        first = client.wait_ping(server_ip, timeout=20)
        if not first.ok:
            raise TopologyError(f"no reply from {server_ip} through the tunnel\n{first.output}")
        step("ping client -> server (5 packets)...")
        p_up = client.ping(server_ip, count=5)
        client_ip = client.config.tunnel_ip()
        step(f"ping server -> client {client_ip} (5 packets)...")
        p_down = topo.ping(topo.server_ns, client_ip, count=5)
        step(f"iperf3 client -> server, {args.seconds:g} s...")
        up = _iperf(topo, client, server_ip, args.seconds, reverse=False)
        step(f"iperf3 server -> client, {args.seconds:g} s...")
        down = _iperf(topo, client, server_ip, args.seconds, reverse=True)
        step("fabric status")
        status = cluster.cli("status", "--state-dir", str(cluster.state_dir), check=False)
        print(status.stdout.rstrip() or status.stderr.rstrip(), flush=True)
        cluster.check_alive()

        print("\nsummary", flush=True)
        hs = client.latest_handshake()
        print(f"  handshake        {'%.0f s ago' % (time.time() - hs) if hs else 'none'}")
        print(
            f"  ping -> server   {p_up.received}/{p_up.transmitted}, avg RTT {_ms(p_up.rtt_avg_ms)}"
        )
        print(
            f"  ping -> client   {p_down.received}/{p_down.transmitted}, avg RTT {_ms(p_down.rtt_avg_ms)}"
        )
        print(f"  iperf3 up        {_mbps(up)}")
        print(f"  iperf3 down      {_mbps(down)}", flush=True)
        ok = p_up.ok and p_down.ok and up is not None and down is not None
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"\nfabric demo failed: {e}", file=sys.stderr)
        if topo.workdir.name:
            print(f"\nprocess logs (tails):\n{topo.log_tails(20)}", file=sys.stderr)
        return 1
    finally:
        step("tearing down (fabric, client, namespaces)...")
        try:
            if cluster is not None:
                cluster.stop()
        finally:
            topo.close()
            signal.signal(signal.SIGTERM, old)
        if args.keep_logs and topo.workdir.name:
            print(f"logs kept in {topo.workdir}")
        step("done")


def _iperf(
    topo: Topology, client: WgClient, server_ip: str, seconds: float, reverse: bool
) -> IperfResult | None:
    try:
        return iperf3(topo, topo.server_ns, client.ns, server_ip, seconds=seconds, reverse=reverse)
    except IperfError as e:
        print(f"    {e}", flush=True)
        return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _mbps(r: IperfResult | None) -> str:
    if r is None:
        return "failed"
    retr = "" if r.retransmits is None else f", {r.retransmits} retransmits"
    return f"{r.mbps:8.1f} Mbit/s{retr}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fabric demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
