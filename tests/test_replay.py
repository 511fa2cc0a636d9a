"""fabric/dataplane/replay.py against the Linux kernel's WireGuard replay-counter self-test.

Source: drivers/net/wireguard/selftest/counter.c (torvalds/linux,
https://github.com/torvalds/linux/blob/master/drivers/net/wireguard/selftest/counter.c),
the same sequence as wireguard-go replay/replay_test.go. There COUNTER_WINDOW_SIZE
is COUNTER_BITS_TOTAL (8192) minus BITS_PER_LONG (64), 8128 on 64-bit machines,
T_LIM is COUNTER_WINDOW_SIZE + 1, and T(n, v) asserts that counter n is accepted
(v true) or refused. REJECT_AFTER_MESSAGES is symbolic in the test; we use ours
(whitepaper 6.1).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.dataplane import replay
from fabric.dataplane.replay import ReplayWindow
from fabric.protocols.wireguard.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE

COUNTER_WINDOW_SIZE = 8192 - 64
T_LIM = COUNTER_WINDOW_SIZE + 1
R = REJECT_AFTER_MESSAGES

KERNEL_SEQUENCE = [
    (0, True),  # 1
    (1, True),
    (1, False),
    (9, True),
    (8, True),
    (7, True),
    (7, False),
    (T_LIM, True),
    (T_LIM - 1, True),
    (T_LIM - 1, False),  # 10
    (T_LIM - 2, True),
    (2, True),
    (2, False),
    (T_LIM + 16, True),
    (3, False),
    (T_LIM + 16, False),
    (T_LIM * 4, True),
    (T_LIM * 4 - (T_LIM - 1), True),
    (10, False),
    (T_LIM * 4 - T_LIM, False),  # 20
    (T_LIM * 4 - (T_LIM + 1), False),
    (T_LIM * 4 - (T_LIM - 2), True),
    (T_LIM * 4 + 1 - T_LIM, False),
    (0, False),
    (R, False),
    (R - 1, True),
    (R, False),
    (R - 1, False),
    (R - 2, True),
    (R + 1, False),  # 30
    (R + 2, False),
    (R - 2, False),
    (R - 3, True),
    (0, False),  # 34
]


class Checker:
    """Runs T(n, v) on a ReplayWindow and, in parallel, on a window at an offset in a
    shared buffer (the layout of the host-shared session table); seen() must predict
    accept() without changing anything."""

    OFF = 24

    def __init__(self) -> None:
        self.window = ReplayWindow(R)
        self.buf = bytearray(self.OFF + replay.STATE_SIZE + 8)
        self.buf[:] = b"\xaa" * len(self.buf)
        replay.reset(self.buf, self.OFF)
        self.many = bytearray(self.buf)  # the same steps through accept_many, one at a time
        self.step = 0

    def t(self, n: int, v: bool) -> None:
        self.step += 1
        assert self.window.seen(n) is (not v), f"seen() at step {self.step}"
        assert self.window.accept(n) is v, f"step {self.step}: T({n}, {v})"
        assert replay.accept(self.buf, self.OFF, n, R) is v, f"buffer step {self.step}"
        assert replay.seen_many(self.many, self.OFF, [n, n], R) == [not v] * 2, f"seen_many step {self.step}"
        assert replay.accept_many(self.many, self.OFF, [n], R) == [v], f"accept_many step {self.step}"
        assert self.many == self.buf, f"accept_many state at step {self.step}"
        assert self.buf[: self.OFF] == b"\xaa" * self.OFF
        assert self.buf[self.OFF + replay.STATE_SIZE :] == b"\xaa" * 8


def test_window_size_matches_kernel() -> None:
    assert REPLAY_WINDOW_SIZE == COUNTER_WINDOW_SIZE == replay.WINDOW_SIZE


def test_kernel_sequence() -> None:
    c = Checker()
    for n, v in KERNEL_SEQUENCE:
        c.t(n, v)
    assert c.step == 34


def test_kernel_sequence_as_one_batch() -> None:
    buf = bytearray(replay.STATE_SIZE)
    assert replay.accept_many(buf, 0, [n for n, _ in KERNEL_SEQUENCE], R) == [v for _, v in KERNEL_SEQUENCE]


def test_kernel_ascending_then_zero() -> None:
    c = Checker()
    for i in range(1, COUNTER_WINDOW_SIZE + 1):
        c.t(i, True)
    c.t(0, True)
    c.t(0, False)


def test_kernel_ascending_from_two() -> None:
    c = Checker()
    for i in range(2, COUNTER_WINDOW_SIZE + 2):
        c.t(i, True)
    c.t(1, True)
    c.t(0, False)


def test_kernel_descending_to_zero() -> None:
    c = Checker()
    for i in range(COUNTER_WINDOW_SIZE, -1, -1):
        c.t(i, True)


def test_kernel_descending_one_too_far() -> None:
    c = Checker()
    for i in range(COUNTER_WINDOW_SIZE + 1, 0, -1):
        c.t(i, True)
    c.t(0, False)


def test_kernel_descending_then_top() -> None:
    c = Checker()
    for i in range(COUNTER_WINDOW_SIZE, 0, -1):
        c.t(i, True)
    c.t(COUNTER_WINDOW_SIZE + 1, True)
    c.t(0, False)


def test_kernel_descending_then_zero_then_top() -> None:
    c = Checker()
    for i in range(COUNTER_WINDOW_SIZE, 0, -1):
        c.t(i, True)
    c.t(0, True)
    c.t(COUNTER_WINDOW_SIZE + 1, True)


@pytest.mark.parametrize("jump", [1, 63, 64, 65, 8128, 8192, 10**6])
def test_jump_forward_forgets_old_bits(jump: int) -> None:
    w = ReplayWindow(R)
    assert w.accept(5)
    assert w.accept(5 + jump)
    assert not w.accept(5 + jump)
    # 5 is still refused: either remembered or behind the window
    assert not w.accept(5)


def test_reset_forgets_everything() -> None:
    w = ReplayWindow(R)
    for n in (0, 1, 100):
        assert w.accept(n)
    w.reset()
    assert w.accept(0) and w.accept(100)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 300), st.integers(0, 3 * replay.WINDOW_SIZE),
                          st.integers(REJECT_AFTER_MESSAGES - 70, REJECT_AFTER_MESSAGES + 2)),
                max_size=120),
       st.lists(st.integers(1, 40), min_size=1, max_size=10))
def test_accept_many_and_seen_many_equal_one_at_a_time(counters: list[int], cuts: list[int]) -> None:
    """Any counters, cut into any batches: accept_many gives what accept() gives one
    by one, and leaves the same window behind (so the edge may commit a batch)."""
    one, many = bytearray(replay.STATE_SIZE + 16), bytearray(replay.STATE_SIZE + 16)
    assert replay.seen_many(one, 8, counters, R) == [replay.seen(one, 8, c, R) for c in counters]
    expected = [replay.accept(one, 8, c, R) for c in counters]
    assert replay.seen_many(one, 8, counters, R) == [replay.seen(one, 8, c, R) for c in counters]
    got: list[bool] = []
    i = k = 0
    while i < len(counters):
        n = cuts[k % len(cuts)]
        got += replay.accept_many(many, 8, counters[i : i + n], R)
        i, k = i + n, k + 1
    assert got == expected
    assert many == one


_STEP = st.one_of(
    st.tuples(st.just("run"), st.sampled_from([2, 5, 63, 64, 65, 300, 8128, 9000, 20000]),
              st.sampled_from([0, 0, 1, 63, 64, 8200, 100_000])),
    st.tuples(st.just("shuffled"), st.integers(2, 40), st.integers(0, 2**32)),
    st.tuples(st.just("old"), st.integers(1, 20), st.integers(0, 9000)),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 20), st.lists(_STEP, min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(0, 60)))
def test_runs_in_order_take_the_short_way_to_the_same_window(start: int, steps: list[tuple[str, int, int]],
                                                             under_limit: int | None) -> None:
    """Batches of consecutive counters above the newest (the common case, accepted whole
    a block at a time) leave the same window and give the same answers as accept() one
    counter at a time; runs longer than the ring, gaps, shuffled and old batches too."""
    one, many = bytearray(replay.STATE_SIZE), bytearray(replay.STATE_SIZE)
    pos = start
    for kind, n, extra in steps:
        if kind == "run":
            batch = list(range(pos, pos + n))
            pos += n + extra
        elif kind == "shuffled":
            batch = list(range(pos, pos + n))
            batch = batch[extra % n:] + batch[: extra % n]
            pos += n
        else:
            batch = [max(1, pos - (extra * (i + 1)) % 9000) for i in range(n)]
        limit = R if under_limit is None else pos + under_limit
        assert replay.seen_many(many, 0, batch, limit) == [replay.seen(one, 0, c, limit) for c in batch]
        expected = [replay.accept(one, 0, c, limit) for c in batch]
        assert replay.accept_many(many, 0, batch, limit) == expected, (kind, n, extra)
        assert many == one, (kind, n, extra)
