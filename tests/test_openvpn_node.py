"""The fabric's OpenVPN server driven in memory: a real broker, edge and worker in one
process (fabric/testbed/node.py: in-memory UDP and TUN, real ZeroMQ) and the sans-I/O
client of fabric/protocols/openvpn/client.py as the peer, with the profile that the
broker's `peer_add` hands out. No namespaces, no privileges.

Covered: connect and data both ways with the AEAD in the edge and in the worker for
each data cipher; tls-auth and no wrapping; the legacy PRF and P_DATA_V1; renegotiation
started by the client (twice, data flowing throughout) and by the server (reneg_sec);
EXIT and OCC_EXIT; a renegotiation taken over by a worker that lost the connection;
peer removal (HALT, then the certificate refused); a reset / bad-cookie flood; the
server's ping-restart; garbage and mutated datagrams (hypothesis); the server sending
to a client that has not sent data yet (key 0 is committed confirmed).

The fabric's loops run on the wall clock in their threads, so timers (reneg_sec,
ping-restart) are waited for, with small settings and bounded waits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.ops import admin
from fabric.protocols import registry
from fabric.protocols.openvpn import OpenVPN
from fabric.protocols.openvpn import keys as km
from fabric.protocols.openvpn.client import (
    DEFAULT_IV_PROTO,
    Closed,
    Connected,
    Data,
    Event,
    OvpnClient,
    Renegotiated,
)
from fabric.protocols.openvpn.constants import (
    P_ACK_V1,
    P_CONTROL_HARD_RESET_CLIENT_V2,
    P_CONTROL_SOFT_RESET_V1,
    P_CONTROL_V1,
)
from fabric.protocols.openvpn.edgeside import CONTROL_BURST, CONTROL_PER_SOURCE, OvpnEdge
from fabric.protocols.openvpn.wire import ControlPacket
from fabric.protocols.openvpn.workerside import OvpnWorker
from fabric.protocols.openvpn.wrap import ControlWrap, NoWrap, TlsAuth, TlsCrypt, parse_static_key
from fabric.testbed.fakes import FakeUDP
from fabric.testbed.node import (
    CLIENT_IP,
    CLIENT_UDP,
    SERVER_IP,
    SERVER_UDP,
    Node,
    udp_packet,
    within,
)

PORT = 1194
SERVER = (SERVER_UDP[0], PORT)
OVPN = OpenVPN.number  # the key of the OpenVPN WorkerSide in Worker.sides
CIPHERS = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")


# --------------------------------------------------------------------------- harness


def nap(seconds: float = 0.05) -> bool:
    """Sleep; False (for `within(..., lambda: nap() or cond)`)."""
    time.sleep(seconds)
    return False


def snapshot(counters: Mapping[str, int]) -> dict[str, int]:
    """A copy of counters another thread updates (a dict may change size mid-copy)."""
    for _ in range(100):
        try:
            return dict(counters)
        except RuntimeError:
            time.sleep(0.001)
    raise AssertionError("counters kept changing")


@dataclass(frozen=True)
class Profile:
    """What a client needs from the inline profile `peer add --openvpn` prints."""

    host: str
    port: int
    ca: bytes
    cert: bytes
    key: bytes
    static_key: bytes | None
    wrap: str


def parse_profile(text: str) -> Profile:
    blocks = dict(re.findall(r"^<([a-z-]+)>\n(.*?)^</\1>$", text, re.S | re.M))
    remote = re.search(r"^remote (\S+) (\d+)$", text, re.M)
    assert remote is not None and {"ca", "cert", "key"} <= blocks.keys(), text
    wrap = "tls-crypt" if "tls-crypt" in blocks else "tls-auth" if "tls-auth" in blocks else "none"
    if wrap == "tls-auth":
        assert re.search(r"^key-direction 1$", text, re.M), "a tls-auth profile names the client's direction"
    static = parse_static_key(blocks[wrap]) if wrap != "none" else None
    return Profile(remote.group(1), int(remote.group(2)), blocks["ca"].encode(), blocks["cert"].encode(),
                   blocks["key"].encode(), static, wrap)


def client_wrapper(profile: Profile) -> ControlWrap:
    """The client's side of the profile's control-channel wrapping (to forge packets)."""
    if profile.wrap == "tls-crypt":
        assert profile.static_key is not None
        return TlsCrypt(profile.static_key, server=False)
    if profile.wrap == "tls-auth":
        assert profile.static_key is not None
        return TlsAuth(profile.static_key, 1)
    return NoWrap()


class Client:
    """An OvpnClient on a fake UDP socket of the node's network, pumped by the test."""

    def __init__(self, node: Node, profile: Profile, addr: tuple[str, int], **kw: Any) -> None:
        self.node, self.profile = node, profile
        self.sock: FakeUDP = node.net.socket(*addr)
        self.server = (profile.host, profile.port)
        self.ovpn = OvpnClient(profile.ca, profile.cert, profile.key, profile.static_key, profile.wrap,
                               now=time.time(), **kw)
        self.events: list[Event] = []
        self.data: list[bytes] = []
        self.sent: list[bytes] = []  # every datagram it sent (seeds for mutation)

    def flush(self) -> None:
        for d in self.ovpn.datagrams_to_send(time.time()):
            self.sent.append(d)
            self.sock.sendto(d, self.server)

    def pump(self, wait: float = 0.01, timers: bool = True) -> bool:
        """One round: timers, send, receive what came (waiting at most `wait`). False,
        so that `within(..., lambda: c.pump() or cond)` reads well."""
        now = time.time()
        timer = self.ovpn.get_timer()
        if timers and timer is not None and timer <= now:
            self.ovpn.handle_timer(now)
        self.flush()
        got = self.sock.recv(timeout=wait)
        while got is not None:
            self.ovpn.receive_datagram(got[0], time.time())
            got = self.sock.recv(timeout=0)
        self.flush()
        while (ev := self.ovpn.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, Data):
                self.data.append(ev.packet)
        return False

    def connect(self, seconds: float = 15) -> Connected:
        ok = within(seconds, lambda: self.pump() or self.ovpn.connected is not None or self.ovpn.closed is not None)
        assert ok and self.ovpn.connected is not None, (
            f"not connected: {self.ovpn.closed}; client drops {self.ovpn.drops}; "
            f"edge {snapshot(self.node.edge.counters)}; worker {snapshot(self.node.worker.counters)}")
        return self.ovpn.connected

    def send(self, packet: bytes) -> None:
        assert self.ovpn.send_data(packet, time.time()), self.ovpn.drops
        self.flush()

    def closed(self) -> Closed | None:
        return self.ovpn.closed

    def close_socket(self) -> None:
        self.sock.close()


class Tun:
    """What the edge wrote to the fake TUN, collected."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.seen: list[bytes] = []

    def poll(self, wait: float = 0.0) -> bool:
        """Collect what came (waiting at most `wait`); False, as Client.pump."""
        pkt = self.node.tun.read(timeout=wait)
        while pkt is not None:
            self.seen.append(pkt)
            pkt = self.node.tun.read(timeout=0)
        return False


def exchange(node: Node, tun: Tun, c: Client, tag: str, seconds: float = 10, ip: str = CLIENT_IP) -> None:
    """One packet each way through the tunnel (the client's tunnel address `ip`), or fail
    with the counters."""
    up = udp_packet(ip, SERVER_IP, f"up {tag}".encode())
    c.send(up)
    assert within(seconds, lambda: c.pump() or tun.poll(0.005) or up in tun.seen), (
        f"{tag}: nothing on the TUN; edge {snapshot(node.edge.counters)}; worker {snapshot(node.worker.counters)}")
    down = udp_packet(SERVER_IP, ip, f"down {tag}".encode())
    node.tun.inject(down)
    assert within(seconds, lambda: c.pump() or down in c.data), (
        f"{tag}: nothing at the client; drops {c.ovpn.drops}; edge {snapshot(node.edge.counters)}")


@dataclass
class Bed:
    node: Node
    tun: Tun
    clients: list[Client]
    sockets: list[FakeUDP]

    def socket(self, addr: tuple[str, int]) -> FakeUDP:
        sock = self.node.net.socket(*addr)
        self.sockets.append(sock)
        return sock

    def add_peer(self, name: str, ip: str = CLIENT_IP) -> Profile:
        reply = self.node.admin({"op": "peer_add", "name": name, "protocol": "openvpn",
                                 "allowed_ips": [f"{ip}/32"]})
        assert reply.get("ok"), reply
        assert reply["listen_port"] == PORT
        return parse_profile(admin.client_config(reply, f"{SERVER[0]}:{PORT}"))

    def client(self, profile: Profile, addr: tuple[str, int] = CLIENT_UDP, **kw: Any) -> Client:
        c = Client(self.node, profile, addr, **kw)
        self.clients.append(c)
        return c

    def sessions(self) -> list[dict[str, Any]]:
        reply = self.node.admin({"op": "sessions"})
        assert reply.get("ok"), reply
        return list(reply["sessions"])

    @property
    def side(self) -> OvpnWorker:
        """The worker's OpenVPN side (its control connections)."""
        return cast(OvpnWorker, self.node.worker.sides[OVPN])

    @property
    def edge_side(self) -> OvpnEdge:
        return cast(OvpnEdge, self.node.edge.listeners["openvpn"].side)


@pytest.fixture
def bed_factory(tmp_path: Path) -> Iterator[Callable[..., Bed]]:
    made: list[Bed] = []

    def make(crypto: str = "edge", **options: Any) -> Bed:
        root = tmp_path / f"node{len(made)}"
        root.mkdir()
        node = Node(root, registry(), {"openvpn": PORT}, crypto, options={"openvpn": options})
        bed = Bed(node, Tun(node), [], [])
        made.append(bed)
        # the edge and worker have the server record (PKI, settings) once they joined
        assert within(10, lambda: nap(0.01) or (bed.side.config is not None and bed.edge_side.config is not None))
        return bed

    yield make
    for bed in made:
        for c in bed.clients:
            c.close_socket()
        for sock in bed.sockets:
            sock.close()
        dead = [t for t in bed.node.threads if not t.is_alive()]
        bed.node.close()
        assert not dead, "a loop of the node died"


# --------------------------------------------------------------------------- connect and data


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("crypto", ["edge", "workers"])
def test_connect_and_data_both_ways(bed_factory: Callable[..., Bed], crypto: str, cipher: str) -> None:
    bed = bed_factory(crypto)
    c = bed.client(bed.add_peer("alice"), ciphers=[cipher])
    conn = c.connect()
    assert (conn.cipher, conn.key_derivation, conn.cc_exit) == (cipher, "tls-ekm", True)
    assert conn.peer_id is not None and conn.ifconfig == (CLIENT_IP, "255.255.255.0")
    for i in range(3):
        exchange(bed.node, bed.tun, c, f"{crypto} {cipher} {i}")
    rows = bed.sessions()
    assert [(r["peer"], r["protocol"], r["cipher"], r["peer_id"], r["key_id"], r["data_format"])
            for r in rows] == [("alice", "openvpn", cipher, conn.peer_id, 0, "v2")]
    assert rows[0]["receiver_index"] == conn.peer_id << 3
    w, e = snapshot(bed.node.worker.counters), snapshot(bed.node.edge.counters)
    if crypto == "workers":
        assert w.get("decrypted", 0) >= 3 and w.get("encrypted", 0) >= 3, w
    else:
        assert e.get("frames_inline", 0) >= 6, e
    assert w.get("openvpn_connections") == 1 and e.get("hard_reset_replies") == 1, (w, e)
    assert not c.ovpn.drops, c.ovpn.drops


def test_the_server_may_send_first(bed_factory: Callable[..., Bed]) -> None:
    bed = bed_factory("edge")
    c = bed.client(bed.add_peer("zoe"))
    c.connect()
    down = udp_packet(SERVER_IP, CLIENT_IP, b"the server first")
    bed.node.tun.inject(down)
    assert within(5, lambda: c.pump() or down in c.data
                  or snapshot(bed.node.edge.counters).get("drop_no_session", 0) > 0)
    assert down in c.data, snapshot(bed.node.edge.counters)


NO_EKM = DEFAULT_IV_PROTO & ~km.IV_PROTO_TLS_KEY_EXPORT
NO_V2 = DEFAULT_IV_PROTO & ~km.IV_PROTO_DATA_V2


@pytest.mark.parametrize(("wrap", "iv_proto", "derivation", "data_format"), [
    ("tls-auth", DEFAULT_IV_PROTO, "tls-ekm", "v2"),
    ("none", DEFAULT_IV_PROTO, "tls-ekm", "v2"),
    ("tls-crypt", NO_EKM, "prf", "v2"),
    ("tls-crypt", NO_V2, "tls-ekm", "v1"),
    ("tls-auth", NO_EKM & NO_V2, "prf", "v1"),
], ids=["tls-auth", "no-wrap", "prf", "data-v1", "tls-auth-prf-v1"])
def test_wraps_key_derivations_and_data_formats(bed_factory: Callable[..., Bed], wrap: str, iv_proto: int,
                                                derivation: str, data_format: str) -> None:
    bed = bed_factory("edge", wrap=wrap)
    profile = bed.add_peer("bob")
    assert profile.wrap == wrap and (profile.static_key is None) == (wrap == "none")
    c = bed.client(profile, iv_proto=iv_proto)
    conn = c.connect()
    assert conn.key_derivation == derivation
    assert (conn.peer_id is None) == (data_format == "v1"), conn.pushed
    for i in range(3):
        exchange(bed.node, bed.tun, c, f"{wrap} {derivation} {data_format} {i}")
    [row] = bed.sessions()
    assert (row["key_derivation"], row["data_format"]) == (derivation, data_format)
    assert bool(bed.edge_side.v1_peers) == (data_format == "v1")


# --------------------------------------------------------------------------- renegotiation


class Stream:
    """Data both ways, one packet each per step, each marked with the number of key
    changes the client had seen when it was sent."""

    def __init__(self, bed: Bed, c: Client) -> None:
        self.bed, self.c = bed, c
        self.up: list[tuple[bytes, int]] = []
        self.down: list[tuple[bytes, int]] = []

    def renegotiations(self) -> list[Renegotiated]:
        return [e for e in self.c.events if isinstance(e, Renegotiated)]

    def step(self) -> bool:
        n, live = len(self.up), len(self.renegotiations())
        up = udp_packet(CLIENT_IP, SERVER_IP, b"stream up %d" % n)
        down = udp_packet(SERVER_IP, CLIENT_IP, b"stream down %d" % n)
        self.c.send(up)
        self.bed.node.tun.inject(down)
        self.up.append((up, live))
        self.down.append((down, live))
        self.c.pump(0.005)
        self.bed.tun.poll()
        return False

    def missing(self) -> tuple[list[int], list[int]]:
        """The live marks of what has not arrived (up, down)."""
        seen_up, seen_down = set(self.bed.tun.seen), set(self.c.data)
        return ([live for p, live in self.up if p not in seen_up], [live for p, live in self.down if p not in seen_down])

    def drain(self, seconds: float = 5) -> tuple[list[int], list[int]]:
        within(seconds, lambda: self.c.pump(0.005) or self.bed.tun.poll(0.005) or self.missing() == ([], []))
        return self.missing()


@pytest.mark.parametrize("crypto", ["edge", "workers"])
def test_client_renegotiates_twice_while_data_flows(bed_factory: Callable[..., Bed], crypto: str) -> None:
    bed = bed_factory(crypto)
    c = bed.client(bed.add_peer("carol"))
    conn = c.connect()
    exchange(bed.node, bed.tun, c, "first")  # the server sends once the client did (see test_server_sends_first)
    s = Stream(bed, c)
    for _ in range(20):  # before
        s.step()
    for round_ in (1, 2):
        assert c.ovpn.renegotiate(time.time())

        def key_live(want: int = round_) -> bool:
            return s.step() or len(s.renegotiations()) == want

        # during: until the new key is live at the client
        assert within(15, key_live), (
            f"round {round_}: no new key; client {c.ovpn.drops} edge {snapshot(bed.node.edge.counters)} "
            f"worker {snapshot(bed.node.worker.counters)}")
        for _ in range(30):  # after
            s.step()
    assert [(e.key_id, e.initiated_by_server) for e in s.renegotiations()] == [(1, False), (2, False)]
    assert c.ovpn.send_key_id == 2 and c.ovpn.closed is None
    lost_up, lost_down = s.drain()
    # nothing sent after a new key went live is lost, nor (stronger) anything sent before
    assert (lost_up, lost_down) == ([], []), (
        f"lost {len(lost_up)} of {len(s.up)} up (marks {lost_up}), {len(lost_down)} of {len(s.down)} down "
        f"(marks {lost_down}); client drops {c.ovpn.drops}; edge {snapshot(bed.node.edge.counters)}")
    rows = bed.sessions()
    assert {r["key_id"] for r in rows} <= {0, 1, 2} and max(rows, key=lambda r: r["latest_handshake"])["key_id"] == 2
    assert {r["peer_id"] for r in rows} == {conn.peer_id}
    # the edge sends with the newest key once the client used it
    down = udp_packet(SERVER_IP, CLIENT_IP, b"after both")
    bed.node.tun.inject(down)
    assert within(5, lambda: c.pump() or down in c.data)
    assert [e.key_id for e in c.events if isinstance(e, Data) and e.packet == down] == [2]
    assert snapshot(bed.node.worker.counters).get("openvpn_connections") == 1


def test_server_renegotiates_after_reneg_sec(bed_factory: Callable[..., Bed]) -> None:
    bed = bed_factory("edge", reneg_sec=2)
    c = bed.client(bed.add_peer("dave"), reneg_seconds=None)
    c.connect()
    exchange(bed.node, bed.tun, c, "first")
    s = Stream(bed, c)
    t0 = time.monotonic()
    # reneg-sec 2: the server starts a soft reset 1.8 to 2 s after a key's commit (init.c), twice here
    assert within(12, lambda: nap(0.02) or s.step() or len(s.renegotiations()) >= 2), (
        f"client {c.ovpn.drops} {c.events[-3:]} worker {snapshot(bed.node.worker.counters)}")
    assert time.monotonic() - t0 >= 1.5
    for _ in range(20):
        s.step()
    assert [(e.key_id, e.initiated_by_server) for e in s.renegotiations()[:2]] == [(1, True), (2, True)]
    lost_up, lost_down = s.drain()
    assert (lost_up, lost_down) == ([], []), (lost_up, lost_down, c.ovpn.drops, snapshot(bed.node.edge.counters))
    assert c.ovpn.closed is None
    assert max(bed.sessions(), key=lambda r: r["latest_handshake"])["key_id"] >= 2


# --------------------------------------------------------------------------- leaving


NO_CC_EXIT = DEFAULT_IV_PROTO & ~km.IV_PROTO_CC_EXIT_NOTIFY
OTHER_IP, OTHER_UDP = "198.19.100.3", ("198.18.0.3", 40001)


@pytest.mark.parametrize(("how", "crypto"), [("exit", "edge"), ("occ-exit", "edge"), ("occ-exit", "workers")])
def test_exit_ends_the_session_at_the_broker(bed_factory: Callable[..., Bed], how: str, crypto: str) -> None:
    bed = bed_factory(crypto)
    c = bed.client(bed.add_peer("erin"), iv_proto=DEFAULT_IV_PROTO if how == "exit" else NO_CC_EXIT)
    stays = bed.client(bed.add_peer("frank", OTHER_IP), OTHER_UDP)
    assert c.connect().cc_exit == (how == "exit")
    stays.connect()
    exchange(bed.node, bed.tun, c, how)
    assert sorted(r["peer"] for r in bed.sessions()) == ["erin", "frank"]
    c.ovpn.close(time.time())
    assert within(10, lambda: c.pump() or stays.pump() or c.closed() is not None)
    assert c.closed() == Closed("exit"), c.closed()
    assert within(10, lambda: stays.pump() or nap() or [r["peer"] for r in bed.sessions()] == ["frank"]), \
        (bed.sessions(), snapshot(bed.node.broker.counters))
    broker, worker = snapshot(bed.node.broker.counters), snapshot(bed.node.worker.counters)
    assert broker.get("sessions_ended") == 1, broker
    if how == "exit":  # the control message, through the worker's commit
        assert worker.get("openvpn_exits") == 1, worker
        conn = bed.side.connections.get(c.ovpn.session_id)
        assert conn is None or conn.closing_at is not None  # it lingers for its last acks (control.CLOSE_AFTER)
    else:  # OCC_EXIT inside the data: the AEAD's drop reason, reported by whoever opened it
        assert worker.get("openvpn_exits") is None, worker
    exchange(bed.node, bed.tun, stays, "the other peer", ip=OTHER_IP)


# --------------------------------------------------------------------------- takeover


@pytest.mark.parametrize("crypto", ["edge", "workers"])
def test_a_worker_without_the_connection_takes_a_renegotiation_over(bed_factory: Callable[..., Bed],
                                                                    crypto: str) -> None:
    bed = bed_factory(crypto)
    c = bed.client(bed.add_peer("grace"))
    conn = c.connect()
    exchange(bed.node, bed.tun, c, "before")
    side = bed.side
    assert list(side.connections) == [c.ovpn.session_id]
    # quiet first: a late ack of key 0 reaching a worker without the connection, within the
    # cookie's life, would make a fresh connection there rather than leave it to a takeover
    assert within(5, lambda: c.pump(0.05) or all(ks.send.all_acked and not ks.recv.has_pending_acks
                                                 for ks in side.connections[c.ovpn.session_id].keys.values()))
    c.pump(0.1)
    old_time = side.connections[c.ovpn.session_id].net_time  # its wrap's packet ids are (this, 1, 2...)
    side.connections.clear()  # as if another worker had held it, or this one restarted
    assert c.ovpn.renegotiate(time.time())
    assert within(15, lambda: c.pump() or any(isinstance(e, Renegotiated) for e in c.events)), (
        f"client {c.ovpn.drops} {c.ovpn.closed} worker {snapshot(bed.node.worker.counters)}")
    assert c.ovpn.send_key_id == 1 and c.ovpn.closed is None
    worker = snapshot(bed.node.worker.counters)
    assert worker.get("openvpn_takeovers") == 1 and worker.get("openvpn_connections") == 1, worker
    assert list(side.connections) == [c.ovpn.session_id]
    # the new holder's packet ids start again from 1: at a later time, or the client would
    # refuse them as replays (likely here: connect and takeover within one second)
    assert side.connections[c.ovpn.session_id].net_time > old_time
    assert not c.ovpn.drops, c.ovpn.drops
    for i in range(3):
        exchange(bed.node, bed.tun, c, f"after {i}")
    rows = bed.sessions()
    newest = max(rows, key=lambda r: r["latest_handshake"])
    assert (newest["key_id"], newest["peer_id"], newest["cipher"]) == (1, conn.peer_id, conn.cipher)
    # and the connection it rebuilt goes on: a second renegotiation on it
    assert c.ovpn.renegotiate(time.time())
    assert within(15, lambda: c.pump() or sum(isinstance(e, Renegotiated) for e in c.events) == 2)
    exchange(bed.node, bed.tun, c, "after the second")
    assert snapshot(bed.node.worker.counters).get("openvpn_takeovers") == 1


# --------------------------------------------------------------------------- peer removal


def test_a_removed_peer_is_halted_and_its_certificate_refused(bed_factory: Callable[..., Bed]) -> None:
    bed = bed_factory("edge")
    profile = bed.add_peer("heidi")
    c = bed.client(profile)
    c.connect()
    exchange(bed.node, bed.tun, c, "before")
    assert bed.node.admin({"op": "peer_remove", "name": "heidi"}).get("ok")
    assert within(10, lambda: c.pump() or c.closed() is not None), (c.ovpn.drops, snapshot(bed.node.worker.counters))
    assert c.closed() == Closed("server-halt", "HALT"), c.closed()  # forward.c: HALT, not RESTART (reconnect)
    assert bed.sessions() == []
    # what the client still sends finds no session
    assert within(5, lambda: nap() or not bed.node.edge.sessions)
    # the same certificate again: the TLS handshake refuses it, no session is made
    again = bed.client(profile, ("198.18.0.2", 40002))
    within(5, lambda: again.pump() or again.closed() is not None
           or snapshot(bed.node.worker.counters).get("drop_openvpn_refused_certificate", 0) >= 1)
    worker = snapshot(bed.node.worker.counters)
    assert worker.get("drop_openvpn_refused_certificate") == 1, worker
    within(1, lambda: again.pump() or again.closed() is not None)
    assert again.ovpn.connected is None and again.closed() is not None, (again.closed(), again.ovpn.drops)
    assert bed.sessions() == [] and worker.get("openvpn_connections") == 2
    assert within(5, lambda: nap() or again.ovpn.session_id not in bed.side.connections)


# --------------------------------------------------------------------------- floods


def test_a_reset_and_bad_cookie_flood_makes_no_state(bed_factory: Callable[..., Bed]) -> None:
    """Hard resets are answered by the edge without state (a cookie as our session id),
    at most a burst per source; packets that echo no valid cookie reach the worker and
    are dropped there: no connection is made for them, nothing grows at the edge."""
    bed = bed_factory("edge")
    profile = bed.add_peer("ivan")  # the attacker knows the tls-crypt key (a peer's profile)
    wrap = client_wrapper(profile)
    sources = [bed.socket((f"198.18.1.{i}", 50000 + i)) for i in range(1, 9)]
    edge, worker = bed.node.edge, bed.node.worker
    before = snapshot(edge.counters)
    pid, net_time = 0, int(time.time())

    def forged(p: ControlPacket) -> bytes:
        nonlocal pid
        pid += 1
        return wrap.wrap(p.pack(), pid, net_time)

    sid = bytes(8)
    resets = cookies = 0
    t0 = time.monotonic()
    # 600 control packets a source: past the burst of 100 and what 200 a second refill,
    # unless sending them took over 2.5 s (edgeside.CONTROL_*; checked below)
    for round_ in range(50):
        for i, sock in enumerate(sources):
            sid = (round_ * 100 + i + 1).to_bytes(8, "big")
            sock.sendto(forged(ControlPacket(P_CONTROL_HARD_RESET_CLIENT_V2, 0, sid, (), None, 0)), SERVER)
            resets += 1
            # the second packet of a handshake, with an ack of the server's message 0 and a made-up cookie
            bad = ControlPacket(P_CONTROL_V1, 0, sid, (0,), (round_ * 7 + i + 1).to_bytes(8, "big"), 1, b"\x16\x03\x01")
            ack = ControlPacket(P_ACK_V1, 0, sid, (0,), (round_ + 99).to_bytes(8, "big"))
            soft = ControlPacket(P_CONTROL_SOFT_RESET_V1, 1, sid, (), None, 0)  # a renegotiation of nothing
            for p in (bad, ack, soft) * 4:
                sock.sendto(forged(p), SERVER)
                cookies += 1
    sent = resets + cookies
    verdicts = ("hard_reset_replies", "drop_reset_rate_source", "frames_affine", "drop_control_rate_source")

    def settled() -> bool:  # every datagram received has its verdict counted (not only udp_in)
        now = snapshot(edge.counters)
        return sum(now.get(k, 0) - before.get(k, 0) for k in verdicts) >= sent

    assert within(10, lambda: nap() or settled()), snapshot(edge.counters)
    elapsed = time.monotonic() - t0
    forwarded = snapshot(edge.counters).get("frames_affine", 0) - before.get("frames_affine", 0)
    assert within(10, lambda: nap() or sum(v for k, v in snapshot(worker.counters).items()
                                                       if k.startswith("drop_")) >= forwarded)
    e, w = snapshot(edge.counters), snapshot(worker.counters)
    delta = {k: v - before.get(k, 0) for k, v in e.items() if v != before.get(k, 0)}
    replies = delta.get("hard_reset_replies", 0)
    # a burst of 5 per source, then 10 a second (edgeside.RESETS_*)
    assert 0 < replies <= len(sources) * (5 + 10 * elapsed + 1), delta
    assert replies + delta.get("drop_reset_rate_source", 0) == resets, delta
    assert forwarded + delta.get("drop_control_rate_source", 0) == cookies, delta
    # a token bucket per source: at most its burst and its refill over the time taken
    budget = len(sources) * (CONTROL_BURST + CONTROL_PER_SOURCE * elapsed + 1)
    assert 0 < forwarded <= budget, (delta, elapsed)
    assert budget < cookies and delta.get("drop_control_rate_source", 0) > 0, (delta, elapsed)
    # the worker: each forwarded packet dropped, no connection, no handshake
    assert w.get("drop_bad_cookie", 0) + w.get("drop_unknown_session", 0) == forwarded, w
    assert not bed.side.connections and "openvpn_connections" not in w and "handshakes" not in w, w
    # the edge: no session, no address table entry, one rate-limit bucket per source
    side = bed.edge_side
    assert not edge.sessions and not side.v1_peers and not side.v1_sessions
    assert len(side.resets.buckets) <= len(sources) and len(side.control_src.buckets) <= len(sources)
    # and a real client still gets in
    c = bed.client(profile)
    c.connect()
    exchange(bed.node, bed.tun, c, "after the flood")
    assert list(bed.side.connections) == [c.ovpn.session_id]


# --------------------------------------------------------------------------- ping-restart


def test_ping_restart_ends_a_silent_clients_session(bed_factory: Callable[..., Bed]) -> None:
    bed = bed_factory("edge", ping=1, ping_restart=3)
    talker = bed.client(bed.add_peer("judy", OTHER_IP), OTHER_UDP)
    silent = bed.client(bed.add_peer("mallory"))
    conn = talker.connect()
    assert (conn.ping, conn.ping_restart) == (1.0, 3.0)
    silent.connect()
    exchange(bed.node, bed.tun, talker, "talker", ip=OTHER_IP)
    exchange(bed.node, bed.tun, silent, "silent")
    t0 = time.monotonic()
    # the talker keeps pinging (ping 1 was pushed), the other sends nothing from now on
    assert within(10, lambda: talker.pump(0.05) or [r["peer"] for r in bed.sessions()] == ["judy"]), bed.sessions()
    gone_after = time.monotonic() - t0
    assert 2.0 <= gone_after, gone_after  # not before ping-restart (3 s after its last packet)
    assert snapshot(bed.node.broker.counters).get("sessions_silent") == 1
    assert talker.ovpn.closed is None and talker.ovpn.stats.get("pings_sent", 0) >= 2, talker.ovpn.stats
    exchange(bed.node, bed.tun, talker, "still there", ip=OTHER_IP)
    # the worker told the silent one to reconnect (RESTART: its peer is still there); what
    # came meanwhile, without the client's own timers (its ping-restart would fire first)
    assert within(8, lambda: silent.pump(0.05, timers=False) or talker.pump(0) or silent.closed() is not None)
    assert silent.closed() == Closed("server-restart", "RESTART"), silent.closed()


# --------------------------------------------------------------------------- garbage


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes flipped, cut, grown, or another first byte (opcode, key id)."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        d = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "grow", "first"]))
            if op == "flip" and d:
                d[draw(st.integers(0, len(d) - 1))] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del d[draw(st.integers(0, len(d))):]
            elif op == "grow":
                d += draw(st.binary(min_size=1, max_size=64))
            elif op == "first" and d:
                d[0] = draw(st.integers(0, 255))
        return bytes(d)

    return mutate()


def garbage(seeds: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.one_of(st.binary(max_size=1600), mutated(seeds)), min_size=1, max_size=8)


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drops(counters: Mapping[str, int]) -> int:
    return sum(v for k, v in counters.items() if k.startswith("drop_"))


@pytest.mark.parametrize("wrap", ["tls-crypt", "none"])
def test_garbage_is_counted_and_harmless(bed_factory: Callable[..., Bed], wrap: str) -> None:
    bed = bed_factory("edge", wrap=wrap)
    profile = bed.add_peer("oscar")
    w = client_wrapper(profile)
    edge, worker = bed.node.edge, bed.node.worker
    fuzz = bed.socket(("198.18.2.1", 50000))
    sid, cookie = bytes.fromhex("0102030405060708"), bytes.fromhex("1112131415161718")
    seeds = [
        w.wrap(ControlPacket(P_CONTROL_HARD_RESET_CLIENT_V2, 0, sid, (), None, 0).pack(), 1, 1000),
        w.wrap(ControlPacket(P_CONTROL_V1, 0, sid, (0,), cookie, 1, b"\x16\x03\x01\x00\x05hello").pack(), 2, 1000),
        w.wrap(ControlPacket(P_ACK_V1, 0, sid, (0, 1, 2), cookie).pack(), 3, 1000),
        w.wrap(ControlPacket(P_CONTROL_SOFT_RESET_V1, 1, sid, (), None, 0).pack(), 4, 1000),
        bytes([9 << 3]) + (5).to_bytes(3, "big") + (1).to_bytes(4, "big") + bytes(16) + b"data v2",
        bytes([6 << 3 | 1]) + (7).to_bytes(4, "big") + bytes(16) + b"data v1",
    ]
    sent = [0]

    @FUZZ
    @given(garbage(seeds))
    def no_session_yet(batch: list[bytes]) -> None:
        for d in batch:
            fuzz.sendto(d, SERVER)
        sent[0] += len(batch)

    e0, w0 = snapshot(edge.counters), snapshot(worker.counters)
    no_session_yet()

    def delta(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
        return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}

    assert within(10, lambda: nap() or delta(snapshot(edge.counters), e0).get("udp_in", 0) >= sent[0])

    def accounted() -> bool:
        d = delta(snapshot(edge.counters), e0)
        forwarded = d.get("frames_affine", 0) + d.get("frames_pushed", 0)
        return drops(d) + d.get("hard_reset_replies", 0) + forwarded == sent[0] \
            and drops(delta(snapshot(worker.counters), w0)) == forwarded

    # every datagram: dropped and counted at the edge, answered (a hard reset), or
    # forwarded to the worker and dropped and counted there
    assert within(10, lambda: nap() or accounted()), (
        sent[0], delta(snapshot(edge.counters), e0), delta(snapshot(worker.counters), w0))
    assert not bed.side.connections and not edge.sessions

    # a real client gets in, then its own datagrams come back mutated (and replayed as
    # they were), from elsewhere and, when they are authenticated, from its own address
    c = bed.client(profile)
    c.connect()
    exchange(bed.node, bed.tun, c, "before")
    live = list(c.sent)
    from_client = wrap != "none"  # unauthenticated control packets from its address may end it (as in OpenVPN)
    e1 = snapshot(edge.counters)

    @FUZZ
    @given(garbage(live), st.booleans())
    def mutations_of_live_traffic(batch: list[bytes], own_address: bool) -> None:
        sock = c.sock if own_address and from_client else fuzz
        for d in batch:
            sock.sendto(d, SERVER)
        sock.sendto(live[len(batch) % len(live)], SERVER)  # a replay
        c.pump(0)

    mutations_of_live_traffic()
    assert within(5, lambda: c.pump() or drops(delta(snapshot(edge.counters), e1)) > 0)
    for i in range(3):
        exchange(bed.node, bed.tun, c, f"after {i}")
    assert c.closed() is None and c.ovpn.send_key_id == 0
    assert [r["peer"] for r in bed.sessions()] == ["oscar"]
    # and another client still connects
    other = bed.client(bed.add_peer("peggy", OTHER_IP), OTHER_UDP)
    other.connect()
    exchange(bed.node, bed.tun, other, "another", ip=OTHER_IP)
    assert all(t.is_alive() for t in bed.node.threads)


# --------------------------------------------------------------------------- control messages


def test_fuzz_control_messages_inside_tls(bed_factory: Callable[..., Bed]) -> None:
    """What an authenticated client may write on its control channel, beside PUSH_REQUEST
    and EXIT (hypothesis draws the strings): each unknown message is a counted drop, and
    the connection and its data go on."""
    bed = bed_factory("edge")
    c = bed.client(bed.add_peer("fuzz"))
    c.connect()
    exchange(bed.node, bed.tun, c, "before")
    messages = st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"")).filter(
        lambda b: bool(b) and b != b"PUSH_REQUEST" and not b.startswith(b"EXIT"))
    sent: list[bytes] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages)
    def write(text: bytes) -> None:
        sent.append(text)
        c.ovpn._send_control(c.ovpn._primary, text)  # as the client's TLS would carry it
        c.ovpn._advance(c.ovpn._primary, time.time())

    write()
    assert within(10, lambda: c.pump() or nap() or
                  snapshot(bed.node.worker.counters).get("drop_control_message", 0) >= len(sent)), (
        len(sent), snapshot(bed.node.worker.counters))
    exchange(bed.node, bed.tun, c, "after")
    assert c.ovpn.closed is None and [r["peer"] for r in bed.sessions()] == ["fuzz"]
