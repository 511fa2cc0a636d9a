"""``fabric demo``: a whole fabric and a stock client in throwaway namespaces.

Creates a server namespace and one client namespace (fabric.testnet), runs
``fabric up`` in the server namespace with a temporary state directory, adds a
peer, connects a wireguard-go client with the printed config, pings, runs
iperf3 both ways, prints a summary and ``fabric status``, then removes
everything again.

``fabric demo --openvpn`` does the same with a stock OpenVPN 2.6 client
(Debian's ``openvpn``) instead: the fabric also serves OpenVPN on UDP 1194,
``fabric peer add demo --openvpn`` prints an inline .ovpn profile, and
``openvpn --config`` runs it unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from types import FrameType
from typing import Any

from fabric.testbed.ovpnclient import OvpnClient
from fabric.testbed.testnet import (
    FabricCluster,
    IperfError,
    IperfResult,
    Topology,
    TopologyError,
    WgClient,
    fabric_argv,
    iperf3,
    missing_tools,
)

ADDRESS = "198.19.100.1/24"
LISTEN_PORT = 51820
OPENVPN_PORT = 1194
PEER = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edges", type=int, default=2, help="edge processes (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="iperf3 duration per direction (default 3)"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the temporary directory with all logs"
    )
    parser.add_argument(
        "--openvpn", action="store_true",
        help=f"connect a stock OpenVPN 2.6 client (Debian's openvpn) instead of wireguard-go: "
             f"the fabric also serves OpenVPN on UDP {OPENVPN_PORT}",
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
    openvpn = bool(getattr(args, "openvpn", False))
    client_tools = ("openvpn",) if openvpn else ("wireguard-go", "wg")
    missing = missing_tools(("ip", "ss", *client_tools, "ping", "iperf3"))
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
        ports = f"UDP port {LISTEN_PORT}" + (
            f", OpenVPN on UDP port {OPENVPN_PORT}" if openvpn else ""
        )
        step(
            f"starting fabric up ({args.edges} edges, {args.workers} workers) "
            f"in {topo.server_ns}, tunnel {ADDRESS}, {ports}..."
        )
        cluster = FabricCluster(
            topo,
            address=ADDRESS,
            listen_port=LISTEN_PORT,
            edges=args.edges,
            workers=args.workers,
            mode="up",
            openvpn_port=OPENVPN_PORT if openvpn else None,
        )
        cluster.start()
        server_ip = cluster.server_ip
        client: WgClient | OvpnClient
        if openvpn:
            endpoint = f"{topo.server_underlay(1)}:{OPENVPN_PORT}"
            step(f"fabric peer add {PEER} --openvpn --endpoint {endpoint}")
            profile = cluster.add_ovpn_peer(PEER, 1)
            print(_abridged(profile), flush=True)
            client = OvpnClient(topo, topo.ns_of_client(1), profile, name=PEER)
            step(f"starting openvpn --config {client.profile_path.name} in {client.ns} "
                 "(the profile as printed)...")
            client.start(timeout=30)
            client_ip = client.tunnel_ip()
            step(f"tunnel up: {client_ip} (pushed); waiting for ping {server_ip}...")
        else:
            endpoint = f"{topo.server_underlay(1)}:{LISTEN_PORT}"
            step(f"fabric peer add {PEER} --endpoint {endpoint}")
            conf = cluster.peer_add(PEER, endpoint=endpoint)
            print("\n".join(f"    {line}".rstrip() for line in conf.strip().splitlines()), flush=True)
            client = WgClient(topo, topo.ns_of_client(1), topo.ifname("w1"), conf)
            step(f"starting wireguard-go client {client.ifname} in {client.ns}...")
            client.start()
            client_ip = client.config.tunnel_ip()
            step(f"waiting for the handshake (ping {server_ip})...")
        first = topo.wait_ping(client.ns, server_ip, timeout=20)
        if not first.ok:
            raise TopologyError(f"no reply from {server_ip} through the tunnel\n{first.output}")
        step("ping client -> server (5 packets)...")
        p_up = topo.ping(client.ns, server_ip, count=5)
        step(f"ping server -> client {client_ip} (5 packets)...")
        p_down = topo.ping(topo.server_ns, client_ip, count=5)
        step(f"iperf3 client -> server, {args.seconds:g} s...")
        up = _iperf(topo, client.ns, server_ip, args.seconds, reverse=False)
        step(f"iperf3 server -> client, {args.seconds:g} s...")
        down = _iperf(topo, client.ns, server_ip, args.seconds, reverse=True)
        step("fabric status")
        status = topo.run(None, fabric_argv("status", "--state-dir", str(cluster.state_dir)),
                          check=False, timeout=20, env=_status_env(cluster.env))
        print(status.stdout.rstrip() or status.stderr.rstrip(), flush=True)
        cluster.check_alive()
        if isinstance(client, OvpnClient) and not client.running:
            raise TopologyError(f"openvpn exited (rc={client.proc.returncode if client.proc else '?'})")

        print("\nsummary", flush=True)
        if isinstance(client, OvpnClient):
            session = _session_of(cluster, PEER)
            hs = float(session.get("latest_handshake") or 0) if session else 0.0
            cipher = session.get("cipher") if session else None
            print(f"  client           openvpn, {client_ip}"
                  + (f", {cipher}" if cipher else "") + f", server UDP {OPENVPN_PORT}")
        else:
            hs = client.latest_handshake()
            print(f"  client           wireguard-go, {client_ip}, server UDP {LISTEN_PORT}")
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


def _status_env(env: dict[str, str]) -> dict[str, str]:
    """`fabric status` prints into a pipe here: as wide as this terminal, or unwrapped when
    the demo's own output is not one (a COLUMNS inherited from elsewhere would fold the tables)."""
    env = dict(env)
    if sys.stdout.isatty():
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
    else:
        env.pop("COLUMNS", None)
    return env


def _abridged(profile: str) -> str:
    """The .ovpn profile, indented, with each inline block (keys, certificates) cut to one line."""
    out: list[str] = []
    block: str | None = None
    lines = 0
    for line in profile.strip().splitlines():
        text = line.strip()
        if block is None and text.startswith("<") and not text.startswith("</") and text.endswith(">"):
            block, lines = text[1:-1], 0
        elif block is not None and text == f"</{block}>":
            out.append(f"<{block}> ... {lines} lines ... </{block}>")
            block = None
        elif block is not None:
            lines += 1
        else:
            out.append(line)
    if block is not None:  # unterminated: show what there is
        out.append(f"<{block}> ... {lines} lines")
    return "\n".join(f"    {line}".rstrip() for line in out)


def _session_of(cluster: FabricCluster, peer: str) -> dict[str, Any] | None:
    """The peer's newest session as `fabric admin sessions --json` shows it, or None."""
    try:
        mine = [s for s in cluster.sessions() if s.get("peer") == peer]
    except Exception:
        return None
    return max(mine, key=lambda s: float(s.get("latest_handshake") or 0), default=None)


def _iperf(
    topo: Topology, client_ns: str, server_ip: str, seconds: float, reverse: bool
) -> IperfResult | None:
    try:
        return iperf3(topo, topo.server_ns, client_ns, server_ip, seconds=seconds, reverse=reverse)
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
