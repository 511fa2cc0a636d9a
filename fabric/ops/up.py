"""`fabric up`: broker, edges and workers on this host, supervised (the embedded default)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from fabric.control import zmqcurve as curve
from fabric.dataplane import tun
from fabric.ops import config, metrics, preflight
from fabric.ops.admin import AdminError, request
from fabric.ops.log import Log
from fabric.ops.paths import StateDir
from fabric.ops.service import stop_on_signals
from fabric.protocols.wireguard.crypto import key_to_base64, public_key

log = Log("up")

RESTART_BACKOFF_MAX = 5.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.2
    next_start: float = 0.0
    history: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        self.started = time.time()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def progress(msg: str) -> None:
    """A progress line of a long setup step (stderr, shown at every verbosity)."""
    print(f"fabric up: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    s = cfg.server
    for w in cfg.warnings:
        log.warning(w)
    sd = StateDir.at(args.state_dir or s.state_dir)
    served, _ = config.served(s, args.listen_port, args.openvpn_port)
    config.require_protocols(served)
    port, ovpn = served["wireguard"], served.get("openvpn")
    addresses = args.address or s.addresses
    address = ",".join(addresses)
    tun_name = args.tun or s.tun
    edges = args.edges or s.edges
    workers = args.workers or s.workers
    crypto = args.crypto or s.crypto
    rx_usecs = s.rx_usecs if args.rx_usecs is None else args.rx_usecs
    endpoint = args.endpoint or s.endpoint
    mbase = getattr(args, "metrics", None) or s.metrics
    ports = metrics.layout(mbase, edges, workers) if mbase else {}
    # before anything is created or started: one line naming the cause and the fix
    preflight.for_up(sd, args.listen, port, edges, not args.no_reuseport, tun_name, openvpn_port=ovpn)
    metrics.check_free(ports.values())
    mflag = {name: ["--metrics", addr] for name, addr in ports.items()}
    sd.ensure()
    up_lock = sd.lock("up")
    os.ftruncate(up_lock, 0)
    os.write(up_lock, f"{os.getpid()}\n".encode())
    base = [sys.executable, "-m", "fabric"] + (["-" + "v" * args.verbose] if args.verbose else [])
    sdir = ["--state-dir", str(sd.root)]
    # OpenVPN's port to broker and edges; the broker reads the rest of [openvpn] from --config
    oflag = ["--openvpn-port", str(ovpn)] if ovpn else []
    broker = Child("broker", base + ["broker", *sdir, "--address", address, "--listen-port", str(port), *oflag]
                   + (["--endpoint", endpoint] if endpoint else []) + (["--config", args.config] if args.config else [])
                   + mflag.get("broker", []))
    children = [broker]
    for i in range(edges):
        children.append(Child(f"edge-{i}", base + ["edge", *sdir, "--id", str(i), "--listen", args.listen,
                                                   "--listen-port", str(port), *oflag, "--tun", tun_name]
                              + (["--no-reuseport"] if args.no_reuseport else []) + ["--crypto", crypto, "--rx-usecs", str(rx_usecs)]
                              + mflag.get(f"edge-{i}", [])))
    for j in range(workers):
        children.append(Child(f"worker-{j}", base + ["worker", *sdir, "--id", str(j)] + mflag.get(f"worker-{j}", [])))

    stop = stop_on_signals()
    exporter = metrics.start(ports.get("up"), "up", 0)
    if exporter is not None:
        exporter.source = lambda f: metrics.supervisor_metrics(f, children)
    try:
        progress(f"creating TUN {tun_name} ({address})...")
        tun.create(tun_name, addresses)
        progress("starting broker...")
        broker.start()
        _wait_broker(sd, broker, stop)
        progress(f"starting {edges} edges and {workers} workers...")
        for c in children[1:]:
            c.start()
        _wait_children(sd, edges, workers, stop)
        server = request(sd.admin, {"op": "server"}, curve=_admin_curve(sd))
        key = server["public_key"]
        print(
            f"fabric up: listening on UDP port {port}"
            + (f" (WireGuard) and {ovpn} (OpenVPN)" if ovpn else "") + f", tunnel {address} on {tun_name}\n"
            f"  public key {key}\n"
            f"  add a client: fabric peer add NAME --state-dir {sd.root}"
            + (" (add --openvpn for an OpenVPN profile)" if ovpn else "") + "\n"
            f"  sessions:     fabric admin sessions --state-dir {sd.root}"
            + (f"\n  metrics:      http://{ports['broker']}/metrics (broker) ... http://{ports['up']}/metrics"
               " (this supervisor); `fabric admin status` lists each" if ports else ""),
            file=sys.stderr, flush=True,
        )
        _supervise(children, stop)
    finally:
        _terminate(children)
        try:
            tun.delete(tun_name)
        except Exception as exc:
            log.warning("could not remove TUN", tun=tun_name, error=str(exc))
        try:
            os.unlink(sd.session_table)
        except OSError:
            pass
        if exporter is not None:
            exporter.close()
        os.close(up_lock)
        progress("stopped")
    return 0


def _wait_children(sd: StateDir, edges: int, workers: int, stop: list[bool], timeout: float = 15.0) -> None:
    """Progress until every edge and worker reported to the broker (never fails: the
    supervisor restarts what died, and `fabric status` shows what is missing)."""
    want = edges + workers
    t0 = time.time()
    shown = -1
    while not stop[0]:
        try:
            st = request(sd.admin, {"op": "status"}, timeout=1.0, curve=_admin_curve(sd))
            up = len({(p["role"], p["id"]) for p in st.get("processes", [])
                      if p.get("alive") and p.get("role") in ("edge", "worker")})
        except (AdminError, KeyError, TypeError):
            up = 0
        if up != shown and up < want:
            progress(f"{up}/{want} edges and workers running...")
            shown = up
        if up >= want:
            progress(f"{want}/{want} edges and workers running ({time.time() - t0:.1f} s)")
            return
        if time.time() - t0 > timeout:
            progress(f"{up}/{want} edges and workers after {timeout:g} s; going on (see `fabric admin status`)")
            return
        time.sleep(0.2)


def _admin_curve(sd: StateDir) -> dict[int, object] | None:
    keys = curve.local(sd)
    return keys.client if keys else None


def _wait_broker(sd: StateDir, broker: Child, stop: list[bool]) -> None:
    deadline = time.time() + 15
    while time.time() < deadline and not stop[0]:
        if not broker.alive():
            raise RuntimeError("the broker exited at start; run `fabric -v broker` to see why")
        if (sd.run / "admin.sock").exists():
            try:
                request(sd.admin, {"op": "server"}, timeout=1.0, curve=_admin_curve(sd))
                return
            except AdminError:
                pass
        time.sleep(0.1)
    if not stop[0]:
        raise RuntimeError("the broker did not answer within 15 s")


def _supervise(children: list[Child], stop: list[bool]) -> None:
    while not stop[0]:
        now = time.time()
        for c in children:
            if c.alive() or c.proc is None and c.next_start == 0.0:
                continue
            if c.next_start == 0.0:
                code = c.proc.returncode if c.proc else None
                # back off if it keeps dying young
                c.backoff = min(RESTART_BACKOFF_MAX, c.backoff * 2) if now - c.started < 2.0 else 0.2
                c.next_start = now + c.backoff
                log.warning("process died, restarting", name=c.name, code=code, restart_in=round(c.backoff, 1))
                print(f"fabric up: {c.name} exited ({code}), restarting", file=sys.stderr, flush=True)
            elif now >= c.next_start:
                c.next_start = 0.0
                c.restarts += 1
                c.start()
        time.sleep(0.2)


def _terminate(children: list[Child]) -> None:
    procs = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def server_public(sd: StateDir) -> str:
    from fabric.protocols.wireguard.crypto import key_from_base64

    return key_to_base64(public_key(key_from_base64(sd.server_key.read_text())))
