"""fabric/control/kvmsg.py: round trips and fuzzing of from_parts() (invariant 7)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fabric.control.kvmsg import HUGZ, ICANHAZ, KTHXBAI, MAX_KEY, KVError, KVMsg

FUZZ = settings(max_examples=300, deadline=None)
U64 = st.integers(0, 2**64 - 1)

msgpack_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
msgpack_values = st.recursive(
    msgpack_leaves,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
kv_values = st.none() | st.dictionaries(st.text(max_size=8), msgpack_values, max_size=6)
keys = st.binary(min_size=1, max_size=MAX_KEY)


def valid_parts() -> list[bytes]:
    return KVMsg(b"session/1", 7, 9, {"a": 1, "b": b"\x00"}).parts()


def check(parts: list[bytes]) -> KVMsg | None:
    """The fuzz property: KVError, or a message consistent with its parts."""
    try:
        m = KVMsg.from_parts(parts)
    except KVError:
        return None
    assert len(parts) == 4
    assert m.key == bytes(parts[0]) and 1 <= len(m.key) <= MAX_KEY
    assert m.seq == int.from_bytes(parts[1], "big") and m.epoch == int.from_bytes(parts[2], "big")
    assert (m.value is None) == (len(parts[3]) == 0)
    assert m.value is None or isinstance(m.value, dict)
    return m


@FUZZ
@given(keys, U64, U64, kv_values)
def test_round_trip(key: bytes, seq: int, epoch: int, value: dict | None) -> None:
    parts = KVMsg(key, seq, epoch, value).parts()
    assert len(parts) == 4
    m = check(parts)
    assert m is not None
    assert (m.key, m.seq, m.epoch, m.value) == (key, seq, epoch, value)


@pytest.mark.parametrize("key", [ICANHAZ, KTHXBAI, HUGZ, b"peer/abc=", b"k" * MAX_KEY])
def test_round_trip_reserved_and_long_keys(key: bytes) -> None:
    m = KVMsg.from_parts(KVMsg(key, 1, 2).parts())
    assert (m.key, m.seq, m.epoch, m.value) == (key, 1, 2, None)


def test_empty_map_is_not_a_deletion() -> None:
    parts = KVMsg(b"k", 1, 1, {}).parts()
    assert parts[3] != b""
    assert KVMsg.from_parts(parts).value == {}
    assert KVMsg.from_parts(KVMsg(b"k", 1, 1, None).parts()).value is None


def test_memoryview_parts() -> None:
    parts = [memoryview(p) for p in valid_parts()]
    m = KVMsg.from_parts(parts)  # type: ignore[arg-type]
    assert (m.key, m.seq, m.epoch, m.value) == (b"session/1", 7, 9, {"a": 1, "b": b"\x00"})
    assert type(m.key) is bytes


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p[:3],
        lambda p: p[:1],
        lambda p: [],
        lambda p: [*p, b""],
        lambda p: [b"", *p[1:]],
        lambda p: [b"k" * (MAX_KEY + 1), *p[1:]],
        lambda p: [p[0], p[1][:7], p[2], p[3]],
        lambda p: [p[0], p[1] + b"\0", p[2], p[3]],
        lambda p: [p[0], p[1], b"", p[3]],
        lambda p: [p[0], p[1], p[2], p[3][:-1]],  # truncated msgpack
        lambda p: [p[0], p[1], p[2], p[3] + b"\xc0"],  # extra data after the map
        lambda p: [p[0], p[1], p[2], b"\xc1"],  # never-used msgpack byte
        lambda p: [p[0], p[1], p[2], msgpack.packb([1, 2])],  # not a map
        lambda p: [p[0], p[1], p[2], msgpack.packb(None)],
        lambda p: [p[0], p[1], p[2], msgpack.packb(5)],
        lambda p: [p[0], p[1], p[2], b"\x81\x91\x01\x01"],  # map with a list key (unhashable)
        lambda p: [p[0], p[1], p[2], b"\x81\x81\x01\x01\x01"],  # map with a map key
        lambda p: [p[0], p[1], p[2], b"\xdb\xff\xff\xff\xff"],  # str32 claiming 4 GiB
        lambda p: [p[0], p[1], p[2], b"\xdf\xff\xff\xff\xff"],  # map32 claiming 4G entries
        lambda p: [p[0], p[1], p[2], b"\x91" * 100000],  # nesting deeper than any stack
        lambda p: [p[0], p[1], p[2], b"\xc7\x01\x05\x00"],  # ext type
    ],
)
def test_malformed_parts(mutate) -> None:
    assert check(valid_parts()) is not None
    with pytest.raises(KVError):
        KVMsg.from_parts(mutate(valid_parts()))


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=6))
@example([b"k", bytes(8), bytes(8), b"\x80"])
@example([b"k", bytes(8), bytes(8), b"\x81\xa1a\x01"])
def test_from_parts_arbitrary(parts: list[bytes]) -> None:
    check(parts)


@FUZZ
@given(st.integers(0, 3), st.binary(max_size=30), st.sampled_from(["replace", "truncate", "append", "flip"]), st.data())
def test_from_parts_mutated(index: int, junk: bytes, how: str, data: st.DataObject) -> None:
    parts = data.draw(st.builds(lambda k, s, e, v: KVMsg(k, s, e, v).parts(), keys, U64, U64, kv_values))
    p = parts[index]
    if how == "replace":
        p = junk
    elif how == "truncate":
        p = p[: data.draw(st.integers(0, len(p)))]
    elif how == "append":
        p = p + junk
    elif p:
        i = data.draw(st.integers(0, len(p) - 1))
        p = p[:i] + bytes([p[i] ^ data.draw(st.integers(1, 255))]) + p[i + 1 :]
    parts[index] = p
    check(parts)
