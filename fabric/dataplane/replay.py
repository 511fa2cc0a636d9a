"""RFC 6479 anti-replay window over a caller-supplied buffer, protocol-neutral.

The same algorithm as wireguard-go `replay/replay.go`: a ring of 128 blocks of
64 bits, so up to 8128 counters behind the newest are still accepted. As there,
the caller gives the limit (`ValidateCounter(counter, limit)`): a counter at or
above it is refused (WireGuard: REJECT_AFTER_MESSAGES; OpenVPN: 2^32, its packet
ids never wrap); `window` may narrow how far behind the newest a counter may be
(OpenVPN's backtrack). The state lives
in any writable buffer (a bytearray for one process, an mmap'd slot of the
host-shared session table for many), laid out as:

    offset 0   u64 last   highest counter accepted so far
    offset 8   128 x u64  the ring of bitmap blocks

Callers serialise access (the session table holds a per-slot lock).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable

BLOCK_BITS = 64
BLOCK_BIT_LOG = 6
RING_BLOCKS = 128  # 8192 bits
BLOCK_MASK = RING_BLOCKS - 1
BIT_MASK = BLOCK_BITS - 1
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 8128: one block is always being recycled
NO_LIMIT = 2**64
STATE_SIZE = 8 + RING_BLOCKS * 8

_U64 = struct.Struct("<Q")
Buffer = bytearray | memoryview | mmap.mmap


def reset(buf: Buffer, off: int = 0) -> None:
    """Forget every counter: the window of a fresh session."""
    buf[off : off + STATE_SIZE] = bytes(STATE_SIZE)


def seen(buf: Buffer, off: int, counter: int, limit: int = NO_LIMIT, window: int = WINDOW_SIZE) -> bool:
    """True if `counter` would be refused now (already seen, too old, or over the limit).

    Changes nothing: used as a cheap filter before the AEAD tag is checked.
    """
    if counter >= limit:
        return True
    (last,) = _U64.unpack_from(buf, off)
    if counter > last:
        return False
    if last - counter > window:
        return True
    block = (counter >> BLOCK_BIT_LOG) & BLOCK_MASK
    (bits,) = _U64.unpack_from(buf, off + 8 + block * 8)
    return bool(bits >> (counter & BIT_MASK) & 1)


def accept(buf: Buffer, off: int, counter: int, limit: int = NO_LIMIT, window: int = WINDOW_SIZE) -> bool:
    """Record `counter`; False if it is a replay or outside the window.

    Call only after the packet's AEAD tag verified (wireguard-go device/receive.go).
    """
    if counter >= limit:
        return False
    (last,) = _U64.unpack_from(buf, off)
    index_block = counter >> BLOCK_BIT_LOG
    if counter > last:
        current = last >> BLOCK_BIT_LOG
        diff = min(index_block - current, RING_BLOCKS)
        ring = off + 8
        for i in range(current + 1, current + diff + 1):
            _U64.pack_into(buf, ring + (i & BLOCK_MASK) * 8, 0)
        _U64.pack_into(buf, off, counter)
    elif last - counter > window:
        return False
    pos = off + 8 + (index_block & BLOCK_MASK) * 8
    (old,) = _U64.unpack_from(buf, pos)
    new = old | (1 << (counter & BIT_MASK))
    if new == old:
        return False
    _U64.pack_into(buf, pos, new)
    return True


def _run_above(buf: Buffer, off: int, counters: Iterable[int], limit: int) -> tuple[int, int, int] | None:
    """(last, first, end) when `counters` is a list first, first + 1, ..., end wholly above
    the window's newest counter and under `limit`: the common batch of one session's
    datagrams in order, which the window accepts whole. None otherwise."""
    if type(counters) is not list or len(counters) < 2:
        return None
    first, end = counters[0], counters[-1]
    (last,) = _U64.unpack_from(buf, off)
    if first <= last or end >= limit or end - first != len(counters) - 1 or counters != list(range(first, end + 1)):
        return None
    return last, first, end


def seen_many(buf: Buffer, off: int, counters: Iterable[int], limit: int = NO_LIMIT,
              window: int = WINDOW_SIZE) -> list[bool]:
    """seen() of each counter against the window as it is now (changes nothing):
    `last` is read once and a block only when the counter moves to another one."""
    out: list[bool] = []
    append = out.append
    (last,) = _U64.unpack_from(buf, off)
    ring = off + 8
    cached = -1
    bits = 0
    for counter in counters:
        if counter >= limit:
            append(True)
        elif counter > last:
            append(False)
        elif last - counter > window:
            append(True)
        else:
            pos = (counter >> BLOCK_BIT_LOG) & BLOCK_MASK
            if pos != cached:
                (bits,) = _U64.unpack_from(buf, ring + pos * 8)
                cached = pos
            append(bool(bits >> (counter & BIT_MASK) & 1))
    return out


def accept_many(buf: Buffer, off: int, counters: Iterable[int], limit: int = NO_LIMIT,
                window: int = WINDOW_SIZE) -> list[bool]:
    """accept() of each counter in turn, in one pass: `last` and the block being
    filled stay in locals and are written back once (a batch of one session's
    datagrams mostly falls in one or two 64-bit blocks). Same results and the same
    final state as calling accept() for each counter.

    A batch in order above the newest counter (_run_above) takes a shorter way: the
    blocks the window slides into are cleared, the run's bits set a block at a time
    with a mask, the newest counter written once (tests/test_replay.py checks it
    against the counter-by-counter path)."""
    run = _run_above(buf, off, counters, limit)
    if run is None:
        return _accept_each(buf, off, counters, limit, window)
    last, first, end = run
    ring, current, end_block = off + 8, last >> BLOCK_BIT_LOG, end >> BLOCK_BIT_LOG
    live = end_block - RING_BLOCKS + 1  # the oldest block the ring still holds afterwards
    for b in range(max(current + 1, live), end_block + 1):  # entered by the window: start empty
        _U64.pack_into(buf, ring + (b & BLOCK_MASK) * 8, 0)
    for b in range(max(first >> BLOCK_BIT_LOG, live), end_block + 1):
        lo, hi = max(first, b << BLOCK_BIT_LOG), min(end, (b << BLOCK_BIT_LOG) | BIT_MASK)
        at = ring + (b & BLOCK_MASK) * 8
        (bits,) = _U64.unpack_from(buf, at)
        _U64.pack_into(buf, at, bits | (((1 << (hi - lo + 1)) - 1) << (lo & BIT_MASK)))
    _U64.pack_into(buf, off, end)
    return [True] * (end - first + 1)


def _accept_each(buf: Buffer, off: int, counters: Iterable[int], limit: int, window: int) -> list[bool]:
    out: list[bool] = []
    append = out.append
    (last,) = _U64.unpack_from(buf, off)
    ring = off + 8
    cached = -1  # ring index of the block held in `bits`, -1: none
    bits = 0
    for counter in counters:
        if counter >= limit:
            append(False)
            continue
        index_block = counter >> BLOCK_BIT_LOG
        if counter > last:
            current = last >> BLOCK_BIT_LOG
            diff = min(index_block - current, RING_BLOCKS)
            if diff:  # the window slides: blocks it enters start empty
                if cached >= 0:
                    _U64.pack_into(buf, ring + cached * 8, bits)
                    cached = -1
                for i in range(current + 1, current + diff + 1):
                    _U64.pack_into(buf, ring + (i & BLOCK_MASK) * 8, 0)
            last = counter
        elif last - counter > window:
            append(False)
            continue
        pos = index_block & BLOCK_MASK
        if pos != cached:
            if cached >= 0:
                _U64.pack_into(buf, ring + cached * 8, bits)
            (bits,) = _U64.unpack_from(buf, ring + pos * 8)
            cached = pos
        bit = 1 << (counter & BIT_MASK)
        if bits & bit:
            append(False)
            continue
        bits |= bit
        append(True)
    if cached >= 0:
        _U64.pack_into(buf, ring + cached * 8, bits)
    _U64.pack_into(buf, off, last)
    return out


class ReplayWindow:
    """A replay window owning its own buffer (one process, one session)."""

    __slots__ = ("buf", "limit", "window")

    def __init__(self, limit: int = NO_LIMIT, window: int = WINDOW_SIZE) -> None:
        self.buf = bytearray(STATE_SIZE)
        self.limit, self.window = limit, window

    def accept(self, counter: int) -> bool:
        return accept(self.buf, 0, counter, self.limit, self.window)

    def seen(self, counter: int) -> bool:
        return seen(self.buf, 0, counter, self.limit, self.window)

    def reset(self) -> None:
        reset(self.buf, 0)
