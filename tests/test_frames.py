"""fabric/control/frames.py: round trips, addresses, and fuzzing of decode() (invariant 7)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fabric.control import frames
from fabric.control.frames import (
    AUX_PER,
    HEADER,
    KINDS,
    MAX_BATCH,
    NO_ADDR,
    VERSION,
    Frame,
    FrameError,
    decode,
    format_addr,
    pack_addr,
    unpack_addr,
)
from fabric.protocols.wireguard.constants import MAX_DATAGRAM

FUZZ = settings(max_examples=300, deadline=None)

U64 = st.integers(0, 2**64 - 1)
kinds = st.sampled_from(sorted(KINDS))
addrs = st.binary(min_size=18, max_size=18)
packet_lists = st.lists(st.binary(max_size=64), max_size=12)


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    kind = draw(kinds)
    packets = draw(packet_lists)
    aux_per = AUX_PER.get(kind, 0)
    aux = draw(st.lists(U64, min_size=len(packets) * aux_per, max_size=len(packets) * aux_per))
    extra = draw(st.none() | st.binary(max_size=64))
    counters: list[int] = []
    if kind == frames.TUN_WRITE:  # (datagrams >= 1, bytes) per packet, a counter per datagram
        aux = [x for _ in packets for x in (draw(st.integers(1, 4)), draw(U64))]
        counters = draw(st.lists(U64, min_size=sum(aux[0::2]), max_size=sum(aux[0::2])))
        extra = None
    return Frame(
        kind=kind,
        edge=draw(st.integers(0, 0xFFFF)),
        session_id=draw(U64),
        counter0=draw(U64),
        addr=draw(addrs),
        packets=packets,
        aux=aux,
        extra=extra,
        counters=counters,
    )


def check_decoded(parts: list[bytes]) -> Frame | None:
    """The fuzz property: FrameError, or a frame consistent with its body."""
    try:
        f = decode(parts)
    except FrameError:
        return None
    assert f.kind in KINDS
    assert len(f.packets) <= MAX_BATCH
    assert sum(len(p) for p in f.packets) == len(parts[1])
    assert all(len(p) <= MAX_DATAGRAM for p in f.packets)
    assert b"".join(bytes(p) for p in f.packets) == bytes(parts[1])
    assert len(f.aux) == len(f.packets) * AUX_PER.get(f.kind, 0)
    assert len(f.addr) == frames.ADDR_SIZE
    return f


def assert_same(a: Frame, b: Frame) -> None:
    assert (a.kind, a.edge, a.session_id, a.counter0) == (b.kind, b.edge, b.session_id, b.counter0)
    assert bytes(a.addr) == bytes(b.addr)
    assert [bytes(p) for p in a.packets] == [bytes(p) for p in b.packets]
    assert list(a.aux) == list(b.aux)
    assert a.extra == b.extra
    assert list(a.counters) == list(b.counters)


def header_fields(head: bytes) -> list:
    return list(HEADER.unpack_from(head, 0))


def with_header(parts: list[bytes], **changes: int) -> list[bytes]:
    """parts with header fields replaced (kind, version, aux_per, proto, edge, n, ...)."""
    names = ["kind", "version", "aux_per", "proto", "edge", "n", "sid", "counter0", "ip", "port", "seq"]
    fields = header_fields(parts[0])
    for k, v in changes.items():
        fields[names.index(k)] = v
    return [HEADER.pack(*fields) + parts[0][HEADER.size :], *parts[1:]]


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_every_kind(kind: int) -> None:
    packets = [b"", b"a", bytes(range(256)) * 4, b"\xff" * MAX_DATAGRAM]
    aux = list(range(len(packets) * AUX_PER.get(kind, 0)))
    counters: list[int] = []
    if kind == frames.TUN_WRITE:  # (datagrams, bytes) per packet; counters of all datagrams
        aux = [1, 10, 2, 20, 3, 30, 1, 40]
        counters = [0, 2**64 - 1, 5, 6, 7, 8, 9]
    f = Frame(kind, edge=7, session_id=2**64 - 1, counter0=12345, addr=pack_addr("192.0.2.1", 51820),
              packets=packets, aux=aux, extra=b"\x80" if kind == frames.HANDSHAKE_OUT else None,
              counters=counters)
    parts = f.encode()
    assert len(parts) == (3 if f.extra is not None or kind == frames.TUN_WRITE else 2)
    g = decode(parts)
    assert_same(f, g)
    assert format_addr(g.addr) == "192.0.2.1:51820"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_empty_batch(kind: int) -> None:
    f = Frame(kind)
    g = decode(f.encode())
    assert_same(f, g)
    assert g.addr == NO_ADDR
    assert format_addr(g.addr) == ""


@FUZZ
@given(valid_frames())
def test_round_trip_fuzz(f: Frame) -> None:
    parts = f.encode()
    g = check_decoded(parts)
    assert g is not None
    assert_same(f, g)
    # memoryview and bytearray parts (zero-copy receive) decode the same
    h = decode([memoryview(p) for p in parts[:2]] + [bytearray(p) for p in parts[2:]])
    assert_same(f, h)


def test_encode_refuses_wrong_aux_count() -> None:
    with pytest.raises(FrameError):
        Frame(frames.TUN_WRITE, packets=[b"x", b"y"], aux=[1, 2, 3]).encode()
    with pytest.raises(FrameError, match="counters"):
        Frame(frames.TUN_WRITE, packets=[b"x", b"y"], aux=[1, 2, 2, 4], counters=[1, 2]).encode()
    with pytest.raises(FrameError):
        Frame(frames.DECRYPT, packets=[b"x"], aux=[1]).encode()


# --- addresses -------------------------------------------------------------------


@FUZZ
@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_addr_v4_round_trip(ip: ipaddress.IPv4Address, port: int) -> None:
    raw = pack_addr(str(ip), port)
    assert len(raw) == frames.ADDR_SIZE
    assert raw[:12] == b"\x00" * 10 + b"\xff\xff"
    assert unpack_addr(raw) == (str(ip), port)
    assert format_addr(raw) == f"{ip}:{port}"


@FUZZ
@given(st.ip_addresses(v=6), st.integers(0, 65535))
def test_addr_v6_round_trip(ip: ipaddress.IPv6Address, port: int) -> None:
    raw = pack_addr(str(ip), port)
    assert len(raw) == frames.ADDR_SIZE
    host, p = unpack_addr(raw)
    assert p == port
    if ip.ipv4_mapped is not None:
        assert host == str(ip.ipv4_mapped)  # v4-mapped comes back as plain IPv4
    else:
        assert ipaddress.IPv6Address(host) == ip
        assert format_addr(raw) == f"[{host}]:{port}" or raw == NO_ADDR


def test_addr_examples() -> None:
    assert unpack_addr(pack_addr("10.1.2.3", 1)) == ("10.1.2.3", 1)
    assert unpack_addr(pack_addr("::1", 51820)) == ("::1", 51820)
    assert unpack_addr(pack_addr("fe80::1%eth0", 5)) == ("fe80::1", 5)  # scope id dropped
    assert pack_addr("1.2.3.4", 80) == pack_addr("::ffff:1.2.3.4", 80)
    assert format_addr(pack_addr("2001:db8::2", 443)) == "[2001:db8::2]:443"
    with pytest.raises(OSError):
        pack_addr("1.2.3", 1)


@FUZZ
@given(st.binary(max_size=40).filter(lambda b: len(b) != 18))
def test_unpack_addr_wrong_size(raw: bytes) -> None:
    with pytest.raises(FrameError):
        unpack_addr(raw)


# --- malformed frames --------------------------------------------------------------


def _valid_parts() -> list[bytes]:
    return Frame(frames.TUN_WRITE, 1, 2, 3, pack_addr("::1", 9), [b"abc", b"de"], [1, 2, 3, 4],
                 counters=[7, 8, 9, 10]).encode()


@pytest.mark.parametrize("nparts", [0, 1, 4, 5])
def test_wrong_part_count(nparts: int) -> None:
    parts = _valid_parts()
    parts = (parts + [b"", b""])[:nparts]
    with pytest.raises(FrameError, match="parts"):
        decode(parts)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: [p[0][: HEADER.size - 1], p[1]], "short header"),
        (lambda p: [b"", p[1]], "short header"),
        (lambda p: [p[0][:-1], p[1]], "header length"),
        (lambda p: [p[0] + b"\0", p[1]], "header length"),
        (lambda p: [p[0], p[1][:-1]], "body length"),
        (lambda p: [p[0], p[1] + b"!"], "body length"),
        (lambda p: with_header(p, version=VERSION + 1), "version"),
        (lambda p: with_header(p, version=0), "version"),
        (lambda p: with_header(p, kind=0), "kind"),
        (lambda p: with_header(p, kind=255), "kind"),
        (lambda p: with_header(p, kind=frames.DECRYPT), "aux"),
        (lambda p: with_header(p, aux_per=1), "aux"),
        (lambda p: with_header(p, n=1), "header length"),
        (lambda p: with_header(p, n=3), "header length"),
        (lambda p: with_header(p, n=MAX_BATCH + 1), "over"),
        (lambda p: with_header(p, n=2**32 - 1), "over"),
        (lambda p: p[:2], "counters"),
        (lambda p: [p[0], p[1], p[2][:-1]], "counters"),
        (lambda p: [p[0], p[1], p[2] + bytes(8)], "counters"),
        (lambda p: [p[0][: -32] + struct.pack("<4Q", 0, 2, 4, 4), p[1], p[2]], "counters"),
    ],
)
def test_malformed_frames(mutate, match: str) -> None:
    parts = _valid_parts()
    assert decode(parts).kind == frames.TUN_WRITE  # the unmutated frame is fine
    with pytest.raises(FrameError, match=match):
        decode(mutate(parts))


def test_packet_over_max_datagram() -> None:
    head = HEADER.pack(frames.UDP_SEND, VERSION, 0, 0, 0, 1, 0, 0, bytes(16), 0, 0)
    parts = [head + struct.pack("<I", MAX_DATAGRAM + 1), bytes(MAX_DATAGRAM + 1)]
    with pytest.raises(FrameError, match="packet"):
        decode(parts)


def test_max_batch_accepted() -> None:
    f = Frame(frames.ENCRYPT, packets=[b"p"] * MAX_BATCH)
    assert len(decode(f.encode()).packets) == MAX_BATCH


def test_huge_lengths_do_not_overflow() -> None:
    # lengths that sum to the body size only modulo 2**32 must not pass
    head = HEADER.pack(frames.UDP_SEND, VERSION, 0, 0, 0, 2, 0, 0, bytes(16), 0, 0)
    parts = [head + struct.pack("<2I", 2**32 - 1, 5), b"abcd"]
    with pytest.raises(FrameError):
        decode(parts)


# --- fuzz ---------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.binary(max_size=120), max_size=5))
@example([HEADER.pack(frames.DECRYPT, VERSION, 0, 0, 0, 0, 0, 0, bytes(16), 0, 0), b""])
@example([HEADER.pack(frames.DECRYPT, VERSION, 0, 0, 0, 1, 0, 0, bytes(16), 0, 0) + b"\5\0\0\0", b"hello"])
def test_decode_arbitrary_parts(parts: list[bytes]) -> None:
    check_decoded(parts)


@st.composite
def header_bytes(draw: st.DrawFn) -> bytes:
    """A header with plausible fields (to get past the first checks) and a lengths array."""
    kind = draw(st.sampled_from([*sorted(KINDS), 0, 5, 255]))
    version = draw(st.sampled_from([VERSION, VERSION, 0, 1, VERSION + 1]))
    aux_per = draw(st.sampled_from([AUX_PER.get(kind, 0), 0, 1, 2, 255]))
    n = draw(st.integers(0, 6) | st.sampled_from([MAX_BATCH, MAX_BATCH + 1, 2**32 - 1]))
    head = HEADER.pack(kind, version, aux_per, draw(st.integers(0, 255)), draw(st.integers(0, 0xFFFF)), n, draw(U64), draw(U64),
                       draw(st.binary(min_size=16, max_size=16)), draw(st.integers(0, 0xFFFF)),
                       draw(st.integers(0, 2**32 - 1)))
    m = draw(st.integers(0, 6))
    lens = draw(st.lists(st.integers(0, 40) | st.sampled_from([MAX_DATAGRAM + 1, 2**32 - 1]), min_size=m, max_size=m))
    aux = draw(st.lists(U64, max_size=12))
    return head + struct.pack(f"<{m}I", *lens) + struct.pack(f"<{len(aux)}Q", *aux)


@FUZZ
@given(header_bytes(), st.binary(max_size=200), st.none() | st.binary(max_size=20))
def test_decode_structured_garbage(head: bytes, body: bytes, extra: bytes | None) -> None:
    parts = [head, body] + ([extra] if extra is not None else [])
    check_decoded(parts)


MUTATIONS = ["truncate_head", "extend_head", "truncate_body", "extend_body", "flip_head_byte",
             "set_field", "drop_part", "add_parts"]


@FUZZ
@given(valid_frames(), st.sampled_from(MUTATIONS), st.data())
def test_decode_mutated_valid_frames(f: Frame, mutation: str, data: st.DataObject) -> None:
    parts = f.encode()
    head, body = parts[0], parts[1]
    if mutation == "truncate_head":
        parts[0] = head[: data.draw(st.integers(0, len(head) - 1))]
    elif mutation == "extend_head":
        parts[0] = head + data.draw(st.binary(min_size=1, max_size=24))
    elif mutation == "truncate_body":
        parts[1] = body[: data.draw(st.integers(0, len(body)))]
    elif mutation == "extend_body":
        parts[1] = body + data.draw(st.binary(min_size=1, max_size=24))
    elif mutation == "flip_head_byte":
        i = data.draw(st.integers(0, len(head) - 1))
        parts[0] = head[:i] + bytes([head[i] ^ data.draw(st.integers(1, 255))]) + head[i + 1 :]
    elif mutation == "set_field":
        field = data.draw(st.sampled_from(["kind", "version", "aux_per", "n"]))
        bits = 32 if field == "n" else 8
        parts = with_header(parts, **{field: data.draw(st.integers(0, 2**bits - 1))})
    elif mutation == "drop_part":
        parts = parts[:1]
    else:
        parts = parts + [b""] * data.draw(st.integers(4 - len(parts), 3))
    g = check_decoded(parts)
    if mutation in ("truncate_head", "extend_head", "drop_part", "add_parts"):
        assert g is None, f"{mutation} must be refused"
    if mutation in ("truncate_body", "extend_body") and len(parts[1]) != len(body):
        assert g is None, f"{mutation} must be refused"


def test_seq_round_trips() -> None:
    f = Frame(frames.ENCRYPT, 2, 7, 100, frames.NO_ADDR, [b"a", b"bc"], seq=0xFFFFFFFF)
    assert frames.decode(f.encode()).seq == 0xFFFFFFFF


# --- send_parts / recv_parts over real ZeroMQ sockets --------------------------------


@pytest.fixture
def zpair():
    import zmq

    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.setsockopt(zmq.LINGER, 0)
    pull.bind("inproc://frames-test")
    push.connect("inproc://frames-test")
    yield push, pull
    ctx.destroy(0)


def _frame(kind: int, n: int) -> Frame:
    packets = [bytes([i]) * (100 + i) for i in range(n)]
    aux: list[int] = []
    counters: list[int] = []
    if kind == frames.TUN_WRITE:
        aux = [v for i in range(n) for v in (1, 100 + i)]
        counters = list(range(n))
    return Frame(kind, edge=2, session_id=77, counter0=5, addr=pack_addr("198.18.0.1", 4242),
                 packets=packets, aux=aux, counters=counters, seq=n,
                 extra=b"\x80" if kind == frames.HANDSHAKE_OUT else None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_send_recv_parts_round_trip(zpair, kind: int) -> None:
    push, pull = zpair
    sent = [_frame(kind, 3), _frame(kind, 0)]
    for f in sent:
        frames.send_parts(push, f.encode())
    got = []
    for _ in range(len(sent)):  # bounded: the messages are queued in-process already
        parts = frames.recv_parts(pull)
        assert parts is not None
        got.append(decode(parts))
    assert [g.encode() for g in got] == [f.encode() for f in sent]
    assert frames.recv_parts(pull) is None  # nothing left: None, not a block


def test_recv_parts_keeps_message_boundaries(zpair) -> None:
    push, pull = zpair
    frames.send_parts(push, [b"a", b"b", b"c"])
    frames.send_parts(push, [b"d"])
    assert [bytes(p) for p in frames.recv_parts(pull) or []] == [b"a", b"b", b"c"]
    assert [bytes(p) for p in frames.recv_parts(pull) or []] == [b"d"]


def test_send_parts_without_peer_raises_again() -> None:
    import zmq

    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.bind("inproc://frames-nobody")  # no peer connected: PUSH cannot queue
        with pytest.raises(zmq.Again):
            frames.send_parts(push, [b"head", b"body"])
    finally:
        ctx.destroy(0)
