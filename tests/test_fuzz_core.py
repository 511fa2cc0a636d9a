"""Fuzzing every parser of untrusted bytes with hypothesis.

Arbitrary bytes and mutations of valid messages (bit flips, truncation,
extension, a changed type word, with and without mac1 recomputed so the
mutation reaches the cryptography) must either be accepted or refused with the
documented error types: MessageError (messages.py) or HandshakeError
(handshake.py). WireGuardEndpoint.receive_datagram and send_packet never raise.
"""

from __future__ import annotations

import functools
import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.constants import MAX_DATAGRAM, MSG_TRANSPORT
from fabric.protocols.wireguard.endpoint import PacketDropped, PacketReceived, WireGuardEndpoint
from fabric.protocols.wireguard.messages import (
    CookieReply,
    Initiation,
    MessageError,
    Response,
    message_type,
    parse_transport_header,
)
from fabric.protocols.wireguard.noise import (
    CookieChecker,
    CookieJar,
    HandshakeError,
    StaticKeys,
    consume_initiation,
    consume_response,
    create_initiation,
    encode_source,
    mac1_key_for,
)

NOW = 1_700_000_000.0
SRC = ("192.0.2.1", 4242)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INI = StaticKeys.from_private(crypto.generate_private_key())
RES = StaticKeys.from_private(crypto.generate_private_key())
PSK = bytes(range(32))


def _ipv4(body: bytes) -> bytes:
    return struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 17, 0,
        bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]),
    ) + body


class World:
    """INI has sent an initiation to RES's endpoint and holds the transport keys."""

    def __init__(self) -> None:
        self.msg1, self.state = create_initiation(INI, RES.public, PSK, 0x01020304, NOW)
        self.ep = WireGuardEndpoint(RES)
        self.ep.add_peer(INI.public, preshared_key=PSK, allowed_ips=["10.0.0.2/32"])
        self.ep.receive_datagram(self.msg1, SRC, NOW)
        ((self.msg2, _),) = self.ep.datagrams_to_send(NOW)
        keys = consume_response(INI, self.state, self.msg2, NOW)
        payload = _ipv4(b"fuzz")
        payload += bytes(-len(payload) % 16)
        self.transport = struct.pack("<IIQ", MSG_TRANSPORT, keys.remote_index, 0) + (
            crypto.aead_encrypt(keys.send_key, 0, payload, b"")
        )
        source = encode_source(*SRC)
        # a cookie reply INI would get from RES, and one RES's endpoint would get from INI
        self.cookie = CookieChecker(RES.public).create_reply(self.msg1, source, NOW)
        self.cookie_ep = CookieChecker(INI.public).create_reply(self.msg2, source, NOW)


@functools.cache
def world() -> World:
    return World()


def valid_messages() -> dict[str, bytes]:
    w = world()
    return {
        "initiation": w.msg1,
        "response": w.msg2,
        "cookie": w.cookie,
        "cookie_ep": w.cookie_ep,
        "transport": w.transport,
    }


def _reseal(data: bytes, receiver_public: bytes) -> bytes:
    if len(data) < 32:
        return data
    b = bytearray(data)
    b[-32:-16] = crypto.mac(mac1_key_for(receiver_public), bytes(b[:-32]))
    return bytes(b)


@st.composite
def mutated(
    draw: st.DrawFn,
    kinds: tuple[str, ...] = ("initiation", "response", "cookie", "cookie_ep", "transport"),
) -> bytes:
    data = bytearray(valid_messages()[draw(st.sampled_from(kinds))])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "type", "zero32"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=40))
        elif op == "type" and len(data) >= 4:
            data[0:4] = struct.pack("<I", draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0x100, 2**32 - 1])))
        elif op == "zero32" and len(data) >= 40:
            i = draw(st.integers(0, len(data) - 32))
            data[i : i + 32] = bytes(32)  # e.g. a low-order point
    out = bytes(data)
    if draw(st.booleans()):
        out = _reseal(out, draw(st.sampled_from([RES.public, INI.public])))
    return out


untrusted = st.one_of(st.binary(max_size=300), mutated())

ALLOWED = (MessageError, HandshakeError)


@FUZZ
@given(untrusted)
def test_message_type(data: bytes) -> None:
    try:
        kind = message_type(data)
    except MessageError as exc:
        assert exc.reason in {"short", "long", "bad_type", "bad_size"}
        return
    assert kind in (1, 2, 3, 4)
    assert len(data) >= 32


@FUZZ
@given(untrusted)
def test_unpack_round_trips(data: bytes) -> None:
    for cls in (Initiation, Response, CookieReply):
        try:
            msg = cls.unpack(data)  # type: ignore[attr-defined]
        except MessageError:
            continue
        assert msg.pack() == data


@FUZZ
@given(untrusted)
def test_parse_transport_header(data: bytes) -> None:
    try:
        receiver, counter = parse_transport_header(data)
    except MessageError:
        return
    assert 0 <= receiver < 2**32 and 0 <= counter < 2**64
    assert data[:4] == b"\x04\x00\x00\x00"


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(("initiation",))))
def test_consume_initiation(data: bytes) -> None:
    try:
        consumed = consume_initiation(RES, data, lambda pub: pub == INI.public)
    except ALLOWED:
        return
    # only the genuine content can decrypt; fields outside the AEADs may vary
    assert consumed.peer_public == INI.public


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(("response",))))
def test_consume_response(data: bytes) -> None:
    try:
        keys = consume_response(INI, world().state, data, NOW)
    except ALLOWED:
        return
    assert keys.is_initiator


@FUZZ
@given(
    st.one_of(st.binary(max_size=200), mutated(("cookie",))),
    st.one_of(st.just(b"genuine"), st.binary(min_size=16, max_size=16)),
)
def test_cookie_jar_consume_reply(data: bytes, last_mac1: bytes) -> None:
    if last_mac1 == b"genuine":
        last_mac1 = world().state.mac1
    jar = CookieJar(RES.public)
    try:
        jar.consume_reply(data, last_mac1, NOW)
    except ALLOWED:
        assert jar.current(NOW) is None
        return
    assert jar.current(NOW) is not None


@FUZZ
@given(untrusted, st.booleans())
def test_cookie_checker(data: bytes, issue_cookie: bool) -> None:
    checker = CookieChecker(RES.public)
    source = encode_source(*SRC)
    if issue_cookie:
        checker.create_reply(valid_messages()["initiation"], source, NOW)
    assert checker.check_mac1(data) in (True, False)
    assert checker.check_mac2(data, source, NOW) in (True, False)
    try:
        reply = checker.create_reply(data, source, NOW)
    except MessageError:
        return
    assert len(reply) == 64


@functools.cache
def loaded_endpoint() -> WireGuardEndpoint:
    ep = WireGuardEndpoint(RES, under_load=lambda now: True)
    ep.add_peer(INI.public, preshared_key=PSK, allowed_ips=["10.0.0.2/32"])
    return ep


def endpoint(under_load: bool) -> WireGuardEndpoint:
    """RES's endpoint knowing INI, mid-handshake (world) or under load."""
    return loaded_endpoint() if under_load else world().ep


@FUZZ
@given(untrusted, st.booleans(), st.floats(0, 1000))
def test_receive_datagram_never_raises(data: bytes, under_load: bool, dt: float) -> None:
    ep = endpoint(under_load)
    ep.receive_datagram(data, SRC, NOW + dt)
    for out, addr in ep.datagrams_to_send(NOW + dt):
        assert len(out) <= MAX_DATAGRAM and addr == SRC
    while (ev := ep.next_event()) is not None:
        if isinstance(ev, PacketReceived):  # only with an authentic packet
            assert ev.peer_public == INI.public
        if isinstance(ev, PacketDropped):
            assert ev.reason and ev.reason.replace("_", "").isalnum()
    ep.handle_timer(NOW + dt)


def _ip_packets() -> st.SearchStrategy[bytes]:
    v4 = st.builds(
        lambda src, dst, body: struct.pack(
            ">BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 17, 0,
            ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
        ) + body,
        st.ip_addresses(v=4), st.ip_addresses(v=4), st.binary(max_size=64),
    )
    return st.one_of(v4, st.binary(max_size=100))


@FUZZ
@given(_ip_packets())
def test_send_packet_never_raises(packet: bytes) -> None:
    ep = WireGuardEndpoint(RES)
    ep.add_peer(INI.public, allowed_ips=["0.0.0.0/1", "::/0"], endpoint=SRC)
    ep.send_packet(packet, NOW)
    for out, _ in ep.datagrams_to_send(NOW):
        assert message_type(out) in (1, 4)


def test_fuzz_inputs_are_valid_to_start_with() -> None:
    """The corpus the mutations start from is genuine (else the fuzzing is shallow)."""
    w = World()
    assert consume_initiation(RES, w.msg1, lambda p: p == INI.public).peer_public == INI.public
    jar = CookieJar(RES.public)
    jar.consume_reply(w.cookie, w.state.mac1, NOW)
    assert jar.current(NOW) is not None
    w.ep.receive_datagram(w.cookie_ep, SRC, NOW)
    assert w.ep.next_event() is None  # cookie taken silently
    w.ep.receive_datagram(w.transport, SRC, NOW)
    events = [w.ep.next_event(), w.ep.next_event()]
    assert isinstance(events[1], PacketReceived) and events[1].packet == _ipv4(b"fuzz")
    assert message_type(valid_messages()["transport"]) == MSG_TRANSPORT
