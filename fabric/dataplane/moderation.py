"""Receive moderation: what a NIC's interrupt moderation (``ethtool -C rx-usecs``)
does for a kernel, done for the edge's poll loop.

A client that sends one datagram per system call (the stock OpenVPN client, any
client without UDP GSO) wakes the edge for a few datagrams at a time, and each
wake-up costs the same whatever it brings: ``epoll_wait``, ``recvmmsg``, a TUN
write the kernel's TCP answers with an ACK, that ACK's read, seal and send, the
session table's locks, and the Python between them. After a pass that received a
burst of full-sized datagrams and read fewer packets from the TUN (a stream
flowing in) the edge waits
``usecs`` before it polls again, so the next pass takes a bigger batch: fewer
wake-ups per GB, larger TCP coalescing on the TUN, fewer ACKs.

What it costs: packets arriving during a wait are read up to ``usecs`` later, and
only while such a stream flows. A pass of fewer than MIN_BURST datagrams (a ping,
a handshake, interactive traffic) never waits; nor one of small datagrams
(averaging under BULK_SIZE bytes: voice, games, and a download's ACKs, which with
several edges often arrive on another edge than the one whose TUN queue the
download leaves by); nor one that read as much from the TUN as from UDP (a
download, or both ways at once); nor one that hit its read limit (more is queued:
a flood is read at full speed). ``usecs`` 0 turns
it off (``fabric up --rx-usecs 0``, ``[server] rx_usecs``).
"""

from __future__ import annotations

import ctypes

# implementation constants
DEFAULT_USECS = 100  # a NIC's usual rx-usecs order; measured in docs/performance.md
MAX_USECS = 10_000  # beyond this a wait is a stall, not moderation
MIN_BURST = 4  # datagrams in one pass that make it a stream worth waiting for
BULK_SIZE = 1024  # mean datagram size (bytes) of a bulk stream: a full-sized packet and its tunnel overhead
TIMER_SLACK_NS = 5_000  # Linux lets a sleep end up to the timer slack late (50 us by default)
PR_SET_TIMERSLACK = 29  # <linux/prctl.h>


class Moderation:
    """Decides, after each pass of the edge's loop, how long to wait before the next
    poll. No clock and no sleeping here: the loop sleeps what `after_pass` returns."""

    def __init__(self, usecs: int = DEFAULT_USECS, min_burst: int = MIN_BURST) -> None:
        if not 0 <= usecs <= MAX_USECS:
            raise ValueError(f"rx_usecs must be 0..{MAX_USECS} (0 turns receive moderation off), not {usecs}")
        if min_burst < 1:
            raise ValueError(f"min_burst must be at least 1, not {min_burst}")
        self.usecs = usecs
        self.delay = usecs / 1e6
        self.min_burst = min_burst
        self.waits = 0  # how often the loop was told to wait

    def after_pass(self, received: int, received_bytes: int, from_tun: int, full: bool) -> float:
        """Seconds to wait (0.0: none) after a pass that took `received` datagrams
        (`received_bytes` in all) from the UDP sockets and `from_tun` packets from the
        TUN; `full`: a read stopped at its limit, so more is already waiting."""
        if (not self.delay or full or received < self.min_burst or from_tun >= received
                or received_bytes < received * BULK_SIZE):
            return 0.0
        self.waits += 1
        return self.delay


def tighten_timer_slack(ns: int = TIMER_SLACK_NS) -> bool:
    """Make this thread's sleeps end within `ns` of the time asked (prctl
    PR_SET_TIMERSLACK), so a wait of `usecs` is that and not 50 us more. False where
    the call is not available; the waits are then just longer."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), ctypes.c_ulong(0),
                               ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0)
    except (OSError, AttributeError):
        return False
