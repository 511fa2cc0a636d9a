"""`fabric up`: broker, edges and workers on this host, supervised (the embedded default)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from fabric import config, curve, metrics, tun
from fabric.admin import AdminError, request
from fabric.crypto import key_to_base64, public_key
from fabric.log import Log
from fabric.paths import StateDir
from fabric.service import stop_on_signals

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


def _preflight() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("fabric up needs root (or CAP_NET_ADMIN) to create the TUN device: run it with sudo")
    if not os.path.exists("/dev/net/tun"):
        raise RuntimeError("/dev/net/tun is missing: load the tun module (modprobe tun) or pass --device /dev/net/tun to docker")


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    s = cfg.server
    sd = StateDir.at(args.state_dir or s.state_dir).ensure()
    port = args.listen_port or s.listen_port
    addresses = args.address or s.addresses
    address = ",".join(addresses)
    tun_name = args.tun or s.tun
    edges = args.edges or s.edges
    workers = args.workers or s.workers
    endpoint = args.endpoint or s.endpoint
    mbase = getattr(args, "metrics", None) or s.metrics
    ports = metrics.layout(mbase, edges, workers) if mbase else {}
    _preflight()
    metrics.check_free(ports.values())  # before anything starts: a taken port is one clear error
    mflag = {name: ["--metrics", addr] for name, addr in ports.items()}
    base = [sys.executable, "-m", "fabric"] + (["-" + "v" * args.verbose] if args.verbose else [])
    sdir = ["--state-dir", str(sd.root)]
    broker = Child("broker", base + ["broker", *sdir, "--address", address, "--listen-port", str(port)]
                   + (["--endpoint", endpoint] if endpoint else []) + (["--config", args.config] if args.config else [])
                   + mflag.get("broker", []))
    children = [broker]
    for i in range(edges):
        children.append(Child(f"edge-{i}", base + ["edge", *sdir, "--id", str(i), "--listen", args.listen,
                                                   "--listen-port", str(port), "--tun", tun_name]
                              + (["--no-reuseport"] if args.no_reuseport else []) + mflag.get(f"edge-{i}", [])))
    for j in range(workers):
        children.append(Child(f"worker-{j}", base + ["worker", *sdir, "--id", str(j)] + mflag.get(f"worker-{j}", [])))

    stop = stop_on_signals()
    exporter = metrics.start(ports.get("up"), "up", 0)
    if exporter is not None:
        exporter.source = lambda f: metrics.supervisor_metrics(f, children)
    try:
        tun.create(tun_name, addresses)
    except BaseException:
        if exporter is not None:
            exporter.close()
        raise
    print(f"fabric up: creating TUN {tun_name} ({address}), starting broker...", file=sys.stderr, flush=True)
    try:
        broker.start()
        _wait_broker(sd, broker, stop)
        print(f"fabric up: starting {edges} edges and {workers} workers...", file=sys.stderr, flush=True)
        for c in children[1:]:
            c.start()
        server = request(sd.admin, {"op": "server"}, curve=_admin_curve(sd))
        key = server["public_key"]
        print(
            f"fabric up: listening on UDP port {port}, tunnel {address} on {tun_name}\n"
            f"  public key {key}\n"
            f"  add a client: fabric peer add NAME --state-dir {sd.root}\n"
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
        print("fabric up: stopped", file=sys.stderr, flush=True)
    return 0


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
    from fabric.crypto import key_from_base64

    return key_to_base64(public_key(key_from_base64(sd.server_key.read_text())))
