"""``fabric bench``: parsing, ratios and the table (fast, no network), and short
live runs in namespaces (``netns``): wireguard-go and the fabric, and OpenVPN 2.6
and the fabric serving the same openvpn client."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fabric.testbed import bench
from fabric.testbed.testnet import fabric_env

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- unit


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p


def test_defaults() -> None:
    a = _parser().parse_args([])
    assert a.seconds == 8.0 and a.systems == ["wg", "ovpn", "fabric"]
    assert (a.edges, a.workers, a.scaling, a.json, a.rounds) == (2, 2, False, None, 3)


def test_parse_systems_aliases_order_and_errors() -> None:
    assert bench.parse_systems("fabric, wg") == ["wg", "fabric"]
    assert bench.parse_systems("openvpn,wireguard-go,wg") == ["wg", "ovpn"]
    for bad in ("", ",", "ipsec", "wg,tinc"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_systems(bad)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--systems", "nope"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--seconds", "0"])


def test_tests_parse_in_canonical_order() -> None:
    assert [t.name for t in bench.parse_tests("tcp1-down, TCP1-UP,tcp1-down")] == ["tcp1-up", "tcp1-down"]
    for bad in ("", ",", "tcp2-up", "tcp1-up,ping"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_tests(bad)
    a = _parser().parse_args(["--tests", "udp64-down", "--crypto", "edge"])
    assert [t.name for t in a.tests] == ["udp64-down"] and a.crypto == "edge"
    assert [t.name for t in _parser().parse_args([]).tests] == [t.name for t in bench.TESTS]
    for argv in (["--tests", "nope"], ["--crypto", "gpu"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)


def test_plan_crypto_applies_to_the_fabric_run() -> None:
    specs, _ = bench.plan(["wg", "fabric"], 2, 2, scaling=False, ncpu=2, crypto="edge")
    assert [(s.name, s.crypto) for s in specs] == [("wg", None), ("fabric", "edge")]
    specs, _ = bench.plan(["fabric"], 2, 2, scaling=True, ncpu=2, crypto="workers")
    assert "fabric-workers" not in [s.name for s in specs]  # the base run is that already
    assert {s.name: s.crypto for s in specs}["fabric"] == "workers"


def test_plan_scaling() -> None:
    specs, notes = bench.plan(["wg", "fabric"], 2, 2, scaling=True, ncpu=2)
    assert [s.name for s in specs] == ["wg", "fabric", "fabric-1e1w", "fabric-workers", "fabric-1cpu", "fabric-2cpu"]
    assert any("2 edge(s)/2 worker(s)" in n for n in notes)  # 2/2 is the base run
    one = {s.name: s for s in specs}
    assert (one["fabric-1e1w"].edges, one["fabric-1e1w"].workers, one["fabric-1e1w"].cpus) == (1, 1, None)
    assert one["fabric-1cpu"].cpus == "0" and one["fabric-2cpu"].cpus == "0,1"
    assert one["fabric-workers"].crypto == "workers" and one["fabric"].crypto is None
    assert "crypto in workers" in one["fabric-workers"].describe()
    specs, _ = bench.plan(["fabric"], 3, 1, scaling=True, ncpu=1)
    assert [s.name for s in specs] == ["fabric", "fabric-1e1w", "fabric-2e2w", "fabric-workers", "fabric-1cpu"]
    specs, notes = bench.plan(["wg"], 2, 2, scaling=True, ncpu=2)
    assert [s.name for s in specs] == ["wg"] and notes
    specs, notes = bench.plan(["ovpn", "fabric"], 2, 2, scaling=False, ncpu=2)
    assert [s.name for s in specs] == ["ovpn", "fabric"] and not notes


def test_parse_proc_stat_with_awkward_comm() -> None:
    fields = ["S", "42"] + ["0"] * 9 + ["250", "75"] + ["0"] * 30
    ppid, cpu = bench.parse_proc_stat("1234 (we ird) (x)) " + " ".join(fields))
    assert ppid == 42 and cpu == pytest.approx(325 / bench.CLK_TCK)


def test_proc_stat_of_this_process() -> None:
    st = bench.proc_stat(os.getpid())
    assert st is not None and st[0] == os.getppid() and st[1] >= 0
    assert os.getpid() in bench.descendants(os.getppid())
    assert bench.proc_stat(2**22 + 12345) is None


def test_fabric_role() -> None:
    py = "/tmp/venv/bin/python"
    assert bench.fabric_role([py, "-m", "fabric", "edge", "--id", "0"]) == "edge"
    assert bench.fabric_role([py, "-m", "fabric", "-vv", "worker"]) == "worker"
    assert bench.fabric_role([py, "-m", "fabric", "up", "--edges", "2"]) == "up"
    assert bench.fabric_role(["/usr/local/bin/fabric", "broker"]) == "broker"
    assert bench.fabric_role([py, "-m", "fabric", "admin", "status"]) == "other"
    assert bench.fabric_role(["wireguard-go", "-f", "fabwgs"]) is None
    assert bench.fabric_role([py, "-m", "pytest", "tests/fabric"]) is None
    assert bench.fabric_role([]) is None


def test_fabric_pids_merges_admin_status() -> None:
    status = {"broker": {"pid": 999_999_1}, "processes": [
        {"role": "edge", "pid": 999_999_2, "alive": True},
        {"role": "worker", "pid": 999_999_3, "alive": False},
        {"role": "edge", "pid": "junk"},
    ]}
    pids = bench.fabric_pids(2**22 + 7, status)  # no such root: status only
    assert pids == {999_999_1: "broker", 999_999_2: "edge"}


def test_cpu_delta() -> None:
    before = {1: ("edge", 1.0), 2: ("edge", 2.0), 3: ("worker", 5.0), 4: ("broker", 1.0)}
    after = {1: ("edge", 1.5), 2: ("edge", 2.25), 3: ("worker", 6.0), 5: ("worker", 0.5)}
    comp, gone = bench.cpu_delta(before, after)
    assert comp == pytest.approx({"edge": 0.75, "worker": 1.5, "broker": 0.0})
    assert gone == [4]


UDP_JSON: dict[str, Any] = {"end": {
    "sum": {"seconds": 2.0, "bytes": 128000, "bits_per_second": 512000.0, "packets": 4000,
            "lost_packets": 1000, "lost_percent": 25.0},
    "sum_sent": {"seconds": 2.0, "bytes": 256000, "bits_per_second": 1024000.0, "packets": 4000},
    "sum_received": {"seconds": 2.0, "bytes": 192000, "bits_per_second": 768000.0,
                     "packets": 4000, "lost_packets": 1000, "lost_percent": 25.0},
}}
TCP_JSON: dict[str, Any] = {"end": {
    "sum_sent": {"seconds": 8.0, "bytes": 600_000_000, "bits_per_second": 6e8, "retransmits": 17},
    "sum_received": {"seconds": 8.01, "bytes": 500_000_000, "bits_per_second": 5e8},
}}


def test_summarize_tcp() -> None:
    s = bench.summarize_iperf(TCP_JSON, udp=False)
    assert s["mbit_s"] == pytest.approx(500.0) and s["sent_mbit_s"] == pytest.approx(600.0)
    assert s["bytes"] == 500_000_000 and s["retransmits"] == 17 and s["pps"] is None


def test_summarize_udp_counts_what_arrived() -> None:
    s = bench.summarize_iperf(UDP_JSON, udp=True)
    assert s["pps"] == pytest.approx(1500.0) and s["packets_received"] == 3000
    assert s["sent_pps"] == pytest.approx(2000.0) and s["loss_pct"] == 25.0
    assert s["mbit_s"] == pytest.approx(0.768) and s["bytes"] == 192000
    # iperf3 before 3.?: only "sum" (the receiver's view)
    old = {"end": {"sum": UDP_JSON["end"]["sum"]}}
    s = bench.summarize_iperf(old, udp=True)
    assert s["pps"] == pytest.approx(1500.0) and s["mbit_s"] == pytest.approx(0.512)
    assert bench.summarize_iperf({}, udp=True)["pps"] == 0.0


def test_per_gb() -> None:
    assert bench.per_gb(13.0, 1_000_000_000) == pytest.approx(13.0)
    assert bench.per_gb(1.0, 250_000_000) == pytest.approx(4.0)
    assert bench.per_gb(1.0, 0) is None


def _runs() -> list[dict[str, Any]]:
    return [
        {"system": "wg", "test": "tcp1-up", "mbit_s": 500.0, "pps": None, "retransmits": 3,
         "server_cpu_s_per_gb": 10.0, "host_cpu_busy_pct": 99.0, "host_steal_pct": 7.3,
         "cpu_s_per_gb_by_component": {"wireguard-go": 10.0}},
        {"system": "wg", "test": "udp64-up", "mbit_s": 10.0, "pps": 20000.0, "loss_pct": 50.0,
         "server_cpu_s_per_gb": 400.0},
        {"system": "fabric", "test": "tcp1-up", "mbit_s": 250.0, "pps": None, "retransmits": 900,
         "server_cpu_s_per_gb": 30.0,
         "cpu_s_per_gb_by_component": {"edge": 20.0, "worker": 9.5, "broker": 0.5, "up": 0.0}},
        {"system": "fabric", "test": "tcp4-up", "mbit_s": 300.0, "server_cpu_s_per_gb": 25.0},
        {"system": "ovpn", "test": "udp64-up", "mbit_s": 0.0, "pps": None, "vpn": "openvpn",
         "server_cpu_s_per_gb": None, "error": "iperf3: unable to connect\nmore"},
    ]


def test_ratios_to_wireguard_go() -> None:
    runs = _runs()
    bench.add_ratios(runs)
    by = {(r["system"], r["test"]): r for r in runs}
    assert by["wg", "tcp1-up"]["mbit_ratio_wg"] == 1.0 and by["wg", "tcp1-up"]["cpu_ratio_wg"] == 1.0
    assert by["fabric", "tcp1-up"]["mbit_ratio_wg"] == pytest.approx(0.5)
    assert by["fabric", "tcp1-up"]["cpu_ratio_wg"] == pytest.approx(3.0)
    assert by["fabric", "tcp4-up"]["mbit_ratio_wg"] is None  # no wg run of that test
    assert by["ovpn", "udp64-up"]["mbit_ratio_wg"] == 0.0
    assert by["ovpn", "udp64-up"]["cpu_ratio_wg"] is None
    # no baseline at all: every ratio is None, nothing raises
    runs = [r for r in _runs() if r["system"] != "wg"]
    bench.add_ratios(runs)
    assert all(r["mbit_ratio_wg"] is None and r["cpu_ratio_wg"] is None for r in runs)


def test_table() -> None:
    runs = _runs()
    bench.add_ratios(runs)
    text = bench.format_table(runs)
    lines = text.splitlines()
    assert len(lines) == 1 + len(runs)
    assert lines[0].split()[:5] == ["SYSTEM", "TEST", "CLIENT", "MBIT/S", "xREF"]
    fab = next(line for line in lines if line.startswith("fabric") and "tcp1-up" in line)
    assert "250.0" in fab and "0.50" in fab and "3.00" in fab and "900" in fab
    assert "edge 20.0 worker 9.5 broker 0.5 up 0.0" in fab
    udp = next(line for line in lines if line.startswith("wg") and "udp64-up" in line)
    assert "20000" in udp and "50.0" in udp
    wg = next(line for line in lines if line.startswith("wg") and "tcp1-up" in line)
    assert "wireguard-go" not in wg  # a single component is not broken down
    assert "STEAL%" in lines[0] and wg.split()[-2:] == ["99", "7.3"]
    bad = next(line for line in lines if line.startswith("ovpn"))
    assert "failed" in bad and "unable to connect" in bad and "more" not in bad
    # columns line up: every MBIT/S cell ends where the header does
    end = lines[0].index("MBIT/S") + len("MBIT/S")
    for line in lines[1:]:
        if "failed" not in line:
            assert line[end - 1] != " " and line[end] == " "
    assert bench.format_table([]).startswith("SYSTEM")


def test_rtt_lines() -> None:
    text = bench.format_rtt({"wg": {"rtt_ms": 0.5}, "fabric": {"rtt_ms": 2.0, "ping_loss": 1},
                             "ovpn": {"rtt_ms": None}})
    assert "wg             0.500 ms" in text
    assert "x4.00 wg" in text and "(1 lost)" in text
    assert "ovpn           - ms" in text


def test_json_shape() -> None:
    runs = _runs()
    bench.add_ratios(runs)
    doc = bench.to_json(runs, {"wg": {"rtt_ms": 0.5}}, {"seconds": 1.0})
    again = json.loads(json.dumps(doc))
    assert set(again) >= {"runs", "systems", "seconds"}
    for r in again["runs"]:
        assert {"system", "test", "mbit_s", "server_cpu_s_per_gb"} <= set(r)


def test_test_matrix() -> None:
    names = [t.name for t in bench.TESTS]
    assert names == ["tcp1-up", "tcp4-up", "tcp1-down", "tcp4-down", "udp64-up", "udp64-down"]
    udp = [t for t in bench.TESTS if t.udp]
    assert all(t.iperf_extra() == ["-u", "-l", "64", "-b", bench.UDP_RATE] for t in udp)
    assert {t.reverse for t in bench.TESTS} == {False, True}
    assert {t.parallel for t in bench.TESTS if not t.udp} == {1, 4}


def test_bench_help() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "fabric.testbed.bench", "--help"],
        capture_output=True, text=True, timeout=30, env=fabric_env(), cwd=ROOT,
    )
    assert cp.returncode == 0, cp.stderr
    for opt in ("--seconds", "--systems", "--edges", "--workers", "--scaling", "--json"):
        assert opt in cp.stdout


def test_missing_tool_skips_the_system_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bench, "missing_tools",
                        lambda tools: [t for t in tools if t == "openvpn"])
    out = tmp_path / "o.json"
    args = _parser().parse_args(["--systems", "ovpn", "--json", str(out)])
    assert bench.run(args) == 2  # nothing left to measure
    text = capsys.readouterr().out
    assert "skipping ovpn: openvpn not installed (apt-get install openvpn)" in text
    doc = json.loads(out.read_text())
    assert doc["runs"] == [] and doc["skipped"][0]["system"] == "ovpn"


def test_signal_during_teardown_waits_for_it() -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with bench._shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            done.append(1)  # the teardown goes on
    assert done == [1] and signal.getsignal(signal.SIGTERM) == before
    with bench._shielded():  # no signal: no interrupt
        pass


# --------------------------------------------------------------------------- live


def run_bench(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], float, str]:
    """`python -m fabric.testbed.bench --seconds 1 ARGS --json OUT`: the process, its
    JSON, how long it took and its output for assertion messages."""
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "fabric.testbed.bench", "--seconds", "1", *args, "--json", str(out)],
                        capture_output=True, text=True, timeout=240, env=fabric_env(), cwd=ROOT)
    elapsed = time.monotonic() - t0
    print(cp.stdout[-6000:])
    where = f"\nstdout:\n{cp.stdout[-6000:]}\nstderr:\n{cp.stderr[-6000:]}"
    assert out.exists(), f"no JSON (rc {cp.returncode}){where}"
    return cp, json.loads(out.read_text()), elapsed, where


@pytest.mark.netns
def test_bench_wg_and_fabric_one_second(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    cp, doc, elapsed, where = run_bench(out, "--systems", "wg,fabric", "--pings", "5", "--rounds", "2")
    assert cp.returncode == 0, where
    runs = doc["runs"]
    assert isinstance(runs, list) and doc["errors"] == []
    assert {(r["system"], r["test"]) for r in runs} == {
        (s, t.name) for s in ("wg", "fabric") for t in bench.TESTS
    }, where
    for r in runs:
        assert not r.get("error"), r
        assert r["mbit_s"] > 0, r
        assert r["rounds"] == 2 and len(r["mbit_s_rounds"]) == 2 and r["mbit_s"] in r["mbit_s_rounds"], r
        assert r["server_cpu_s_per_gb"] is not None and r["server_cpu_s_per_gb"] >= 0, r
        assert "pps" in r and "rtt_ms" in r and "cpu_by_component" in r
        assert 0 <= r["host_steal_pct"] <= 100, r
        assert set(r["udp_rcvbuf_drops"]) == {"server", "client"}, r
        assert all(v >= 0 for v in r["udp_rcvbuf_drops"].values()), r
        if r["test"].startswith("udp"):
            assert r["pps"] > 0 and 0 <= r["loss_pct"] <= 100, r
        else:
            assert r["pps"] is None
        if r["system"] == "wg":
            assert set(r["cpu_by_component"]) == {"wireguard-go"} and r["mbit_ratio_wg"] == 1.0
        else:
            assert {"edge", "worker", "broker"} <= set(r["cpu_by_component"]), r
            # the edges always work; workers only when the AEAD runs there (--crypto)
            assert r["cpu_by_component"]["edge"] > 0 and r["cpu_by_component"]["worker"] >= 0, r
            assert r["crypto"] == "auto", r
            assert r["mbit_ratio_wg"] is not None and r["mbit_ratio_wg"] > 0
    for s in ("wg", "fabric"):
        assert doc["systems"][s]["rtt_ms"] > 0 and len(doc["systems"][s]["rtt_ms_rounds"]) == 2
    assert doc["rounds"] == 2 and "round 2/2" in cp.stdout
    assert "xREF" in cp.stdout and "idle ping RTT" in cp.stdout
    prefixes = _prefixes(cp.stdout)
    assert len(prefixes) == 4, where  # one topology per system and round
    assert not [n for n in _netns() if n.startswith(tuple(prefixes))], "namespaces left behind"
    assert elapsed < 180, f"took {elapsed:.0f}s{where}"


SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 100
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 5000 1 30 4000 29 0 1 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 7 0 0 0 0
"""
SNMP6 = """Udp6InDatagrams                 	12
Udp6RcvbufErrors                	4
UdpLite6RcvbufErrors            	9
"""


def test_parse_udp_rcvbuf_errors() -> None:
    # /proc/net/snmp as Linux 6.x writes it: the Udp: value line, not UdpLite's
    assert bench.parse_udp_rcvbuf_errors(SNMP) == 29
    assert bench.parse_udp_rcvbuf_errors(SNMP + SNMP6) == 33  # cat of both files
    assert bench.parse_udp_rcvbuf_errors(SNMP6) == 4
    assert bench.parse_udp_rcvbuf_errors("") is None
    assert bench.parse_udp_rcvbuf_errors("Udp: InDatagrams RcvbufErrors\nUdp: 1\n") is None  # cut short
    assert bench.parse_udp_rcvbuf_errors("garbage\nUdp: x\n") is None


def test_parse_udp_rcvbuf_errors_of_this_host() -> None:
    # the kernel's own text parses (the live bench test covers udp_rcvbuf_errors in a namespace)
    with open("/proc/net/snmp") as f:
        here = bench.parse_udp_rcvbuf_errors(f.read())
    assert here is not None and here >= 0


def test_host_stat_line() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    busy, total, steal = bench.parse_host_stat("cpu  100 5 50 800 10 3 2 30 0 0\n")
    assert (busy, total, steal) == (190.0, 1000.0, 30.0)
    assert bench.parse_host_stat("cpu  1 2 3 4")[1] == 10.0  # an old kernel: no steal field
    b0 = bench.host_cpu()
    assert b0[1] > 0 and 0 <= b0[2] <= b0[1] and 0 <= b0[0] <= b0[1]


def test_rounds_rotate_and_the_median_round_is_reported() -> None:
    assert bench.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert bench.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert bench.rotated([], 3) == []
    rs = [{"mbit_s": 300.0, "server_cpu_s_per_gb": 9.0, "x": 1},
          {"mbit_s": 500.0, "server_cpu_s_per_gb": 7.0, "x": 2},
          {"mbit_s": 0.0, "error": "iperf3 died"},
          {"mbit_s": 400.0, "server_cpu_s_per_gb": 8.0, "x": 3}]
    m = bench.median_run(rs)
    assert m["x"] == 3 and m["mbit_s"] == 400.0  # the middle one of the three that ran
    assert m["rounds"] == 4 and m["failed_rounds"] == 1
    assert m["mbit_s_rounds"] == [300.0, 500.0, 0.0, 400.0]
    assert m["server_cpu_s_per_gb_rounds"] == [9.0, 7.0, None, 8.0]
    assert bench.median_run(rs[:2])["x"] == 1  # even count: the lower middle
    assert bench.median_run([rs[2]]).get("error")  # nothing ran: the failure is reported
    assert bench.median([3.0, 1.0, 2.0]) == 2.0 and bench.median([1.0, 2.0]) == 1.5
    assert bench.median([]) is None


def _netns() -> list[str]:
    cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _prefixes(stdout: str) -> set[str]:
    """The namespace prefixes the run printed ("namespaces fabXXXXXX-srv, ...")."""
    out = set()
    for word in stdout.replace(",", " ").split():
        if word.startswith("fab") and word.endswith("-srv"):
            out.add(word[: -len("-srv")])
    return out


# --------------------------------------------------------------------------- floods, clients


def test_flood_tests_are_opt_in_and_named() -> None:
    assert not any(t.flood for t in _parser().parse_args([]).tests)  # the default set has none
    assert [t.name for t in bench.parse_tests("flood")] == ["flood"]
    assert [t.flood for t in bench.parse_tests("floods")] == [
        "initiation", "bad-mac1", "unknown-index", "random", "short", "oversized"]
    assert [t.name for t in bench.parse_tests("floods,tcp1-up")][0] == "tcp1-up"
    assert "closed port" in bench.parse_tests("flood")[0].describe()
    from fabric.testbed.flood import KINDS

    # the bench's floods are WireGuard's (the flood tool's ovpn-* kinds are not bench tests)
    assert {t.flood for t in bench.FLOOD_TESTS} == {k for k in KINDS if not k.startswith("ovpn-")}


def test_clients_and_wg25(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench.parse_client("WG25") == "wg25"
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_client("wg19")
    monkeypatch.delenv("FABRIC_WG25", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    path, looked = bench.find_wg25(str(tmp_path / "nope"))
    assert path is None and "nope" in looked and "on PATH" in looked
    exe = tmp_path / bench.WG25_NAME
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert bench.find_wg25(None)[0] == str(exe)  # found on PATH
    monkeypatch.setenv("FABRIC_WG25", str(exe))
    assert bench.find_wg25(None)[0] == str(exe.resolve())
    specs, _ = bench.plan(["wg", "wg25", "fabric"], 2, 2, scaling=True, ncpu=2, client="wg25", wg25=str(exe))
    by = {s.name: s for s in specs}
    assert (by["wg"].client, by["wg"].binary) == ("wg22", "wireguard-go")
    assert (by["wg25"].client, by["wg25"].binary) == ("wg25", str(exe))
    assert all(s.client == "wg25" and s.binary == str(exe) for s in specs if s.kind == "fabric")
    assert "wireguard-go 0.0.20250522" in by["fabric"].describe()
    specs, _ = bench.plan(["fabric"], 2, 2, scaling=False, ncpu=2)
    assert (specs[0].client, specs[0].binary) == ("wg22", "wireguard-go")


def test_explicit_wg25_client_without_the_binary_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.os, "geteuid", lambda: 0)
    monkeypatch.delenv("FABRIC_WG25", raising=False)
    monkeypatch.setattr(bench, "find_wg25", lambda given: (None, "--wg25 /x, wireguard-go-0.0.20250522 on PATH"))
    assert bench.run(_parser().parse_args(["--client", "wg25", "--systems", "fabric"])) == 2
    assert "looked at --wg25 /x" in capsys.readouterr().err


def test_flood_rows_median_and_table() -> None:
    def row(share: float, new: float | None) -> dict[str, Any]:
        return {"system": "fabric", "test": "flood", "flood": "initiation", "client": "wg25",
                "mbit_s": 500 * share, "ceiling_mbit_s": 500.0, "share_of_ceiling": share,
                "newcomer_s": new, "flood_pps": 118000, "server_cpu_s": 7.5}
    m = bench.median_run([row(0.9, 5.2), row(0.5, None), row(0.95, 5.4)])
    assert m["share_of_ceiling"] == 0.9 and m["newcomer_s"] == 5.2
    assert m["share_of_ceiling_rounds"] == [0.9, 0.5, 0.95] and m["newcomer_s_rounds"] == [5.2, None, 5.4]
    runs = [m, {**row(0.3, None), "system": "wg25", "share_of_ceiling_rounds": [0.3]}]
    bench.add_ratios(runs)  # flood rows are left alone
    assert "mbit_ratio_wg" not in runs[0]
    lines = bench.format_flood_table(runs).splitlines()
    assert lines[0].split()[:6] == ["SYSTEM", "TEST", "CLIENT", "CEILING", "FLOODED", "SHARE%"]
    assert lines[1].split()[:8] == ["fabric", "flood", "wg25", "500", "450", "90", "90", "50"]
    assert "5.2 s" in lines[1] and "118,000" in lines[1]
    assert " no " in lines[2]


def test_baseline_measures_another_checkout_beside_this_one(tmp_path: Path) -> None:
    specs, notes = bench.plan(["wg", "fabric"], 2, 2, scaling=False, ncpu=2, baseline=str(tmp_path))
    assert [(s.name, s.source) for s in specs] == [("wg", None), ("fabric", None), ("fabric-base", str(tmp_path))]
    assert str(tmp_path) in specs[2].describe()
    _, notes = bench.plan(["wg"], 2, 2, scaling=False, ncpu=2, baseline=str(tmp_path))
    assert any("--baseline needs the fabric" in n for n in notes)
    with pytest.raises(SystemExit, match="no fabric/ package"):
        bench._baseline(str(tmp_path))
    assert bench._baseline(str(ROOT)) == str(ROOT)


# --------------------------------------------------------------------------- OpenVPN clients


def test_openvpn_systems_parse_and_plan() -> None:
    assert bench.parse_systems("fabric-openvpn, ovpn") == ["ovpn", "fabric-ovpn"]
    assert bench.parse_systems("FABRIC-OVPN,fabric") == ["fabric", "fabric-ovpn"]
    a = _parser().parse_args(["--systems", "ovpn,fabric-ovpn"])
    assert a.systems == ["ovpn", "fabric-ovpn"]
    specs, notes = bench.plan(["ovpn", "fabric", "fabric-ovpn"], 3, 1, scaling=False, ncpu=2, crypto="workers",
                              client="wg25", wg25="/x/wireguard-go-0.0.20250522")
    by = {s.name: s for s in specs}
    assert [s.name for s in specs] == ["ovpn", "fabric", "fabric-ovpn"] and not notes
    fo = by["fabric-ovpn"]
    # the fabric's shape applies; the wireguard-go client does not: the openvpn client of ovpn
    assert (fo.kind, fo.edges, fo.workers, fo.crypto) == ("fabric-ovpn", 3, 1, "workers")
    assert fo.client == by["ovpn"].client == bench.OVPN_CLIENT and fo.binary == "openvpn"
    assert by["fabric"].client == "wg25"
    assert (fo.vpn, fo.anchor, by["ovpn"].anchor, by["fabric"].anchor) == ("openvpn", "ovpn", "ovpn", "wg")
    for sp in (fo, by["ovpn"]):
        assert "openvpn 2.6 (AES-256-GCM, --disable-dco)" in sp.describe(), sp.describe()
    assert "--openvpn-port" in fo.describe() and "3 edges, 1 workers" in fo.describe()
    # scaling variants stay WireGuard's
    specs, _ = bench.plan(["fabric-ovpn"], 2, 2, scaling=True, ncpu=2)
    assert [s.name for s in specs] == ["fabric-ovpn"]
    # --baseline: the other checkout serves the same openvpn client, in the same rounds
    specs, notes = bench.plan(["ovpn", "fabric-ovpn"], 2, 2, scaling=False, ncpu=2, baseline="/b")
    assert [(s.name, s.kind, s.source, s.client) for s in specs] == [
        ("ovpn", "ovpn", None, "openvpn"), ("fabric-ovpn", "fabric-ovpn", None, "openvpn"),
        ("fabric-ovpn-base", "fabric-ovpn", "/b", "openvpn")] and not notes
    assert specs[2].anchor == "ovpn" and "the code in /b" in specs[2].describe()


def test_floods_skip_openvpn_and_four_clients_skip_wireguard() -> None:
    specs, _ = bench.plan(["wg", "ovpn", "fabric", "fabric-ovpn"], 2, 2, scaling=False, ncpu=2)
    by = {s.name: s for s in specs}
    tests = bench.parse_tests("tcp1-up,flood,clients4")
    assert [t.name for t in tests] == ["tcp1-up", "clients4-up", "clients4-down", "flood"]
    assert [t.clients for t in tests] == [1, 4, 4, 1]
    flood, four = tests[3], tests[1]
    assert "WireGuard" in (bench.skip_reason(by["ovpn"], flood) or "")
    assert "WireGuard" in (bench.skip_reason(by["fabric-ovpn"], flood) or "")
    assert bench.skip_reason(by["fabric"], flood) is None and bench.skip_reason(by["wg"], flood) is None
    assert "OpenVPN" in (bench.skip_reason(by["wg"], four) or "")
    assert bench.skip_reason(by["fabric-ovpn"], four) is None and bench.skip_reason(by["ovpn"], tests[0]) is None
    # namespaces: the attacker and newcomer of the floods, or one per client
    assert {n: bench.clients_needed(sp, tests) for n, sp in by.items()} == {
        "wg": 3, "ovpn": 4, "fabric": 3, "fabric-ovpn": 4}
    assert bench.clients_needed(by["fabric-ovpn"], tests[:1]) == 1
    notes = bench.skip_notes(specs, tests)
    assert any(n.startswith("flood: not run for ovpn, fabric-ovpn") for n in notes), notes
    assert any(n.startswith("clients4-up: not run for wg, fabric ") for n in notes), notes
    assert bench.skip_notes(specs, tests[:1]) == []
    assert "4 clients" in four.describe()


def test_openvpn_rows_are_compared_with_openvpn() -> None:
    def row(system: str, test: str, mbit: float, cpu: float | None, vpn: str) -> dict[str, Any]:
        return {"system": system, "test": test, "mbit_s": mbit, "server_cpu_s_per_gb": cpu, "vpn": vpn,
                "client": "openvpn" if vpn == "openvpn" else "wg25", "pps": None, "retransmits": 5}
    runs = [row("wg", "tcp1-up", 1000.0, 4.0, "wireguard"), row("fabric", "tcp1-up", 500.0, 8.0, "wireguard"),
            row("ovpn", "tcp1-up", 800.0, 8.0, "openvpn"), row("fabric-ovpn", "tcp1-up", 880.0, 4.0, "openvpn"),
            row("fabric-ovpn", "clients4-up", 1200.0, 5.0, "openvpn")]
    bench.add_ratios(runs)
    by = {(r["system"], r["test"]): r for r in runs}
    fo = by["fabric-ovpn", "tcp1-up"]
    assert fo["anchor"] == "ovpn" and fo["mbit_ratio"] == pytest.approx(1.1) and fo["cpu_ratio"] == pytest.approx(0.5)
    assert fo["mbit_ratio_wg"] == pytest.approx(0.88) and fo["cpu_ratio_wg"] == pytest.approx(1.0)  # kept: to wg
    assert by["ovpn", "tcp1-up"]["mbit_ratio"] == 1.0 and by["ovpn", "tcp1-up"]["anchor"] == "ovpn"
    f = by["fabric", "tcp1-up"]
    assert f["anchor"] == "wg" and f["mbit_ratio"] == f["mbit_ratio_wg"] == pytest.approx(0.5)
    assert f["cpu_ratio"] == pytest.approx(2.0)
    assert by["fabric-ovpn", "clients4-up"]["mbit_ratio"] is None  # no ovpn run of that test
    lines = bench.format_table(runs).splitlines()
    line = next(x for x in lines if x.startswith("fabric-ovpn") and "tcp1-up" in x)
    assert line.split()[:5] == ["fabric-ovpn", "tcp1-up", "openvpn", "880.0", "1.10"]
    assert line.split()[8:11] == ["4.0", "0.50", "ovpn"]
    anchor_line = next(x for x in lines if x.startswith("ovpn"))
    assert anchor_line.split()[10] == "-"  # the anchor itself names no REF
    fab = next(x for x in lines if x.startswith("fabric ") and "tcp1-up" in x)
    assert fab.split()[2] == "wg25" and fab.split()[10] == "wg"
    # the idle RTT of each system against its own protocol's anchor
    text = bench.format_rtt({"wg": {"rtt_ms": 0.5}, "ovpn": {"rtt_ms": 0.25, "anchor": "ovpn"},
                             "fabric-ovpn": {"rtt_ms": 1.0, "anchor": "ovpn"}, "fabric": {"rtt_ms": 1.0}})
    assert "x4.00 ovpn" in text and "x2.00 wg" in text and "ovpn           0.250 ms\n" in text


def test_several_clients_are_summed() -> None:
    one = bench.summarize_iperf(TCP_JSON, udp=False)
    assert bench.combine_summaries([one]) == one
    two = {**one, "mbit_s": 100.0, "bytes": 100, "retransmits": 3, "duration_s": 9.0}
    s = bench.combine_summaries([one, two])
    assert s["mbit_s"] == pytest.approx(600.0) and s["bytes"] == 500_000_100 and s["retransmits"] == 20
    assert s["duration_s"] == 9.0 and s["per_client_mbit_s"] == [pytest.approx(500.0), 100.0] and s["pps"] is None
    assert bench.combine_summaries([one, {**two, "retransmits": None}])["retransmits"] is None
    u = bench.summarize_iperf(UDP_JSON, udp=True)
    assert u["packets_lost"] == 1000
    s = bench.combine_summaries([u, u])
    assert s["pps"] == pytest.approx(3000.0) and s["packets_received"] == 6000 and s["loss_pct"] == pytest.approx(25.0)
    t = bench.Target("198.19.100.1", "c1", lambda: {}, client_nss=["c1", "c2"])
    assert t.clients(2) == ["c1", "c2"]
    with pytest.raises(bench.TopologyError):
        t.clients(4)
    assert bench.Target("198.19.100.1", "c1", lambda: {}).clients(1) == ["c1"]


def test_fabric_ovpn_without_openvpn_is_skipped_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bench, "missing_tools", lambda tools: [t for t in tools if t == "openvpn"])
    assert bench.run(_parser().parse_args(["--systems", "fabric-ovpn"])) == 2
    assert "skipping fabric-ovpn: openvpn not installed (apt-get install openvpn)" in capsys.readouterr().out


@pytest.mark.netns
def test_bench_openvpn_and_fabric_ovpn_one_second(tmp_path: Path) -> None:
    """Both OpenVPN systems, the same client: one stream up, and four clients at once;
    the flood asked for is left out with a note (WireGuard systems only)."""
    if not shutil.which("openvpn"):
        pytest.skip("openvpn not installed (apt-get install openvpn)")
    out = tmp_path / "out.json"
    cp, doc, elapsed, where = run_bench(out, "--systems", "ovpn,fabric-ovpn", "--tests", "tcp1-up,clients4-down,flood",
                                        "--pings", "3", "--rounds", "1")
    assert cp.returncode == 0 and doc["errors"] == [], where
    runs = {(r["system"], r["test"]): r for r in doc["runs"]}
    assert set(runs) == {(s, t) for s in ("ovpn", "fabric-ovpn") for t in ("tcp1-up", "clients4-down")}, where
    for (system, test), r in runs.items():
        assert not r.get("error") and r["mbit_s"] > 0, r
        assert r["client"] == "openvpn" and r["vpn"] == "openvpn" and r["anchor"] == "ovpn", r
        assert r["server_cpu_s_per_gb"] is not None and r["server_cpu_s_per_gb"] > 0, r
        if test == "clients4-down":
            assert r["clients"] == 4 and len(r["per_client_mbit_s"]) == 4, r
            assert all(m > 0 for m in r["per_client_mbit_s"]), r  # every client's stream ran
            assert r["mbit_s"] == pytest.approx(sum(r["per_client_mbit_s"])), r
        if system == "ovpn":
            assert set(r["cpu_by_component"]) == {"openvpn"} and r["mbit_ratio"] == 1.0, r
        else:
            assert r["cpu_by_component"]["edge"] > 0 and r["mbit_ratio"] > 0 and r["cpu_ratio"] > 0, r
    for s in ("ovpn", "fabric-ovpn"):
        info = doc["systems"][s]
        assert info["cipher"] == "AES-256-GCM" and "openvpn 2.6" in info["client"], info
        assert info["rtt_ms"] > 0 and info["anchor"] == "ovpn"
    assert any(n.startswith("flood: not run for ovpn, fabric-ovpn") for n in doc["notes"]), doc["notes"]
    assert "xREF" in cp.stdout and re.search(r"fabric-ovpn +[\d.]+ ms +x[\d.]+ ovpn", cp.stdout), where
    prefixes = _prefixes(cp.stdout)
    assert len(prefixes) == 2, where
    assert not [n for n in _netns() if n.startswith(tuple(prefixes))], "namespaces left behind"
    assert elapsed < 180, f"took {elapsed:.0f}s{where}"
