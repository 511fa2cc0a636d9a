"""OpenVPN wire formats, control-channel wrapping and the reliability layer.

fabric.protocols.openvpn.{constants,wire,wrap,reliable}: unit tests, hypothesis
fuzzing of every parser of unauthenticated bytes (a value or WireError with a
reason, nothing else), and interop with Debian's `openvpn` 2.6 client on 127.0.0.1
(its first datagrams, unwrapped; our hard reset, accepted).
"""

from __future__ import annotations

import datetime
import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.protocols.openvpn import constants as C
from fabric.protocols.openvpn.reliable import ReliableReceive, ReliableSend, SendWindowFull
from fabric.protocols.openvpn.wire import (
    ControlPacket,
    WireError,
    data_v1_header,
    data_v2_header,
    opcode_key_id,
    pack_tlvs,
    parse_data,
    parse_tlvs,
)
from fabric.protocols.openvpn.wrap import (
    NoWrap,
    ReplayWindow,
    TlsAuth,
    TlsCrypt,
    format_static_key,
    parse_static_key,
)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEY = bytes(range(256))
SID_C = bytes.fromhex("1122334455667788")
SID_S = bytes.fromhex("99aabbccddeeff01")
REASON = re.compile(r"^[a-z][a-z0-9_]*$")


def refused(exc: WireError) -> str:
    assert REASON.match(exc.reason), exc.reason
    return exc.reason


def reason_of(fn: Callable[..., object], *args: object) -> str:
    with pytest.raises(WireError) as info:
        fn(*args)
    return refused(info.value)


# --- constants ---------------------------------------------------------------------------


def test_constants_match_the_source() -> None:
    assert C.P_CONTROL_HARD_RESET_CLIENT_V2 << C.P_OPCODE_SHIFT == 0x38  # first byte seen on the wire
    assert C.P_DATA_V2 << C.P_OPCODE_SHIFT == 0x48
    assert C.CONTROL_OPCODES == {3, 4, 5, 7, 8, 10, 11}
    assert len(C.PING_STRING) == 16 and C.PING_STRING[0] == 0x2A
    assert len(C.OCC_MAGIC) == 16 and C.OCC_MAGIC[0] == 0x28
    assert C.TLS_CRYPT_OFF_CT == 49 and C.TLS_CRYPT_OVERHEAD == 40
    assert C.DATA_V2_HEADER_SIZE == 8 and C.STATIC_KEY2_SIZE == 256


# --- control packets -----------------------------------------------------------------------


def test_opcode_key_id() -> None:
    assert opcode_key_id(0x38) == (7, 0)
    assert opcode_key_id(0x4B) == (9, 3)
    assert opcode_key_id(0xFF) == (31, 7)


def test_client_reset_as_seen_from_openvpn() -> None:
    raw = bytes.fromhex("38") + SID_C + bytes.fromhex("00") + bytes(4)
    p = ControlPacket.unpack(raw)
    assert (p.opcode, p.key_id, p.session_id, p.acks, p.remote_session_id, p.message_id, p.payload) == \
        (C.P_CONTROL_HARD_RESET_CLIENT_V2, 0, SID_C, (), None, 0, b"")
    assert p.pack() == raw


def test_server_reset_layout() -> None:
    p = ControlPacket(C.P_CONTROL_HARD_RESET_SERVER_V2, 0, SID_S, (0,), SID_C, 0)
    raw = p.pack()
    # ssl_pkt.c tls_reset_standalone: 1 ack (id 0), the client's sid, our message id 0
    assert raw == bytes([0x40]) + SID_S + b"\x01" + bytes(4) + SID_C + bytes(4)
    assert ControlPacket.unpack(raw) == p


def test_ack_and_control_layouts() -> None:
    ack = ControlPacket(C.P_ACK_V1, 2, SID_S, (5, 6, 7), SID_C)
    raw = ack.pack()
    assert len(raw) == 1 + 8 + 1 + 12 + 8 and raw[0] == C.P_ACK_V1 << 3 | 2
    assert ControlPacket.unpack(raw) == ack
    ctl = ControlPacket(C.P_CONTROL_V1, 1, SID_S, (), None, 9, b"\x16\x03\x01tls")
    raw = ctl.pack()
    assert raw == bytes([0x21]) + SID_S + b"\x00" + (9).to_bytes(4, "big") + b"\x16\x03\x01tls"
    assert ControlPacket.unpack(raw) == ctl


@pytest.mark.parametrize("fields", [
    dict(opcode=C.P_DATA_V2, key_id=0, session_id=SID_S, message_id=1),
    dict(opcode=C.P_CONTROL_V1, key_id=0, session_id=SID_S[:7], message_id=1),
    dict(opcode=C.P_CONTROL_V1, key_id=8, session_id=SID_S, message_id=1),
    dict(opcode=C.P_CONTROL_V1, key_id=0, session_id=SID_S, acks=(1,), message_id=1),
    dict(opcode=C.P_CONTROL_V1, key_id=0, session_id=SID_S, remote_session_id=SID_C, message_id=1),
    dict(opcode=C.P_CONTROL_V1, key_id=0, session_id=SID_S, acks=tuple(range(9)),
         remote_session_id=SID_C, message_id=1),
    dict(opcode=C.P_CONTROL_V1, key_id=0, session_id=SID_S),
    dict(opcode=C.P_CONTROL_V1, key_id=0, session_id=SID_S, message_id=2**32),
    dict(opcode=C.P_ACK_V1, key_id=0, session_id=SID_S, acks=(1,), remote_session_id=SID_C, message_id=3),
    dict(opcode=C.P_ACK_V1, key_id=0, session_id=SID_S, acks=(1,), remote_session_id=SID_C, payload=b"x"),
])
def test_pack_refuses_inconsistent_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ControlPacket(**fields).pack()


def _ctl(op: int, kid: int = 0, sid: bytes = SID_C) -> bytes:
    return bytes([op << 3 | kid]) + sid


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "short"),
    (_ctl(4), "short"),  # no ack count
    (_ctl(4) + b"\x00", "short"),  # no message id
    (_ctl(4) + b"\x00\x00\x00\x01", "short"),
    (_ctl(4) + b"\x01\x00\x00\x00\x01", "short"),  # no remote sid after an ack
    (_ctl(4) + b"\x02\x00\x00\x00\x01", "short"),  # truncated acks
    (_ctl(1) + b"\x00" + bytes(4), "bad_opcode"),  # key method 1
    (_ctl(2) + b"\x00" + bytes(4), "bad_opcode"),
    (_ctl(0) + b"\x00" + bytes(4), "bad_opcode"),
    (_ctl(6) + b"\x00" + bytes(4), "bad_opcode"),  # data
    (_ctl(9) + b"\x00" + bytes(4), "bad_opcode"),
    (_ctl(12) + b"\x00" + bytes(4), "bad_opcode"),
    (_ctl(31, 7) + b"\x00" + bytes(4), "bad_opcode"),
    (_ctl(7, 1) + b"\x00" + bytes(4), "bad_key_id"),  # a hard reset is key id 0
    (_ctl(8, 3) + b"\x00" + bytes(4), "bad_key_id"),
    (_ctl(7, 0, bytes(8)) + b"\x00" + bytes(4), "bad_session_id"),
    (_ctl(5) + b"\x01" + bytes(4) + bytes(8), "bad_session_id"),  # zero remote sid
    (_ctl(4) + b"\x09" + bytes(36) + SID_S + bytes(4), "too_many_acks"),
    (_ctl(4) + b"\xff" + bytes(64), "too_many_acks"),
    (_ctl(5) + b"\x00", "empty_ack"),
    (_ctl(5) + b"\x01" + bytes(4) + SID_S + b"\x00", "ack_payload"),
    (_ctl(7) + b"\x00" + bytes(4) + b"\x00\x01\x00", "bad_tlv"),  # truncated TLV header
    (_ctl(7) + b"\x00" + bytes(4) + b"\x00\x01\x00\x04\x00\x01", "bad_tlv"),  # truncated value
])
def test_unpack_refuses(raw: bytes, reason: str) -> None:
    assert reason_of(ControlPacket.unpack, raw) == reason


def test_hard_reset_payload_is_tlvs() -> None:
    # ssl_pkt.c tls_reset_standalone with request_resend_wkc: the early-negotiation flags TLV
    tlv = pack_tlvs([(C.TLV_TYPE_EARLY_NEG_FLAGS, C.EARLY_NEG_FLAG_RESEND_WKC.to_bytes(2, "big"))])
    assert tlv == bytes.fromhex("000100020001")
    assert parse_tlvs(tlv) == [(1, b"\x00\x01")]
    p = ControlPacket(C.P_CONTROL_HARD_RESET_SERVER_V2, 0, SID_S, (0,), SID_C, 0, tlv)
    assert ControlPacket.unpack(p.pack()).payload == tlv
    assert parse_tlvs(b"") == []
    # unknown types are skipped by ssl.c parse_early_negotiation_tlvs, so accepted here
    assert parse_tlvs(bytes.fromhex("7777000161")) == [(0x7777, b"a")]
    # a later message of a hard-reset opcode is TLS, not TLVs
    assert ControlPacket.unpack(_ctl(7) + b"\x00" + (1).to_bytes(4, "big") + b"\x00\x01").payload == b"\x00\x01"


def test_eight_acks_are_the_limit() -> None:
    p = ControlPacket(C.P_ACK_V1, 0, SID_S, tuple(range(8)), SID_C)
    assert ControlPacket.unpack(p.pack()).acks == tuple(range(8))


sids = st.binary(min_size=8, max_size=8).filter(lambda b: b != bytes(8))


@st.composite
def control_packets(draw: st.DrawFn) -> ControlPacket:
    op = draw(st.sampled_from(sorted(C.CONTROL_OPCODES)))
    kid = 0 if op in C.HARD_RESET_OPCODES else draw(st.integers(0, 7))
    acks = tuple(draw(st.lists(st.integers(0, 2**32 - 1), min_size=1 if op == C.P_ACK_V1 else 0, max_size=8)))
    remote = draw(sids) if acks else None
    if op == C.P_ACK_V1:
        return ControlPacket(op, kid, draw(sids), acks, remote)
    mid = draw(st.integers(0, 2**32 - 1))
    if op in C.HARD_RESET_OPCODES and mid == 0:
        payload = pack_tlvs(draw(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=8)), max_size=3)))
    else:
        payload = draw(st.binary(max_size=64))
    return ControlPacket(op, kid, draw(sids), acks, remote, mid, payload)


@FUZZ
@given(control_packets())
def test_control_round_trip(p: ControlPacket) -> None:
    assert ControlPacket.unpack(p.pack()) == p


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_control_unpack(data: bytes) -> None:
    try:
        p = ControlPacket.unpack(data)
    except WireError as e:
        refused(e)
    else:
        assert p.pack() == data  # what parses is exactly what it packs back to


@FUZZ
@given(control_packets(), st.data())
def test_fuzz_control_mutations(p: ControlPacket, data: st.DataObject) -> None:
    raw = bytearray(p.pack())
    for _ in range(data.draw(st.integers(1, 4))):
        what = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if what == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif what == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=9))
    try:
        ControlPacket.unpack(bytes(raw))
    except WireError as e:
        refused(e)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_parse_tlvs(data: bytes) -> None:
    try:
        tlvs = parse_tlvs(data)
    except WireError as e:
        assert refused(e) == "bad_tlv"
    else:
        assert pack_tlvs(tlvs) == data


# --- data channel headers ---------------------------------------------------------------


def test_data_v2_header_and_parse() -> None:
    head = data_v2_header(3, 0x010203, 0xA0B0C0D0)
    assert head == bytes([0x4B, 1, 2, 3, 0xA0, 0xB0, 0xC0, 0xD0])
    assert parse_data(head + bytes(17)) == (C.P_DATA_V2, 3, 0x010203, 0xA0B0C0D0)
    assert reason_of(parse_data, head + bytes(16)) == "short"  # openvpn_decrypt_aead: "missing payload"


def test_data_v1_header_and_parse() -> None:
    head = data_v1_header(1, 7)
    assert head == bytes([0x31, 0, 0, 0, 7])
    assert parse_data(head + bytes(17)) == (C.P_DATA_V1, 1, None, 7)
    assert reason_of(parse_data, head + bytes(16)) == "short"


def test_data_undefined_peer_id_means_lookup_by_address() -> None:
    # mudp.c multi_get_create_instance_udp: peer-id MAX_PEER_ID is "disabled"
    assert parse_data(data_v2_header(0, C.MAX_PEER_ID, 1) + bytes(17))[2] is None


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "short"),
    (b"\x48", "short"),
    (bytes([C.P_CONTROL_V1 << 3]) + bytes(30), "bad_opcode"),
    (bytes([0]) + bytes(30), "bad_opcode"),
    (bytes([0x48, 0, 0, 1]) + bytes(4) + bytes(17), "zero_packet_id"),
    (bytes([0x30]) + bytes(4) + bytes(17), "zero_packet_id"),
])
def test_parse_data_refuses(raw: bytes, reason: str) -> None:
    assert reason_of(parse_data, raw) == reason


def test_data_headers_refuse_bad_values() -> None:
    for call in (lambda: data_v2_header(8, 0, 1), lambda: data_v2_header(0, 1 << 24, 1),
                 lambda: data_v2_header(0, 0, 1 << 32), lambda: data_v1_header(0, -1)):
        with pytest.raises(ValueError):
            call()


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_parse_data(data: bytes) -> None:
    try:
        op, kid, peer, pid = parse_data(data)
    except WireError as e:
        refused(e)
    else:
        assert op in (C.P_DATA_V1, C.P_DATA_V2) and 0 <= kid <= 7 and pid > 0
        head = data_v2_header(kid, peer if peer is not None else C.MAX_PEER_ID, pid) \
            if op == C.P_DATA_V2 else data_v1_header(kid, pid)
        assert data.startswith(head)


# --- static key files ------------------------------------------------------------------


def test_format_static_key_is_what_genkey_writes() -> None:
    text = format_static_key(KEY)
    lines = text.split("\n")
    assert lines[:4] == ["#", "# 2048 bit OpenVPN static key", "#", C.STATIC_KEY_HEAD]
    assert lines[4] == KEY[:16].hex() and all(len(line) == 32 for line in lines[4:20])
    assert lines[20:] == [C.STATIC_KEY_FOOT, ""]
    assert parse_static_key(text) == KEY
    assert parse_static_key(text.replace("\n", "\r\n")) == KEY
    upper = "\n".join(line.upper() if len(line) == 32 else line for line in lines)
    assert upper != text and parse_static_key(upper) == KEY  # isxdigit: either case
    assert parse_static_key("  " + text.replace("\n", "  \n")) == KEY


def test_parse_static_key_of_openvpn_genkey(tmp_path: Path) -> None:
    openvpn = shutil.which("openvpn") or ("/usr/sbin/openvpn" if os.path.exists("/usr/sbin/openvpn") else None)
    if openvpn is None:
        pytest.skip("openvpn not installed (apt-get install openvpn)")
    path = tmp_path / "ta.key"
    subprocess.run([openvpn, "--genkey", "secret", str(path)], check=True, capture_output=True, timeout=30)
    text = path.read_text()
    key = parse_static_key(text)
    assert len(key) == 256 and key != bytes(256)
    assert format_static_key(key) == text  # byte for byte the same file


@pytest.mark.parametrize(("text", "word"), [
    ("", "BEGIN"),
    (format_static_key(KEY).replace(C.STATIC_KEY_FOOT, ""), "END"),
    (format_static_key(KEY).replace(C.STATIC_KEY_FOOT, "-----END nonsense-----"), "END"),
    (format_static_key(KEY).replace(KEY[:16].hex(), KEY[:15].hex() + "zz"), "non-hex"),
    (format_static_key(KEY).replace(KEY[:16].hex() + "\n", ""), "240 key bytes"),
    (format_static_key(KEY).replace(KEY[:16].hex(), KEY[:16].hex() + "00"), "257 key bytes"),
])
def test_parse_static_key_refuses(text: str, word: str) -> None:
    with pytest.raises(WireError) as info:
        parse_static_key(text)
    assert info.value.reason == "bad_key_file" and word in str(info.value)


def test_format_static_key_refuses_wrong_size() -> None:
    with pytest.raises(ValueError):
        format_static_key(bytes(128))


@FUZZ
@given(st.text(max_size=300), st.integers(0, 2))
def test_fuzz_parse_static_key(junk: str, where: int) -> None:
    good = format_static_key(KEY)
    text = [junk, good[:100] + junk + good[100:], good + junk][where]
    try:
        key = parse_static_key(text)
    except WireError as e:
        assert refused(e) == "bad_key_file"
    else:
        assert len(key) == 256


# --- tls-crypt ------------------------------------------------------------------------------


def _reset(sid: bytes = SID_C) -> bytes:
    return ControlPacket(C.P_CONTROL_HARD_RESET_CLIENT_V2, 0, sid, message_id=0).pack()


def test_tls_crypt_round_trip_both_ways() -> None:
    server, client = TlsCrypt(KEY, server=True), TlsCrypt(KEY, server=False)
    packet = ControlPacket(C.P_CONTROL_V1, 0, SID_C, (0,), SID_S, 1, b"\x16hello").pack()
    wire = client.wrap(packet, 2, 1_700_000_000)
    assert wire[:9] == packet[:9] and wire[9:17] == (2).to_bytes(4, "big") + (1_700_000_000).to_bytes(4, "big")
    assert len(wire) == len(packet) + C.TLS_CRYPT_OVERHEAD
    assert b"hello" not in wire  # encrypted
    assert server.unwrap(wire) == (packet, 2, 1_700_000_000)
    back = ControlPacket(C.P_CONTROL_HARD_RESET_SERVER_V2, 0, SID_S, (0,), SID_C, 0).pack()
    assert client.unwrap(server.wrap(back, 1, 5)) == (back, 1, 5)


def test_tls_crypt_directions_are_not_symmetric() -> None:
    server, client = TlsCrypt(KEY, server=True), TlsCrypt(KEY, server=False)
    assert reason_of(server.unwrap, server.wrap(_reset(), 1, 1)) == "tls_crypt_auth"
    assert reason_of(client.unwrap, client.wrap(_reset(), 1, 1)) == "tls_crypt_auth"


def test_tls_crypt_uses_the_first_32_bytes_of_each_half() -> None:
    # tls_crypt.c tls_crypt_kt: AES-256-CTR and SHA256 take 32 of the 64 bytes of cipher/hmac
    other = bytearray(KEY)
    for i in (*range(32, 64), *range(96, 128)):
        other[i] ^= 0xFF
    assert TlsCrypt(bytes(other), server=True).wrap(_reset(), 1, 1) == TlsCrypt(KEY, server=True).wrap(_reset(), 1, 1)
    for flip in (0, 64):  # cipher and hmac key of key[0]: the server's sending key
        changed = bytearray(KEY)
        changed[flip] ^= 1
        assert TlsCrypt(bytes(changed), server=True).wrap(_reset(), 1, 1) != TlsCrypt(KEY, server=True).wrap(_reset(), 1, 1)
    changed = bytearray(KEY)
    changed[128] ^= 1  # key[1]: the server only receives with it
    assert TlsCrypt(bytes(changed), server=True).wrap(_reset(), 1, 1) == TlsCrypt(KEY, server=True).wrap(_reset(), 1, 1)


def test_tls_crypt_refuses_tampering_and_short() -> None:
    server, client = TlsCrypt(KEY, server=True), TlsCrypt(KEY, server=False)
    wire = client.wrap(_reset(), 1, 1)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x40
        assert reason_of(server.unwrap, bytes(bad)) == "tls_crypt_auth", i
    assert reason_of(server.unwrap, wire[:48]) == "short"
    assert reason_of(server.unwrap, wire + b"x") == "tls_crypt_auth"
    assert reason_of(TlsCrypt(bytes(256), server=True).unwrap, wire) == "tls_crypt_auth"


def test_wrappers_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError):
        TlsCrypt(bytes(255), server=True)
    with pytest.raises(ValueError):
        TlsAuth(KEY, 2)
    with pytest.raises(ValueError):
        TlsAuth(KEY, 0, "MD4")
    with pytest.raises(ValueError):
        TlsCrypt(KEY, server=True).wrap(b"\x38" + bytes(7), 1, 1)
    with pytest.raises(ValueError):
        TlsAuth(KEY, 0).wrap(_reset(), 2**32, 1)


# --- tls-auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("digest", "size"), [("SHA1", 20), ("SHA256", 32), ("sha512", 64)])
def test_tls_auth_round_trip(digest: str, size: int) -> None:
    server, client = TlsAuth(KEY, 0, digest), TlsAuth(KEY, 1, digest)
    packet = ControlPacket(C.P_CONTROL_V1, 0, SID_C, (0,), SID_S, 1, b"\x16hello").pack()
    wire = client.wrap(packet, 7, 99)
    # ssl_pkt.c swap_hmac: op|kid, sid, hmac, packet id, time, then the rest in clear
    assert wire[:9] == packet[:9] and len(wire) == len(packet) + size + 8
    assert wire[9 + size:17 + size] == (7).to_bytes(4, "big") + (99).to_bytes(4, "big")
    assert wire[17 + size:] == packet[9:]
    assert server.unwrap(wire) == (packet, 7, 99)
    assert client.unwrap(server.wrap(packet, 1, 2)) == (packet, 1, 2)
    assert reason_of(server.unwrap, server.wrap(packet, 1, 2)) == "tls_auth_hmac"


def test_tls_auth_without_direction_uses_key0_both_ways() -> None:
    a, b = TlsAuth(KEY, None), TlsAuth(KEY, None)
    assert b.unwrap(a.wrap(_reset(), 1, 1))[0] == _reset()
    assert a.unwrap(a.wrap(_reset(), 1, 1))[0] == _reset()
    # key[0]'s hmac part is what "0" sends with; "1" receives with it
    assert TlsAuth(KEY, 1).unwrap(a.wrap(_reset(), 1, 1))[0] == _reset()
    assert reason_of(TlsAuth(KEY, 0).unwrap, a.wrap(_reset(), 1, 1)) == "tls_auth_hmac"


def test_tls_auth_refuses_tampering_and_short() -> None:
    server, client = TlsAuth(KEY, 0), TlsAuth(KEY, 1)
    wire = client.wrap(_reset(), 1, 1)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        assert reason_of(server.unwrap, bytes(bad)) == "tls_auth_hmac", i
    assert reason_of(server.unwrap, wire[:9 + 20 + 7]) == "short"
    assert reason_of(TlsAuth(KEY, 0, "SHA256").unwrap, wire) == "short"  # 42 bytes < 9 + 32 + 8
    long = client.wrap(_reset() + bytes(20), 1, 1)
    assert reason_of(TlsAuth(KEY, 0, "SHA256").unwrap, long) == "tls_auth_hmac"


def test_no_wrap() -> None:
    w = NoWrap()
    assert w.wrap(_reset(), 5, 6) == _reset()
    assert w.unwrap(_reset()) == (_reset(), 0, 0)
    assert reason_of(w.unwrap, b"\x38" + bytes(7)) == "short"
    assert not NoWrap.replay_protected and TlsCrypt.replay_protected


def _fuzz_unwrap(unwrap: Callable[[bytes], tuple[bytes, int, int]], data: bytes, allowed: set[str]) -> None:
    try:
        packet, pid, net_time = unwrap(data)
    except WireError as e:
        assert refused(e) in allowed
    else:
        assert isinstance(packet, bytes) and 0 <= pid < 2**32 and 0 <= net_time < 2**32


@FUZZ
@given(st.binary(max_size=120))
def test_fuzz_unwrap(data: bytes) -> None:
    _fuzz_unwrap(TlsCrypt(KEY, server=True).unwrap, data, {"short", "tls_crypt_auth"})
    _fuzz_unwrap(TlsCrypt(KEY, server=False).unwrap, data, {"short", "tls_crypt_auth"})
    _fuzz_unwrap(TlsAuth(KEY, 0).unwrap, data, {"short", "tls_auth_hmac"})
    _fuzz_unwrap(TlsAuth(KEY, None, "SHA256").unwrap, data, {"short", "tls_auth_hmac"})
    _fuzz_unwrap(NoWrap().unwrap, data, {"short"})


@FUZZ
@given(control_packets(), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.data())
def test_fuzz_wrapped_mutations(p: ControlPacket, pid: int, net_time: int, data: st.DataObject) -> None:
    """A valid wrapped packet round-trips; a changed one is refused, never crashes."""
    for sender, receiver in ((TlsCrypt(KEY, server=False), TlsCrypt(KEY, server=True)),
                             (TlsAuth(KEY, 1), TlsAuth(KEY, 0))):
        wire = sender.wrap(p.pack(), pid, net_time)
        assert receiver.unwrap(wire) == (p.pack(), pid, net_time)
        bad = bytearray(wire)
        i = data.draw(st.integers(0, len(bad) - 1))
        bad[i] ^= 1 << data.draw(st.integers(0, 7))
        cut = data.draw(st.integers(0, len(bad)))
        for candidate in (bytes(bad), bytes(wire[:cut]) if cut < len(wire) else bytes(bad)):
            with pytest.raises(WireError) as info:
                receiver.unwrap(candidate)
            assert refused(info.value) in ("short", "tls_crypt_auth", "tls_auth_hmac")


# --- replay window ---------------------------------------------------------------------------


def test_replay_window_backtrack() -> None:
    w = ReplayWindow()
    assert not w.check(0, 100)  # packet_id_test: id 0 never
    assert w.check(5, 100)
    w.add(5, 100)
    assert not w.check(5, 100)  # replay
    assert w.check(3, 100) and w.check(1, 100)  # reordered, unseen
    w.add(3, 100)
    assert not w.check(3, 100) and w.check(4, 100)
    w.add(70, 100)
    assert w.check(7, 100)  # 63 behind, unseen
    assert not w.check(6, 100)  # 64 behind: outside the window
    assert not w.check(71, 99)  # time going back
    assert w.check(1, 101)  # time forward: accepted, a new sequence
    w.add(1, 101)
    assert not w.check(1, 101) and not w.check(70, 100) and w.check(2, 101)


def test_replay_window_jump_and_sequence() -> None:
    w = ReplayWindow()
    for i in range(1, 200):
        assert w.check(i, 7)
        w.add(i, 7)
        assert not w.check(i, 7)
    w.add(1000, 7)  # a jump past the window restarts it below the new id
    assert w.check(999, 7) and w.check(937, 7) and not w.check(936, 7) and not w.check(199, 7)


def test_replay_window_reap_expires_old_ids() -> None:
    # packet_id.c packet_id_reap: ids below one seen more than 15 s ago are expired
    w = ReplayWindow()
    w.add(10, 1, now=100.0)
    w.add(8, 1, now=101.0)
    assert w.check(9, 1, now=110.0) and w.check(5, 1, now=110.0)
    assert not w.check(9, 1, now=117.0) and not w.check(5, 1, now=117.0)
    assert w.check(11, 1, now=117.0)  # newer ids are still fine


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 3)), max_size=60))
def test_replay_window_never_accepts_twice(events: list[tuple[int, int]]) -> None:
    w = ReplayWindow()
    accepted: set[tuple[int, int]] = set()
    newest_time = 0
    for pid, t in events:
        ok = w.check(pid, t)
        if ok:
            assert (pid, t) not in accepted and pid != 0 and t >= newest_time
            w.add(pid, t)
            accepted.add((pid, t))
            newest_time = max(newest_time, t)


# --- reliability: send side ---------------------------------------------------------------


def test_send_assigns_ids_and_keeps_a_window_of_six() -> None:
    s = ReliableSend(first_id=1)
    ids = [s.queue(bytes([i])) for i in range(6)]
    assert ids == [1, 2, 3, 4, 5, 6] and s.available == 0
    with pytest.raises(SendWindowFull):
        s.queue(b"x")
    assert s.on_acks([2, 3, 4, 5, 6]) == [2, 3, 4, 5, 6]
    # reliable_get_num_output_sequenced_available: id 1 unacked still holds the window
    assert s.available == 0 and not s.all_acked and s.in_flight == [1]
    assert s.on_acks([1]) == [1]
    assert s.available == 6 and s.all_acked and s.queue(b"y") == 7


def test_send_timing_backs_off() -> None:
    s = ReliableSend(first_id=0)
    s.queue(b"a", opcode=C.P_CONTROL_HARD_RESET_SERVER_V2)
    assert s.next_timer() == 0.0 and s.opcode(0) == C.P_CONTROL_HARD_RESET_SERVER_V2
    assert s.due(10.0) == [(0, b"a")]
    assert s.due(10.0) == []
    assert s.next_timer() == 12.0
    assert s.due(11.99) == []
    sent_at = []
    for t10 in range(100, 500):  # 10.0 .. 49.9 s, every 0.1 s
        if s.due(t10 / 10):
            sent_at.append(t10 / 10)
    # reliable.c reliable_send: next_try = now + timeout, then timeout *= 2 (2, 4, 8, 16 s)
    assert sent_at == [12.0, 16.0, 24.0, 40.0]
    assert s.sends(0) == 5


def test_send_queued_later_goes_at_once_and_acks_of_unknown_ids_are_ignored() -> None:
    s = ReliableSend(first_id=1)
    s.queue(b"a")
    assert s.due(0.0) == [(1, b"a")]
    s.queue(b"b")
    assert s.due(0.5) == [(2, b"b")]
    assert s.on_acks([0]) == []  # message 0 (the stateless reset): not held
    assert s.in_flight == [1, 2] and s.acked(0) and not s.acked(1) and not s.acked(3)
    assert s.on_acks([2, 2]) == [2] and s.acked(2)
    assert s.next_timer() == 2.0  # id 1 has two later acks
    assert s.on_acks([77]) == []  # not held, but reliable_send_purge counts it as later
    assert s.next_timer() == 0.0 and s.due(0.6) == [(1, b"a")]


def test_fast_retransmit_after_three_later_acks() -> None:
    s = ReliableSend(first_id=0)
    for i in range(5):
        s.queue(bytes([i]))
    assert len(s.due(0.0)) == 5
    s.on_acks([1])
    s.on_acks([2])
    assert s.due(0.1) == []
    s.on_acks([3])  # reliable_send_purge: a third ack of a later id
    assert s.next_timer() == 0.0
    assert s.due(0.2) == [(0, b"\x00")]
    # the resend doubled its timeout (2 -> 4) and reset the count: next at 0.2 + 4
    assert s.next_timer() == pytest.approx(2.0)  # id 4's first retransmit
    s.on_acks([4])
    assert s.due(2.1) == []
    assert s.next_timer() == pytest.approx(4.2)


def test_reacks_count_towards_fast_retransmit() -> None:
    # the peer repeats old acks from its MRU list; reliable_send_purge counts those too
    s = ReliableSend(first_id=0)
    s.queue(b"a")
    s.queue(b"b")
    s.due(0.0)
    s.on_acks([1])
    s.on_acks([1])
    assert s.due(0.5) == []
    s.on_acks([1])
    assert s.due(0.5) == [(0, b"a")]


def test_schedule_now_resends_with_the_initial_timeout() -> None:
    s = ReliableSend(first_id=0, initial_timeout=1.0)
    s.queue(b"a")
    s.due(0.0)
    s.due(1.0)
    s.due(3.0)
    assert s.next_timer() == 7.0
    s.schedule_now(3.5)
    assert s.due(3.5) == [(0, b"a")] and s.next_timer() == 4.5


# --- reliability: receive side -------------------------------------------------------------


@FUZZ
@given(st.permutations(list(range(12))), st.integers(0, 1000))
def test_receive_delivers_in_order_from_any_arrival(order: list[int], base: int) -> None:
    r = ReliableReceive(first_id=base)
    out: list[bytes] = []
    for i in order:
        assert r.on_packet(base + i, b"%d" % (base + i))
        out += r.read()
    assert out == [b"%d" % (base + i) for i in range(12)]
    assert r.packet_id == base + 12


def test_receive_window_edges() -> None:
    r = ReliableReceive(first_id=1)
    assert r.on_packet(12, b"last")  # next_expected + 11
    assert not r.on_packet(13, b"out")  # next_expected + 12: reliable_wont_break_sequentiality
    assert r.pending_acks == [12] and r.dropped_window == 1
    assert r.read() == []
    assert r.on_packet(1, b"first")
    assert r.read() == [b"first"] and r.packet_id == 2
    assert r.on_packet(13, b"now in")  # the window moved


def test_receive_duplicates_are_acked_but_delivered_once() -> None:
    r = ReliableReceive(first_id=0)
    assert r.on_packet(0, b"a")
    assert r.acks_to_send() == [0]
    assert r.read() == [b"a"]
    assert not r.on_packet(0, b"a")  # replay of a delivered one: acked again
    assert r.pending_acks == [0] and r.duplicates == 1
    assert r.on_packet(2, b"c")
    assert not r.on_packet(2, b"c")  # duplicate of a held one: one ack entry
    assert r.pending_acks == [0, 2]
    assert r.read() == []
    assert r.on_packet(1, b"b")
    assert r.read() == [b"b", b"c"]


def test_receive_pending_acks_are_capped_at_eight() -> None:
    r = ReliableReceive(first_id=0)
    for i in range(10):
        r.on_packet(i, b"x")
    assert r.pending_acks == list(range(8))  # reliable_ack_acknowledge_packet_id: full
    assert r.read() == [b"x"] * 10


def test_acks_to_send_limits_and_mru_reacks() -> None:
    r = ReliableReceive(first_id=0)
    for i in range(6):
        r.on_packet(i, b"x")
    r.read()
    assert r.acks_to_send(r.piggyback_ack_limit) == [0, 1, 2, 3]
    assert r.pending_acks == [4, 5] and r.has_pending_acks
    # reliable_ack_write: new acks first, then earlier ones again while there is room
    assert r.acks_to_send(r.dedicated_ack_limit) == [4, 5, 0, 1, 2, 3]
    assert not r.has_pending_acks
    assert r.acks_to_send(4) == [4, 5, 0, 1]  # nothing new: re-acks only
    r.on_packet(6, b"x")
    r.on_packet(1, b"dup")
    assert r.acks_to_send(8) == [6, 1, 4, 5, 0, 2, 3]
    assert r.acks_to_send(0) == []
    assert r.dedicated_ack_limit == 8 and r.piggyback_ack_limit == 4


def test_mru_keeps_eight_newest_first() -> None:
    r = ReliableReceive()
    r.copy_acks_to_mru(list(range(10)))
    assert r.mru == list(range(8))
    r.copy_acks_to_mru([5, 20])
    assert r.mru == [5, 20, 0, 1, 2, 3, 4, 6]


def test_receive_drops_when_all_buffers_hold_out_of_order() -> None:
    r = ReliableReceive(first_id=0, size=3)
    assert r.on_packet(1, b"b") and r.on_packet(2, b"c")
    assert r.on_packet(0, b"a")  # three held, unread
    assert not r.on_packet(1, b"b") and r.dropped_full == 1  # reliable_can_get: no ack either
    assert r.read() == [b"a", b"b", b"c"]


# --- interop with Debian's openvpn 2.6 client ------------------------------------------------


def _openvpn() -> str | None:
    path = shutil.which("openvpn")
    if path is None and os.access("/usr/sbin/openvpn", os.X_OK):
        path = "/usr/sbin/openvpn"
    return path


def _pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway EC P-256 CA and client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fabric test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    paths = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


@pytest.fixture
def udp_server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def _recv(sock: socket.socket, deadline: float, log: Path) -> tuple[bytes, tuple[str, int]]:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"no datagram from the openvpn client in time; its log:\n{tail}")
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        return data, addr


def _interop(tmp_path: Path, udp_server: socket.socket) -> tuple[str, Path, Path, Path, bytes, int]:
    """What an interop test with the real client needs (skips without openvpn): its path,
    a CA with a client certificate and key, a static key (also in tmp_path/ta.key) and
    the port of the UDP socket standing in for the server."""
    openvpn = _openvpn()
    if openvpn is None:
        pytest.skip("openvpn (2.6) not installed: apt-get install openvpn")
    ca, cert, key = _pki(tmp_path)
    static = os.urandom(256)
    (tmp_path / "ta.key").write_text(format_static_key(static))
    return openvpn, ca, cert, key, static, udp_server.getsockname()[1]


@pytest.mark.parametrize("mode", ["tls-crypt", "tls-auth", "none"])
def test_interop_openvpn_client_reset(mode: str, tmp_path: Path, udp_server: socket.socket) -> None:
    openvpn, ca, cert, key, static, port = _interop(tmp_path, udp_server)
    lines = ["client", "dev null", "proto udp", f"remote 127.0.0.1 {port}", "nobind",
             f"ca {ca}", f"cert {cert}", f"key {key}", "verb 3", "connect-retry-max 1"]
    server_wrap: TlsCrypt | TlsAuth | NoWrap
    if mode == "tls-crypt":
        lines.append(f"tls-crypt {tmp_path / 'ta.key'}")
        server_wrap = TlsCrypt(static, server=True)
    elif mode == "tls-auth":
        lines.append(f"tls-auth {tmp_path / 'ta.key'} 1")
        server_wrap = TlsAuth(static, 0)
    else:
        server_wrap = NoWrap()
    conf = tmp_path / "client.conf"
    conf.write_text("\n".join(lines) + "\n")
    log = tmp_path / "openvpn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([openvpn, "--config", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        # 1. the client's hard reset
        data, addr = _recv(udp_server, time.monotonic() + 10, log)
        assert data[0] == 0x38  # P_CONTROL_HARD_RESET_CLIENT_V2 << 3 | key id 0
        packet, pid, net_time = server_wrap.unwrap(data)
        reset = ControlPacket.unpack(packet)
        assert reset.opcode == C.P_CONTROL_HARD_RESET_CLIENT_V2 and reset.key_id == 0
        assert len(reset.session_id) == 8 and reset.session_id != bytes(8)
        assert reset.acks == () and reset.remote_session_id is None
        assert reset.message_id == 0 and reset.payload == b""  # no early-negotiation TLVs without tls-crypt-v2
        replay = ReplayWindow()
        if server_wrap.replay_protected:
            assert pid == 1  # tls_session_init: packet ids from 1 (not EARLY_NEG_START)
            assert abs(net_time - time.time()) < 3600
            assert replay.check(pid, net_time)
            replay.add(pid, net_time)
        else:
            assert len(data) == 1 + 8 + 1 + 4 and (pid, net_time) == (0, 0)

        # 2. our hard reset: acks its message 0, our own message 0
        our_sid = os.urandom(8)
        answer = ControlPacket(C.P_CONTROL_HARD_RESET_SERVER_V2, 0, our_sid, (0,), reset.session_id, 0)
        udp_server.sendto(server_wrap.wrap(answer.pack(), 1, int(time.time())), addr)

        # 3. the client goes on: TLS ClientHello (message 1) or an ack of our reset
        data, addr2 = _recv(udp_server, time.monotonic() + 10, log)
        assert addr2 == addr
        packet, pid2, net_time2 = server_wrap.unwrap(data)
        nxt = ControlPacket.unpack(packet)
        assert nxt.opcode != C.P_CONTROL_HARD_RESET_CLIENT_V2, \
            "the client resent its reset: it did not take ours\n" + log.read_text(errors="replace")[-2000:]
        assert nxt.session_id == reset.session_id and nxt.key_id == 0
        assert nxt.opcode in (C.P_CONTROL_V1, C.P_ACK_V1), C.OPCODE_NAMES.get(nxt.opcode)
        assert 0 in nxt.acks and nxt.remote_session_id == our_sid
        if nxt.opcode == C.P_CONTROL_V1:
            assert nxt.message_id == 1
            assert nxt.payload[:1] == b"\x16" and nxt.payload[5:6] == b"\x01"  # TLS handshake, ClientHello
        if server_wrap.replay_protected:
            assert (pid2, net_time2) == (2, net_time)  # the same time, the next id
            assert replay.check(pid2, net_time2)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_interop_client_resends_its_reset_with_new_packet_ids(tmp_path: Path, udp_server: socket.socket) -> None:
    """Unanswered, the client resends its reset (reliable.c, --tls-timeout 2 s, OpenVPN's
    whole-second clock) re-wrapped with a new tls-crypt packet id each time."""
    openvpn, ca, cert, key, static, port = _interop(tmp_path, udp_server)
    log = tmp_path / "openvpn.log"
    server = TlsCrypt(static, server=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [openvpn, "--client", "--dev", "null", "--proto", "udp", "--remote", "127.0.0.1", str(port),
             "--nobind", "--tls-crypt", str(tmp_path / "ta.key"), "--ca", str(ca), "--cert", str(cert),
             "--key", str(key), "--verb", "1", "--connect-retry-max", "1"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        seen: list[tuple[float, int, int, ControlPacket]] = []
        deadline = time.monotonic() + 10
        while len(seen) < 2:
            data, _ = _recv(udp_server, deadline, log)
            packet, pid, net_time = server.unwrap(data)
            p = ControlPacket.unpack(packet)
            seen.append((time.monotonic(), pid, net_time, p))
        (t1, pid1, time1, p1), (t2, pid2, time2, p2) = seen
        assert p1 == p2 and p1.opcode == C.P_CONTROL_HARD_RESET_CLIENT_V2 and p1.message_id == 0
        assert (pid1, pid2) == (1, 2) and time1 == time2
        assert 0.9 <= t2 - t1 <= 3.5
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_random_shuffles_with_duplicates_and_loss() -> None:
    """Send and receive sides together over a lossy, reordering, duplicating link."""
    rng = random.Random(7)
    tx, rx = ReliableSend(first_id=1), ReliableReceive(first_id=1)
    messages = [bytes([i]) * 3 for i in range(40)]
    todo = list(messages)
    got: list[bytes] = []
    now = 0.0
    while len(got) < len(messages) and now < 2000:
        while todo and tx.available:
            tx.queue(todo.pop(0))
        flight = [m for m in tx.due(now) if rng.random() > 0.3]
        flight += [m for m in flight if rng.random() < 0.2]
        rng.shuffle(flight)
        for mid, payload in flight:
            rx.on_packet(mid, payload)
        got += rx.read()
        if rng.random() > 0.3:
            tx.on_acks(rx.acks_to_send(rng.choice([4, 8])))
        now += 0.5
    assert got == messages
