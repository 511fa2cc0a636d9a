"""Invariants under faults (DESIGN.md invariants 1, 3, 4, 5) against a live fabric.

A stock wireguard-go client talks to fabric processes in network namespaces
while the test SIGKILLs a worker, an edge or the broker in the middle of an
iperf3 run, respawns it or adds a new one, and checks afterwards:

* every transport message the fabric sent (tcpdump on the server's veth) has a
  (receiver index, counter) pair never seen before: no nonce reuse;
* the TCP stream through the tunnel went on (iperf3 finished, data flowed again
  within seconds) and no new handshake was needed (wireguard-go's latest
  handshake and the broker's `handshakes` counter unchanged);
* a new worker or edge takes part without a handshake; a respawned broker is
  noticed by every subscriber (new epoch) and accepts new handshakes.

What each fault cost (ping loss and outage, iperf3 stall and retransmits) is
printed; run with ``pytest -s`` to see it.
"""

from __future__ import annotations

import re
import struct
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabric.testbed.monitor import BackgroundIperf, Flow, PingMonitor, wait_for
from fabric.testbed.testnet import (
    Capture,
    FabricCluster,
    Topology,
    WgClient,
    iperf3,
    read_pcap,
    transport_nonces,
)

pytestmark = pytest.mark.netns

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
PORT = 51820


# --------------------------------------------------------------------------- checkers


def nonce_repeats(nonces: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """(receiver index, counter) pairs seen more than once, with their counts.

    The receiver index names the session key (the peer picks a fresh index per
    handshake), so a repeated pair is a repeated (key, nonce)."""
    return {pair: n for pair, n in Counter(nonces).items() if n > 1}


def assert_unique_nonces(pcap: Path, at_least: int) -> list[tuple[int, int]]:
    nonces = transport_nonces(read_pcap(pcap))
    repeats = nonce_repeats(nonces)
    assert not repeats, (
        f"(key, nonce) reuse: {len(repeats)} (receiver index, counter) pairs sent more than "
        f"once, e.g. {sorted(repeats.items())[:10]}"
    )
    assert len(nonces) > at_least, f"capture saw only {len(nonces)} transport messages"
    return nonces


def nonce_summary(nonces: list[tuple[int, int]]) -> str:
    per: dict[int, list[int]] = {}
    for idx, ctr in nonces:
        per.setdefault(idx, []).append(ctr)
    parts = []
    for idx, ctrs in per.items():
        span = max(ctrs) - min(ctrs) + 1
        parts.append(f"index {idx:#010x}: {len(ctrs)} msgs, counters {min(ctrs)}..{max(ctrs)}, "
                     f"{span - len(set(ctrs))} skipped")
    return "; ".join(parts)


# --------------------------------------------------------------------------- measuring


def report(name: str, **numbers: Any) -> None:
    print(f"\n[fault cost] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# --------------------------------------------------------------------------- fixtures


def cluster(topo: Topology, edges: int, workers: int, crypto: str | None = None) -> FabricCluster:
    return FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=edges, workers=workers,
                         mode="separate", crypto=crypto).start()


def session_of(fab: FabricCluster, peer: str) -> dict[str, Any]:
    mine = [s for s in fab.sessions() if s.get("peer") == peer]
    assert mine, fab.sessions()
    return max(mine, key=lambda s: s["session_id"])


def per_edge(fab: FabricCluster, peer: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in session_of(fab, peer)["packets_per_edge"].items()}


def busiest_edge(fab: FabricCluster, peer: str) -> tuple[int, dict[int, int]]:
    """The edge that handled most of the peer's packets, and every edge's count."""
    counts = per_edge(fab, peer)
    return max(counts, key=lambda k: counts[k]), counts


def moved_to_others(fab: FabricCluster, peer: str, killed: int, before: dict[int, int]) -> int:
    """Packets of `peer` handled by edges other than `killed` since `before`."""
    now = per_edge(fab, peer)
    return sum(n - before.get(e, 0) for e, n in now.items() if e != killed)


@dataclass
class HandshakeMark:
    client_hs: float
    broker_hs: int
    sessions: set[int]

    @classmethod
    def take(cls, fab: FabricCluster, client: WgClient) -> HandshakeMark:
        return cls(client.latest_handshake(), fab.stats().get("handshakes", 0),
                   {s["session_id"] for s in fab.sessions()})

    def assert_unchanged(self, fab: FabricCluster, client: WgClient, what: str) -> None:
        now = HandshakeMark.take(fab, client)
        assert now.client_hs == self.client_hs, (
            f"{what}: wireguard-go made a new handshake ({self.client_hs} -> {now.client_hs})")
        assert now.broker_hs == self.broker_hs, (
            f"{what}: broker committed {now.broker_hs - self.broker_hs} new handshake(s)")
        assert now.sessions == self.sessions, f"{what}: sessions {self.sessions} -> {now.sessions}"


# --------------------------------------------------------------------------- checker self-test


def _pcap(payloads: list[bytes]) -> bytes:
    """A classic Ethernet pcap of UDP datagrams 198.18.1.1:51820 -> 198.18.1.2:40000."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i, p in enumerate(payloads):
        udp = struct.pack(">HHHH", PORT, 40000, 8 + len(p), 0) + p
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                         bytes([198, 18, 1, 1]), bytes([198, 18, 1, 2])) + udp
        frame = bytes(12) + b"\x08\x00" + ip
        out.append(struct.pack("<IIII", i, 0, len(frame), len(frame)) + frame)
    return b"".join(out)


def test_nonce_checker_catches_reuse(tmp_path: Path) -> None:
    def transport(index: int, counter: int) -> bytes:
        return struct.pack("<IIQ", 4, index, counter) + bytes(32)

    assert nonce_repeats([(1, 0), (1, 1), (2, 0)]) == {}
    assert nonce_repeats([(1, 0), (1, 1), (1, 0), (2, 1), (1, 0)]) == {(1, 0): 3}
    # the whole path: pcap -> transport_nonces -> check; handshake messages are ignored
    good = [transport(7, c) for c in range(5)] + [b"\x01\x00\x00\x00" + bytes(144)]
    pcap = tmp_path / "good.pcap"
    pcap.write_bytes(_pcap(good))
    assert_unique_nonces(pcap, at_least=4)
    pcap.write_bytes(_pcap([*good, transport(7, 3)]))
    with pytest.raises(AssertionError, match=r"reuse: 1 .*\(7, 3\)"):
        assert_unique_nonces(pcap, at_least=4)


# --------------------------------------------------------------------------- 1: nonces under kills


@pytest.mark.parametrize("crypto", ["workers", "auto"])
def test_no_nonce_reuse_when_worker_and_edge_are_killed(topo2: Topology, crypto: str) -> None:
    """Both placements of the AEAD (docs/architecture.md): every datagram sealed by
    a worker, and the default, where the edges seal them."""
    topo = topo2
    fab = cluster(topo, edges=4, workers=3, crypto=crypto)
    client = fab.connect_client(1, "alice")
    mark = HandshakeMark.take(fab, client)
    ping = PingMonitor(topo, client.ns, SERVER_IP)
    with Capture(topo, topo.server_ns, topo.ifname("s1"), bpf=f"udp src port {PORT}", segments=True) as cap:
        bg = BackgroundIperf(topo, client.ns, seconds=10, reverse=True)
        time.sleep(3.0)
        edge, counts = busiest_edge(fab, "alice")  # the edge carrying the stream now
        killed_at = time.time()
        fab.kill(f"edge{edge}")
        fab.kill("worker1")
        time.sleep(2.0)
        moved = moved_to_others(fab, "alice", edge, counts)  # edges report once a second
        fab.respawn(f"edge{edge}")
        fab.respawn("worker1")
        respawned_at = time.time()
        res = bg.result()
        time.sleep(0.5)
    pings = ping.stop()
    flow = Flow.of(res, killed_at, bg)
    nonces = assert_unique_nonces(cap.path, at_least=1000)
    report(
        f"SIGKILL edge{edge} + worker1 during iperf3 -R, respawned after "
        f"{respawned_at - killed_at:.1f}s",
        transport_msgs=len(nonces), nonce_repeats=0, iperf_mbps=f"{flow.mbps:.0f}",
        packets_on_other_edges_while_down=moved,
        stall_s=flow.stall_s(), dip_pct=flow.dip_pct(), resumed_after_s=flow.resumed_after_s(),
        retransmits=flow.retransmits, ping_lost=f"{pings.lost}/{pings.sent}",
        ping_longest_gap_s=f"{pings.longest_gap_s:.2f}",
    )
    print("  intervals:", flow.describe())
    print("  nonces:", nonce_summary(nonces))
    assert flow.total_bytes > 0, f"client received nothing: {flow.describe()}"
    assert moved > 1000, f"the stream did not move off edge{edge} ({moved} packets elsewhere)"
    mark.assert_unchanged(fab, client, "after killing a worker and an edge")
    fab.check_alive()


# --------------------------------------------------------------------------- 2: workers


def test_worker_death_and_growth(topo2: Topology) -> None:
    topo = topo2
    fab = cluster(topo, edges=2, workers=2, crypto="workers")  # all data crosses the workers
    client = fab.connect_client(1, "alice")
    mark = HandshakeMark.take(fab, client)
    ping = PingMonitor(topo, client.ns, SERVER_IP)
    bg = BackgroundIperf(topo, client.ns, seconds=8, reverse=False)
    time.sleep(3.0)
    killed_at = time.time()
    fab.kill("worker0")
    res = bg.result()
    flow = Flow.of(res, killed_at, bg)
    resumed = flow.resumed_after_s()
    after_kill = flow.bytes_between(flow.fault_at + 0.5, 1e9)
    print("\n  intervals:", flow.describe())
    assert res.mbps > 0 and flow.total_bytes > 0, flow.describe()
    assert resumed is not None and resumed <= 3.0, (
        f"stream did not resume within 3 s of the worker kill at {flow.fault_at:.1f}s: "
        f"{flow.describe()}")
    assert after_kill > 0, flow.describe()
    mark.assert_unchanged(fab, client, "after killing a worker")

    # growth: a worker with a new id takes load at once, without a handshake
    added_at = time.monotonic()
    fab.add_worker(7)

    def new_worker_packets() -> int:
        client.ping(SERVER_IP, count=5, timeout=1.0)
        return int(session_of(fab, "alice")["packets_per_worker"].get("7", 0))

    got = wait_for(new_worker_packets, timeout=10.0, step=0.2)
    took = time.monotonic() - added_at
    pings = ping.stop()
    status = {(p["role"], p["id"]): p for p in fab.status()["processes"] if p["alive"]}
    report(
        "SIGKILL worker0 (of 2) during iperf3, then add worker7",
        iperf_mbps=f"{flow.mbps:.0f}", stall_s=flow.stall_s(), dip_pct=flow.dip_pct(),
        resumed_after_s=resumed,
        retransmits=flow.retransmits, ping_lost=f"{pings.lost}/{pings.sent}",
        ping_longest_gap_s=f"{pings.longest_gap_s:.2f}",
        new_worker_packets=got, new_worker_first_packets_after_s=f"{took:.1f}",
    )
    assert got > 0, f"worker7 served no packets within 10 s: {session_of(fab, 'alice')}"
    assert ("worker", 7) in status, status.keys()
    mark.assert_unchanged(fab, client, "after adding a worker")
    fab.procs.pop("worker0")  # killed on purpose
    fab.check_alive()


# --------------------------------------------------------------------------- 3: edges


def test_edge_death_and_growth(topo2: Topology) -> None:
    topo = topo2
    fab = cluster(topo, edges=3, workers=2)
    client = fab.connect_client(1, "alice")
    mark = HandshakeMark.take(fab, client)
    ping = PingMonitor(topo, client.ns, SERVER_IP)
    bg = BackgroundIperf(topo, client.ns, seconds=10, reverse=False)
    time.sleep(3.0)
    edge, counts = busiest_edge(fab, "alice")  # its socket receives the client's stream
    killed_at = time.time()
    fab.kill(f"edge{edge}")
    time.sleep(3.0)
    moved = moved_to_others(fab, "alice", edge, counts)  # edges report once a second
    added_at = time.time()
    fab.add_edge(9)
    res = bg.result()
    flow = Flow.of(res, killed_at, bg)
    print("\n  intervals:", flow.describe())
    resumed = flow.resumed_after_s()
    resumed_add = flow.resumed_after_s(added_at - killed_at + flow.fault_at)
    assert flow.total_bytes > 0, flow.describe()
    assert moved > 1000, f"the stream did not move off edge{edge} ({moved} packets elsewhere)"
    assert resumed is not None and resumed <= 5.0, (
        f"stream did not resume within 5 s of killing edge{edge}: {flow.describe()}")
    assert flow.bytes_between(flow.intervals[-1][0] - 1.0, 1e9) > 0, (
        f"no data in the last seconds, after adding edge9: {flow.describe()}")
    r = client.ping(SERVER_IP, count=5)
    assert r.all_ok, r.output
    r = topo.ping(topo.server_ns, client.config.tunnel_ip(), count=5)
    assert r.all_ok, r.output
    pings = ping.stop()
    status = {(p["role"], p["id"]) for p in fab.status()["processes"] if p["alive"]}
    report(
        f"SIGKILL edge{edge} (of 3) during iperf3, add edge9 {added_at - killed_at:.1f}s later",
        iperf_mbps=f"{flow.mbps:.0f}", packets_on_other_edges_while_down=moved,
        stall_s=flow.stall_s(), dip_pct=flow.dip_pct(), resumed_after_kill_s=resumed,
        resumed_after_add_s=resumed_add, retransmits=flow.retransmits,
        ping_lost=f"{pings.lost}/{pings.sent}", ping_longest_gap_s=f"{pings.longest_gap_s:.2f}",
    )
    assert ("edge", 9) in status, status
    mark.assert_unchanged(fab, client, "after killing and adding edges")
    fab.procs.pop(f"edge{edge}")  # killed on purpose
    fab.check_alive()


# --------------------------------------------------------------------------- 4: broker


def not_resnapshotted(fab: FabricCluster, labels: list[str]) -> list[str]:
    """Labels whose log does not (yet) say they noticed the broker's new epoch."""
    pat = re.compile(r"broker restarted, re-snapshotting|new broker epoch")
    return [lb for lb in labels
            if not pat.search((fab.topo.log_dir / f"fabric-{lb}.log").read_text(errors="replace"))]


def test_broker_death_and_return(topo2: Topology) -> None:
    topo = topo2
    fab = cluster(topo, edges=2, workers=2)
    subscribers = [lb for lb in fab.procs if lb != "broker"]
    client = fab.connect_client(1, "alice")
    old_hs = client.latest_handshake()
    old_sid = session_of(fab, "alice")["session_id"]
    assert not_resnapshotted(fab, subscribers) == subscribers  # nothing logged yet
    ping = PingMonitor(topo, client.ns, SERVER_IP)
    with Capture(topo, topo.server_ns, topo.ifname("s1"), bpf=f"udp src port {PORT}", segments=True) as cap:
        bg = BackgroundIperf(topo, client.ns, seconds=12, reverse=True)
        time.sleep(2.0)
        killed_at = time.time()
        fab.kill("broker")
        time.sleep(5.0)  # longer than clone.DEAD_AFTER: subscribers call the broker dead
        respawned_at = time.time()
        fab.respawn("broker")
        fab.wait_admin(timeout=15)
        admin_back = time.time() - respawned_at
        res = bg.result()
        flow = Flow.of(res, killed_at, bg)
        down_t0, down_t1 = flow.fault_at, flow.fault_at + (respawned_at - killed_at)
        print("\n  intervals:", flow.describe())
        during = flow.bytes_between(down_t0 + 0.5, down_t1)
        assert during > 0, f"no data while the broker was down: {flow.describe()}"
        assert client.latest_handshake() == old_hs, "the broker's death forced a new handshake"
        assert session_of(fab, "alice")["session_id"] == old_sid
        # every subscriber noticed the new epoch and re-snapshotted
        all_seen = wait_for(lambda: not not_resnapshotted(fab, subscribers), timeout=10)
        assert all_seen, f"no re-snapshot logged by {not_resnapshotted(fab, subscribers)}"
        # the resumed session still carries data after the re-snapshot
        after = iperf3(topo, topo.server_ns, client.ns, SERVER_IP, seconds=2, reverse=True)
        assert after.mbps > 0
        assert client.latest_handshake() == old_hs
        pings = ping.stop()  # before the client restart below, which loses pings by design
        assert pings.replies_between(killed_at, respawned_at) > 0, "no ping reply while down"
        # new handshakes work again: the same peer restarted, and a peer added now
        time.sleep(1.1)  # wg shows handshake times in whole seconds
        client.restart()
        r = client.wait_ping(SERVER_IP, timeout=20)
        assert r.ok, f"restarted client cannot handshake with the respawned broker\n{r.output}"
        assert client.latest_handshake() > old_hs
        assert session_of(fab, "alice")["session_id"] != old_sid
        bob = fab.connect_client(2, "bob")
        assert bob.ping(SERVER_IP, count=3).all_ok
        new = iperf3(topo, topo.server_ns, client.ns, SERVER_IP, seconds=2, reverse=True)
        assert new.mbps > 0
        time.sleep(0.5)
    nonces = assert_unique_nonces(cap.path, at_least=1000)
    report(
        f"SIGKILL broker during iperf3 -R, respawned after {respawned_at - killed_at:.1f}s",
        transport_msgs=len(nonces), nonce_repeats=0, iperf_mbps=f"{flow.mbps:.0f}",
        stall_s=flow.stall_s(), dip_pct=flow.dip_pct(), retransmits=flow.retransmits,
        mb_while_down=f"{during / 1e6:.1f}", admin_back_after_s=f"{admin_back:.1f}",
        ping_lost=f"{pings.lost}/{pings.sent}",
        ping_replies_while_down=pings.replies_between(killed_at, respawned_at),
        ping_longest_gap_s=f"{pings.longest_gap_s:.2f}",
    )
    print("  nonces:", nonce_summary(nonces))
    fab.check_alive()
