"""`fabric status`: the health view from fixed broker replies, and end to end with a
real fabric and a wireguard-go client in network namespaces."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from fabric.ops import render
from fabric.testbed.testnet import FabricCluster, Topology

NOW = 1_700_000_000.0


def proc(role: str, rid: int, pid: int, age: float, alive: bool | None = None, **extra: Any) -> dict[str, Any]:
    return {"role": role, "id": rid, "pid": pid, "age": age, "alive": age < 5 if alive is None else alive,
            "counters": extra.pop("counters", {}), "rates": extra.pop("rates", {}), **extra}


def reply(*procs: dict[str, Any], peers: int = 1, sessions: int = 1) -> dict[str, Any]:
    return {"ok": True, "broker": {"pid": 100, "seq": 42, "epoch": 7, "counters": {}, "started": NOW - 125},
            "processes": list(procs), "peers": peers, "sessions": sessions}


HEALTHY = reply(
    proc("worker", 0, 301, 0.4, counters={"decrypted": 50, "encrypted": 40}, rates={"decrypted": 10.0, "encrypted": 8.0}),
    proc("edge", 0, 201, 0.2, counters={"udp_in": 60, "tun_in": 45, "drop_short": 3},
         rates={"udp_in": 12.0, "tun_in": 9.5, "drop_short": 0.5}, metrics="http://127.0.0.1:9101/metrics"),
)


def test_a_healthy_fabric() -> None:
    v = render.status_view(HEALTHY, [], NOW, {100: 1.5, 201: 20.0})
    assert v["health"] == "ok" and v["problems"] == []
    assert v["summary"] == "fabric ok: broker up 2m05s, 1 edge, 1 worker up, 1 peer, 1 session"
    assert [(r["role"], r["id"], r["health"]) for r in v["processes"]] == [("edge", 0, "up"), ("worker", 0, "up")]
    edge, worker = v["processes"]
    assert edge["packets_per_s"] == 21.5 and worker["packets_per_s"] == 18.0  # from the counter rates
    assert edge["drops"] == 3 and edge["drops_per_s"] == 0.5
    assert edge["cpu_percent"] == 20.0 and worker["cpu_percent"] is None  # not measured: not local
    assert edge["metrics"] == "http://127.0.0.1:9101/metrics" and worker["metrics"] is None
    assert v["broker"] == {"pid": 100, "uptime": 125.0, "epoch": 7, "seq": 42, "cpu_percent": 1.5, "metrics": None}


def test_status_text_names_every_process_and_ends_with_the_summary() -> None:
    v = render.status_view(HEALTHY, [], NOW, {})
    text = render.to_text(render.status_tables(v, NOW))
    lines = text.splitlines()
    assert lines[0].startswith("broker  pid 100  up 2m05s  epoch 7  seq 42")
    rows = [line.split() for line in lines if line.split()[:1] in (["edge"], ["worker"])]
    assert [r[:4] for r in rows] == [["edge", "0", "201", "up"], ["worker", "0", "301", "up"]]
    assert "21.5" in rows[0] and "http://127.0.0.1:9101/metrics" in rows[0]
    assert lines[-1] == v["summary"]


def test_handshake_load_is_shown_only_when_something_goes_on() -> None:
    quiet = render.status_view(HEALTHY, [], NOW, {})
    assert quiet["load"] == {"under_load": False, "edges_under_load": [], "banned_sources": 0,
                             "cookie_replies_per_s": 0.0, "handshakes_refused_per_s": 0.0,
                             "kernel_drops_per_s": 0.0}
    assert "under load" not in render.to_text(render.status_tables(quiet, NOW))
    flood = reply(
        proc("edge", 0, 201, 0.2, gauges={"under_load": 1, "banned_sources": 1},
             rates={"cookie_replies": 20.0, "drop_cookie_ratelimited": 400.0, "drop_ratelimited": 5.0,
                    "udp_socket_drops": 59000.0}),
        proc("edge", 1, 202, 0.3, gauges={"under_load": 1, "banned_sources": 1},
             rates={"cookie_replies": 19.0, "drop_cookie_budget": 1.0, "udp_socket_drops": 60000.0}),
        proc("edge", 2, 203, 90.0, gauges={"under_load": 1, "banned_sources": 5}),  # gone: not counted
        proc("worker", 0, 301, 0.4),
    )
    v = render.status_view(flood, [], NOW, {})
    assert v["load"] == {"under_load": True, "edges_under_load": [0, 1], "banned_sources": 2,
                         "cookie_replies_per_s": 39.0, "handshakes_refused_per_s": 406.0,
                         "kernel_drops_per_s": 119000.0}
    assert v["health"] == "ok"  # a flood the fabric holds off is not a fault
    text = render.to_text(render.status_tables(v, NOW))
    assert ("under load (edges 0, 1): handshakes need a cookie; 2 source(s) banned; per second: "
            "39 cookie replies, 406 handshakes refused, 119,000 dropped by the kernel") in text


def test_a_silent_process_degrades_and_is_named() -> None:
    st = reply(*HEALTHY["processes"], proc("edge", 1, 202, 12.0))
    v = render.status_view(st, [], NOW)
    assert v["health"] == "degraded"
    assert v["problems"] == ["edge 1 (pid 202) silent for 12s"]
    assert v["summary"].startswith("fabric degraded: edge 1 (pid 202) silent for 12s (1 edge, 1 worker up")


def test_a_restarted_process_counts_a_restart_not_a_problem() -> None:
    st = reply(*HEALTHY["processes"], proc("worker", 0, 299, 30.0))  # the pid before the restart
    v = render.status_view(st, [], NOW)
    assert v["health"] == "ok", v["problems"]
    worker = next(r for r in v["processes"] if r["role"] == "worker")
    assert worker["pid"] == 301 and worker["restarts"] == 1


def test_a_long_gone_process_is_shown_but_only_degrades_when_its_role_is_empty() -> None:
    st = reply(*HEALTHY["processes"], proc("edge", 3, 203, render.GONE_AFTER + 1))
    v = render.status_view(st, [], NOW)
    assert v["health"] == "ok" and [r["health"] for r in v["processes"] if r["id"] == 3] == ["gone"]
    no_workers = reply(HEALTHY["processes"][1], proc("worker", 0, 301, render.GONE_AFTER + 5))
    v = render.status_view(no_workers, [], NOW)
    assert v["health"] == "degraded"
    assert v["problems"] == ["no worker is up: no packet can be decrypted: start `fabric worker` (or `fabric up`)"]


def test_no_rates_yet_shows_no_load() -> None:
    v = render.status_view(reply(proc("edge", 0, 201, 0.1), proc("worker", 0, 301, 0.1)), [], NOW)
    assert [r["packets_per_s"] for r in v["processes"]] == [None, None]
    text = render.to_text(render.status_tables(v, NOW))
    edge = next(line.split() for line in text.splitlines() if line.startswith("edge "))
    assert edge[:8] == ["edge", "0", "201", "up", "0s", "ago", "0", "-"]  # PKT/S unknown, not 0


def test_cpu_percent_of_local_fabric_processes_only() -> None:
    import subprocess
    import sys

    # a busy process whose command line names fabric, like `python -m fabric edge`
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass", "fabric"])
    try:
        time.sleep(0.2)
        cpu = render.cpu_percent([busy.pid, 1, 2**22 + 12345], interval=0.5)
    finally:
        busy.kill()
        busy.wait()
    assert cpu[1] is None  # init is not a fabric process
    assert cpu[2**22 + 12345] is None  # no such process here (another host's pid)
    measured = cpu[busy.pid]
    assert measured is not None and 5.0 < measured <= 105.0, measured


# --- end to end ----------------------------------------------------------------------------------

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"


def _status(fab: FabricCluster, *args: str) -> tuple[int, str, str]:
    cp = fab.cli("status", "--state-dir", str(fab.state_dir), *args, check=False)
    return cp.returncode, cp.stdout, cp.stderr


def _wait_healthy(fab: FabricCluster, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rc, out, err = _status(fab, "--json")
        view: dict[str, Any] = json.loads(out) if out.strip() else {}
        if rc == 0 and all(r["health"] == "up" for r in view["processes"]):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"fabric status not healthy after {timeout}s: rc={rc} {out} {err}")
        time.sleep(0.5)


@pytest.mark.netns
def test_status_and_stats_of_a_live_fabric(topo2: Topology) -> None:
    fab = FabricCluster(topo2, address=ADDRESS, edges=2, workers=2)
    fab.extra = {"broker": ["--metrics", "127.0.0.1:9580"]}  # loopback of the server's namespace
    fab.start()
    try:
        client = fab.connect_client(1, "alice")
        view = _wait_healthy(fab)
        procs = {(r["role"], r["id"]): r for r in view["processes"]}
        assert set(procs) == {("edge", 0), ("edge", 1), ("worker", 0), ("worker", 1)}
        for label, p in fab.procs.items():
            role, rid = label.rstrip("0123456789"), label[len(label.rstrip("0123456789")):]
            if role == "broker":
                assert view["broker"]["pid"] == p.pid
            else:
                row = procs[(role, int(rid))]
                assert row["pid"] == p.pid and row["alive"] and row["health"] == "up"
                assert row["cpu_percent"] is not None  # local: measured from /proc
        assert [s["peer"] for s in view["sessions"]] == ["alice"]
        assert view["session_count"] == 1 and view["peer_count"] == 1
        assert "9580" in (view["broker"]["metrics"] or ""), view["broker"]

        rc, text, _ = _status(fab)
        assert rc == 0
        for role, rid in procs:
            assert any(line.split()[:3] == [role, str(rid), str(procs[(role, rid)]["pid"])]
                       for line in text.splitlines()), text
        assert "alice" in text and text.splitlines()[-1].startswith("fabric ok: ")
        assert "metrics " in text.splitlines()[0] and "9580" in text.splitlines()[0]

        before = fab.stats()
        assert client.ping(SERVER_IP, count=5, timeout=2).ok
        time.sleep(1.5)  # one report interval
        after = fab.stats()
        for key in ("edge.udp_in", "edge.tun_out"):
            assert after.get(key, 0) >= before.get(key, 0) + 5, (key, before.get(key), after.get(key))
        # decrypted in an edge or a worker (--crypto; the default runs it in the edge)
        decrypted = [d.get("edge.decrypted", 0) + d.get("worker.decrypted", 0) for d in (before, after)]
        assert decrypted[1] >= decrypted[0] + 5, (before, after)
        table = fab.admin("stats").stdout
        row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["edge.udp_in"])
        assert int(row[1].replace(",", "")) >= after["edge.udp_in"]

        # bad input: one line on stderr, non-zero exit, the fabric still serves afterwards
        bad = [
            ("peer", "remove", "nobody", "--state-dir", str(fab.state_dir)),
            ("peer", "add", "alice", "--state-dir", str(fab.state_dir)),
            ("peer", "add", "mallory", "--allowed-ip", fab.peers()[0]["allowed_ips"][0],
             "--state-dir", str(fab.state_dir)),
            ("admin", "sessions", "nobody", "--state-dir", str(fab.state_dir)),
        ]
        for args in bad:
            cp = fab.cli(*args, check=False)
            assert cp.returncode != 0 and len(cp.stderr.strip().splitlines()) == 1, (args, cp.stderr)
            assert "Traceback" not in cp.stderr
        assert [p["name"] for p in fab.peers()] == ["alice"]
        assert client.ping(SERVER_IP, count=3, timeout=2).ok
        fab.check_alive()

        # a dead edge makes the fabric degraded, and status says which
        fab.kill("edge1")
        deadline = time.monotonic() + 20
        while True:
            rc, out, _ = _status(fab, "--json")
            v = json.loads(out)
            if rc == 1:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.5)
        assert v["health"] == "degraded" and any(p.startswith("edge 1 ") for p in v["problems"]), v["problems"]
        assert client.wait_ping(SERVER_IP, timeout=15).ok  # the other edge carries the session
    finally:
        fab.stop()

    # and with the broker stopped, status is unreachable: one line, exit 2
    rc, out, err = _status(fab)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "fabric up" in err, err
