"""WireGuardEndpoint (fabric/protocols/wireguard/endpoint.py): two endpoints wired together in memory."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Callable

import pytest

from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.constants import (
    INITIATION_FLOOD_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    SESSION_KEEP_TIME,
)
from fabric.protocols.wireguard.endpoint import (
    MAX_STAGED_PACKETS,
    Address,
    Event,
    HandshakeCompleted,
    PacketDropped,
    PacketReceived,
    WireGuardEndpoint,
)
from fabric.protocols.wireguard.messages import message_type, parse_transport_header
from fabric.protocols.wireguard.noise import CookieJar, StaticKeys, create_initiation

T0 = 1_700_000_000.0
ADDR_A: Address = ("198.51.100.1", 40000)
ADDR_B: Address = ("203.0.113.5", 51820)


def ipv4(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    header = struct.pack(
        ">IHBB16s16s",
        6 << 28, len(payload), 17, 64,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


def approx(t: float) -> object:
    """Timer values: absolute times near T0, so an absolute tolerance."""
    return pytest.approx(t, rel=0, abs=1e-6)


def drain(ep: WireGuardEndpoint) -> list[Event]:
    out = []
    while (ev := ep.next_event()) is not None:
        out.append(ev)
    return out


def kinds(datagrams: list[tuple[bytes, Address]]) -> list[int]:
    return [message_type(d) for d, _ in datagrams]


class Net:
    """A and B, each at a UDP address; `pump` carries datagrams until both are quiet."""

    def __init__(
        self,
        *,
        psk: bytes | None = None,
        a_keepalive: float = 0,
        b_under_load: Callable[[float], bool] | None = None,
        a_endpoint_for_b: bool = False,
    ) -> None:
        self.ka = StaticKeys.from_private(crypto.generate_private_key())
        self.kb = StaticKeys.from_private(crypto.generate_private_key())
        idx = itertools.count(0x1000)
        self.a = WireGuardEndpoint(self.ka, random_index=lambda: next(idx), jitter=lambda: 0.0)
        self.b = WireGuardEndpoint(
            self.kb, random_index=lambda: next(idx), jitter=lambda: 0.0, under_load=b_under_load
        )
        self.a.add_peer(
            self.kb.public,
            preshared_key=psk,
            allowed_ips=["10.0.0.0/24", "fd00::/64"],
            endpoint=ADDR_B,
            persistent_keepalive=a_keepalive,
        )
        self.b.add_peer(
            self.ka.public,
            preshared_key=psk,
            allowed_ips=["10.0.0.2/32", "fd00::2/128"],
            endpoint=ADDR_A if a_endpoint_for_b else None,
        )
        self.addr = {"a": ADDR_A, "b": ADDR_B}
        self.log: list[tuple[str, bytes]] = []  # (sender, datagram)

    def ep(self, name: str) -> WireGuardEndpoint:
        return self.a if name == "a" else self.b

    def pump(self, now: float, drop: Callable[[str, bytes], bool] | None = None) -> None:
        for _ in range(100):
            moved = False
            for name, other in (("a", "b"), ("b", "a")):
                for data, dst in self.ep(name).datagrams_to_send(now):
                    moved = True
                    self.log.append((name, data))
                    if drop is not None and drop(name, data):
                        continue
                    if dst == self.addr[other]:
                        self.ep(other).receive_datagram(data, self.addr[name], now)
            if not moved:
                return
        raise AssertionError("datagrams never stopped flowing")

    def connect(self, now: float = T0) -> None:
        self.a.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"first"), now)
        self.pump(now)


def received(events: list[Event]) -> list[bytes]:
    return [e.packet for e in events if isinstance(e, PacketReceived)]


def dropped(events: list[Event]) -> list[str]:
    return [e.reason for e in events if isinstance(e, PacketDropped)]


def completed(events: list[Event]) -> list[bool]:
    return [e.is_initiator for e in events if isinstance(e, HandshakeCompleted)]


# --- handshake and data -----------------------------------------------------------


@pytest.mark.parametrize("psk", [None, bytes(range(32))], ids=["no-psk", "psk"])
def test_handshake_and_data_both_ways(psk: bytes | None) -> None:
    net = Net(psk=psk)
    first = ipv4("10.0.0.2", "10.0.0.1", b"first")
    net.a.send_packet(first, T0)
    out = net.a.datagrams_to_send(T0)
    assert kinds(out) == [MSG_INITIATION] and out[0][1] == ADDR_B
    assert net.a.peer_status(net.kb.public).staged == 1
    net.b.receive_datagram(out[0][0], ADDR_A, T0)
    out = net.b.datagrams_to_send(T0)
    assert kinds(out) == [MSG_RESPONSE] and out[0][1] == ADDR_A
    assert net.b.peer_status(net.ka.public).next_index is not None
    assert net.b.peer_status(net.ka.public).current_index is None
    net.a.receive_datagram(out[0][0], ADDR_B, T0)
    assert completed(drain(net.a)) == [True]
    out = net.a.datagrams_to_send(T0)
    assert kinds(out) == [MSG_TRANSPORT]  # the queued packet, which confirms B's session
    net.b.receive_datagram(out[0][0], ADDR_A, T0)
    events = drain(net.b)
    assert completed(events) == [False]
    assert received(events) == [first]
    st = net.b.peer_status(net.ka.public)
    assert st.current_index is not None and st.next_index is None
    assert st.endpoint == ADDR_A  # learnt from the authenticated initiation
    # B answers
    reply = ipv4("10.0.0.1", "10.0.0.2", b"reply")
    net.b.send_packet(reply, T0 + 1)
    net.pump(T0 + 1)
    assert received(drain(net.a)) == [reply]


def test_padding_to_16_bytes() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    for size in (0, 1, 15, 16, 17, 100):
        pkt = ipv4("10.0.0.2", "10.0.0.1", bytes(size))
        net.a.send_packet(pkt, T0 + 1)
        (data, _), = net.a.datagrams_to_send(T0 + 1)
        # 5.4.6: header 16, plaintext padded to a multiple of 16, tag 16
        assert len(data) == 16 + (-(-len(pkt) // 16) * 16) + 16
        net.b.receive_datagram(data, ADDR_A, T0 + 1)
        assert received(drain(net.b)) == [pkt]  # padding stripped using the IP length


def test_ipv6_inner_packets() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    up = ipv6("fd00::2", "fd00::1", b"six up")
    net.a.send_packet(up, T0 + 1)
    net.pump(T0 + 1)
    assert received(drain(net.b)) == [up]
    down = ipv6("fd00::1", "fd00::2", b"six down!")
    net.b.send_packet(down, T0 + 1)
    net.pump(T0 + 1)
    assert received(drain(net.a)) == [down]


def test_longest_prefix_routing() -> None:
    k = [StaticKeys.from_private(crypto.generate_private_key()) for _ in range(3)]
    ep = WireGuardEndpoint(k[0], jitter=lambda: 0.0)
    ep.add_peer(k[1].public, allowed_ips=["10.0.0.0/8", "::/0"], endpoint=("192.0.2.1", 1))
    ep.add_peer(k[2].public, allowed_ips=["10.1.0.0/16", "2001:db8::/32"], endpoint=("192.0.2.2", 2))
    ep.send_packet(ipv4("10.9.9.9", "10.1.2.3"), T0)
    ep.send_packet(ipv4("10.9.9.9", "10.2.2.3"), T0)
    ep.send_packet(ipv6("fd00::9", "2001:db8::1"), T0)
    ep.send_packet(ipv6("fd00::9", "2001:db9::1"), T0)
    ep.send_packet(ipv4("10.9.9.9", "11.0.0.1"), T0)
    dests = [dst for _, dst in ep.datagrams_to_send(T0)]
    # one initiation per peer (the second is rate limited), in order of first use
    assert dests == [("192.0.2.2", 2), ("192.0.2.1", 1)]
    assert ep.peer_status(k[2].public).staged == 2
    assert ep.peer_status(k[1].public).staged == 2
    assert dropped(drain(ep)) == ["no_route"]
    # re-adding a prefix to another peer moves it (cryptokey routing)
    ep.add_peer(k[1].public, allowed_ips=["10.1.0.0/16"])
    ep.send_packet(ipv4("10.9.9.9", "10.1.2.3"), T0)
    assert ep.peer_status(k[1].public).staged == 3
    ep.send_packet(ipv4("10.9.9.9", "10.2.2.3"), T0)
    assert dropped(drain(ep)) == ["no_route"]


def test_bad_inner_packets_from_tun() -> None:
    net = Net()
    net.a.send_packet(b"", T0)
    net.a.send_packet(b"\x45" + bytes(10), T0)
    net.a.send_packet(b"\x70" + bytes(60), T0)
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1") + bytes(70000), T0)
    assert dropped(drain(net.a)) == ["bad_packet"] * 3 + ["long"]
    assert net.a.datagrams_to_send(T0) == []


def test_staged_queue_is_bounded() -> None:
    net = Net()
    for i in range(MAX_STAGED_PACKETS + 3):
        net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1", bytes([i])), T0)
    assert dropped(drain(net.a)) == ["queue_full"] * 3
    assert net.a.peer_status(net.kb.public).staged == MAX_STAGED_PACKETS
    net.pump(T0)
    got = received(drain(net.b))
    assert len(got) == MAX_STAGED_PACKETS
    assert got[0][-1] == 3  # the oldest were dropped


# --- refusals ------------------------------------------------------------------------


def test_replayed_transport_dropped() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    pkt = ipv4("10.0.0.2", "10.0.0.1", b"once")
    net.a.send_packet(pkt, T0 + 1)
    (data, _), = net.a.datagrams_to_send(T0 + 1)
    net.b.receive_datagram(data, ADDR_A, T0 + 1)
    assert received(drain(net.b)) == [pkt]
    net.b.receive_datagram(data, ADDR_A, T0 + 2)
    events = drain(net.b)
    assert received(events) == [] and dropped(events) == ["replay"]


def test_out_of_order_accepted_within_window() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    datagrams = []
    for i in range(5):
        net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1", bytes([i])), T0 + 1)
        datagrams += net.a.datagrams_to_send(T0 + 1)
    for data, _ in reversed(datagrams):
        net.b.receive_datagram(data, ADDR_A, T0 + 1)
    assert [p[-1] for p in received(drain(net.b))] == [4, 3, 2, 1, 0]


def test_tampered_transport_dropped_without_burning_the_counter() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    pkt = ipv4("10.0.0.2", "10.0.0.1", b"intact")
    net.a.send_packet(pkt, T0 + 1)
    (data, _), = net.a.datagrams_to_send(T0 + 1)
    bad = data[:-1] + bytes([data[-1] ^ 1])
    net.b.receive_datagram(bad, ADDR_A, T0 + 1)
    assert dropped(drain(net.b)) == ["decrypt"]
    net.b.receive_datagram(data, ADDR_A, T0 + 1)  # the genuine one is still accepted
    assert received(drain(net.b)) == [pkt]


def test_unknown_index_and_garbage() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0 + 1)
    (data, _), = net.a.datagrams_to_send(T0 + 1)
    receiver, _ = parse_transport_header(data)
    other = data[:4] + struct.pack("<I", receiver ^ 0xFFFF) + data[8:]
    net.b.receive_datagram(other, ADDR_A, T0 + 1)
    net.b.receive_datagram(b"\x04\x00", ADDR_A, T0 + 1)
    net.b.receive_datagram(b"\x07\x00\x00\x00" + bytes(60), ADDR_A, T0 + 1)
    net.b.receive_datagram(b"\x01\x00\x00\x00" + bytes(144), ADDR_A, T0 + 1)
    assert dropped(drain(net.b)) == ["unknown_index", "short", "bad_type", "bad_mac1"]
    assert net.b.datagrams_to_send(T0 + 1) == []


def test_unknown_peer_refused() -> None:
    net = Net()
    stranger = StaticKeys.from_private(crypto.generate_private_key())
    data, _ = create_initiation(stranger, net.kb.public, bytes(32), 1, T0)
    net.b.receive_datagram(data, ("192.0.2.66", 1), T0)
    assert dropped(drain(net.b)) == ["unknown_peer"]
    assert net.b.datagrams_to_send(T0) == []


def test_removed_peer_is_unknown() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    net.b.remove_peer(net.ka.public)
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0 + 1)
    net.pump(T0 + 1)
    assert dropped(drain(net.b)) == ["unknown_index"]
    net.a.handle_timer(T0 + 1 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)  # A gives up waiting
    net.pump(T0 + 1 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
    assert dropped(drain(net.b)) == ["unknown_peer"]


def test_stale_timestamp_refused() -> None:
    net = Net()
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0)
    (init1, _), = net.a.datagrams_to_send(T0)
    net.b.receive_datagram(init1, ADDR_A, T0)
    assert kinds(net.b.datagrams_to_send(T0)) == [MSG_RESPONSE]
    # the same initiation again (a replay), a minute later
    net.b.receive_datagram(init1, ADDR_A, T0 + 60)
    assert dropped(drain(net.b)) == ["stale_timestamp"]
    assert net.b.datagrams_to_send(T0 + 60) == []
    # an initiation made with an older clock is as stale
    old, _ = create_initiation(net.ka, net.kb.public, bytes(32), 5, T0 - 10)
    net.b.receive_datagram(old, ADDR_A, T0 + 61)
    assert dropped(drain(net.b)) == ["stale_timestamp"]


def test_initiation_flood_refused() -> None:
    net = Net()
    first, _ = create_initiation(net.ka, net.kb.public, bytes(32), 1, T0)
    second, _ = create_initiation(net.ka, net.kb.public, bytes(32), 2, T0 + 0.001)
    third, _ = create_initiation(net.ka, net.kb.public, bytes(32), 3, T0 + 1)
    net.b.receive_datagram(first, ADDR_A, T0)
    net.b.receive_datagram(second, ADDR_A, T0 + INITIATION_FLOOD_INTERVAL / 2)
    net.b.receive_datagram(third, ADDR_A, T0 + 2 * INITIATION_FLOOD_INTERVAL)
    assert dropped(drain(net.b)) == ["flood"]
    assert kinds(net.b.datagrams_to_send(T0 + 1)) == [MSG_RESPONSE, MSG_RESPONSE]


def test_source_not_allowed() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    spoofed = ipv4("10.0.0.3", "10.0.0.1", b"spoof")  # A may only use 10.0.0.2
    net.a.send_packet(spoofed, T0 + 1)
    net.a.send_packet(ipv6("fd00::3", "fd00::1"), T0 + 1)
    net.pump(T0 + 1)
    events = drain(net.b)
    assert received(events) == []
    assert dropped(events) == ["source_not_allowed", "source_not_allowed"]


def test_bad_inner_packet_received() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    # an IPv4 header claiming more bytes than were sent
    pkt = bytearray(ipv4("10.0.0.2", "10.0.0.1", b"x" * 20))
    pkt[2:4] = (200).to_bytes(2, "big")
    net.a.send_packet(bytes(pkt), T0 + 1)
    net.pump(T0 + 1)
    assert dropped(drain(net.b)) == ["bad_packet"]


def test_under_load_cookie_path() -> None:
    load = {"on": True}
    net = Net(b_under_load=lambda now: load["on"])
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"later"), T0)
    net.pump(T0)
    # B answered the initiation with a cookie reply instead of a response
    assert [(who, message_type(d)) for who, d in net.log] == [
        ("a", MSG_INITIATION),
        ("b", MSG_COOKIE_REPLY),
    ]
    assert dropped(drain(net.b)) == ["bad_mac2"]
    assert completed(drain(net.a)) == []
    # the retransmission carries mac2 with the cookie and gets through
    net.a.handle_timer(T0 + REKEY_TIMEOUT)
    net.pump(T0 + REKEY_TIMEOUT)
    events_b = drain(net.b)
    assert dropped(events_b) == []
    assert received(events_b) == [ipv4("10.0.0.2", "10.0.0.1", b"later")]
    assert completed(drain(net.a)) == [True]


def test_under_load_cookie_bound_to_source() -> None:
    net = Net(b_under_load=lambda now: True)
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0)
    net.pump(T0)
    drain(net.b)
    net.addr["a"] = ("198.51.100.99", 40000)  # A's address changes before the retry
    net.a.handle_timer(T0 + REKEY_TIMEOUT)
    net.pump(T0 + REKEY_TIMEOUT)
    assert dropped(drain(net.b)) == ["bad_mac2"]  # cookie was for the old address
    assert completed(drain(net.a)) == []


def test_under_load_rate_limit() -> None:
    net = Net(b_under_load=lambda now: True)
    init, state = create_initiation(net.ka, net.kb.public, bytes(32), 1, T0)
    net.b.receive_datagram(init, ADDR_A, T0)
    (cookie_reply, _), = net.b.datagrams_to_send(T0)
    jar = CookieJar(net.kb.public)
    jar.consume_reply(cookie_reply, state.mac1, T0)
    for i in range(10):
        data, _ = create_initiation(
            net.ka, net.kb.public, bytes(32), 10 + i, T0 + 1 + i, cookie=jar.current(T0)
        )
        net.b.receive_datagram(data, ADDR_A, T0 + 0.001 * i)
    reasons = dropped(drain(net.b))
    assert reasons[0] == "bad_mac2"
    # a burst of 5, then 20 per second (wireguard-go's ratelimiter)
    assert reasons.count("rate_limited") >= 4
    assert len(kinds(net.b.datagrams_to_send(T0))) <= 6


# --- roaming ---------------------------------------------------------------------------


def test_roaming() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    assert net.b.peer_status(net.ka.public).endpoint == ADDR_A
    new_addr: Address = ("192.0.2.200", 1234)
    net.addr["a"] = new_addr
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"moved"), T0 + 1)
    net.pump(T0 + 1)
    assert received(drain(net.b)) == [ipv4("10.0.0.2", "10.0.0.1", b"moved")]
    assert net.b.peer_status(net.ka.public).endpoint == new_addr
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"follow"), T0 + 2)
    (_, dst), = net.b.datagrams_to_send(T0 + 2)
    assert dst == new_addr


def test_no_roaming_on_unauthenticated_datagram() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0 + 1)
    (data, _), = net.a.datagrams_to_send(T0 + 1)
    forged = data[:-1] + bytes([data[-1] ^ 0x80])
    net.b.receive_datagram(forged, ("192.0.2.66", 666), T0 + 1)
    net.b.receive_datagram(data, ("192.0.2.67", 667), T0 + 1)  # authentic, then replayed
    net.b.receive_datagram(data, ("192.0.2.68", 668), T0 + 1)
    assert dropped(drain(net.b)) == ["decrypt", "replay"]
    assert net.b.peer_status(net.ka.public).endpoint == ("192.0.2.67", 667)


# --- timers ------------------------------------------------------------------------------


def test_rekey_after_time() -> None:
    net = Net()
    net.connect()
    drain(net.a)
    drain(net.b)
    old = net.a.peer_status(net.kb.public).current_index
    t = T0 + REKEY_AFTER_TIME + 1
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"late"), t)
    out = net.a.datagrams_to_send(t)
    assert kinds(out) == [MSG_TRANSPORT, MSG_INITIATION]
    for data, _ in out:
        net.b.receive_datagram(data, ADDR_A, t)
    net.pump(t)
    assert received(drain(net.b)) == [ipv4("10.0.0.2", "10.0.0.1", b"late")]
    assert completed(drain(net.a)) == [True]
    st = net.a.peer_status(net.kb.public)
    assert st.current_index != old and st.previous_index == old
    # B confirmed the new session with A's keepalive
    st_b = net.b.peer_status(net.ka.public)
    assert st_b.next_index is None and st_b.previous_index is not None


def test_responder_does_not_rekey_after_time() -> None:
    net = Net()
    net.connect()
    t = T0 + REKEY_AFTER_TIME + 1
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), t)
    assert kinds(net.b.datagrams_to_send(t)) == [MSG_TRANSPORT]


def test_initiator_rekeys_on_receive_near_reject_time() -> None:
    net = Net()
    net.connect()
    t = T0 + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT + 1
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), t)
    (data, _), = net.b.datagrams_to_send(t)
    net.a.receive_datagram(data, ADDR_B, t)
    assert len(received(drain(net.a))) == 1
    assert kinds(net.a.datagrams_to_send(t)) == [MSG_INITIATION]
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), t + 6)
    (data, _), = net.b.datagrams_to_send(t + 6)
    net.a.receive_datagram(data, ADDR_B, t + 6)
    assert net.a.datagrams_to_send(t + 6) == []  # only once per session


def test_session_rejected_after_reject_time() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    t = T0 + REJECT_AFTER_TIME
    # a datagram sealed just before expiry, delivered after
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"old"), t - 1)
    old = [d for d, _ in net.a.datagrams_to_send(t - 1) if message_type(d) == MSG_TRANSPORT]
    net.b.receive_datagram(old[0], ADDR_A, t)
    assert dropped(drain(net.b)) == ["expired"]
    # an expired session is not used to send: B queues and initiates instead
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"new"), t)
    assert kinds(net.b.datagrams_to_send(t)) == [MSG_INITIATION]
    assert net.b.peer_status(net.ka.public).staged == 1


def test_handshake_after_expiry_recovers() -> None:
    net = Net()
    net.connect()
    drain(net.a)
    drain(net.b)
    t = T0 + REJECT_AFTER_TIME + 5
    pkt = ipv4("10.0.0.1", "10.0.0.2", b"after")
    net.b.send_packet(pkt, t)
    net.pump(t)
    assert completed(drain(net.b)) == [True]  # B was the initiator this time
    assert received(drain(net.a)) == [pkt]


def test_passive_keepalive() -> None:
    net = Net()
    net.connect()
    drain(net.a)
    drain(net.b)
    # B received data and sent nothing: it must send a keepalive after KEEPALIVE_TIMEOUT
    assert net.b.get_timer() == approx(T0 + KEEPALIVE_TIMEOUT)
    net.b.handle_timer(T0 + KEEPALIVE_TIMEOUT - 0.5)
    assert net.b.datagrams_to_send(T0 + KEEPALIVE_TIMEOUT - 0.5) == []
    t = T0 + KEEPALIVE_TIMEOUT
    net.b.handle_timer(t)
    out = net.b.datagrams_to_send(t)
    assert kinds(out) == [MSG_TRANSPORT] and len(out[0][0]) == 32  # empty payload
    net.a.receive_datagram(out[0][0], ADDR_B, t)
    events = drain(net.a)
    assert events == []  # a keepalive is accepted and not delivered
    # and A no longer plans a new handshake for "not hearing back" (due at T0 + 15):
    # only the key erasure timer is left
    assert net.a.get_timer() == approx(T0 + SESSION_KEEP_TIME)


def test_no_passive_keepalive_when_answering() -> None:
    net = Net()
    net.connect()
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0 + 1)
    net.b.datagrams_to_send(T0 + 1)
    net.b.handle_timer(T0 + KEEPALIVE_TIMEOUT + 1)
    assert net.b.datagrams_to_send(T0 + KEEPALIVE_TIMEOUT + 1) == []


def test_new_handshake_when_not_hearing_back() -> None:
    net = Net()
    net.connect()
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0)  # A hears back for its first packet
    net.pump(T0)
    drain(net.a)
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0 + 1)
    net.a.datagrams_to_send(T0 + 1)  # lost; B never answers
    t = T0 + 1 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    net.a.handle_timer(t - 0.1)
    assert net.a.datagrams_to_send(t - 0.1) == []
    net.a.handle_timer(t)
    assert kinds(net.a.datagrams_to_send(t)) == [MSG_INITIATION]


def test_persistent_keepalive() -> None:
    net = Net(a_keepalive=25)
    # configured with an endpoint: A sends at once, which means a handshake first
    first_timer = net.a.get_timer()
    assert first_timer is not None and first_timer <= T0
    net.a.handle_timer(T0)
    net.pump(T0)
    assert completed(drain(net.a)) == [True]
    assert completed(drain(net.b)) == [False]  # confirmed by A's keepalive
    assert net.a.get_timer() == approx(T0 + 25)
    net.a.handle_timer(T0 + 24)
    assert net.a.datagrams_to_send(T0 + 24) == []
    net.a.handle_timer(T0 + 25)
    out = net.a.datagrams_to_send(T0 + 25)
    assert kinds(out) == [MSG_TRANSPORT] and len(out[0][0]) == 32
    # the next one is due 25 s after the last authenticated packet sent or received
    assert net.a.get_timer() == approx(T0 + 50)
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0 + 30)
    net.pump(T0 + 30)
    assert len(received(drain(net.a))) == 1
    # A now owes B a passive keepalive (T0 + 40), which also counts as traffic
    assert net.a.get_timer() == approx(T0 + 30 + KEEPALIVE_TIMEOUT)
    net.a.handle_timer(T0 + 40)
    assert kinds(net.a.datagrams_to_send(T0 + 40)) == [MSG_TRANSPORT]
    assert net.a.get_timer() == approx(T0 + 65)
    net.a.handle_timer(T0 + 64)
    assert net.a.datagrams_to_send(T0 + 64) == []
    net.a.handle_timer(T0 + 65)
    out = net.a.datagrams_to_send(T0 + 65)
    assert kinds(out) == [MSG_TRANSPORT] and len(out[0][0]) == 32


def test_initiation_retransmit_and_give_up() -> None:
    net = Net()
    pkt = ipv4("10.0.0.2", "10.0.0.1")
    net.a.send_packet(pkt, T0)
    sent = [T0] if kinds(net.a.datagrams_to_send(T0)) == [MSG_INITIATION] else []
    t = T0
    while (timer := net.a.get_timer()) is not None and timer < T0 + 10 * REKEY_ATTEMPT_TIME:
        t = timer
        net.a.handle_timer(t)
        for data, _ in net.a.datagrams_to_send(t):
            assert message_type(data) == MSG_INITIATION
            sent.append(t)
        if t - T0 > REKEY_ATTEMPT_TIME + REKEY_TIMEOUT:
            break
    gaps = {round(b - a, 6) for a, b in zip(sent, sent[1:], strict=False)}
    assert gaps == {REKEY_TIMEOUT}
    assert sent[-1] - T0 < REKEY_ATTEMPT_TIME
    assert len(sent) == int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
    assert dropped(drain(net.a)) == ["handshake_timeout"]
    assert net.a.peer_status(net.kb.public).staged == 0


def test_retransmit_uses_fresh_ephemeral_and_jitter() -> None:
    ka = StaticKeys.from_private(crypto.generate_private_key())
    kb = StaticKeys.from_private(crypto.generate_private_key())
    ep = WireGuardEndpoint(ka, jitter=lambda: 0.25)
    ep.add_peer(kb.public, allowed_ips=["0.0.0.0/0"], endpoint=ADDR_B)
    ep.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0)
    (first, _), = ep.datagrams_to_send(T0)
    assert ep.get_timer() == approx(T0 + REKEY_TIMEOUT + 0.25)
    ep.handle_timer(T0 + REKEY_TIMEOUT + 0.25)
    (second, _), = ep.datagrams_to_send(T0 + REKEY_TIMEOUT + 0.25)
    assert first[8:40] != second[8:40]  # new ephemeral
    assert first[4:8] != second[4:8]  # new sender index


def test_keys_erased_after_three_reject_times() -> None:
    net = Net()
    net.connect()
    drain(net.b)
    net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0 + 1)
    (data, _), = net.a.datagrams_to_send(T0 + 1)
    t = T0 + SESSION_KEEP_TIME
    net.b.handle_timer(t)
    st = net.b.peer_status(net.ka.public)
    assert (st.previous_index, st.current_index, st.next_index) == (None, None, None)
    net.b.receive_datagram(data, ADDR_A, t)
    assert dropped(drain(net.b)) == ["unknown_index"]


def test_get_timer_none_when_idle() -> None:
    ka = StaticKeys.from_private(crypto.generate_private_key())
    ep = WireGuardEndpoint(ka)
    assert ep.get_timer() is None
    ep.add_peer(StaticKeys.from_private(crypto.generate_private_key()).public)
    assert ep.get_timer() is None
    assert ep.next_event() is None
    assert ep.datagrams_to_send(T0) == []


def test_add_peer_validation() -> None:
    ka = StaticKeys.from_private(crypto.generate_private_key())
    ep = WireGuardEndpoint(ka)
    with pytest.raises(ValueError):
        ep.add_peer(ka.public)
    with pytest.raises(ValueError):
        ep.add_peer(b"short")
    with pytest.raises(ValueError):
        ep.add_peer(bytes(32))  # low-order point
    with pytest.raises(ValueError):
        ep.add_peer(
            StaticKeys.from_private(crypto.generate_private_key()).public, preshared_key=b"x"
        )


def test_rekey_after_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric.protocols.wireguard import timers

    monkeypatch.setattr(timers, "REKEY_AFTER_MESSAGES", 3)
    net = Net()
    net.connect()  # counter 0 used by the first packet
    sent = []
    for i in range(4):
        net.a.send_packet(ipv4("10.0.0.2", "10.0.0.1"), T0 + 6 + i)
        sent.append(kinds(net.a.datagrams_to_send(T0 + 6 + i)))
    # 6.2: once more than REKEY_AFTER_MESSAGES were sent (counters 0..3), the initiator
    # rekeys, once (initiations are at most one per REKEY_TIMEOUT)
    assert sent == [[MSG_TRANSPORT], [MSG_TRANSPORT], [MSG_TRANSPORT, MSG_INITIATION], [MSG_TRANSPORT]]


def test_reject_after_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric.protocols.wireguard import endpoint as protocol

    monkeypatch.setattr(protocol, "REJECT_AFTER_MESSAGES", 3)
    net = Net()
    net.connect()
    drain(net.b)
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0 + 6)
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0 + 6)
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0 + 6)
    net.b.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0 + 6)
    # 6.2: a session is not used past REJECT_AFTER_MESSAGES: queue and handshake
    out = net.b.datagrams_to_send(T0 + 6)
    assert kinds(out) == [MSG_TRANSPORT] * 3 + [MSG_INITIATION]
    counters = [parse_transport_header(d)[1] for d, _ in out[:3]]
    assert counters == [0, 1, 2]
    assert net.b.peer_status(net.ka.public).staged == 1


def test_simultaneous_initiation_converges() -> None:
    net = Net(a_endpoint_for_b=True)
    to_b = ipv4("10.0.0.2", "10.0.0.1", b"to b")
    to_a = ipv4("10.0.0.1", "10.0.0.2", b"to a")
    net.a.send_packet(to_b, T0)
    net.b.send_packet(to_a, T0)
    net.pump(T0)
    ev_a, ev_b = drain(net.a), drain(net.b)
    assert received(ev_a) == [to_a] and received(ev_b) == [to_b]
    assert dropped(ev_a) == [] and dropped(ev_b) == []
    # both keep talking afterwards
    net.a.send_packet(to_b, T0 + 1)
    net.b.send_packet(to_a, T0 + 1)
    net.pump(T0 + 1)
    assert received(drain(net.a)) == [to_a] and received(drain(net.b)) == [to_b]
