"""Handshake floods (issue "Handshake floods"): the test bed's flood tool, and the
fabric under a flood in network namespaces.

The netns test measures what an established iperf3 stream keeps while one attacker
sends ~120,000 forged initiations a second (valid mac1, from 64 ports of its own
address), against the same flood aimed at a closed port (the ceiling: what the
stream keeps when the server does nothing for the flood), and checks that a new
wireguard-go client connects while it runs (cookie reply, then mac2, whitepaper
5.4.7). Before the guard and the socket filter (fabric/protocols/wireguard/guard.py), six runs kept
0-51% of the ceiling and a new client connected in some runs only.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any

import pytest

from fabric.protocols.wireguard.guard import SAMPLE
from fabric.protocols.wireguard.noise import CookieChecker, StaticKeys
from fabric.testbed import flood as fl
from fabric.testbed.testnet import FabricCluster, Topology, WgClient, WgConfig, fabric_env, iperf3

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
PORT = 51820
CLOSED = 51999  # nothing listens here: the ceiling
SERVER = StaticKeys.from_private(bytes(range(32)))


# --------------------------------------------------------------------------- the tool


def test_pools_are_what_their_kind_says() -> None:
    checker = CookieChecker(SERVER.public)
    init = fl.make_pool("initiation", SERVER.public, 50)
    assert len(set(init)) == 50
    assert all(len(d) == 148 and d[:4] == b"\x01\x00\x00\x00" and d[-16:] == bytes(16) for d in init)
    assert all(checker.check_mac1(d) for d in init)  # valid mac1, as from an old client config
    assert not any(checker.check_mac1(d) for d in fl.make_pool("bad-mac1", SERVER.public, 50))
    assert all(len(d) == 128 and d[:4] == b"\x04\x00\x00\x00" for d in fl.make_pool("unknown-index", None, 50))
    assert all(4 <= len(d) < 148 and d[0] == 1 for d in fl.make_pool("short", None, 50))
    assert all(len(d) == 1400 and d[0] == 1 for d in fl.make_pool("oversized", None, 50))
    assert all(1 <= len(d) <= 1400 for d in fl.make_pool("random", None, 50))
    with pytest.raises(fl.FloodError, match="server's public key"):
        fl.make_pool("initiation", None)
    with pytest.raises(fl.FloodError, match="unknown kind"):
        fl.make_pool("ping-of-death", None)


def test_openvpn_pools_unwrap_as_the_server_sees_them() -> None:
    from fabric.protocols.openvpn.constants import P_CONTROL_HARD_RESET_CLIENT_V2
    from fabric.protocols.openvpn.wire import ControlPacket, WireError
    from fabric.protocols.openvpn.wrap import TlsCrypt, format_static_key

    key = bytes(range(256))
    server = TlsCrypt(key, server=True)
    resets = fl.make_pool("ovpn-reset", None, 40, static_key=key)
    sids = set()
    for d in resets:  # each a valid hard reset of its own session (what an old profile can send)
        packet, pid, _ = server.unwrap(d)
        cp = ControlPacket.unpack(packet)
        assert (cp.opcode, cp.message_id, cp.acks) == (P_CONTROL_HARD_RESET_CLIENT_V2, 0, ())
        sids.add(cp.session_id)
    assert len(sids) == 40
    junk = fl.make_pool("ovpn-junk", None, 40)
    assert all(d[0] == 7 << 3 for d in junk)
    for d in junk:
        with pytest.raises(WireError):
            server.unwrap(d)
    profile = f"client\n<tls-crypt>\n{format_static_key(key)}</tls-crypt>\n"
    assert fl.static_key_of_profile(profile) == key
    with pytest.raises(fl.FloodError, match="no <tls-crypt>"):
        fl.static_key_of_profile("client\n")
    with pytest.raises(fl.FloodError, match="--ovpn-profile"):
        fl.make_pool("ovpn-reset", None)


@pytest.mark.parametrize("dst", ["10.0.0.1", "172.16.0.1", "192.168.1.1", "8.8.8.8", "2001:db8::1", "example.org"])
def test_refuses_anything_but_the_test_network(dst: str) -> None:
    with pytest.raises(fl.FloodError):
        fl.check_destination(dst)
    with pytest.raises(fl.FloodError):
        fl.flood(dst, 9, [b"x"], 10, 1, 1)


def test_bounds() -> None:
    for rate, seconds, ports in ((0, 1, 1), (10, 0, 1), (10, 601, 1), (2_000_000, 1, 1), (10, 1, 0)):
        with pytest.raises(fl.FloodError):
            fl.flood("127.0.0.1", 9, [b"x"], rate, seconds, 10, ports)
    assert fl.check_destination("198.19.1.1") == "198.19.1.1"
    assert fl.check_destination("127.0.0.1") == "127.0.0.1"


@pytest.mark.parametrize("burst", [False, True])
def test_sends_the_count_it_is_given_and_no_more(burst: bool) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx.settimeout(0.5)
    pool = fl.make_pool("unknown-index", None, 37)
    try:
        out = fl.flood("127.0.0.1", rx.getsockname()[1], pool, 5000.0, 5.0, 300, ports=4, burst=burst)
        got, sources = [], set()
        while True:
            try:
                d, a = rx.recvfrom(2048)
            except TimeoutError:
                break
            got.append(d)
            sources.add(a[1])
    finally:
        rx.close()
    assert out["sent"] == out["attempted"] == 300 and len(got) == 300
    assert out["mode"] == ("sendmmsg" if burst else "sendto")
    assert len(sources) == 4 and set(got) == set(pool)
    assert out["seconds"] < 2.0  # 300 at 5,000 a second: the count ended it, not the clock


def test_command_line_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert fl.main(["10.1.2.3", "51820", "--kind", "random"]) == 2
    assert "outside 198.18.0.0/15" in capsys.readouterr().err
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    try:
        assert fl.main(["127.0.0.1", str(rx.getsockname()[1]), "--kind", "short", "--rate", "1000",
                        "--max-packets", "20", "--ports", "2"]) == 0
    finally:
        rx.close()
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "short" and out["sent"] == 20


# --------------------------------------------------------------------------- live


def start_flood(topo: Topology, fab: FabricCluster, port: int, kind: str, seconds: float,
                server_pub: str) -> Any:
    return topo.popen(topo.ns_of_client(2), [
        sys.executable, "-m", "fabric.testbed.flood", topo.server_underlay(2), str(port), "--kind", kind,
        "--rate", "120000", "--seconds", str(seconds), "--server-key", server_pub,
    ], env=fabric_env(), label=f"flood-{kind}-{port}")


def flood_result(topo: Topology, proc: Any) -> dict[str, Any]:
    proc.wait(timeout=60)
    lines = topo.log_path(proc).read_text().strip().splitlines()
    assert proc.returncode == 0 and lines, lines[-5:]
    out: dict[str, Any] = json.loads(lines[-1])
    return out


@pytest.mark.netns
def test_stream_and_a_new_client_hold_up_under_an_initiation_flood() -> None:
    seconds = 6.0
    with Topology(clients=3) as topo:
        fab = FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=2, workers=2).start()
        try:
            client = fab.connect_client(1, "alice")
            conf = fab.peer_add("newbie", endpoint=f"{topo.server_underlay(3)}:{PORT}")
            server_pub = WgConfig.parse(conf).peers[0]["publickey"]
            newbie = WgClient(topo, topo.ns_of_client(3), topo.ifname("w3"), conf)
            pids = {k: p.pid for k, p in fab.procs.items()}

            shares: dict[int, float] = {}
            joined: dict[str, float | None] = {}
            for port in (CLOSED, PORT):
                proc = start_flood(topo, fab, port, "initiation", seconds + 4, server_pub)
                time.sleep(1.5)  # the flood is on

                def join() -> None:
                    time.sleep(1.0)
                    t0 = time.monotonic()
                    newbie.start()
                    ok = newbie.wait_ping(SERVER_IP, timeout=15).ok
                    joined["after"] = time.monotonic() - t0 if ok else None

                th = threading.Thread(target=join) if port == PORT else None
                if th is not None:
                    th.start()
                r = iperf3(topo, topo.server_ns, client.ns, SERVER_IP, seconds=seconds)
                if th is not None:
                    th.join(timeout=30)
                out = flood_result(topo, proc)
                assert out["sent"] > 50000 * (seconds + 4), out  # the flood really ran
                shares[port] = r.mbps
            stats = fab.stats()
            summary = {"ceiling_mbit_s": round(shares[CLOSED]), "flooded_mbit_s": round(shares[PORT]),
                       "new_client_after_s": joined.get("after"),
                       **{k: v for k, v in stats.items() if k.startswith("edge.") and (
                           "kernel" in k or "cookie" in k or "ratelimit" in k or k.endswith(".bans")
                           or "udp_socket_drops" in k)}}
            print(f"initiation flood: {summary}")
            fab.check_alive()
            assert {k: p.pid for k, p in fab.procs.items()} == pids
            # the bar of the issue: half the ceiling, and a new client within 15 s
            assert shares[PORT] >= 0.5 * shares[CLOSED], summary
            assert joined.get("after") is not None, f"the new client did not connect\n{fab.log_tails()}"
            # how: the flooding source was banned, and the kernel dropped its initiations
            assert stats.get("edge.bans", 0) >= 1, summary
            assert stats.get("edge.drop_kernel_banned", 0) >= 100 * SAMPLE, summary
            assert stats.get("edge.udp_socket_drops", 0) >= 0.5 * 120000 * seconds, summary
            # cookie replies stayed bounded: per source (20/s, burst 5) on each edge
            assert stats.get("edge.cookie_replies", 0) <= fab.edges * (5 + 20 * (seconds + 6)) + 5, summary
            assert client.ping(SERVER_IP, count=3).all_ok
        finally:
            fab.stop()
