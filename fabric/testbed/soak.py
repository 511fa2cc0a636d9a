"""``fabric soak``: wireguard-go clients under mixed load while fabric processes are killed.

Builds the test bed of ``fabric.testnet`` (a server namespace, K client
namespaces, a broker, N edges and M workers started as separate processes, K
wireguard-go clients), then for ``--duration`` seconds:

* every client alternates ping bursts to the server's tunnel address and short
  iperf3 TCP runs (a fresh iperf3 server per run, one port per client, bound
  in the server namespace), upload and download in turn;
* a chaos loop SIGKILLs one worker or one edge every few seconds, respawns it
  and waits until it reports to the broker again before the next kill (never
  all edges or all workers at once), and now and then adds a worker;
* tcpdump records UDP on every server-side veth.

At the end every client must still pass traffic both ways, the captures must
show no (session key, counter) pair twice, and no process may have died that
the chaos loop did not kill. The report (a table, and JSON with ``--json``)
gives ping and iperf3 totals, drops by reason, handshakes, restarts and the
violations; the exit code is 0 only if there is none.

Only namespaces created by the run and 198.18.0.0/15 are used; everything is
killed and removed on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fabric.protocols.wireguard.messages import TRANSPORT
from fabric.testbed.testnet import (
    Capture,
    FabricCluster,
    IperfError,
    Topology,
    WgClient,
    iter_pcap,
    missing_tools,
    parse_iperf,
    tail,
)

ADDRESS = "198.19.100.1/24"
LISTEN_PORT = 51820
IPERF_BASE_PORT = 5201
PING_BURST = 10  # echo requests per burst
PING_INTERVAL = 0.1
IPERF_SECONDS = 2.0
READY_TIMEOUT = 10.0  # a respawned process must report to the broker within this
FINAL_CHECK_TIMEOUT = 15.0  # per client, after the chaos stopped
MAX_RESPAWNS_UNEXPECTED = 3  # per label: a process dying by itself is respawned at most this often
CAPTURE_SNAPLEN = 96  # Ethernet + IPv4/IPv6 + UDP + the 16-byte WireGuard transport header

__all__ = [
    "NonceCheck",
    "SoakReport",
    "add_arguments",
    "check_nonces",
    "pcap_transport_records",
    "run",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=_positive, default=60.0, help="seconds of load and chaos (default 60)"
    )
    parser.add_argument("--clients", type=_small_int, default=2, help="wireguard-go clients (default 2)")
    parser.add_argument("--edges", type=_small_int, default=2, help="edge processes (default 2)")
    parser.add_argument("--workers", type=_small_int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the chaos schedule (default: random, printed)"
    )
    parser.add_argument(
        "--chaos-every",
        type=float,
        default=4.0,
        metavar="S",
        help="mean seconds between kills (default 4; 0 disables the chaos loop)",
    )
    parser.add_argument(
        "--max-added-workers", type=int, default=2, help="workers the chaos loop may add (default 2)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="FABRIC_TIME_SCALE for the fabric processes: its session timers run X times "
        "faster (rekeys, expiry and fabric-initiated handshakes within the run; the "
        "wireguard-go clients keep real time); default 1",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the temporary directory with all logs"
    )


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"{v:g} is out of range; use 0 < S <= 86400")
    return v


def _small_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= v <= 32:
        raise argparse.ArgumentTypeError(f"{v} is out of range; use 1 to 32")
    return v


# --------------------------------------------------------------------------- nonces

# (source address, destination address, receiver index, counter): the receiver
# index names the session key of one direction at the receiving end; ports are
# left out on purpose, so a counter reused through another edge still counts.
NonceRecord = tuple[str, str, int, int]


@dataclass
class NonceCheck:
    transport_messages: int = 0  # WireGuard transport messages checked
    session_keys: int = 0  # distinct (src, dst, receiver index)
    reused: int = 0  # messages whose (key, counter) was seen before
    examples: list[str] = field(default_factory=list)
    capture_dropped: int = 0  # tcpdump: packets dropped by the kernel (not checked)


def check_nonces(records: Iterable[NonceRecord], max_examples: int = 10) -> NonceCheck:
    """Count (key, counter) pairs seen more than once."""
    seen: dict[tuple[str, str, int], set[int]] = {}
    out = NonceCheck()
    for src, dst, receiver, counter in records:
        out.transport_messages += 1
        counters = seen.setdefault((src, dst, receiver), set())
        if counter in counters:
            out.reused += 1
            if len(out.examples) < max_examples:
                out.examples.append(f"{src} -> {dst} receiver {receiver:#010x} counter {counter}")
        else:
            counters.add(counter)
    out.session_keys = len(seen)
    return out


def pcap_transport_records(path: str | Path) -> Iterator[NonceRecord]:
    """(src, dst, receiver index, counter) of every WireGuard transport message
    in a classic pcap file, read as a stream."""
    for p in iter_pcap(path):
        if len(p.head) >= 16 and p.head[:4] == b"\x04\x00\x00\x00":
            _, receiver, counter = TRANSPORT.unpack_from(p.head, 0)
            yield p.src, p.dst, receiver, counter


_TCPDUMP_DROPPED = re.compile(r"(\d+) packets? dropped by kernel")


def capture_dropped(log_text: str) -> int:
    m = _TCPDUMP_DROPPED.search(log_text)
    return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------- report


@dataclass
class PingTotals:
    sent: int = 0
    received: int = 0
    bursts: int = 0


@dataclass
class IperfTotals:
    runs: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def mbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass
class SoakReport:
    seed: int
    duration: float  # seconds of load actually run
    requested_duration: float
    clients: int
    edges: int
    workers: int
    workers_added: int = 0
    time_scale: float = 1.0
    ping: dict[int, PingTotals] = field(default_factory=dict)  # client k -> totals
    iperf_up: IperfTotals = field(default_factory=IperfTotals)  # client -> server
    iperf_down: IperfTotals = field(default_factory=IperfTotals)  # server -> client
    drops: dict[str, int] = field(default_factory=dict)
    handshakes: int = 0
    restarts: dict[str, int] = field(default_factory=dict)  # label -> kills + respawns by chaos
    nonces: NonceCheck = field(default_factory=NonceCheck)
    unexpected_deaths: list[str] = field(default_factory=list)
    clients_without_traffic: list[int] = field(default_factory=list)
    final_check: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the run itself broke (setup, stats)
    events: list[dict[str, Any]] = field(default_factory=list)  # chaos: kills and adds
    wall_seconds: float = 0.0

    @property
    def restarts_total(self) -> int:
        return sum(self.restarts.values())

    def violations(self) -> list[str]:
        out = []
        if self.nonces.reused:
            out.append(f"nonce reuse: {self.nonces.reused} transport message(s) repeat a counter")
        out += [f"died unexpectedly: {d}" for d in self.unexpected_deaths]
        out += [
            f"client {k} passes no traffic at the end: {self.final_check.get(k, '')}".rstrip(": ")
            for k in self.clients_without_traffic
        ]
        out += [f"soak error: {e}" for e in self.errors]
        return out

    @property
    def ok(self) -> bool:
        return not self.violations()

    def to_dict(self) -> dict[str, Any]:
        ping_sent = sum(p.sent for p in self.ping.values())
        ping_recv = sum(p.received for p in self.ping.values())

        def iperf(t: IperfTotals) -> dict[str, Any]:
            return {
                "runs": t.runs,
                "failed": t.failed,
                "bytes": t.bytes,
                "seconds": round(t.seconds, 3),
                "mbps": round(t.mbps, 2),
                "errors": t.errors[:10],
            }

        violations = self.violations()
        return {
            "ok": not violations,
            "seed": self.seed,
            "duration_s": round(self.duration, 2),
            "requested_duration_s": self.requested_duration,
            "wall_s": round(self.wall_seconds, 2),
            "clients": self.clients,
            "edges": self.edges,
            "workers": self.workers,
            "workers_added": self.workers_added,
            "time_scale": self.time_scale,
            "ping": {
                "sent": ping_sent,
                "received": ping_recv,
                "per_client": {str(k): asdict(p) for k, p in sorted(self.ping.items())},
            },
            "iperf3": {"up": iperf(self.iperf_up), "down": iperf(self.iperf_down)},
            "drops": dict(sorted(self.drops.items())),
            "handshakes": self.handshakes,
            "restarts": {"total": self.restarts_total, "by_process": dict(sorted(self.restarts.items()))},
            "chaos_events": list(self.events),
            "nonce_check": asdict(self.nonces),
            "final_check": {str(k): v for k, v in sorted(self.final_check.items())},
            "violations": {
                "nonce_reuse": self.nonces.reused,
                "unexpected_deaths": list(self.unexpected_deaths),
                "clients_without_traffic": list(self.clients_without_traffic),
                "errors": list(self.errors),
                "all": violations,
            },
        }

    def format(self) -> str:
        lines = [
            f"fabric soak report: seed {self.seed}, {self.duration:.1f} s of load "
            f"({self.wall_seconds:.1f} s in all), {self.clients} client(s), {self.edges} edge(s), "
            f"{self.workers} worker(s) + {self.workers_added} added"
            + (f", fabric timers x{self.time_scale:g}" if self.time_scale != 1.0 else ""),
            "",
            f"  {'client':<8}{'ping sent':>10}{'received':>10}{'loss':>8}   final check",
        ]
        for k in range(1, self.clients + 1):
            p = self.ping.get(k, PingTotals())
            loss = f"{100 * (1 - p.received / p.sent):.1f}%" if p.sent else "-"
            lines.append(
                f"  {k:<8}{p.sent:>10}{p.received:>10}{loss:>8}   {self.final_check.get(k, '-')}"
            )
        lines += ["", f"  {'iperf3':<8}{'runs':>6}{'failed':>8}{'MB':>10}{'Mbit/s':>10}"]
        for name, t in (("up", self.iperf_up), ("down", self.iperf_down)):
            lines.append(
                f"  {name:<8}{t.runs:>6}{t.failed:>8}{t.bytes / 1e6:>10.1f}{t.mbps:>10.1f}"
            )
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.drops.items())) or "none"
        restarts = ", ".join(f"{k} {v}" for k, v in sorted(self.restarts.items())) or "none"
        n = self.nonces
        lines += [
            "",
            f"  handshakes       {self.handshakes}",
            f"  restarts         {self.restarts_total} ({restarts})",
            f"  drops            {drops}",
            f"  nonce check      {n.transport_messages} transport messages, {n.session_keys} "
            f"session keys, {n.reused} reused"
            + (f" (tcpdump dropped {n.capture_dropped})" if n.capture_dropped else ""),
        ]
        lines += [f"                   {e}" for e in n.examples]
        v = self.violations()
        lines.append(f"  violations       {len(v) or 'none'}")
        lines += [f"    - {x}" for x in v]
        lines.append(f"  result           {'PASS' if not v else 'FAIL'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- load


class _Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        with self.lock:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


class ClientLoad(threading.Thread):
    """Ping bursts and short iperf3 runs from client k, until `deadline`."""

    def __init__(
        self,
        topo: Topology,
        client: WgClient,
        k: int,
        server_ip: str,
        deadline: float,
        stop: threading.Event,
        report: SoakReport,
        lock: threading.Lock,
        say: _Progress,
    ) -> None:
        super().__init__(name=f"soak-client-{k}", daemon=True)
        self.topo = topo
        self.client = client
        self.k = k
        self.server_ip = server_ip
        self.deadline = deadline
        self.stop_event = stop
        self.report = report
        self.lock = lock
        self.say = say
        self.port = IPERF_BASE_PORT + k
        self.reverse = k % 2 == 0  # clients start in different directions
        self.ping = report.ping.setdefault(k, PingTotals())

    def run(self) -> None:
        try:
            max_rounds = int((self.deadline - time.monotonic()) / 0.5) + 10
            for _ in range(max(0, max_rounds)):
                if self.stop_event.is_set() or time.monotonic() >= self.deadline:
                    return
                self._ping_burst()
                remaining = self.deadline - time.monotonic()
                if self.stop_event.is_set() or remaining < IPERF_SECONDS + 1.0:
                    continue
                self._iperf(self.reverse)
                self.reverse = not self.reverse
        except Exception as e:  # reported, never fatal for the run
            with self.lock:
                self.report.errors.append(f"client {self.k} load thread: {e!r}")

    def _ping_burst(self) -> None:
        r = self.topo.ping(
            self.client.ns, self.server_ip, count=PING_BURST, timeout=1.0, interval=PING_INTERVAL
        )
        with self.lock:
            self.ping.sent += r.transmitted if r.transmitted else PING_BURST
            self.ping.received += r.received
            self.ping.bursts += 1

    def _iperf(self, reverse: bool) -> None:
        totals = self.report.iperf_down if reverse else self.report.iperf_up
        try:
            nbytes, secs = iperf_once(
                self.topo, self.client.ns, self.server_ip, self.port, IPERF_SECONDS, reverse
            )
        except IperfError as e:
            with self.lock:
                totals.runs += 1
                totals.failed += 1
                totals.errors.append(f"client {self.k}: {str(e)[:200]}")
            self.say(f"client {self.k}: iperf3 {'down' if reverse else 'up'} failed: {str(e)[:120]}")
            return
        with self.lock:
            totals.runs += 1
            totals.bytes += nbytes
            totals.seconds += secs


def iperf_once(
    topo: Topology, client_ns: str, addr: str, port: int, seconds: float, reverse: bool
) -> tuple[int, float]:
    """One bounded iperf3 TCP run (fresh ``-s -1`` server in the server
    namespace); returns (bytes at the receiver, seconds)."""
    srv = topo.popen(
        topo.server_ns,
        ["iperf3", "-s", "-1", "-B", addr, "-p", str(port)],
        label=f"iperf3-server-{port}",
    )
    try:
        deadline = time.monotonic() + 5.0
        for _ in range(200):
            if topo.tcp_listening(topo.server_ns, addr, port):
                break
            if srv.poll() is not None or time.monotonic() >= deadline:
                raise IperfError(
                    f"iperf3 server did not listen on {addr}:{port}: {tail(topo.log_path(srv), 5)}"
                )
            time.sleep(0.05)
        argv = ["iperf3", "-c", addr, "-p", str(port), "-t", f"{seconds:g}", "-J",
                "--connect-timeout", "3000"]
        if reverse:
            argv.append("-R")
        try:
            cp = topo.run(client_ns, argv, check=False, timeout=seconds + 10)
        except subprocess.TimeoutExpired:
            raise IperfError(f"iperf3 client did not finish within {seconds + 10:g}s") from None
        res = parse_iperf(cp.stdout or cp.stderr, reverse=reverse)
        recv = res.raw.get("end", {}).get("sum_received", {})
        return int(recv.get("bytes", 0)), float(recv.get("seconds", 0.0))
    finally:
        topo.stop(srv, timeout=2.0)


# --------------------------------------------------------------------------- chaos


class Chaos:
    """Kills one worker or edge at a time, respawns it, waits until it reports."""

    def __init__(
        self,
        cluster: FabricCluster,
        rng: random.Random,
        report: SoakReport,
        lock: threading.Lock,
        say: _Progress,
        clients: Sequence[WgClient],
        max_added: int,
        t0: float,
    ) -> None:
        self.t0 = t0
        self.cluster = cluster
        self.rng = rng
        self.report = report
        self.lock = lock
        self.say = say
        self.clients = clients
        self.max_added = max_added
        self.next_worker_id = cluster.workers
        self.unexpected_respawns: dict[str, int] = {}
        self.dead_clients: set[str] = set()

    # -- bookkeeping --------------------------------------------------------
    def check_processes(self) -> None:
        """Record (and respawn, a few times) fabric processes that died by themselves."""
        for label, proc in list(self.cluster.procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log = self.cluster.topo.log_path(proc)
            msg = f"{label} (pid {proc.pid}, rc {rc}): {tail(log, 3).strip()[-300:]}"
            with self.lock:
                self.report.unexpected_deaths.append(msg)
            self.say(f"UNEXPECTED: {label} died (rc {rc}); log {log}")
            n = self.unexpected_respawns.get(label, 0)
            if n < MAX_RESPAWNS_UNEXPECTED:
                self.unexpected_respawns[label] = n + 1
                self.cluster.respawn(label)
            else:
                # stop looking at it: it keeps dying
                self.cluster.procs.pop(label)
        for c in self.clients:
            if c.proc is not None and c.proc.poll() is not None and c.ifname not in self.dead_clients:
                self.dead_clients.add(c.ifname)
                with self.lock:
                    self.report.unexpected_deaths.append(
                        f"wireguard-go {c.ifname} (pid {c.proc.pid}, rc {c.proc.returncode})"
                    )
                self.say(f"UNEXPECTED: wireguard-go {c.ifname} died")

    def _alive(self, prefix: str) -> list[str]:
        return sorted(
            label
            for label, p in self.cluster.procs.items()
            if label.startswith(prefix) and p.poll() is None
        )

    def reported_pids(self) -> set[int]:
        from fabric.ops import admin

        try:
            ep = admin.endpoint_for(str(self.cluster.state_dir), None)
            st = admin.request(ep, {"op": "status"}, timeout=2.0)
        except Exception:
            return set()
        return {
            int(p["pid"])
            for p in st.get("processes", [])
            if isinstance(p, dict) and p.get("alive") and isinstance(p.get("pid"), int)
        }

    def wait_reporting(self, label: str, timeout: float = READY_TIMEOUT) -> bool:
        """Until the process `label` has reported its counters to the broker."""
        proc = self.cluster.procs[label]
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.2) + 1):
            if proc.pid in self.reported_pids():
                return True
            if proc.poll() is not None or time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return False

    # -- events -------------------------------------------------------------
    def event(self, load_deadline: float) -> None:
        self.check_processes()
        added = self.report.workers_added
        if added < self.max_added and self.rng.random() < 0.15:
            self.add_worker()
            return
        edges, workers = self._alive("edge"), self._alive("worker")
        choices = [lbl for group in (edges, workers) if len(group) >= 2 for lbl in group]
        if not choices:
            if added < self.max_added:
                self.add_worker()
            return
        victim = self.rng.choice(choices)
        pid = self.cluster.procs[victim].pid
        t = time.monotonic()
        self.cluster.kill(victim, signal.SIGKILL)
        down = min(self.rng.uniform(0.2, 1.5), max(0.0, load_deadline - time.monotonic()))
        time.sleep(down)
        self.cluster.respawn(victim)
        with self.lock:
            self.report.restarts[victim] = self.report.restarts.get(victim, 0) + 1
        # wait (bounded) until it reports again, so the next kill never leaves
        # a role without a running process; near the end of the load, less long
        wait = max(2.0, min(READY_TIMEOUT, load_deadline - time.monotonic() + 2.0))
        ready = self.wait_reporting(victim, timeout=wait)
        new_pid = self.cluster.procs[victim].pid
        with self.lock:
            self.report.events.append({
                "t": round(t - self.t0, 2), "action": "kill", "process": victim, "pid": pid,
                "down_s": round(down, 2), "new_pid": new_pid,
                "reporting_after_s": round(time.monotonic() - t, 2) if ready else None,
            })
        self.say(
            f"chaos: SIGKILL {victim} (pid {pid}), down {down:.1f}s, respawned as pid {new_pid}, "
            + (f"reporting after {time.monotonic() - t:.1f}s" if ready else "NOT reporting yet")
        )

    def add_worker(self) -> None:
        j = self.next_worker_id
        self.next_worker_id += 1
        t = time.monotonic()
        self.cluster.add_worker(j)
        with self.lock:
            self.report.workers_added += 1
        ready = self.wait_reporting(f"worker{j}")
        with self.lock:
            self.report.events.append({
                "t": round(t - self.t0, 2), "action": "add", "process": f"worker{j}",
                "new_pid": self.cluster.procs[f"worker{j}"].pid,
                "reporting_after_s": round(time.monotonic() - t, 2) if ready else None,
            })
        self.say(f"chaos: added worker{j}" + ("" if ready else " (NOT reporting yet)"))


# --------------------------------------------------------------------------- run


class _Interrupted(BaseException):
    pass


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(f"signal {signum}")


def final_check(
    topo: Topology, clients: dict[int, WgClient], server_ip: str, report: SoakReport
) -> None:
    """Every client must reach the server and be reached by it (in parallel, bounded)."""
    results: dict[int, str] = {}

    def one(k: int, c: WgClient) -> None:
        try:
            first = topo.wait_ping(c.ns, server_ip, timeout=FINAL_CHECK_TIMEOUT)
            up = topo.ping(c.ns, server_ip, count=5, timeout=1.0, interval=0.2)
            down = topo.ping(topo.server_ns, c.config.tunnel_ip(), count=5, timeout=1.0, interval=0.2)
            ok = first.ok and up.ok and down.ok
            results[k] = (
                f"{'ok' if ok else 'FAIL'}: to server {up.received}/{up.transmitted}, "
                f"from server {down.received}/{down.transmitted}"
            )
        except Exception as e:
            results[k] = f"FAIL: {e!r}"

    threads = [
        threading.Thread(target=one, args=(k, c), daemon=True, name=f"soak-final-{k}")
        for k, c in clients.items()
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + FINAL_CHECK_TIMEOUT + 15
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    for k in clients:
        res = results.get(k, "FAIL: check did not finish")
        report.final_check[k] = res
        if not res.startswith("ok"):
            report.clients_without_traffic.append(k)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("fabric soak needs root (network namespaces, TUN devices): try sudo", file=sys.stderr)
        return 2
    missing = missing_tools(("ip", "ss", "wireguard-go", "wg", "ping", "iperf3", "tcpdump"))
    if missing:
        print(f"fabric soak: missing {', '.join(missing)}; run scripts/setup.sh", file=sys.stderr)
        return 2
    if not 1.0 <= args.time_scale <= 1000.0:
        print("fabric soak: --time-scale must be 1 to 1000", file=sys.stderr)
        return 2
    duration = float(args.duration)
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    rng = random.Random(seed)
    say = _Progress()
    wall0 = time.monotonic()
    report = SoakReport(
        seed=seed,
        duration=0.0,
        requested_duration=duration,
        clients=args.clients,
        edges=args.edges,
        workers=args.workers,
        time_scale=args.time_scale,
    )
    lock = threading.Lock()
    stop = threading.Event()
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    old_alarm = signal.signal(signal.SIGALRM, _raise_interrupt)
    # last resort: whatever hangs, the run ends (and cleans up) by itself
    signal.alarm(int(duration) + 240)
    topo = Topology(clients=args.clients, keep_workdir=bool(args.keep_logs))
    cluster: FabricCluster | None = None
    captures: list[Capture] = []
    loads: list[ClientLoad] = []
    interrupted = False
    try:
        say(f"seed {seed}; creating {args.clients + 1} namespaces ({topo.prefix}-*, 198.18.0.0/15)...")
        topo.setup()
        for k in range(1, args.clients + 1):
            cap = Capture(topo, topo.server_ns, topo.ifname(f"s{k}"), snaplen=CAPTURE_SNAPLEN)
            cap.__enter__()
            captures.append(cap)
        say(f"tcpdump on {len(captures)} server-side veth(s); starting broker, "
            f"{args.edges} edge(s), {args.workers} worker(s)...")
        cluster = FabricCluster(
            topo,
            address=ADDRESS,
            listen_port=LISTEN_PORT,
            edges=args.edges,
            workers=args.workers,
            mode="separate",
        )
        if args.time_scale != 1.0:
            cluster.env["FABRIC_TIME_SCALE"] = f"{args.time_scale:g}"
        cluster.start()
        clients: dict[int, WgClient] = {}
        for k in range(1, args.clients + 1):
            clients[k] = cluster.connect_client(k, f"soak{k}")
            say(f"client {k} ({clients[k].ns}, {clients[k].config.tunnel_ip()}) connected")
        server_ip = cluster.server_ip

        t_load = time.monotonic()
        load_deadline = t_load + duration
        for k, c in clients.items():
            loads.append(
                ClientLoad(topo, c, k, server_ip, load_deadline, stop, report, lock, say)
            )
        for ld in loads:
            ld.start()
        say(f"load running for {duration:g}s (ping bursts, {IPERF_SECONDS:g}s iperf3 runs); chaos "
            + (f"every ~{args.chaos_every:g}s" if args.chaos_every > 0 else "off"))
        chaos = Chaos(cluster, rng, report, lock, say, list(clients.values()), args.max_added_workers,
                      t_load)
        mean = float(args.chaos_every)
        next_event = t_load + (rng.uniform(0.5, 1.5) * mean if mean > 0 else float("inf"))
        next_progress = t_load + 10.0
        for _ in range(int(duration / 0.2) + 100):
            now = time.monotonic()
            if now >= load_deadline:
                break
            chaos.check_processes()
            if now >= next_event and load_deadline - now > 2.0:
                chaos.event(load_deadline)
                next_event = time.monotonic() + rng.uniform(0.5, 1.5) * mean
            if now >= next_progress:
                say(_progress_line(report, lock, now - t_load))
                next_progress = now + 10.0
            time.sleep(max(0.0, min(0.2, load_deadline - time.monotonic())))
        report.duration = time.monotonic() - t_load
        say("load phase over; waiting for the clients' last runs...")
        join_deadline = time.monotonic() + IPERF_SECONDS + 15
        for ld in loads:
            ld.join(timeout=max(0.0, join_deadline - time.monotonic()))
        stop.set()
        chaos.check_processes()
        say("final check: every client to and from the server...")
        final_check(topo, clients, server_ip, report)
        chaos.check_processes()
        try:
            counters = cluster.stats()
            report.drops = {
                k: int(v) for k, v in counters.items() if k.rsplit(".", 1)[-1].startswith("drop_")
            }
            report.handshakes = int(counters.get("handshakes", 0))
        except Exception as e:
            report.errors.append(f"fabric admin stats failed: {e}")
        say("stopping captures, checking nonces...")
        _check_captures(topo, captures, report)
        captures = []
    except _Interrupted as e:
        interrupted = True
        print(f"\nfabric soak interrupted ({e})", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("\nfabric soak interrupted", file=sys.stderr)
    except Exception as e:
        report.errors.append(f"{type(e).__name__}: {str(e)[:2000]}")
        print(f"\nfabric soak failed: {e}", file=sys.stderr)
        if topo.workdir.name:
            print(f"\nprocess logs (tails):\n{topo.log_tails(20)}", file=sys.stderr)
    finally:
        stop.set()
        signal.alarm(0)
        # teardown is bounded; a second Ctrl-C or SIGTERM must not cut it short
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("tearing down (fabric, clients, namespaces)...")
        try:
            for cap in captures:
                cap.__exit__(None, None, None)
            if cluster is not None:
                cluster.stop(timeout=5.0)
        except BaseException as e:  # teardown below must run whatever happened
            print(f"fabric soak: stopping processes: {e!r}", file=sys.stderr)
        finally:
            topo.close()
            for ld in loads:
                ld.join(timeout=5.0)
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGALRM, old_alarm)
            signal.signal(signal.SIGINT, old_int)
        if args.keep_logs and topo.workdir.name:
            print(f"logs kept in {topo.workdir}")
    if interrupted:
        return 130
    report.wall_seconds = time.monotonic() - wall0
    print()
    print(report.format(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def _progress_line(report: SoakReport, lock: threading.Lock, t: float) -> str:
    with lock:
        ping = " ".join(f"c{k} {p.received}/{p.sent}" for k, p in sorted(report.ping.items()))
        up, down = report.iperf_up, report.iperf_down
        return (
            f"t+{t:.0f}s ping {ping}; iperf3 up {up.runs - up.failed}/{up.runs} "
            f"{up.mbps:.0f} Mbit/s, down {down.runs - down.failed}/{down.runs} {down.mbps:.0f} Mbit/s; "
            f"restarts {report.restarts_total}, workers added {report.workers_added}, "
            f"unexpected deaths {len(report.unexpected_deaths)}"
        )


def _check_captures(topo: Topology, captures: Sequence[Capture], report: SoakReport) -> None:
    for cap in captures:
        cap.__exit__(None, None, None)

    def records() -> Iterator[NonceRecord]:
        for cap in captures:
            yield from pcap_transport_records(cap.path)

    dropped = 0
    for cap in captures:
        if cap.proc is not None:
            dropped += capture_dropped(tail(topo.log_path(cap.proc), 10))
    report.nonces = check_nonces(records())
    report.nonces.capture_dropped = dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fabric soak", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
