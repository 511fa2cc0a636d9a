"""Prometheus metrics: one HTTP endpoint per process, read at scrape time.

Every fabric process (broker, each edge, each worker, and the `fabric up`
supervisor) can serve `/metrics` from a daemon thread (`--metrics HOST:PORT`, or
`metrics = "HOST:PORT"` in the TOML `[server]` table as the base of a port
layout). Nothing is counted twice: the collector reads the counters the
process keeps anyway (the same ones it reports to the broker once a second)
when Prometheus scrapes, so the data path pays nothing for it. The one
addition is the worker's per-frame timing (`FrameStats`: two `perf_counter`
calls and two bucket increments per frame, not per packet).

Reading another thread's dicts: `dict(d)`, `list(d.values())` and `len(d)` of
plain dicts run in C under the GIL without calling back into Python (keys are
str/int/bytes), so they see a consistent copy; a RuntimeError from a racing
resize is retried.

Port layout from a base B (`fabric up --metrics HOST:B`, or the config key):
broker B, edge i B+1+i, worker j B+1+E+j (E edges), the supervisor B+1+E+W.

ZeroMQ's own queues (messages waiting in a socket's pipes) are not observable
from pyzmq; the queue depths exported are the ones the processes hold
themselves (an edge's reorder buffer and staged packets, pending handshakes).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fabric import __version__
from fabric.ops.config import ConfigError
from fabric.ops.log import Log

log = Log("metrics")

# worker time per frame, seconds
LATENCY_BOUNDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 1.0)
# packets per frame
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)

# edge counters that are packets through one of its four doors
PACKET_DIRECTIONS = {"udp_in": "udp_in", "udp_out": "udp_out", "tun_in": "tun_in", "tun_out": "tun_out"}
# worker counters: packets through the AEAD
CRYPTO_OPS = {"decrypted": "decrypt", "encrypted": "encrypt"}
# counters with a metric of their own (the rest become fabric_events_total{event=...})
OWN_METRICS = {
    "handshakes": ("fabric_handshakes", "Handshakes completed (worker) or committed (broker)"),
    "initiations": ("fabric_initiations", "Handshake initiations by the fabric (edge: requested, worker: sent, broker: registered)"),
    "frames_pushed": ("fabric_frames_pushed", "Frames an edge pushed to workers"),
    "packets_pushed": ("fabric_packets_pushed", "Packets in the frames an edge pushed to workers"),
}
# worker frame kinds (fabric/control/frames.py), by the header's first byte
FRAME_KINDS = {1: "decrypt", 2: "encrypt", 3: "handshake", 4: "initiate"}


def parse_address(value: Any, where: str = "--metrics") -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:9580) -> (host, port); ConfigError names `where` and the fix."""
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{where}: {text!r} must be HOST:PORT, e.g. 127.0.0.1:9580")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is not a port; use 1 to 65535, e.g. 127.0.0.1:9580")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{where}: {host!r} is not an IP address; write e.g. 127.0.0.1:9580") from None
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def child_address(base: str, role: str, ident: int, edges: int, workers: int = 0) -> str:
    """The endpoint of one process in the layout starting at `base` (see the module doc)."""
    host, port = parse_address(base)
    offset = {"broker": 0, "edge": 1 + ident, "worker": 1 + edges + ident, "up": 1 + edges + workers}[role]
    if port + offset > 65535:
        raise ConfigError(f"metrics: base port {port} leaves no room for {role} {ident}; pick a lower base")
    return format_address(host, port + offset)


def layout(base: str, edges: int, workers: int) -> dict[str, str]:
    """Every endpoint of a `fabric up` with this base: {"broker": ..., "edge-0": ..., "up": ...}."""
    out = {"broker": child_address(base, "broker", 0, edges, workers)}
    out.update({f"edge-{i}": child_address(base, "edge", i, edges, workers) for i in range(edges)})
    out.update({f"worker-{j}": child_address(base, "worker", j, edges, workers) for j in range(workers)})
    out["up"] = child_address(base, "up", 0, edges, workers)
    return out


def _in_use(address: str) -> str:
    return (f"metrics port {address} is in use (another program or fabric holds it): "
            "pick another --metrics HOST:PORT or `metrics` key, or stop that program")


def check_free(addresses: Iterable[str]) -> None:
    """Raise RuntimeError naming the first address whose TCP port cannot be bound."""
    for address in addresses:
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does
            try:
                s.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise RuntimeError(_in_use(address)) from None
                raise RuntimeError(f"cannot listen for metrics on {address}: {exc.strerror}") from None


class Histogram:
    """A fixed-bucket histogram for one writer thread: observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1  # bucket i holds bounds[i-1] < v <= bounds[i]
        self.sum += v

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Prometheus buckets (le, cumulative count) ending with +Inf, and the sum."""
        counts, total = list(self.counts), self.sum
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, c in zip(self.bounds, counts, strict=False):
            acc += c
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", acc + counts[-1]))
        return out, total


class FrameStats:
    """The worker's per-frame figures: processing time and packets per frame, by kind."""

    def __init__(self) -> None:
        self.latency: dict[str, Histogram] = {}
        self.batch: dict[str, Histogram] = {}

    def observe(self, head: Any, seconds: float) -> None:
        """One frame was handled; `head` is its first part (the header)."""
        if len(head) >= 12:
            kind = FRAME_KINDS.get(head[0], "other")
            n = int.from_bytes(head[8:12], "little")
        else:
            kind, n = "bad", 0
        h = self.latency.get(kind)
        if h is None:
            h = self.latency[kind] = Histogram(LATENCY_BOUNDS)
            self.batch[kind] = Histogram(BATCH_BOUNDS)
        h.observe(seconds)
        self.batch[kind].observe(n)

    def counters(self) -> dict[str, int]:
        """Totals for the stats report (ints): frames handled and their time in microseconds."""
        hs = list(self.latency.values())
        return {"frames_handled": sum(h.count for h in hs),
                "frame_time_us": int(sum(h.sum for h in hs) * 1e6)}


class Families:
    """Collects samples into metric families, every one labelled with role and id."""

    def __init__(self, role: str, ident: int | str) -> None:
        self.base = [role, str(ident)]
        self.fams: dict[str, Any] = {}

    def _family(self, cls_name: str, name: str, doc: str, labels: tuple[str, ...]) -> Any:
        fam = self.fams.get(name)
        if fam is None:
            import prometheus_client.core as core

            cls = getattr(core, cls_name)
            fam = self.fams[name] = cls(name, doc, labels=["role", "id", *labels])
        return fam

    def counter(self, name: str, doc: str, value: float, **labels: str) -> None:
        self._family("CounterMetricFamily", name, doc, tuple(labels)).add_metric(
            [*self.base, *labels.values()], value)

    def gauge(self, name: str, doc: str, value: float, **labels: str) -> None:
        self._family("GaugeMetricFamily", name, doc, tuple(labels)).add_metric(
            [*self.base, *labels.values()], value)

    def histogram(self, name: str, doc: str, h: Histogram, **labels: str) -> None:
        buckets, total = h.cumulative()
        self._family("HistogramMetricFamily", name, doc, tuple(labels)).add_metric(
            [*self.base, *labels.values()], buckets, sum_value=total)

    def counters(self, counters: dict[str, int]) -> None:
        """A process's counter dict: drop_* -> fabric_drops_total{reason}, packets by
        direction, crypto ops, named events, and the rest as fabric_events_total{event}."""
        for name, v in sorted(counters.items()):
            if name.startswith("drop_"):
                self.counter("fabric_drops", "Packets or messages dropped, by reason", v, reason=name[5:])
            elif name in PACKET_DIRECTIONS:
                self.counter("fabric_packets", "Packets through an edge's UDP socket and TUN queue",
                             v, direction=PACKET_DIRECTIONS[name])
            elif name in CRYPTO_OPS:
                self.counter("fabric_crypto_packets", "Packets a worker (or an edge, inline) decrypted or encrypted",
                             v, op=CRYPTO_OPS[name])
            elif name in OWN_METRICS:
                metric, doc = OWN_METRICS[name]
                self.counter(metric, doc, v)
            else:
                self.counter("fabric_events", "Other counted events, by name", v, event=name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fams.values())


def _copy(get: Callable[[], Any]) -> Any:
    for _ in range(5):
        try:
            return get()
        except RuntimeError:  # a dict resized under us: try again
            continue
    return get()


# --- what each role exports ---------------------------------------------------------------


def edge_metrics(f: Families, edge: Any) -> None:
    # the known series exist from the start (at 0), as Prometheus prefers
    counters: dict[str, int] = {**dict.fromkeys(PACKET_DIRECTIONS, 0), "frames_pushed": 0,
                                "packets_pushed": 0, **_copy(lambda: dict(edge.counters))}
    f.counters(counters)
    peers = _copy(lambda: [list(p.stats) for p in list(edge.peers.values())])
    f.counter("fabric_bytes", "Bytes through an edge's UDP socket (in: authenticated datagrams)",
              sum(s[0] for s in peers), direction="udp_in")
    f.counter("fabric_bytes", "Bytes through an edge's UDP socket (in: authenticated datagrams)",
              sum(s[1] for s in peers), direction="udp_out")
    frames_, packets = counters.get("frames_pushed", 0), counters.get("packets_pushed", 0)
    f.gauge("fabric_batch_size", "Mean packets per frame pushed to workers since start",
            packets / frames_ if frames_ else 0.0)
    for queue, depth in edge_gauges(edge).items():
        if queue.startswith("queue_"):
            f.gauge("fabric_queue_depth", "Items waiting in a queue the process holds", depth, queue=queue[6:])
    f.gauge("fabric_sessions", "Sessions this process holds", len(edge.sessions))
    f.gauge("fabric_peers", "Peers this process knows", len(edge.peers))
    f.gauge("fabric_attached", "1 once the edge has joined the UDP port and the TUN device",
            1 if edge.sock is not None else 0)
    f.gauge("fabric_crypto_in_workers", "1 while the edge hands the AEAD of data to workers, 0 while it runs it",
            int(edge.placement.offloading))
    f.gauge("fabric_busy_ratio", "Share of the last 0.1 s the edge spent handling traffic", edge.placement.busy)
    gauges = edge_gauges(edge)
    f.gauge("fabric_under_load", "1 while the host is under load: handshakes need a cookie in mac2",
            gauges["under_load"])
    f.gauge("fabric_banned_sources", "Source addresses whose handshakes the edge's socket filter drops",
            gauges["banned_sources"])


def edge_gauges(edge: Any) -> dict[str, int]:
    """Point-in-time figures of an edge (also in its stats report)."""
    staged = _copy(lambda: sum(len(p.staged) for p in list(edge.peers.values())))
    return {
        "sessions": len(edge.sessions), "peers": len(edge.peers),
        "queue_reorder_inflight": len(edge.order.inflight), "queue_reorder_held": len(edge.order.held),
        "queue_staged": staged,
        # 1 while the edge hands the AEAD to workers (fabric/dataplane/placement.py CryptoPlacement)
        "crypto_in_workers": int(edge.placement.offloading), "busy_percent": round(edge.placement.busy * 100),
        # the protocols' own (WireGuard: under_load while handshakes need a cookie in mac2,
        # banned_sources whose handshakes the socket filter drops; fabric/protocols/wireguard/guard.py)
        "under_load": 0, "banned_sources": 0, **_copy(lambda: edge.gauges(time.time())),
    }


def worker_metrics(f: Families, worker: Any) -> None:
    f.counters({**dict.fromkeys(CRYPTO_OPS, 0), "handshakes": 0, **_copy(lambda: dict(worker.counters))})
    fs: FrameStats = worker.frame_stats
    for kind, h in _copy(lambda: list(fs.latency.items())):
        f.histogram("fabric_worker_frame_seconds", "Time a worker spent on one frame, by frame kind", h,
                    kind=kind)
    for kind, h in _copy(lambda: list(fs.batch.items())):
        f.histogram("fabric_worker_batch_packets", "Packets per frame a worker received, by frame kind",
                    h, kind=kind)
    for name, v in worker_gauges(worker).items():
        if name.startswith("queue_"):
            f.gauge("fabric_queue_depth", "Items waiting in a queue the process holds", v, queue=name[6:])
    f.gauge("fabric_sessions", "Sessions this process holds", len(worker.sessions))
    f.gauge("fabric_peers", "Peers this process knows", len(worker.peers))
    f.gauge("fabric_worker_edges", "Edges this worker is connected to", len(worker.edges))


def worker_gauges(worker: Any) -> dict[str, int]:
    return {"sessions": len(worker.sessions), "peers": len(worker.peers),
            "queue_pending_handshakes": sum(s.pending_count() for s in worker.sides.values()),
            "edges": len(worker.edges)}


def broker_metrics(f: Families, broker: Any, gone_after: float) -> None:
    from base64 import b64encode

    def key_to_base64(k: bytes) -> str:
        return b64encode(k).decode()

    f.counters({"handshakes": 0, **_copy(lambda: dict(broker.counters))})
    f.gauge("fabric_sessions", "Sessions this process holds", len(broker.sessions))
    f.gauge("fabric_peers", "Peers this process knows", len(broker.peers))
    f.gauge("fabric_queue_depth", "Items waiting in a queue the process holds", broker.pending_count(),
            queue="pending_handshakes")
    now = time.time()
    alive: dict[tuple[str, str], int] = {}
    for (role, _rid, _pid), (seen, _r) in _copy(lambda: list(broker.reports.latest.items())):
        state = "alive" if now - seen < gone_after else "gone"
        alive[(role, state)] = alive.get((role, state), 0) + 1
    for role in ("edge", "worker"):
        for state in ("alive", "gone"):
            f.gauge("fabric_processes", "Edge and worker processes that reported to the broker",
                    alive.get((role, state), 0), process_role=role, state=state)
    peers = {pub: (p.name, p.protocol) for pub, p in _copy(lambda: list(broker.peers.items()))}
    totals = _copy(broker._peer_totals)
    for pub, (name, proto) in sorted(peers.items(), key=lambda kv: kv[1]):
        t = totals.get(pub, [0, 0, 0, 0])
        key = key_to_base64(pub)
        for direction, b, p in (("rx", t[0], t[2]), ("tx", t[1], t[3])):
            f.counter("fabric_peer_bytes", "Bytes per peer at the edges' UDP sockets (all edges)", b,
                      peer=name, public_key=key, protocol=proto, direction=direction)
            f.counter("fabric_peer_packets", "Packets per peer at the edges' UDP sockets (all edges)", p,
                      peer=name, public_key=key, protocol=proto, direction=direction)
    newest: dict[bytes, float] = {}
    ciphers: dict[tuple[str, str, str], int] = {}
    for s in _copy(lambda: list(broker.sessions.values())):
        newest[s.peer] = max(newest.get(s.peer, 0.0), s.created)
        name, proto = peers.get(s.peer, ("?", s.protocol))
        cipher = str(broker.protocols[s.protocol].describe(s).get("cipher") or "")
        ciphers[(name, proto, cipher)] = ciphers.get((name, proto, cipher), 0) + 1
    for (name, proto, cipher), n in sorted(ciphers.items()):
        f.gauge("fabric_peer_sessions", "Sessions per peer, by protocol and data cipher", n,
                peer=name, protocol=proto, cipher=cipher)
    for pub, (name, proto) in sorted(peers.items(), key=lambda kv: kv[1]):
        f.gauge("fabric_peer_latest_handshake_seconds", "Unix time of the peer's newest session (0: none)",
                newest.get(pub, 0.0), peer=name, public_key=key_to_base64(pub), protocol=proto)


def supervisor_metrics(f: Families, children: list[Any]) -> None:
    for c in list(children):
        # returncode, not poll(): the supervisor's thread reaps its children
        running = c.proc is not None and c.proc.returncode is None
        f.counter("fabric_restarts", "Times `fabric up` restarted a process", c.restarts, process=c.name)
        f.gauge("fabric_process_up", "1 while a process `fabric up` supervises is running",
                1 if running else 0, process=c.name)


# --- the endpoint -----------------------------------------------------------------------


class Exporter:
    """The `/metrics` endpoint of one process; `source` fills the families at scrape time."""

    def __init__(self, role: str, ident: int | str, address: str) -> None:
        self.role, self.ident, self.address = role, str(ident), address
        self.source: Callable[[Families], None] | None = None
        self._server: Any = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily("fabric_process_info", "One per process: its role, id, pid and version",
                                 labels=["role", "id", "pid", "version"])
        info.add_metric([self.role, self.ident, str(os.getpid()), __version__], 1)
        yield info
        f = Families(self.role, self.ident)
        if self.source is not None:
            try:
                self.source(f)
            except Exception as exc:  # a scrape must never take the process down
                log.warning("metrics collection failed", error=str(exc))
        yield from f

    def start(self) -> Exporter:
        """Listen now (before the process does anything else); RuntimeError if the port is taken."""
        from prometheus_client import start_http_server
        from prometheus_client.process_collector import ProcessCollector
        from prometheus_client.registry import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)
        host, port = parse_address(self.address)
        try:
            self._server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RuntimeError(_in_use(self.address)) from None
            raise RuntimeError(f"cannot listen for metrics on {self.address}: {exc.strerror}") from None
        log.info("metrics endpoint", address=self.address, role=self.role, id=self.ident)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start(address: str | None, role: str, ident: int | str) -> Exporter | None:
    """An exporter listening on `address`, or None when metrics are off."""
    if not address:
        return None
    return Exporter(role, ident, address).start()


def scrape(address: str, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET http://address/metrics and parse it: {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
