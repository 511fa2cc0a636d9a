"""The host-shared session table: the per-session state every edge on a host must agree on.

One fixed-size slot per session in a shared mapping (/dev/shm). The broker assigns
slots; a slot belongs to the session whose id it holds. Session ids only grow, so a
slot is re-initialised exactly when a newer session claims it, and an edge still
acting on an older session finds the id changed and backs off.

Slot layout (little-endian):

    0    u64  session id (0: free)
    8    u64  next send counter          (invariant 1: never handed out twice)
    16   u32  flags (1: confirmed, the peer has sent on this session)
    24   f64  last receive time
    32   f64  last send time
    40   18s  peer endpoint (frames.pack_addr) of the latest authenticated datagram
    64   ...  RFC 6479 receive window (fabric.replay)  (invariant 2)
    1104 f64  time of the first data sent since the last receive (0: none)

Each slot has its own fcntl byte-range lock: taken once per batch, never per
packet, and released by the kernel if the edge holding it dies.

Slot 0 is the table header: a magic, the table's creation time and, at byte 16,
the time until which the host is "under load" (fabric/protocols/wireguard/guard.py: any edge that
counts a handshake flood sets it, every edge reads it; written without a lock, an
aligned f64, read once per batch of datagrams). A session
created before the table existed may have used counters from an older table
(a reboot, a restarted `fabric up`), so `claim` refuses it: the peer has to
make a new handshake rather than risk a (key, nonce) pair twice (invariant 1).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fcntl import LOCK_EX, LOCK_UN, lockf
from pathlib import Path

from fabric.control.frames import ADDR_SIZE, NO_ADDR
from fabric.dataplane import replay

SLOT_SIZE = 1152
U64_LIMIT = 2**64 - 1  # what a slot can count to; a protocol's limit is lower (CounterSpace.limit)
DEFAULT_SLOTS = 4096
CONFIRMED = 1

_HEAD = struct.Struct("<QQI4xdd18s")
_TABLE_HEADER = struct.Struct("<8sd")
OFF_UNDER_LOAD = 16  # in the header (slot 0)
MAGIC = b"fabric01"
_SID = struct.Struct("<Q")
_COUNTER = struct.Struct("<Q")
_FLAGS = struct.Struct("<I")
_TIME = struct.Struct("<d")
OFF_COUNTER = 8
OFF_FLAGS = 16
OFF_LAST_RX = 24
OFF_LAST_TX = 32
OFF_ENDPOINT = 40
OFF_REPLAY = 64
OFF_UNANSWERED = 1104
assert OFF_REPLAY + replay.STATE_SIZE <= OFF_UNANSWERED


@dataclass(frozen=True, slots=True)
class SlotView:
    session_id: int
    send_counter: int
    flags: int
    last_rx: float
    last_tx: float
    endpoint: bytes

    @property
    def confirmed(self) -> bool:
        return bool(self.flags & CONFIRMED)


class SessionTable:
    """A mapping of `slots` session slots in the file `path`, created zeroed if absent."""

    def __init__(self, path: str | Path, slots: int = DEFAULT_SLOTS) -> None:
        self.path = Path(path)
        self.slots = slots
        size = slots * SLOT_SIZE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
            magic, created = _TABLE_HEADER.unpack_from(self.mm, 0)
            if magic != MAGIC:
                created = time.time()
                for off in range(0, size, 1 << 20):
                    n = min(1 << 20, size - off)
                    self.mm[off : off + n] = bytes(n)
                _TABLE_HEADER.pack_into(self.mm, 0, MAGIC, created)
            self.created: float = created
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def _off(self, slot: int) -> int:
        if not 0 < slot < self.slots:
            raise IndexError(f"slot {slot} outside 1..{self.slots - 1}")
        return slot * SLOT_SIZE

    @contextmanager
    def locked(self, slot: int) -> Iterator[int]:
        """Hold slot's lock; yields the slot's byte offset."""
        off = self._off(slot)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, slot)
        try:
            yield off
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, slot)

    def under_load_until(self) -> float:
        """The host-wide "under load until" time (see the module docstring)."""
        return float(_TIME.unpack_from(self.mm, OFF_UNDER_LOAD)[0])

    def set_under_load_until(self, until: float) -> None:
        _TIME.pack_into(self.mm, OFF_UNDER_LOAD, until)

    def read(self, slot: int) -> SlotView:
        """A lock-free (possibly torn) view, for display and cheap filters."""
        sid, counter, flags, rx, tx, ep = _HEAD.unpack_from(self.mm, self._off(slot))
        return SlotView(sid, counter, flags, rx, tx, ep)

    def _matches(self, off: int, session_id: int) -> bool:
        return bool(_SID.unpack_from(self.mm, off)[0] == session_id)

    def claim(
        self, slot: int, session_id: int, created: float, endpoint: bytes = NO_ADDR,
        confirmed: bool = False, first: int = 0,
    ) -> bool:
        """Make `slot` belong to `session_id`; False if a newer session holds it,
        or if the session is older than this table (see the module docstring).

        `confirmed` marks a session the fabric initiated: it may send at once.
        `first` is the protocol's first send counter (OpenVPN's packet ids start at 1).
        """
        if created < self.created:
            return False
        with self.locked(slot) as off:
            (cur,) = _SID.unpack_from(self.mm, off)
            if cur > session_id:
                return False
            if cur < session_id:
                self.mm[off : off + SLOT_SIZE] = bytes(SLOT_SIZE)
                _SID.pack_into(self.mm, off, session_id)
                _COUNTER.pack_into(self.mm, off + OFF_COUNTER, first)
                if endpoint != NO_ADDR:
                    self.mm[off + OFF_ENDPOINT : off + OFF_ENDPOINT + ADDR_SIZE] = endpoint
            if confirmed:
                (flags,) = _FLAGS.unpack_from(self.mm, off + OFF_FLAGS)
                _FLAGS.pack_into(self.mm, off + OFF_FLAGS, flags | CONFIRMED)
            return True

    def reserve(
        self, slot: int, session_id: int, n: int, now: float, data: bool = True, limit: int = U64_LIMIT
    ) -> tuple[int, bytes] | None:
        """Reserve n consecutive send counters; (first counter, endpoint) or None.

        None if the slot no longer belongs to the session or the counters would
        reach `limit`, the protocol's (WireGuard: REJECT_AFTER_MESSAGES, whitepaper 6.1).
        """
        # the lock taken inline, not with locked(): this runs once per batch on the data
        # path, and a generator context manager costs more than the rest of it
        off = self._off(slot)
        mm = self.mm
        lockf(self.fd, LOCK_EX, 1, slot)
        try:
            if not self._matches(off, session_id):
                return None
            (first,) = _COUNTER.unpack_from(mm, off + OFF_COUNTER)
            if first + n > limit:
                return None
            _COUNTER.pack_into(mm, off + OFF_COUNTER, first + n)
            _TIME.pack_into(mm, off + OFF_LAST_TX, now)
            if data and _TIME.unpack_from(mm, off + OFF_UNANSWERED)[0] == 0.0:
                _TIME.pack_into(mm, off + OFF_UNANSWERED, now)
            return first, mm[off + OFF_ENDPOINT : off + OFF_ENDPOINT + ADDR_SIZE]
        finally:
            lockf(self.fd, LOCK_UN, 1, slot)

    def commit_rx(
        self, slot: int, session_id: int, counters: Iterable[int], source: bytes, now: float,
        limit: int = U64_LIMIT, window: int = replay.WINDOW_SIZE,
    ) -> list[bool] | None:
        """Record authenticated counters in the window; per counter, True if it is new.

        The first accepted counter confirms the session; the source of an accepted
        datagram becomes the peer's endpoint (roaming, whitepaper 6.5... 2.1).
        None if the slot no longer belongs to the session.
        """
        off = self._off(slot)  # the lock inline, as in reserve()
        mm = self.mm
        lockf(self.fd, LOCK_EX, 1, slot)
        try:
            if not self._matches(off, session_id):
                return None
            accepted = replay.accept_many(mm, off + OFF_REPLAY, counters, limit, window)
            if True in accepted:
                (flags,) = _FLAGS.unpack_from(mm, off + OFF_FLAGS)
                _FLAGS.pack_into(mm, off + OFF_FLAGS, flags | CONFIRMED)
                _TIME.pack_into(mm, off + OFF_LAST_RX, now)
                _TIME.pack_into(mm, off + OFF_UNANSWERED, 0.0)
                if source != NO_ADDR:
                    mm[off + OFF_ENDPOINT : off + OFF_ENDPOINT + ADDR_SIZE] = source
            return accepted
        finally:
            lockf(self.fd, LOCK_UN, 1, slot)

    def seen(self, slot: int, session_id: int, counter: int, limit: int = U64_LIMIT) -> bool:
        """`seen_many` of one counter."""
        return self.seen_many(slot, session_id, [counter], limit)[0]

    def seen_many(self, slot: int, session_id: int, counters: list[int], limit: int = U64_LIMIT,
                  window: int = replay.WINDOW_SIZE) -> list[bool]:
        """Lock-free pre-filter: per counter, True if it is surely a replay (one read
        of the window for a batch).

        All False if the slot moved on to another session: `commit_rx` refuses those.
        """
        off = self._off(slot)
        if not self._matches(off, session_id):
            return [False] * len(counters)
        return replay.seen_many(self.mm, off + OFF_REPLAY, counters, limit, window)

    def keepalive_due(
        self, slot: int, session_id: int, now: float, passive: float, persistent: float,
        limit: int = U64_LIMIT,
    ) -> tuple[int, bytes] | None:
        """Reserve one counter for a keepalive if one is due (whitepaper 6.5).

        Passive: we received since we last sent, and `passive` > 0 seconds passed since.
        Persistent: `persistent` > 0 seconds passed since we last sent anything.
        The check and the reservation share the lock, so only one edge sends it.
        """
        with self.locked(slot) as off:
            if not self._matches(off, session_id):
                return None
            _, counter, flags, rx, tx, endpoint = _HEAD.unpack_from(self.mm, off)
            if endpoint == NO_ADDR or not flags & CONFIRMED:
                return None
            due = ((passive > 0 and rx > tx and now - rx >= passive)
                   or (persistent > 0 and now - tx >= persistent))
            if not due or counter + 1 > limit:
                return None
            _COUNTER.pack_into(self.mm, off + OFF_COUNTER, counter + 1)
            _TIME.pack_into(self.mm, off + OFF_LAST_TX, now)
            return counter, bytes(endpoint)

    def unanswered(self, slot: int, session_id: int, now: float, after: float) -> bool:
        """True once if data sent `after` seconds ago got no answer (whitepaper 6.4 timer).

        The mark is cleared, so the caller starts one new handshake per stall.
        """
        with self.locked(slot) as off:
            if not self._matches(off, session_id):
                return False
            (since,) = _TIME.unpack_from(self.mm, off + OFF_UNANSWERED)
            if since == 0.0 or now - since < after:
                return False
            _TIME.pack_into(self.mm, off + OFF_UNANSWERED, 0.0)
            return True
