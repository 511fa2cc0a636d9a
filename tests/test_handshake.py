"""Noise IKpsk2 handshake and cookies (fabric/protocols/wireguard/noise.py), initiator and responder in memory."""

from __future__ import annotations

import itertools

import pytest

from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.constants import COOKIE_REFRESH_TIME, INITIATION_SIZE, RESPONSE_SIZE
from fabric.protocols.wireguard.crypto import aead_decrypt, aead_encrypt, generate_private_key
from fabric.protocols.wireguard.messages import (
    CookieReply,
    MessageError,
    Response,
    transport_header,
)
from fabric.protocols.wireguard.noise import (
    ZERO_KEY,
    CookieChecker,
    CookieJar,
    HandshakeError,
    StaticKeys,
    check_mac1,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    encode_source,
    mac1_key_for,
)

NOW = 1_700_000_000.0
PSK = bytes(range(32))


@pytest.fixture
def keys() -> tuple[StaticKeys, StaticKeys]:
    return StaticKeys.from_private(generate_private_key()), StaticKeys.from_private(
        generate_private_key()
    )


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


def _reseal_mac1(data: bytes, receiver_public: bytes) -> bytes:
    """Recompute mac1 so a tampered message gets past the mac1 check."""
    b = bytearray(data)
    b[-32:-16] = crypto.mac(mac1_key_for(receiver_public), bytes(b[:-32]))
    return bytes(b)


def _known(*publics: bytes):  # type: ignore[no-untyped-def]
    return lambda pub: pub in publics


@pytest.mark.parametrize("psk", [ZERO_KEY, PSK], ids=["no-psk", "psk"])
def test_full_handshake(keys: tuple[StaticKeys, StaticKeys], psk: bytes) -> None:
    ini, res = keys
    msg1, state = create_initiation(ini, res.public, psk, 0x11223344, NOW)
    assert len(msg1) == INITIATION_SIZE
    assert check_mac1(res.mac1_key, msg1)
    assert not check_mac1(ini.mac1_key, msg1)
    consumed = consume_initiation(res, msg1, _known(ini.public))
    assert consumed.peer_public == ini.public
    assert consumed.sender_index == 0x11223344
    assert consumed.timestamp == crypto.tai64n(NOW)
    msg2, r_keys = create_response(res, consumed, psk, 0x55667788, NOW)
    assert len(msg2) == RESPONSE_SIZE
    assert check_mac1(ini.mac1_key, msg2)
    i_keys = consume_response(ini, state, msg2, NOW + 0.1)
    assert i_keys.is_initiator and not r_keys.is_initiator
    assert (i_keys.local_index, i_keys.remote_index) == (0x11223344, 0x55667788)
    assert (r_keys.local_index, r_keys.remote_index) == (0x55667788, 0x11223344)
    assert i_keys.send_key == r_keys.recv_key
    assert i_keys.recv_key == r_keys.send_key
    assert i_keys.send_key != i_keys.recv_key
    # the keys actually carry transport data both ways (whitepaper 5.4.6)
    ct = aead_encrypt(i_keys.send_key, 0, b"ping", b"")
    assert aead_decrypt(r_keys.recv_key, 0, ct, b"") == b"ping"
    ct = aead_encrypt(r_keys.send_key, 0, b"pong", b"")
    assert aead_decrypt(i_keys.recv_key, 0, ct, b"") == b"pong"


def test_psk_mismatch_is_refused(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    msg1, state = create_initiation(ini, res.public, ZERO_KEY, 1, NOW)
    consumed = consume_initiation(res, msg1, _known(ini.public))
    msg2, _ = create_response(res, consumed, PSK, 2, NOW)
    with pytest.raises(HandshakeError) as exc:
        consume_response(ini, state, msg2, NOW)
    assert exc.value.reason == "decrypt"


def test_sessions_differ_between_handshakes(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    sends = set()
    for i in range(3):
        msg1, state = create_initiation(ini, res.public, PSK, i, NOW + i)
        consumed = consume_initiation(res, msg1, _known(ini.public))
        msg2, _ = create_response(res, consumed, PSK, 100 + i, NOW + i)
        sends.add(consume_response(ini, state, msg2, NOW + i).send_key)
    assert len(sends) == 3  # fresh ephemerals every time


def test_deterministic_with_given_ephemerals(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    e = generate_private_key()
    a, _ = create_initiation(ini, res.public, PSK, 9, NOW, ephemeral_private=e)
    b, _ = create_initiation(ini, res.public, PSK, 9, NOW, ephemeral_private=e)
    assert a == b
    assert a[8:40] == crypto.public_key(e)


# --- tampering ------------------------------------------------------------------

# initiation layout: type 0-3, sender 4-7, ephemeral 8-39, static 40-87, timestamp 88-115


@pytest.mark.parametrize(
    "pos,reason",
    [(8, "decrypt"), (40, "decrypt"), (87, "decrypt"), (88, "decrypt"), (115, "decrypt")],
)
def test_tampered_initiation(keys: tuple[StaticKeys, StaticKeys], pos: int, reason: str) -> None:
    ini, res = keys
    msg1, _ = create_initiation(ini, res.public, PSK, 1, NOW)
    bad = _flip(msg1, pos)
    assert not check_mac1(res.mac1_key, bad)  # mac1 catches it first
    with pytest.raises(HandshakeError) as exc:
        consume_initiation(res, _reseal_mac1(bad, res.public), _known(ini.public))
    assert exc.value.reason == reason


def test_initiation_from_unknown_peer(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    msg1, _ = create_initiation(ini, res.public, PSK, 1, NOW)
    with pytest.raises(HandshakeError) as exc:
        consume_initiation(res, msg1, _known())
    assert exc.value.reason == "unknown_peer"


def test_initiation_for_someone_else(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    other = StaticKeys.from_private(generate_private_key())
    msg1, _ = create_initiation(ini, other.public, PSK, 1, NOW)
    assert not check_mac1(res.mac1_key, msg1)
    with pytest.raises(HandshakeError) as exc:
        consume_initiation(res, msg1, _known(ini.public))
    assert exc.value.reason == "decrypt"


def test_low_order_ephemeral_in_initiation(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    msg1, _ = create_initiation(ini, res.public, PSK, 1, NOW)
    bad = _reseal_mac1(msg1[:8] + bytes(32) + msg1[40:], res.public)
    with pytest.raises(HandshakeError) as exc:
        consume_initiation(res, bad, _known(ini.public))
    assert exc.value.reason == "decrypt"


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"\x01\x00\x00", "short"),
        (b"\x01\x00\x00\x00" + bytes(100), "bad_size"),
        (b"\x09\x00\x00\x00" + bytes(144), "bad_type"),
        (b"\x02\x00\x00\x00" + bytes(88), "bad_type"),  # a response is not an initiation
    ],
)
def test_malformed_initiation(keys: tuple[StaticKeys, StaticKeys], data: bytes, reason: str) -> None:
    ini, res = keys
    with pytest.raises(MessageError) as exc:
        consume_initiation(res, data, _known(ini.public))
    assert exc.value.reason == reason


def _response(keys: tuple[StaticKeys, StaticKeys]):  # type: ignore[no-untyped-def]
    ini, res = keys
    msg1, state = create_initiation(ini, res.public, PSK, 1, NOW)
    consumed = consume_initiation(res, msg1, _known(ini.public))
    msg2, _ = create_response(res, consumed, PSK, 2, NOW)
    return ini, state, msg2


# response layout: type 0-3, sender 4-7, receiver 8-11, ephemeral 12-43, empty 44-59


@pytest.mark.parametrize("pos", [4, 12, 43, 44, 59])
def test_tampered_response(keys: tuple[StaticKeys, StaticKeys], pos: int) -> None:
    ini, state, msg2 = _response(keys)
    bad = _flip(msg2, pos)
    assert not check_mac1(ini.mac1_key, bad)
    resealed = _reseal_mac1(bad, ini.public)
    if pos == 4:  # the sender index is not authenticated by the AEAD: only mac1 guards it
        assert consume_response(ini, state, resealed, NOW).remote_index == 2 ^ 1
        return
    with pytest.raises(HandshakeError) as exc:
        consume_response(ini, state, resealed, NOW)
    assert exc.value.reason == "decrypt"


def test_response_to_another_initiation(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, state, msg2 = _response(keys)
    bad = _reseal_mac1(_flip(msg2, 8), ini.public)
    with pytest.raises(HandshakeError) as exc:
        consume_response(ini, state, bad, NOW)
    assert exc.value.reason == "unknown_index"


def test_low_order_ephemeral_in_response(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, state, msg2 = _response(keys)
    bad = _reseal_mac1(msg2[:12] + bytes(32) + msg2[44:], ini.public)
    with pytest.raises(HandshakeError) as exc:
        consume_response(ini, state, bad, NOW)
    assert exc.value.reason == "bad_key"


def test_response_is_not_accepted_twice_by_message_type(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, state, msg2 = _response(keys)
    with pytest.raises(MessageError) as exc:
        consume_response(ini, state, transport_header(1, 0) + bytes(16), NOW)
    assert exc.value.reason == "bad_type"


# --- cookies (whitepaper 5.4.7) ----------------------------------------------------


def _counter_random():  # type: ignore[no-untyped-def]
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "little")


SRC = encode_source("192.0.2.7", 51820)
OTHER_SRC = encode_source("192.0.2.8", 51820)


def test_encode_source() -> None:
    assert encode_source("192.0.2.7", 51820) == bytes([192, 0, 2, 7]) + (51820).to_bytes(2, "big")
    assert len(encode_source("2001:db8::1", 1)) == 18


def test_cookie_round_trip(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    checker = CookieChecker(res.public, random=_counter_random())
    jar = CookieJar(res.public)
    msg1, state = create_initiation(ini, res.public, PSK, 0xABCD, NOW)
    assert checker.check_mac1(msg1)
    assert not checker.check_mac2(msg1, SRC, NOW)  # no cookie yet
    reply = checker.create_reply(msg1, SRC, NOW)
    parsed = CookieReply.unpack(reply)
    assert parsed.receiver == 0xABCD
    assert jar.current(NOW) is None
    jar.consume_reply(reply, state.mac1, NOW + 0.1)
    cookie = jar.current(NOW + 0.1)
    assert cookie is not None and len(cookie) == 16
    msg1b, _ = create_initiation(ini, res.public, PSK, 0xABCE, NOW + 1, cookie=cookie)
    assert checker.check_mac1(msg1b)
    assert checker.check_mac2(msg1b, SRC, NOW + 1)
    # the cookie is bound to the source address and port
    assert not checker.check_mac2(msg1b, OTHER_SRC, NOW + 1)
    assert not checker.check_mac2(msg1b, encode_source("192.0.2.7", 51821), NOW + 1)
    # tampering with anything before mac2 breaks it
    assert not checker.check_mac2(_flip(msg1b, 5), SRC, NOW + 1)


def test_cookie_on_response(keys: tuple[StaticKeys, StaticKeys]) -> None:
    """A responder under load may itself be answered with a cookie (5.4.7)."""
    ini, res = keys
    msg1, _ = create_initiation(ini, res.public, PSK, 1, NOW)
    consumed = consume_initiation(res, msg1, _known(ini.public))
    msg2, _ = create_response(res, consumed, PSK, 0x77, NOW)
    checker = CookieChecker(ini.public)
    reply = checker.create_reply(msg2, SRC, NOW)
    assert CookieReply.unpack(reply).receiver == 0x77
    jar = CookieJar(ini.public)
    jar.consume_reply(reply, Response.unpack(msg2).mac1, NOW)
    msg2b, _ = create_response(res, consumed, PSK, 0x78, NOW, cookie=jar.current(NOW))
    assert checker.check_mac2(msg2b, SRC, NOW)


def test_cookie_reply_for_another_message_refused(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    checker = CookieChecker(res.public)
    msg1, _ = create_initiation(ini, res.public, PSK, 1, NOW)
    msg1b, state_b = create_initiation(ini, res.public, PSK, 2, NOW)
    reply = checker.create_reply(msg1, SRC, NOW)
    jar = CookieJar(res.public)
    with pytest.raises(HandshakeError) as exc:
        jar.consume_reply(reply, state_b.mac1, NOW)  # bound to msg1's mac1 by the AEAD
    assert exc.value.reason == "decrypt"
    assert jar.current(NOW) is None
    # a jar for another responder cannot open it either
    with pytest.raises(HandshakeError):
        CookieJar(ini.public).consume_reply(reply, msg1[-32:-16], NOW)


def test_cookie_reply_only_for_handshake_messages(keys: tuple[StaticKeys, StaticKeys]) -> None:
    _, res = keys
    checker = CookieChecker(res.public)
    with pytest.raises(MessageError) as exc:
        checker.create_reply(transport_header(1, 0) + bytes(16), SRC, NOW)
    assert exc.value.reason == "bad_type"


def test_cookie_secret_rotation(keys: tuple[StaticKeys, StaticKeys]) -> None:
    ini, res = keys
    checker = CookieChecker(res.public, random=_counter_random())
    jar = CookieJar(res.public)
    msg1, state = create_initiation(ini, res.public, PSK, 1, NOW)
    jar.consume_reply(checker.create_reply(msg1, SRC, NOW), state.mac1, NOW)
    old_cookie = jar.current(NOW)
    msg1b, _ = create_initiation(ini, res.public, PSK, 2, NOW, cookie=old_cookie)
    assert checker.check_mac2(msg1b, SRC, NOW + COOKIE_REFRESH_TIME - 1)
    # the secret is only good for COOKIE_REFRESH_TIME (5.4.7)
    assert not checker.check_mac2(msg1b, SRC, NOW + COOKIE_REFRESH_TIME)
    # the initiator stops using the cookie after the same time
    assert jar.current(NOW + COOKIE_REFRESH_TIME - 1) is not None
    assert jar.current(NOW + COOKIE_REFRESH_TIME) is None
    # a reply made after that uses a fresh secret: the old cookie is worthless,
    # the new one works
    later = NOW + COOKIE_REFRESH_TIME + 1
    msg1c, state_c = create_initiation(ini, res.public, PSK, 3, later)
    reply = checker.create_reply(msg1c, SRC, later)
    assert not checker.check_mac2(msg1b, SRC, later)
    jar.consume_reply(reply, state_c.mac1, later)
    new_cookie = jar.current(later)
    assert new_cookie is not None and new_cookie != old_cookie
    msg1d, _ = create_initiation(ini, res.public, PSK, 4, later, cookie=new_cookie)
    assert checker.check_mac2(msg1d, SRC, later)

