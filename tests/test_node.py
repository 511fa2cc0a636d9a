"""A real Edge, Worker and Broker in one process, over in-memory UDP and TUN.

The processes' loops run in threads and talk over real ZeroMQ sockets (ipc, in a
temporary state directory); the edge's UDP socket and TUN queue are the fakes of
fabric/testbed/fakes.py. Two protocols go through them:

* WireGuard, with the sans-I/O endpoint (fabric/protocols/wireguard/endpoint.py) as
  the client: a handshake committed by the broker, data both ways, with the AEAD
  in the edge and in the worker;
* a toy protocol defined here (tests only), to show that the interface of
  fabric/protocols/base.py carries a second protocol that differs from WireGuard:
  32-bit counters from 1, a 64-counter window, its own header, its own control
  message and commit rule.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fabric.control.records import PeerRecord, SessionRecord
from fabric.dataplane import segment
from fabric.dataplane.edge import Edge
from fabric.protocols import registry
from fabric.protocols.base import (
    Authority,
    ControlResult,
    CounterSpace,
    EdgeSide,
    Forward,
    NewSession,
    Protocol,
    SessionKeys,
    Split,
    WorkerHost,
    WorkerSide,
)
from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.endpoint import PacketReceived, WireGuardEndpoint
from fabric.protocols.wireguard.noise import StaticKeys
from fabric.testbed.node import (
    CLIENT_IP,
    CLIENT_UDP,
    SERVER_IP,
    SERVER_UDP,
    Node,
    udp_packet,
    within,
)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(protocols: dict[str, Protocol] | None = None, ports: dict[str, int] | None = None,
             crypto: str = "edge") -> Node:
        n = Node(tmp_path, protocols or registry(), ports or {"wireguard": SERVER_UDP[1]}, crypto)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


# --------------------------------------------------------------------------- WireGuard


class WgClient:
    """The sans-I/O WireGuard endpoint as peer "alice" of `node`, on a fake UDP socket."""

    def __init__(self, node: Node) -> None:
        keys = StaticKeys.from_private(crypto.generate_private_key())
        reply = node.admin({"op": "peer_add", "name": "alice", "allowed_ips": [f"{CLIENT_IP}/32"],
                            "public_key": crypto.key_to_base64(keys.public)})
        self.endpoint = WireGuardEndpoint(keys)
        self.endpoint.add_peer(crypto.key_from_base64(reply["server_public_key"]),
                               allowed_ips=[f"{SERVER_IP}/32"], endpoint=SERVER_UDP)
        self.sock = node.net.socket(*CLIENT_UDP)
        self.received: list[bytes] = []

    def pump(self) -> bool:
        """Send what the endpoint has, take one datagram, fire timers; False (for within())."""
        client = self.endpoint
        for data, addr in client.datagrams_to_send(time.time()):
            self.sock.sendto(data, addr)
        got = self.sock.recv(timeout=0.05)
        if got is not None:
            client.receive_datagram(got[0], got[1], time.time())
        client.handle_timer(time.time())
        while (ev := client.next_event()) is not None:
            if isinstance(ev, PacketReceived):
                self.received.append(ev.packet)
        return False

    def connect(self, node: Node, first: bytes) -> None:
        """Send `first` (a handshake comes before it, whitepaper 5.4.2) until the TUN has it."""
        self.endpoint.send_packet(first, time.time())
        seen: list[bytes] = []

        def tun_got_it() -> bool:
            self.pump()
            pkt = node.tun.read(timeout=0.01)
            if pkt is not None:
                seen.append(pkt)
            return first in seen

        assert within(15, tun_got_it), f"nothing on the TUN; edge counters {dict(node.edge.counters)}"


@pytest.mark.parametrize("crypto_in", ["edge", "workers"])
def test_wireguard_client_through_a_real_edge_and_worker(node_factory: Callable[..., Node],
                                                         crypto_in: str) -> None:
    node = node_factory(crypto=crypto_in)
    c = WgClient(node)
    sock, received, pump = c.sock, c.received, c.pump
    c.connect(node, udp_packet(CLIENT_IP, SERVER_IP, b"through the tunnel"))
    down = udp_packet(SERVER_IP, CLIENT_IP, b"and back")
    node.tun.inject(down)
    assert within(10, lambda: pump() or down in received), f"edge counters {dict(node.edge.counters)}"
    sessions = node.admin({"op": "sessions"})["sessions"]
    assert [(s["peer"], s["protocol"]) for s in sessions] == [("alice", "wireguard")]
    if crypto_in == "workers":
        assert node.worker.counters.get("decrypted", 0) >= 1 and node.worker.counters.get("encrypted", 0) >= 1
    else:
        assert node.edge.counters.get("frames_inline", 0) >= 2
    assert node.worker.counters.get("handshakes") == 1
    sock.close()


def test_tso_super_packets_from_the_tun_reach_the_client_as_segments(node_factory: Callable[..., Node]) -> None:
    """What a TUN with offloads reads (fabric/dataplane/segment.py) goes to the client
    cut into segments with complete checksums; a read the edge cannot cut is a counted
    drop, and the session goes on."""
    node = node_factory()
    c = WgClient(node)
    c.connect(node, udp_packet(CLIENT_IP, SERVER_IP, b"hello"))
    payload = bytes(range(256)) * 14  # 3584 bytes: segments of 1200, 1200, 1184
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, 7000, 1, 5 << 4, 0x18, 512, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0x100, 0x4000, 64, 6, 0,
                     socket.inet_aton(SERVER_IP), socket.inet_aton(CLIENT_IP))
    super_packet = ip + tcp
    node.tun.inject_offloaded(struct.pack("<BBHHHH", 1, 1, 40, 1200, 20, 16), super_packet)  # NEEDS_CSUM, TCPV4
    assert within(10, lambda: c.pump() or len(c.received) >= 3), f"edge counters {dict(node.edge.counters)}"
    segs = c.received[:3]
    assert [len(p) - 40 for p in segs] == [1200, 1200, 1184]
    assert b"".join(p[40:] for p in segs) == payload
    assert [struct.unpack_from("!I", p, 24)[0] for p in segs] == [7000, 8200, 9400]
    for p in segs:  # RFC 1071 over the pseudo-header and the segment: every checksum complete
        pseudo = p[12:20] + struct.pack("!BBH", 0, 6, len(p) - 20)
        assert segment.split_py(bytes(10) + p) == [p]  # (the no-offload path returns it as it is)
        assert _ones_sum(p[:20]) == 0xFFFF and _ones_sum(pseudo + p[20:]) == 0xFFFF
    drops = node.edge.counters.get("drop_bad_offload", 0)
    node.tun.inject_offloaded(struct.pack("<BBHHHH", 1, 1, 40, 1200, 20, 16), super_packet[:30])  # cut short
    later = udp_packet(SERVER_IP, CLIENT_IP, b"still here")
    node.tun.inject(later)
    assert within(10, lambda: c.pump() or later in c.received), f"edge counters {dict(node.edge.counters)}"
    assert node.edge.counters.get("drop_bad_offload", 0) == drops + 1
    assert node.edge.counters.get("tso_reads", 0) == 1  # the one cut; the short one only counted as a drop


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# --------------------------------------------------------------------------- a toy protocol
#
# Wire format (tests only):
#   hello  b"\x02" + peer public key (32)                    client -> fabric (control)
#   hi     b"\x03" + data key (4, big-endian)                 fabric -> client
#   data   b"\x01" + data key (4) + counter (4) + tag (8) + payload, tag = BLAKE2s(secret, all but the tag)
# Counters are 32-bit from 1 with a 64-counter window (as OpenVPN's packet ids).

TOY_HDR = struct.Struct("!BII")


def toy_tag(secret: bytes, header: bytes, payload: bytes) -> bytes:
    return hashlib.blake2s(header + payload, key=secret, digest_size=8).digest()


class ToyKeys(SessionKeys):
    def __init__(self, record: SessionRecord) -> None:
        assert record.keys is not None
        self.sid, self.peer, self.created = record.id, record.peer, record.created
        self.key, self.secret = record.data_key, record.keys["secret"]

    def open(self, datagrams: Sequence[bytes | memoryview], allowed: Callable[[bytes], Any],
             drops: dict[str, int]) -> tuple[list[bytes], list[int], list[int]]:
        plain, counters, sizes = [], [], []
        for d in datagrams:
            d = bytes(d)
            _, key, counter = TOY_HDR.unpack_from(d)
            if key != self.key or toy_tag(self.secret, d[:9], d[17:]) != d[9:17]:
                drops["toy_bad_tag"] = drops.get("toy_bad_tag", 0) + 1
                continue
            payload = d[17:]
            if payload and not allowed(payload[12:16]):
                drops["source_not_allowed"] = drops.get("source_not_allowed", 0) + 1
                continue
            plain.append(payload)
            counters.append(counter)
            sizes.append(len(d))
        return plain, counters, sizes

    def seal(self, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        out = []
        for i, p in enumerate(packets):
            header = TOY_HDR.pack(1, self.key, counter0 + i)
            out.append(header + toy_tag(self.secret, header, bytes(p)) + bytes(p))
        return out


class ToyEdge(EdgeSide):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.handshake_retry = 5.0

    def split(self, datagrams: Sequence[bytes], sources: Sequence[Any], filtered: bool) -> Split:
        out = Split()
        for d, sa in zip(datagrams, sources, strict=True):
            if len(d) >= 17 and d[0] == 1:
                _, key, counter = TOY_HDR.unpack_from(d)
                pkts, ctrs = out.groups.setdefault((key, sa), ([], []))
                pkts.append(d)
                ctrs.append(counter)
            elif len(d) == 33 and d[0] == 2:
                out.control.append((d, sa))
            else:
                out.drops["toy_junk"] = out.drops.get("toy_junk", 0) + 1
        return out

    def control(self, datagram: bytes, addr: bytes, now: float) -> Forward:
        return Forward(datagram[1:9])  # to the worker this peer's key picks (OpenVPN's TLS needs it)

    def filter_program(self, data_keys: Collection[int]) -> bytes | None:
        return None


class ToyWorker(WorkerSide):
    def __init__(self, protocol: Protocol, host: WorkerHost) -> None:
        self.protocol, self.host = protocol, host

    def control(self, datagram: bytes, addr: bytes, now: float, edge: int = 0) -> ControlResult:
        peer = datagram[1:33]
        if peer not in self.host.peers:
            self.host.count("drop_toy_unknown_peer")
            return ControlResult()
        key = secrets.randbits(31) + 1
        reply = self.host.commit({"protocol": "toy", "peer": peer, "key": key, "endpoint": addr})
        if reply is None or not reply.get("ok"):
            self.host.count("drop_toy_refused")
            return ControlResult()
        return ControlResult([b"\x03" + struct.pack("!I", key)], SessionRecord.from_wire(reply["session"]))


class ToyAuthority(Authority):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol

    def commit(self, req: dict[str, Any], peer: PeerRecord, sessions: Iterable[SessionRecord],
               now: float) -> NewSession | str:
        key = req.get("key")
        if not isinstance(key, int) or any(s.data_key == key for s in sessions):
            return "key_in_use"
        # the secret is derived from the peer's key here: a toy, not cryptography
        secret = hashlib.blake2s(peer.public + struct.pack("!I", key)).digest()
        return NewSession(key, {}, {"secret": secret}, True, req.get("endpoint", b""))


class Toy(Protocol):
    name = "toy"
    number = 7
    counters = CounterSpace(bits=32, first=1, limit=2**32, window=64)

    def __init__(self) -> None:
        self.lifetime, self.keep_time, self.max_sessions_per_peer = 60.0, 180.0, 2

    def edge(self, count: Callable[[str, int], None], shared_load: Any = None) -> EdgeSide:
        return ToyEdge(self)

    def worker(self, host: WorkerHost) -> WorkerSide:
        return ToyWorker(self, host)

    def authority(self) -> Authority:
        return ToyAuthority(self)

    def keys(self, record: SessionRecord) -> SessionKeys | None:
        return ToyKeys(record) if record.keys else None


def test_affinity_picks_the_same_worker_everywhere_and_moves_little() -> None:
    class E:
        worker_for = Edge.worker_for

    a, b = E(), E()
    a.workers, b.workers = {0, 1, 2, 3}, {3, 2, 1, 0}
    keys = [os.urandom(8) for _ in range(400)]
    picks = {k: a.worker_for(k) for k in keys}
    assert picks == {k: b.worker_for(k) for k in keys}  # every edge agrees
    assert set(picks.values()) == {0, 1, 2, 3}
    b.workers = {0, 1, 2}  # worker 3 leaves: only its share moves
    assert all(b.worker_for(k) == w for k, w in picks.items() if w != 3)
    a.workers = set()
    assert a.worker_for(keys[0]) is None


def test_a_second_protocol_goes_through_the_same_edge_and_worker(node_factory: Callable[..., Node]) -> None:
    protocols = {**registry(), "toy": Toy()}
    node = node_factory(protocols=protocols, ports={"wireguard": 51820, "toy": 7777})
    public = os.urandom(32)
    node.admin({"op": "peer_add", "name": "toybox", "allowed_ips": [f"{CLIENT_IP}/32"], "protocol": "toy",
                "public_key": crypto.key_to_base64(public)})
    peers = node.admin({"op": "peers"})["peers"]
    assert [(p["name"], p["protocol"]) for p in peers] == [("toybox", "toy")]
    sock = node.net.socket(*CLIENT_UDP)
    server = (SERVER_UDP[0], 7777)
    sock.sendto(b"\x02" + public, server)
    got = sock.recv(timeout=10)
    assert got is not None and got[0][0] == 3, f"no answer; worker {node.worker.counters}"
    key = struct.unpack("!I", got[0][1:5])[0]
    secret = hashlib.blake2s(public + struct.pack("!I", key)).digest()
    assert node.edge.counters["frames_affine"] == 1  # through the control ROUTER, to its worker

    def toy(counter: int, payload: bytes) -> bytes:
        header = TOY_HDR.pack(1, key, counter)
        return header + toy_tag(secret, header, payload) + payload

    up = [udp_packet(CLIENT_IP, SERVER_IP, b"toy %d" % i) for i in range(3)]
    for i, p in enumerate(up, start=1):
        sock.sendto(toy(i, p), server)
    sock.sendto(toy(2, up[1]), server)  # a replay: refused after the tag verified
    sock.sendto(toy(9, b"forged")[:-1] + b"?", server)  # a bad tag
    assert [node.tun.read(timeout=5) for _ in up] == up
    assert node.tun.read(timeout=0.5) is None
    assert within(5, lambda: node.edge.counters.get("drop_replay", 0) >= 1
                  and node.edge.counters.get("drop_toy_bad_tag", 0) >= 1), dict(node.edge.counters)
    # the other way: sealed by the toy with counters from the protocol's first, 1
    down = udp_packet(SERVER_IP, CLIENT_IP, b"toy reply")
    node.tun.inject(down)
    got = sock.recv(timeout=5)
    assert got is not None, dict(node.edge.counters)
    d = got[0]
    _, k, counter = TOY_HDR.unpack_from(d)
    assert (k, counter, d[17:]) == (key, 1, down)
    assert d[9:17] == toy_tag(secret, d[:9], d[17:])
    sessions = node.admin({"op": "sessions"})["sessions"]
    assert [(s["peer"], s["protocol"], s["receiver_index"]) for s in sessions] == [("toybox", "toy", key)]
    sock.close()
