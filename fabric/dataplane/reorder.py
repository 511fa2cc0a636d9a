"""Release results in the order their work was sent (wireguard-go send.go: "encrypt
in parallel, transmit in order").

Workers finish frames in parallel, so results arrive out of order; TCP inside the
tunnel reads reordering as loss. An edge numbers each data frame it pushes and
releases the results by that number. A result that does not come back within
`timeout` (its worker died) is given up so it cannot hold back the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

SEQ_MAX = 0xFFFFFFFF  # sequence numbers are u32, 0 means "unordered"


def _next(seq: int) -> int:
    return seq + 1 if seq < SEQ_MAX else 1


class ReorderBuffer(Generic[T]):
    def __init__(self, timeout: float = 0.05, max_inflight: int = 4096) -> None:
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.next_seq = 1  # number of the next frame sent
        self.release_seq = 1  # number of the next result to release
        self.inflight: dict[int, float] = {}  # seq -> time sent, in send order
        self.held: dict[int, T] = {}  # results that arrived early
        self.lost = 0

    def reserve(self) -> int:
        """The number for the next frame, or 0 (unordered) when too many are in flight."""
        return self.next_seq if len(self.inflight) < self.max_inflight else 0

    def sent(self, seq: int, now: float) -> None:
        """The frame numbered `seq` (from reserve()) left; 0 is ignored."""
        if seq:
            self.inflight[seq] = now
            self.next_seq = _next(seq)

    def arrived(self, seq: int, result: T) -> bool:
        """Hold a result; False if its number is not in flight (late, or a stranger)."""
        if seq not in self.inflight or seq in self.held:
            return False
        self.held[seq] = result
        return True

    def release(self, now: float) -> Iterator[T]:
        """Results that may go now, in send order; gives up results older than timeout."""
        inflight, held = self.inflight, self.held
        while inflight:
            seq = self.release_seq
            sent = inflight.get(seq)
            if sent is None:  # cannot happen while numbers are contiguous; resync
                self.release_seq = next(iter(inflight))
                continue
            result = held.pop(seq, None)
            if result is None:
                if now - sent < self.timeout:
                    return
                self.lost += 1
            del inflight[seq]
            self.release_seq = _next(seq)
            if result is not None:
                yield result

    @property
    def waiting(self) -> bool:
        """Results are held behind a missing one (call release() again later)."""
        return bool(self.held)
