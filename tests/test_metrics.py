"""Prometheus metrics (fabric/ops/metrics.py): the collector, the endpoint, its errors, and
an end-to-end run that scrapes every process of a live fabric."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from brokers.broker import Broker
from brokers.reports import sanitize_report
from fabric.control import frames
from fabric.dataplane.reorder import ReorderBuffer
from fabric.ops import metrics
from fabric.ops.config import ConfigError, parse
from fabric.ops.paths import StateDir
from fabric.testbed.testnet import FabricCluster, Topology, fabric_argv, fabric_env, new_prefix

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def exposition(exporter: metrics.Exporter) -> Samples:
    """What Prometheus would read from this exporter: generated text, parsed back."""
    from prometheus_client.exposition import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    text = generate_latest(registry).decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`; KeyError if none."""
    hits = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    if not hits:
        raise KeyError(f"{name} {labels} not exported")
    return sum(hits)


def fake_edge() -> Any:
    order: ReorderBuffer[int] = ReorderBuffer()
    for _ in range(3):
        order.sent(order.reserve(), 0.0)
    order.arrived(2, 2)  # held behind the missing 1
    peer_a = SimpleNamespace(stats=[1000, 2000, 10, 20], staged=[b"x", b"y"])
    peer_b = SimpleNamespace(stats=[5, 7, 1, 1], staged=[])
    return SimpleNamespace(
        counters={"udp_in": 11, "udp_out": 21, "tun_in": 22, "tun_out": 10, "drop_replay": 3,
                  "drop_bad_mac1": 2, "frames_pushed": 4, "packets_pushed": 30, "keepalives": 5,
                  "initiations": 1},
        peers={b"a": peer_a, b"b": peer_b}, sessions={1: None, 2: None}, order=order, sock=object(),
        placement=SimpleNamespace(offloading=True, busy=0.25),
        gauges=lambda now: {"under_load": 1, "banned_sources": 1},
    )


def test_edge_counters_become_metrics() -> None:
    exp = metrics.Exporter("edge", 3, "127.0.0.1:1")
    edge = fake_edge()
    exp.source = lambda f: metrics.edge_metrics(f, edge)
    got = exposition(exp)
    lab = {"role": "edge", "id": "3"}
    for direction, n in (("udp_in", 11), ("udp_out", 21), ("tun_in", 22), ("tun_out", 10)):
        assert value(got, "fabric_packets_total", direction=direction, **lab) == n
    assert value(got, "fabric_bytes_total", direction="udp_in", **lab) == 1005
    assert value(got, "fabric_bytes_total", direction="udp_out", **lab) == 2007
    assert value(got, "fabric_drops_total", reason="replay", **lab) == 3
    assert value(got, "fabric_drops_total", reason="bad_mac1", **lab) == 2
    assert value(got, "fabric_frames_pushed_total", **lab) == 4
    assert value(got, "fabric_packets_pushed_total", **lab) == 30
    assert value(got, "fabric_batch_size", **lab) == 7.5
    assert value(got, "fabric_events_total", event="keepalives", **lab) == 5
    assert value(got, "fabric_initiations_total", **lab) == 1
    assert value(got, "fabric_queue_depth", queue="reorder_inflight", **lab) == 3
    assert value(got, "fabric_queue_depth", queue="reorder_held", **lab) == 1
    assert value(got, "fabric_queue_depth", queue="staged", **lab) == 2
    assert value(got, "fabric_sessions", **lab) == 2
    assert value(got, "fabric_peers", **lab) == 2
    assert value(got, "fabric_crypto_in_workers", **lab) == 1
    assert value(got, "fabric_busy_ratio", **lab) == 0.25
    assert value(got, "fabric_under_load", **lab) == 1
    assert value(got, "fabric_banned_sources", **lab) == 1
    assert value(got, "fabric_process_info", pid=str(os.getpid())) == 1
    # read at scrape time: a later counter shows up in the next scrape
    edge.counters["udp_in"] += 5
    assert value(exposition(exp), "fabric_packets_total", direction="udp_in") == 16


def test_histogram_buckets_follow_prometheus_le() -> None:
    h = metrics.Histogram((1, 2, 4))
    for v in (0.5, 1, 1.5, 2, 3, 9):
        h.observe(v)
    buckets, total = h.cumulative()
    assert buckets == [("1.0", 2), ("2.0", 4), ("4.0", 5), ("+Inf", 6)]
    assert total == 17.0 and h.count == 6


def test_worker_frame_stats_by_kind() -> None:
    fs = metrics.FrameStats()
    enc = frames.Frame(frames.ENCRYPT, 0, 1, 0, frames.NO_ADDR, [b"a"] * 5).encode()[0]
    dec = frames.Frame(frames.DECRYPT, 0, 1, 0, frames.NO_ADDR, [b"a"] * 64).encode()[0]
    fs.observe(enc, 0.0002)
    fs.observe(enc, 0.003)
    fs.observe(dec, 0.0004)
    fs.observe(b"\x01", 0.00001)  # too short to be a header
    worker = SimpleNamespace(counters={"encrypted": 10, "decrypted": 64, "drop_decrypt": 1, "handshakes": 2},
                             frame_stats=fs, sessions={7: None}, peers={}, edges={0: {}},
                             sides={0: SimpleNamespace(pending_count=lambda: 1)})
    exp = metrics.Exporter("worker", 1, "127.0.0.1:1")
    exp.source = lambda f: metrics.worker_metrics(f, worker)
    got = exposition(exp)
    lab = {"role": "worker", "id": "1"}
    assert value(got, "fabric_worker_frame_seconds_count", kind="encrypt", **lab) == 2
    assert value(got, "fabric_worker_frame_seconds_bucket", kind="encrypt", le="0.00025", **lab) == 1
    assert value(got, "fabric_worker_frame_seconds_sum", kind="encrypt", **lab) == pytest.approx(0.0032)
    assert value(got, "fabric_worker_frame_seconds_count", kind="bad", **lab) == 1
    assert value(got, "fabric_worker_batch_packets_bucket", kind="decrypt", le="32.0", **lab) == 0
    assert value(got, "fabric_worker_batch_packets_bucket", kind="decrypt", le="64.0", **lab) == 1
    assert value(got, "fabric_worker_batch_packets_sum", kind="encrypt", **lab) == 10
    assert value(got, "fabric_crypto_packets_total", op="encrypt", **lab) == 10
    assert value(got, "fabric_crypto_packets_total", op="decrypt", **lab) == 64
    assert value(got, "fabric_drops_total", reason="decrypt", **lab) == 1
    assert value(got, "fabric_handshakes_total", **lab) == 2
    assert value(got, "fabric_queue_depth", queue="pending_handshakes", **lab) == 1
    assert value(got, "fabric_sessions", **lab) == 1
    assert fs.counters() == {"frames_handled": 4, "frame_time_us": 3610}


def test_broker_metrics_and_reports(tmp_path: Path) -> None:
    sd = StateDir.at(tmp_path / "state").ensure()
    b = Broker(sd, ["198.19.100.1/24"], 51820)
    reply = b.admin({"op": "peer_add", "name": "alice"}, time.time())
    assert reply["ok"]
    from fabric.protocols.wireguard.crypto import key_from_base64

    pub = key_from_base64(reply["public_key"])
    now = time.time()
    b.on_report({"role": "edge", "id": 0, "pid": 10, "counters": {"udp_in": 4}, "peers": {pub: [100, 200, 1, 2]},
                 "gauges": {"sessions": 1, "queue_staged": 0}, "metrics": "127.0.0.1:9581"}, now)
    b.on_report({"role": "worker", "id": 0, "pid": 11, "counters": {"frames_handled": 3},
                 "gauges": {"sessions": 1}, "metrics": "127.0.0.1:9582"}, now - 60)  # long gone
    status = b.admin({"op": "status"}, now)
    assert {(p["role"], p["metrics"]) for p in status["processes"]} == {
        ("edge", "127.0.0.1:9581"), ("worker", "127.0.0.1:9582")}
    assert status["broker"]["gauges"]["peers"] == 1
    stats = b.admin({"op": "stats"}, now)
    assert stats["counters"]["worker.frames_handled"] == 3
    assert stats["gauges"]["edge.sessions"] == 1
    assert "worker.sessions" not in stats["gauges"]  # a dead process's gauges are not current
    exp = metrics.Exporter("broker", 0, "127.0.0.1:1")
    exp.source = lambda f: metrics.broker_metrics(f, b, 5.0)
    got = exposition(exp)
    assert value(got, "fabric_peers", role="broker") == 1
    assert value(got, "fabric_peer_bytes_total", peer="alice", protocol="wireguard", direction="rx") == 100
    assert value(got, "fabric_peer_packets_total", peer="alice", direction="tx") == 2
    assert value(got, "fabric_processes", process_role="edge", state="alive") == 1
    assert value(got, "fabric_processes", process_role="worker", state="gone") == 1


def test_reports_with_bad_metrics_fields_are_refused() -> None:
    good = {"role": "edge", "id": 0, "pid": 1, "gauges": {"sessions": 1}, "metrics": "127.0.0.1:9581"}
    assert sanitize_report(good) is not None
    bad: dict[str, Any]
    for bad in ({"gauges": {"sessions": -1}}, {"gauges": []}, {"gauges": {1: 1}}, {"metrics": 9581},
                {"metrics": "x" * 300}):
        assert sanitize_report({**good, **bad}) is None, bad


def test_addresses_and_layout() -> None:
    assert metrics.parse_address("127.0.0.1:9580") == ("127.0.0.1", 9580)
    assert metrics.parse_address("[::1]:9580") == ("::1", 9580)
    assert metrics.layout("127.0.0.1:9580", 2, 3) == {
        "broker": "127.0.0.1:9580", "edge-0": "127.0.0.1:9581", "edge-1": "127.0.0.1:9582",
        "worker-0": "127.0.0.1:9583", "worker-1": "127.0.0.1:9584", "worker-2": "127.0.0.1:9585",
        "up": "127.0.0.1:9586"}
    assert metrics.child_address("[::1]:9000", "worker", 1, 4) == "[::1]:9006"
    for bad in ("9580", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "host.example:9580", ":9580"):
        with pytest.raises(ConfigError, match="--metrics"):
            metrics.parse_address(bad)
    with pytest.raises(ConfigError, match="lower base"):
        metrics.layout("127.0.0.1:65534", 2, 2)


@pytest.mark.parametrize("bad", ["127.0.0.1", 9580, "127.0.0.1:99999"])
def test_config_key_is_validated(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^server\.metrics: .*e\.g\. .*127\.0\.0\.1:9580"):
        parse({"server": {"metrics": bad}})
    assert parse({"server": {"metrics": "127.0.0.1:9580"}}).server.metrics == "127.0.0.1:9580"
    assert parse({}).server.metrics is None


def _taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_endpoint_serves_and_refuses_a_taken_port() -> None:
    addr = f"127.0.0.1:{_free_port()}"
    exp = metrics.start(addr, "worker", 0)
    assert exp is not None
    exp.source = lambda f: f.counters({"drop_short": 4})
    try:
        got = metrics.scrape(addr)
        assert got[("fabric_drops_total", (("id", "0"), ("reason", "short"), ("role", "worker")))] == 4
        assert any(name == "process_cpu_seconds_total" for name, _ in got)
        with pytest.raises(RuntimeError, match=f"metrics port {addr} is in use.*pick another"):
            metrics.start(addr, "edge", 1)
        with pytest.raises(RuntimeError, match="in use"):
            metrics.check_free([addr])
    finally:
        exp.close()
    metrics.check_free([addr])  # closed: free again
    assert metrics.start(None, "edge", 0) is None


def _fabric(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fabric_argv(*args), cwd=ROOT, env=fabric_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("role", ["broker", "edge", "worker"])
def test_process_with_a_taken_port_exits_with_one_line(role: str, tmp_path: Path) -> None:
    sock, port = _taken_port()
    tun = new_prefix("fm")[:15]
    extra = {"broker": [], "edge": ["--id", "0", "--tun", tun], "worker": ["--id", "0"]}[role]
    try:
        cp = _fabric(role, "--state-dir", str(tmp_path), "--metrics", f"127.0.0.1:{port}", *extra)
    finally:
        sock.close()
    assert cp.returncode == 1, cp
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    assert f"metrics port 127.0.0.1:{port} is in use" in lines[0] and "pick another" in lines[0]
    assert not (tmp_path / "broker.state").exists()  # the broker stopped before doing anything
    assert not Path(f"/sys/class/net/{tun}").exists()  # the edge never touched the TUN


@pytest.mark.parametrize("flag", ["nonsense", "127.0.0.1:0", "localhost"])
def test_bad_flag_is_a_usage_error(flag: str) -> None:
    cp = _fabric("worker", "--id", "0", "--metrics", flag)
    assert cp.returncode == 2
    assert "--metrics" in cp.stderr and "127.0.0.1:9580" in cp.stderr
    assert "Traceback" not in cp.stderr


# --- end to end ------------------------------------------------------------------------------

SCRAPE = """
import json, sys
from fabric.ops.metrics import scrape
print(json.dumps({a: [[n, dict(ls), v] for (n, ls), v in scrape(a).items()] for a in sys.argv[1:]}))
"""


def scrape_all(topo: Topology, addrs: list[str]) -> dict[str, Samples]:
    """Scrape every endpoint from inside the server namespace (their loopback)."""
    cp = topo.run(topo.server_ns, [sys.executable, "-c", SCRAPE, *addrs], env=fabric_env())
    data = json.loads(cp.stdout)
    return {a: {(n, tuple(sorted(ls.items()))): v for n, ls, v in rows} for a, rows in data.items()}


@pytest.mark.netns
def test_up_with_metrics_taken_port_starts_nothing() -> None:
    with Topology(clients=1) as topo:
        base = 9580
        # something else listens on the second port of the layout (edge 0)
        hold = topo.popen(topo.server_ns, [sys.executable, "-c",
                                           "import socket,time; s=socket.socket(); "
                                           f"s.bind(('127.0.0.1', {base + 1})); s.listen(); time.sleep(120)"])
        for _ in range(100):
            if topo.tcp_listening(topo.server_ns, "127.0.0.1", base + 1):
                break
            time.sleep(0.1)
        tun = topo.ifname("t")
        cp = topo.run(topo.server_ns, fabric_argv("up", "--state-dir", str(topo.workdir / "state"),
                                                  "--tun", tun, "--edges", "1", "--workers", "1",
                                                  "--metrics", f"127.0.0.1:{base}"),
                      check=False, env=fabric_env(), timeout=60)
        topo.stop(hold)
        assert cp.returncode == 1, cp
        lines = cp.stderr.strip().splitlines()
        assert len(lines) == 1, cp.stderr
        assert f"metrics port 127.0.0.1:{base + 1} is in use" in lines[0]
        assert not topo.link_exists(topo.server_ns, tun)
        ps = subprocess.run(["ip", "netns", "pids", topo.server_ns], capture_output=True, text=True)
        assert ps.stdout.split() == [], "processes left behind"


@pytest.mark.netns
def test_metrics_end_to_end(topo2: Topology) -> None:
    edges, workers, base = 2, 2, 9580
    # crypto in workers: their frame histograms get samples
    fab = FabricCluster(topo2, address="198.19.100.1/24", edges=edges, workers=workers, mode="up",
                        crypto="workers")
    fab.extra["up"] = ["--metrics", f"127.0.0.1:{base}"]
    fab.start()
    try:
        ports = metrics.layout(f"127.0.0.1:{base}", edges, workers)
        client = fab.connect_client(1, "alice")
        # every process announces its endpoint to the broker (status lists them)
        deadline = time.monotonic() + 15
        while True:
            status = fab.status()
            listed = {f"{p['role']}-{p['id']}": p.get("metrics") for p in status["processes"] if p["alive"]}
            listed["broker"] = status["broker"].get("metrics")
            if all(listed.get(k) == v for k, v in ports.items() if k != "up") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {k: listed.get(k) for k in ports if k != "up"} == {k: v for k, v in ports.items() if k != "up"}
        addrs = list(ports.values())
        before = scrape_all(topo2, addrs)
        pings = 10
        r = client.ping("198.19.100.1", count=pings)
        assert r.all_ok, r.output
        after = scrape_all(topo2, addrs)

        def edge_sum(samples: dict[str, Samples], name: str, **labels: str) -> float:
            return sum(value(samples[ports[f"edge-{i}"]], name, **labels) for i in range(edges))

        for direction in ("udp_in", "udp_out", "tun_in", "tun_out"):
            rose = edge_sum(after, "fabric_packets_total", direction=direction) - edge_sum(
                before, "fabric_packets_total", direction=direction)
            assert rose >= pings, (direction, rose)
        for direction in ("udp_in", "udp_out"):
            rose = edge_sum(after, "fabric_bytes_total", direction=direction) - edge_sum(
                before, "fabric_bytes_total", direction=direction)
            assert rose >= pings * 84, (direction, rose)  # at least the 84-byte inner packets
        broker = after[ports["broker"]]
        assert value(broker, "fabric_sessions", role="broker") == 1
        assert value(broker, "fabric_peers", role="broker") == 1
        assert value(broker, "fabric_handshakes_total", role="broker") >= 1
        assert value(broker, "fabric_processes", process_role="edge", state="alive") == edges
        for i in range(edges):
            assert value(after[ports[f"edge-{i}"]], "fabric_sessions", role="edge", id=str(i)) == 1
        frames_timed = sum(value(after[ports[f"worker-{j}"]], "fabric_worker_frame_seconds_count",
                                 role="worker", id=str(j)) for j in range(workers))
        assert frames_timed > 0
        crypto = sum(value(after[ports[f"worker-{j}"]], "fabric_crypto_packets_total", op=op)
                     - value(before[ports[f"worker-{j}"]], "fabric_crypto_packets_total", op=op)
                     for j in range(workers) for op in ("encrypt", "decrypt"))
        assert crypto >= 2 * pings
        sup = after[ports["up"]]
        for name in ("broker", *(f"edge-{i}" for i in range(edges)), *(f"worker-{j}" for j in range(workers))):
            assert value(sup, "fabric_process_up", process=name) == 1
            assert value(sup, "fabric_restarts_total", process=name) == 0
        fab.check_alive()
    finally:
        fab.stop()
