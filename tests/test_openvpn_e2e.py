"""Stock OpenVPN 2.6 clients (Debian's `openvpn`, unchanged) against the fabric, in
network namespaces: the profiles are what `fabric peer add NAME --openvpn` prints.

What the issue "OpenVPN clients" asks to see end to end: ping both ways, flood ping,
TCP both ways, large packets, each data cipher, clients at once, renegotiation every
few seconds under ping with no loss, a client whose address changes, an IPv6 underlay,
explicit-exit-notify, a worker and an edge SIGKILLed under iperf3 with no new TLS
handshake, no (key id, packet id) sent twice per session key, a captured data packet
replayed from another port refused, a flood of forged hard resets, a removed peer.

Addresses: underlay 198.18.k.0/24 and 2001:2:0:k::/64, tunnel 198.19.100.0/24 and
2001:2:0:100::/64 (benchmarking ranges), only inside this test's namespaces.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fabric.protocols.openvpn.constants import P_DATA_V2
from fabric.testbed.capture import UdpPacket
from fabric.testbed.monitor import BackgroundIperf, Flow, PingMonitor, wait_for
from fabric.testbed.ovpnclient import INIT_DONE, OvpnClient
from fabric.testbed.testnet import Capture, FabricCluster, Topology, fabric_env, iperf3, read_pcap

pytestmark = pytest.mark.netns

ADDRESS = "198.19.100.1/24,2001:2:0:100::1/64"
SERVER_IP, SERVER_IP6 = "198.19.100.1", "2001:2:0:100::1"
WG_PORT, PORT = 51820, 1194


# --------------------------------------------------------------------------- helpers


def data_ids(packets: list[UdpPacket]) -> list[tuple[bytes, int]]:
    """((opcode|key id, peer id) as the 4 header bytes, packet id) of every P_DATA_V2
    datagram captured: the first four bytes name the session key (key id and peer-id),
    the next four are its packet id, the AEAD's nonce (openvpn-protocol.md, data channel)."""
    out = []
    for p in packets:
        if len(p.head) >= 8 and p.head[0] >> 3 == P_DATA_V2:
            out.append((p.head[:4], struct.unpack_from("!I", p.head, 4)[0]))
    return out


def repeats(ids: list[tuple[bytes, int]]) -> dict[tuple[bytes, int], int]:
    return {k: n for k, n in Counter(ids).items() if n > 1}


def fabric(topo: Topology, edges: int = 2, workers: int = 2, **options: Any) -> FabricCluster:
    return FabricCluster(topo, address=ADDRESS, listen_port=WG_PORT, edges=edges, workers=workers,
                         mode="separate", openvpn_port=PORT, openvpn_options=options or None).start()


def client(fab: FabricCluster, name: str, k: int, *extra: str, remote: str | None = None) -> OvpnClient:
    """A peer `name` for client namespace k and its stock client (not started)."""
    profile = fab.add_ovpn_peer(name, k)
    if remote is not None:
        profile = re.sub(r"^remote .*$", f"remote {remote} {PORT}", profile, count=1, flags=re.M)
    return OvpnClient(fab.topo, fab.topo.ns_of_client(k), profile, name, extra=extra)


def session_of(fab: FabricCluster, peer: str) -> dict[str, Any]:
    mine = [s for s in fab.sessions() if s.get("peer") == peer]
    assert mine, fab.sessions()
    return max(mine, key=lambda s: s["session_id"])


def wait_endpoint(fab: FabricCluster, peer: str, prefix: str, timeout: float = 5.0) -> None:
    """Until the broker shows `peer`'s endpoint starting with `prefix` (the edges report
    what they saw about once a second)."""
    ok = wait_for(lambda: session_of(fab, peer).get("endpoint", "").startswith(prefix), timeout, step=0.2)
    assert ok, f"{peer}: endpoint {session_of(fab, peer).get('endpoint')!r}, expected {prefix}..."


def add_ipv6(topo: Topology, k: int) -> None:
    topo.run(topo.server_ns, ["ip", "-6", "addr", "add", f"2001:2:0:{k}::1/64", "dev", topo.ifname(f"s{k}"), "nodad"])
    topo.run(topo.ns_of_client(k), ["ip", "-6", "addr", "add", f"2001:2:0:{k}::2/64", "dev",
                                    topo.ifname(f"c{k}"), "nodad"])


def ping(topo: Topology, ns: str, dst: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return topo.run(ns, ["ping", "-n", "-q", *args, dst], check=False, timeout=timeout)


def received(out: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- 1: the basics


def test_three_clients_each_cipher_both_ways(topo3: Topology) -> None:
    """Three stock clients at once, each offering one data cipher only (NCP picks it):
    ping both ways over IPv4 and IPv6, flood ping, large packets, TCP both ways; the
    operator sees each peer's protocol and cipher; explicit-exit-notify ends a session
    at once."""
    topo = topo3
    fab = fabric(topo)
    ciphers = {"alice": "AES-256-GCM", "bob": "AES-128-GCM", "carol": "CHACHA20-POLY1305"}
    clients = {name: client(fab, name, k, "--data-ciphers", cipher)
               for k, (name, cipher) in enumerate(ciphers.items(), start=1)}
    for c in clients.values():
        c.start()
    for name, c in clients.items():
        assert f"Data Channel: cipher '{ciphers[name]}'" in c.log, c.log[-2000:]
        ip4 = c.tunnel_ip()
        m = re.search(r"ifconfig-ipv6 ([0-9a-f:]+)/64", c.log)
        assert m, "no pushed ifconfig-ipv6"
        # the server speaks first (the client has sent no data since it connected)
        for dst in (ip4, m.group(1)):
            out = ping(topo, topo.server_ns, dst, "-c", "5", "-i", "0.2", "-W", "2").stdout
            assert received(out)[1] == 5, f"server -> {name} {dst}: {out}"
        for dst in (SERVER_IP, SERVER_IP6):
            out = ping(topo, c.ns, dst, "-c", "5", "-i", "0.2", "-W", "2").stdout
            assert received(out)[1] == 5, f"{name} -> {dst}: {out}"
    # what the operator sees: protocol and cipher per peer and session
    peers = {p["name"]: p for p in fab.peers()}
    want = {"AES-256-GCM": "aes256", "AES-128-GCM": "aes128", "CHACHA20-POLY1305": "chacha"}
    for name, cipher in ciphers.items():
        assert peers[name]["protocol"] == "openvpn", peers[name]
        assert peers[name]["cipher"] == cipher, peers[name]
        s = session_of(fab, name)
        assert s["protocol"] == "openvpn", s
        assert want[cipher] in fab.admin("sessions").stdout.lower()
    status = fab.cli("status", "--state-dir", str(fab.state_dir)).stdout
    assert "ovpn" in status and "alice" in status, status

    alice = clients["alice"]
    # flood ping (as fast as replies come, 2000 of them) and large packets: 8000 bytes
    # (fragmented inside the tunnel) and a full 1500-byte inner packet with DF set
    waits = fab.stats().get("edge.rx_waits", 0)
    sent, got = received(ping(topo, alice.ns, SERVER_IP, "-f", "-c", "2000", "-W", "1", timeout=60).stdout)
    assert got >= sent * 0.99, f"flood ping: {got}/{sent}"
    # receive moderation (fabric/dataplane/moderation.py): a lone packet never waits
    time.sleep(1.2)  # the edges' counters reach the broker once a second
    assert fab.stats().get("edge.rx_waits", 0) == waits, "an edge waited after a pass of pings"
    for args in (("-s", "8000"), ("-M", "do", "-s", "1472")):
        out = ping(topo, alice.ns, SERVER_IP, "-c", "5", "-i", "0.2", "-W", "2", *args).stdout
        assert received(out)[1] == 5, f"ping {args}: {out}"
    out = ping(topo, topo.server_ns, alice.tunnel_ip(), "-c", "5", "-i", "0.2", "-W", "2", "-s", "8000").stdout
    assert received(out)[1] == 5, f"server ping -s 8000: {out}"
    # TCP both ways (each client in turn: the last one with the other two idle)
    for c in (alice, clients["carol"]):
        for reverse in (False, True):
            waits = fab.stats().get("edge.rx_waits", 0)
            res = iperf3(topo, topo.server_ns, c.ns, SERVER_IP, seconds=2, reverse=reverse)
            assert res.mbps > 1, (c.name, reverse, res.mbps)
            if not reverse:  # the stock client's upload, one datagram a sendto: moderated
                assert fab.stats().get("edge.rx_waits", 0) > waits, "no edge waited for a bigger batch"

    # explicit-exit-notify (in the profile the fabric printed): the client says goodbye
    # and the session ends at once
    before = fab.stats()
    bob = clients["bob"]
    bob.stop()
    gone = wait_for(lambda: not [s for s in fab.sessions() if s.get("peer") == "bob"], timeout=5, step=0.2)
    assert gone, fab.sessions()
    assert fab.stats().get("sessions_ended", 0) > before.get("sessions_ended", 0), fab.stats()
    assert {s["peer"] for s in fab.sessions()} == {"alice", "carol"}
    fab.check_alive()
    fab.stop()


# --------------------------------------------------------------------------- 2: keys and addresses


def test_renegotiation_under_ping_float_and_ipv6_underlay(topo3: Topology) -> None:
    """alice renegotiates every 4 s (her side) while a ping runs every 0.1 s: no loss.
    bob (TLS 1.2) has his address changed under the session and the session follows it once a packet
    from the new address authenticates. carol reaches the server over IPv6. Meanwhile
    the server renegotiates too (reneg_sec 7) with everyone."""
    topo = topo3
    add_ipv6(topo, 3)
    fab = fabric(topo, reneg_sec=7)
    alice = client(fab, "alice", 1, "--reneg-sec", "4")
    bob = client(fab, "bob", 2, "--tls-version-max", "1.2")  # TLS 1.2 (the others 1.3)
    carol = client(fab, "carol", 3, remote="2001:2:0:3::1")
    for c in (alice, bob, carol):
        c.start()
    assert "Control Channel: TLSv1.2" in bob.log and "Control Channel: TLSv1.3" in alice.log, bob.log[-2000:]
    wait_endpoint(fab, "carol", "[2001:2:0:3::2]:")

    mon = PingMonitor(topo, alice.ns, SERVER_IP, interval=0.1, deadline=40)
    mon6 = PingMonitor(topo, carol.ns, SERVER_IP6, interval=0.2, deadline=40)
    time.sleep(1)
    # bob moves: a second address on his veth, the first one removed (the kernel picks
    # the new one as source for the client's unbound socket; promote_secondaries keeps
    # the second when the first goes)
    wait_endpoint(fab, "bob", "198.18.2.2:")
    c_if = topo.ifname("c2")
    topo.run(bob.ns, ["sysctl", "-q", "-w", f"net.ipv4.conf.{c_if}.promote_secondaries=1"])
    topo.run(bob.ns, ["ip", "addr", "add", "198.18.2.3/24", "dev", c_if])
    topo.run(bob.ns, ["ip", "addr", "del", "198.18.2.2/24", "dev", c_if])
    out = ping(topo, bob.ns, SERVER_IP, "-c", "5", "-i", "0.3", "-W", "2").stdout
    assert received(out)[1] >= 4, f"bob after the move: {out}"
    wait_endpoint(fab, "bob", "198.18.2.3:")
    out = ping(topo, topo.server_ns, bob.tunnel_ip(), "-c", "3", "-i", "0.3", "-W", "2").stdout
    assert received(out)[1] == 3, f"server -> bob after the move: {out}"

    time.sleep(15)  # ~4 renegotiations by alice, 2 by the server
    stats = mon.stop()
    stats6 = mon6.stop()
    soft = alice.log.count("TLS: soft reset")
    print(f"\n[reneg] alice: {soft} soft resets, ping {stats.received}/{stats.sent}, longest gap "
          f"{stats.longest_gap_s:.2f}s; carol over IPv6: {stats6.received}/{stats6.sent}")
    assert soft >= 3, alice.log[-3000:]
    # the server's own renegotiations (reneg_sec 7, randomized down as OpenVPN does):
    # a new TLS exchange in carol's log without her asking
    assert carol.log.count("Control Channel:") >= 2, carol.log[-3000:]
    # the last request may still be in flight when ping stops
    assert stats.lost <= 1, f"lost {stats.lost}/{stats.sent}, longest gap {stats.longest_gap_s:.2f}s"
    assert stats.longest_gap_s < 1.0, stats.longest_gap_s
    assert stats6.lost <= 1, f"IPv6 underlay: lost {stats6.lost}/{stats6.sent}"
    for c in (alice, bob, carol):
        assert c.log.count(INIT_DONE) == 1, c.log[-2000:]
    fab.check_alive()
    fab.stop()


# --------------------------------------------------------------------------- 3: processes die


@pytest.mark.parametrize("crypto", ["workers", "auto"])
def test_kill_edge_and_worker_under_iperf(topo3: Topology, crypto: str) -> None:
    """SIGKILL the edge carrying a download and a worker, respawn both: the stream goes
    on through the other edges, the client makes no new TLS handshake (one
    "Initialization Sequence Completed", one control channel in its log), and no
    (key id + peer-id, packet id) leaves the server twice (a pcap of the whole run)."""
    topo = topo3
    fab = FabricCluster(topo, address=ADDRESS, listen_port=WG_PORT, edges=4, workers=3, mode="separate",
                        crypto=crypto, openvpn_port=PORT).start()
    alice = client(fab, "alice", 1).start()
    sessions = {s["session_id"] for s in fab.sessions()}
    ping_mon = PingMonitor(topo, alice.ns, SERVER_IP)
    with Capture(topo, topo.server_ns, topo.ifname("s1"), bpf=f"udp src port {PORT}", segments=True) as cap:
        bg = BackgroundIperf(topo, alice.ns, seconds=10, reverse=True)
        time.sleep(3.0)
        counts = {int(k): int(v) for k, v in session_of(fab, "alice")["packets_per_edge"].items()}
        edge = max(counts, key=lambda k: counts[k])
        killed_at = time.time()
        fab.kill(f"edge{edge}")
        fab.kill("worker1")
        time.sleep(2.0)
        after = {int(k): int(v) for k, v in session_of(fab, "alice")["packets_per_edge"].items()}
        moved = sum(n - counts.get(e, 0) for e, n in after.items() if e != edge)
        fab.respawn(f"edge{edge}")
        fab.respawn("worker1")
        res = bg.result()
        time.sleep(0.5)
    pings = ping_mon.stop()
    flow = Flow.of(res, killed_at, bg)
    ids = data_ids(read_pcap(cap.path))
    twice = repeats(ids)
    print(f"\n[ovpn kill, crypto {crypto}] edge{edge}+worker1: {len(ids)} data packets, {len(twice)} repeated; "
          f"iperf {flow.mbps:.0f} Mbit/s, stall {flow.stall_s():.1f}s, moved {moved}, "
          f"ping lost {pings.lost}/{pings.sent}")
    assert not twice, f"(key, packet id) sent more than once: {sorted(twice.items())[:10]}"
    # every datagram of the download (about 1500 bytes each), not one per GSO batch
    assert len(ids) * 1500 > 0.8 * flow.total_bytes, f"the capture saw only {len(ids)} data packets"
    assert flow.total_bytes > 0, flow.describe()
    assert moved > 1000, f"the stream did not move off edge{edge} ({moved} packets elsewhere)"
    assert alice.log.count(INIT_DONE) == 1 and alice.log.count("Control Channel:") == 1, alice.log[-3000:]
    assert {s["session_id"] for s in fab.sessions()} == sessions, fab.sessions()
    # and the tunnel still works both ways
    assert received(ping(topo, alice.ns, SERVER_IP, "-c", "3", "-i", "0.2", "-W", "2").stdout)[1] == 3
    fab.check_alive()
    fab.stop()


# --------------------------------------------------------------------------- 4: replay


REPLAY = """
import socket, sys
data = [bytes.fromhex(h) for h in sys.argv[3:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
for d in data:
    s.sendto(d, (sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1])
"""


def test_captured_data_replayed_from_another_port_is_refused(topo2: Topology) -> None:
    """Data packets captured from the client, sent again from a new source port: each
    is authentic but seen before, so the replay window refuses it (counted), nothing
    reaches the TUN, and the session does not float to the replaying port."""
    topo = topo2
    fab = fabric(topo)
    alice = client(fab, "alice", 1).start()
    wait_endpoint(fab, "alice", "198.18.1.2:")
    endpoint = session_of(fab, "alice")["endpoint"]
    with Capture(topo, alice.ns, topo.ifname("c1"), bpf=f"udp dst port {PORT}", snaplen=2000) as cap:
        assert received(ping(topo, alice.ns, SERVER_IP, "-c", "10", "-i", "0.1", "-W", "2").stdout)[1] == 10
        time.sleep(0.5)
    captured = [p for p in cap.packets() if p.head and p.head[0] >> 3 == P_DATA_V2 and len(p.head) == p.length]
    assert len(captured) >= 10, f"captured {len(captured)} whole data packets"
    time.sleep(1.5)  # the edges' reports settle
    before = fab.stats()
    out = topo.run(alice.ns, [sys.executable, "-c", REPLAY, topo.server_underlay(1), str(PORT),
                              *(p.head.hex() for p in captured)])
    port = int(out.stdout.strip())
    assert port != int(endpoint.rsplit(":", 1)[1])
    drops = wait_for(lambda: fab.stats().get("edge.drop_replay", 0) - before.get("edge.drop_replay", 0)
                     >= len(captured), timeout=5, step=0.3)
    after = fab.stats()
    assert drops, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert after.get("edge.tun_out", 0) == before.get("edge.tun_out", 0), "a replayed packet reached the TUN"
    assert session_of(fab, "alice")["endpoint"] == endpoint, "the session floated to the replaying port"
    assert received(ping(topo, alice.ns, SERVER_IP, "-c", "3", "-i", "0.2", "-W", "2").stdout)[1] == 3
    fab.check_alive()
    fab.stop()


# --------------------------------------------------------------------------- 5: forged hard resets


def fabric_rss(fab: FabricCluster) -> dict[str, int]:
    return {label: rss_kb(p.pid) for label, p in fab.procs.items() if p.poll() is None}


def test_forged_hard_reset_flood(topo3: Topology) -> None:
    """One attacker (client namespace 3, 64 ports) sends hard resets wrapped with a real
    profile's tls-crypt key, each from a new session, then junk behind the hard-reset
    opcode. The server answers at most a rate-limited few (stateless, with a cookie as
    its session id), so nothing grows: the processes' memory stays flat, alice's
    tunnel keeps working and bob, starting during the flood, connects."""
    topo = topo3
    fab = fabric(topo)
    alice = client(fab, "alice", 1).start()
    bob = client(fab, "bob", 2)
    profile = fab.add_ovpn_peer("mallory", 3)  # an old profile, as an attacker would have
    profile_path = topo.workdir / "mallory.ovpn"
    profile_path.write_text(profile)
    mon = PingMonitor(topo, alice.ns, SERVER_IP, interval=0.2, deadline=60)
    rss0 = fabric_rss(fab)
    before = fab.stats()
    sent = {}
    for kind in ("ovpn-reset", "ovpn-junk"):
        proc = topo.popen(topo.ns_of_client(3), [
            sys.executable, "-m", "fabric.testbed.flood", topo.server_underlay(3), str(PORT), "--kind", kind,
            "--rate", "50000", "--seconds", "6", "--ovpn-profile", str(profile_path),
        ], env=fabric_env(), label=f"flood-{kind}")
        if kind == "ovpn-junk":
            time.sleep(1.0)
            t0 = time.monotonic()
            bob.start(timeout=15)
            joined = time.monotonic() - t0
        proc.wait(timeout=60)
        lines = topo.log_path(proc).read_text().strip().splitlines()
        assert proc.returncode == 0 and lines, lines[-5:]
        sent[kind] = json.loads(lines[-1])
    stats = mon.stop()
    time.sleep(1.5)  # the last reports
    after = fab.stats()
    rss1 = fabric_rss(fab)
    diff = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    growth = {label: rss1.get(label, 0) - kb for label, kb in rss0.items()}
    print(f"\n[reset flood] sent {[(k, v['sent'], v['rate']) for k, v in sent.items()]}, replies "
          f"{[(k, v.get('replies')) for k, v in sent.items()]}; bob joined after {joined:.1f}s; "
          f"alice ping {stats.received}/{stats.sent}; RSS growth kB {growth}\n  counters {diff}")
    assert all(v["sent"] > 100000 for v in sent.values()), sent  # the floods really ran
    replies = diff.get("edge.hard_reset_replies", 0)
    assert replies < 0.01 * sent["ovpn-reset"]["sent"], f"{replies} stateless replies: not rate-limited"
    dropped = sum(v for k, v in diff.items() if k.startswith("edge.drop_"))
    assert dropped > 0.9 * sum(v["sent"] for v in sent.values()) - diff.get("edge.udp_socket_drops", 0), diff
    assert stats.lost <= max(2, stats.sent // 20), f"alice lost {stats.lost}/{stats.sent} pings"
    assert all(g < 20_000 for g in growth.values()), f"memory grew (kB): {growth}"
    assert received(ping(topo, bob.ns, SERVER_IP, "-c", "3", "-i", "0.2", "-W", "2").stdout)[1] == 3
    fab.check_alive()
    fab.stop()


# --------------------------------------------------------------------------- 6: revocation


def test_removed_peer_is_halted_and_refused(topo2: Topology) -> None:
    """`fabric peer remove` ends the live session at once (the client is told HALT and
    exits) and the certificate is refused from then on; the other client is untouched."""
    topo = topo2
    fab = fabric(topo)
    alice = client(fab, "alice", 1).start()
    bob = client(fab, "bob", 2).start()
    fab.peer_remove("alice")
    gone = wait_for(lambda: not [s for s in fab.sessions() if s.get("peer") == "alice"], timeout=5, step=0.2)
    assert gone, fab.sessions()
    alice.wait_log("Halt command was pushed by server", timeout=10)
    ok = wait_for(lambda: not alice.running, timeout=10, step=0.2)
    assert ok, "the client did not exit after HALT"
    before = fab.stats()
    try:
        alice.start(timeout=12)
        connected = True
    except Exception:
        connected = False
    assert not connected, alice.log[-2000:]
    refused = {k: v - before.get(k, 0) for k, v in fab.stats().items() if "refused" in k or "certificate" in k}
    assert sum(refused.values()) >= 1, fab.stats()
    assert not [s for s in fab.sessions() if s.get("peer") == "alice"], fab.sessions()
    assert received(ping(topo, bob.ns, SERVER_IP, "-c", "3", "-i", "0.2", "-W", "2").stdout)[1] == 3
    alice.stop()
    fab.check_alive()
    fab.stop()
