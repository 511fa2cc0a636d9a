"""Receive moderation (fabric/dataplane/moderation.py): when the edge waits after a
pass, and when it must not."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.dataplane import moderation
from fabric.dataplane.moderation import BULK_SIZE, DEFAULT_USECS, MAX_USECS, MIN_BURST, Moderation

FULL = 1420  # a full-sized tunnel datagram


def test_a_stream_flowing_in_waits_the_configured_time() -> None:
    m = Moderation(100)
    # nine full-sized datagrams in, one ACK out of the TUN: an upload's pass
    assert m.after_pass(9, 9 * FULL, 1, False) == pytest.approx(100e-6)
    assert m.waits == 1
    assert Moderation(2500).after_pass(9, 9 * FULL, 0, False) == pytest.approx(2.5e-3)


@pytest.mark.parametrize("received, size, from_tun, full, why", [
    (1, FULL, 0, False, "a lone packet (a ping, a handshake)"),
    (MIN_BURST - 1, FULL, 0, False, "fewer than MIN_BURST datagrams"),
    (40, 80, 0, False, "small datagrams: ACKs of a download leaving by another edge"),
    (12, 200, 1, False, "small datagrams: voice, games"),
    (8, FULL, 8, False, "as much read from the TUN: both ways at once"),
    (4, 90, 120, False, "a download's pass: ACKs in, TSO segments out"),
    (256, 256 * FULL, 0, True, "the read hit its limit: more is queued (a flood)"),
    (0, 0, 0, False, "nothing received"),
])
def test_passes_that_never_wait(received: int, size: int, from_tun: int, full: bool, why: str) -> None:
    m = Moderation(100)
    assert m.after_pass(received, received * size, from_tun, full) == 0.0, why
    assert m.waits == 0


def test_off_never_waits() -> None:
    m = Moderation(0)
    assert m.after_pass(64, 64 * FULL, 0, False) == 0.0 and m.waits == 0


def test_the_thresholds_are_where_the_docstring_says() -> None:
    m = Moderation(100)
    assert m.after_pass(MIN_BURST, MIN_BURST * BULK_SIZE, MIN_BURST - 1, False) > 0
    assert m.after_pass(MIN_BURST, MIN_BURST * BULK_SIZE - 1, 0, False) == 0.0
    assert Moderation(100, min_burst=1).after_pass(1, FULL, 0, False) > 0


@pytest.mark.parametrize("usecs", [-1, MAX_USECS + 1])
def test_out_of_range_is_refused_with_the_range(usecs: int) -> None:
    with pytest.raises(ValueError, match=f"0..{MAX_USECS}"):
        Moderation(usecs)
    with pytest.raises(ValueError, match="min_burst"):
        Moderation(DEFAULT_USECS, min_burst=0)


@given(st.integers(0, 10_000), st.integers(0, 10_000_000), st.integers(0, 10_000), st.booleans())
def test_a_wait_is_zero_or_the_configured_delay(received: int, nbytes: int, from_tun: int, full: bool) -> None:
    m = Moderation(100)
    wait = m.after_pass(received, nbytes, from_tun, full)
    assert wait in (0.0, m.delay)
    assert m.waits == (wait > 0)


def test_tightened_timer_slack_is_what_the_kernel_keeps() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.restype = ctypes.c_long
    before = libc.prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK
    try:
        assert moderation.tighten_timer_slack(7_000) is True
        assert libc.prctl(30, 0, 0, 0, 0) == 7_000
    finally:
        libc.prctl(29, ctypes.c_ulong(before), 0, 0, 0)
