"""fabric.reorder: results leave in the order their work was sent."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.dataplane.reorder import SEQ_MAX, ReorderBuffer


def send(buf: ReorderBuffer[str], n: int, now: float = 0.0) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = buf.reserve()
        buf.sent(seq, now)
        seqs.append(seq)
    return seqs


def test_out_of_order_results_leave_in_send_order() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer()
    a, b, c = send(buf, 3)
    assert buf.arrived(c, "c") and list(buf.release(0.01)) == []
    assert buf.arrived(a, "a") and list(buf.release(0.01)) == ["a"]
    assert buf.arrived(b, "b") and list(buf.release(0.01)) == ["b", "c"]
    assert not buf.inflight and not buf.waiting


def test_a_lost_result_is_given_up_after_the_timeout() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(timeout=0.05)
    a, b = send(buf, 2, now=1.0)
    buf.arrived(b, "b")
    assert list(buf.release(1.01)) == [] and buf.waiting
    assert list(buf.release(1.06)) == ["b"]
    assert buf.lost == 1 and not buf.inflight


def test_late_and_duplicate_results_are_refused() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(timeout=0.05)
    (a,) = send(buf, 1, now=1.0)
    assert list(buf.release(2.0)) == [] and buf.lost == 1
    assert not buf.arrived(a, "late")
    (b,) = send(buf, 1, now=2.0)
    assert buf.arrived(b, "b") and not buf.arrived(b, "again")
    assert not buf.arrived(b + 100, "stranger")


def test_numbers_wrap_and_skip_zero() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer()
    buf.next_seq = buf.release_seq = SEQ_MAX
    x, y = send(buf, 2)
    assert (x, y) == (SEQ_MAX, 1)
    buf.arrived(y, "y")
    buf.arrived(x, "x")
    assert list(buf.release(0.0)) == ["x", "y"]


def test_full_buffer_sends_unordered() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(max_inflight=2)
    assert send(buf, 3) == [1, 2, 0]
    assert len(buf.inflight) == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.randoms(use_true_random=False), st.sets(st.integers(0, 59)))
def test_any_arrival_order_releases_in_send_order(n: int, rnd: random.Random, lost: set[int]) -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(timeout=1.0)
    seqs = send(buf, n)
    order = list(range(n))
    rnd.shuffle(order)
    out: list[int] = []
    for i in order:
        if i not in lost:
            assert buf.arrived(seqs[i], i)
        out += buf.release(0.5)
    out += buf.release(10.0)  # everything missing times out
    assert out == [i for i in range(n) if i not in lost]
    assert buf.lost == len([i for i in range(n) if i in lost]) and not buf.inflight
