"""Watching traffic while a test breaks things: a background ping that records every
reply, a background iperf3 whose 0.5 s intervals show a stall, and what they say
about a fault at a given moment (tests/test_faults.py, tests/test_openvpn_e2e.py).
"""

from __future__ import annotations

import re
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabric.testbed.iperf import IperfResult, iperf3
from fabric.testbed.netns import Topology

SERVER_IP = "198.19.100.1"  # the fabric's tunnel address in the test bed's clusters


@dataclass
class PingStats:
    sent: int
    received: int
    longest_gap_s: float  # longest time between two consecutive replies
    replies: list[tuple[float, int]] = field(default_factory=list)  # (epoch time, icmp_seq)

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def replies_between(self, t0: float, t1: float) -> int:
        return sum(1 for ts, _ in self.replies if t0 <= ts <= t1)


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")
_SENT = re.compile(r"(\d+) packets transmitted")


class PingMonitor:
    """``ping -D -O -i interval`` in the background; stop() parses every reply."""

    def __init__(self, topo: Topology, ns: str, dst: str, interval: float = 0.1,
                 deadline: float = 55.0) -> None:
        self.topo = topo
        self.interval = interval
        self.proc = topo.popen(
            ns, ["ping", "-n", "-D", "-O", "-i", f"{interval:g}", "-w", f"{deadline:g}", dst],
            label="ping-monitor",
        )
        self.log = topo.log_path(self.proc)

    def stop(self) -> PingStats:
        self.topo.stop(self.proc, sig=signal.SIGINT)
        text = self.log.read_text(errors="replace")
        replies = sorted({(float(m.group(1)), int(m.group(2)))
                          for m in map(_REPLY.match, text.splitlines()) if m})
        seqs = {s for _, s in replies}
        m = _SENT.search(text)
        sent = int(m.group(1)) if m else len(seqs)
        times = [t for t, _ in replies]
        gap = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
        return PingStats(sent, len(seqs), gap, replies)


class BackgroundIperf:
    """iperf3 (``-J``, 0.5 s intervals) in a thread; result() re-raises its error."""

    def __init__(self, topo: Topology, client_ns: str, seconds: float, reverse: bool,
                 port: int = 5201, dst: str = SERVER_IP) -> None:
        self.seconds = seconds
        self._res: IperfResult | None = None
        self._err: BaseException | None = None
        self.returned = 0.0

        def run() -> None:
            try:
                self._res = iperf3(topo, topo.server_ns, client_ns, dst, seconds=seconds,
                                   reverse=reverse, port=port, extra=("-i", "0.5"))
            except BaseException as e:  # handed to the test thread in result()
                self._err = e
            finally:
                self.returned = time.time()

        self.called = time.time()
        self.thread = threading.Thread(target=run, name="iperf3", daemon=True)
        self.thread.start()

    def result(self) -> IperfResult:
        self.thread.join(timeout=self.seconds + 45)
        assert not self.thread.is_alive(), "iperf3 did not return"
        if self._err is not None:
            raise AssertionError(f"iperf3 failed: {self._err}") from self._err
        assert self._res is not None
        return self._res


@dataclass
class Flow:
    """What an iperf3 run says about a fault at `fault_at` seconds into the test."""

    intervals: list[tuple[float, float, int]]  # (start, end, bytes)
    fault_at: float
    total_bytes: int
    retransmits: int | None
    mbps: float

    @classmethod
    def of(cls, res: IperfResult, fault_wall: float, bg: BackgroundIperf) -> Flow:
        iv = [(float(i["sum"]["start"]), float(i["sum"]["end"]), int(i["sum"]["bytes"]))
              for i in res.raw.get("intervals", [])]
        end = res.raw.get("end", {})
        total = int(end.get("sum_received", {}).get("bytes", 0))
        duration = iv[-1][1] if iv else bg.seconds
        # the client ran its test for `duration` seconds and returned just after
        started = bg.returned - duration
        return cls(iv, fault_wall - started, total, res.retransmits, res.mbps)

    def _threshold(self) -> float:
        return 0.1 * statistics.median(b for _, _, b in self.intervals)

    def stall_s(self) -> float:
        """Longest run of intervals carrying < 10 % of the median interval."""
        thr, best, run = self._threshold(), 0.0, 0.0
        for s, e, b in self.intervals:
            run = run + (e - s) if b < thr else 0.0
            best = max(best, run)
        return best

    def resumed_after_s(self, t: float | None = None) -> float | None:
        """Seconds from `t` (default: the fault) until the stream ran at normal
        rate again: 0 if no interval within 2 s of `t` fell below 10 % of the
        median, else the start of the first normal interval after that dip;
        None if it never recovered."""
        t = self.fault_at if t is None else t
        thr = self._threshold()
        after = [iv for iv in self.intervals if iv[0] >= t - 0.5]
        lows = [i for i, (s, _, b) in enumerate(after) if b < thr and s <= t + 2.0]
        if not lows:
            return 0.0
        for s, _, b in after[lows[0]:]:
            if b >= thr:
                return max(0.0, s - t)
        return None

    def dip_pct(self, t: float | None = None) -> int:
        """The weakest interval within 3 s after `t` (default: the fault), in %
        of the median interval."""
        t = self.fault_at if t is None else t
        near = [b for s, _, b in self.intervals if t - 0.5 <= s <= t + 3.0]
        return round(100 * min(near, default=0) / statistics.median(b for *_, b in self.intervals))

    def bytes_between(self, t0: float, t1: float) -> int:
        return sum(b for s, e, b in self.intervals if s >= t0 and e <= t1)

    def describe(self) -> str:
        return " ".join(f"{s:.1f}:{b / 1e6:.1f}MB" for s, _, b in self.intervals)


def wait_for(check: Callable[[], Any], timeout: float, step: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy (bounded); returns the last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(step)
        value = check()
    return value
