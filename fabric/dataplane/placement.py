"""Where an edge runs the AEAD of its data frames (`--crypto`, docs/architecture.md
"Where the AEAD runs"): sans-I/O, fed the edge's busy time and the host's idle cores."""

from __future__ import annotations

from collections.abc import Callable

CRYPTO_MODES = ("auto", "edge", "workers")

# Where an edge runs the AEAD of its data frames (`fabric edge --crypto`):
#   edge     always in the edge (when it holds the session's keys)
#   workers  always in a worker (the edge only moves packets)
#   auto     in the edge, and in workers while the edge is saturated and the host
#            has idle cores for them (CryptoPlacement below)
BUSY_WINDOW = 0.1  # seconds over which an edge measures how busy it is
BUSY_HIGH = 0.9  # busier than this: hand crypto to workers (auto, with idle cores)
BUSY_LOW = 0.5  # less busy than this while handing off: take crypto back
IDLE_TO_OFFLOAD = 1.0  # idle cores the host needs before workers take the AEAD
IDLE_TO_KEEP = 0.25  # fewer idle cores while handing off: the host is full, take it back
RETRY_AFTER = 5.0  # seconds inline after giving up for want of cores, before trying again


class CryptoPlacement:
    """Decides, per data frame, whether the edge runs the AEAD itself (`inline`).

    A round trip through a worker costs four ZeroMQ hand-offs (edge -> worker ->
    edge, each through two I/O threads): that dominates idle latency and, with no
    idle core beside the edge, throughput too (docs/performance.md: one edge on
    a 2-core VM shared with the client, 764 -> 434 Mbit/s up with the AEAD in a
    worker). Workers pay only when they add cores that would otherwise idle: a
    saturated edge on a host with idle cores. Sans-I/O: the edge reports its
    working time with `work(seconds, now)`; `idle_cores()` (given) says how many
    of the host's cores idled since it was last asked, None if unknown.
    Hysteresis keeps it from flapping: handed off, the edge is less busy for the
    same traffic (BUSY_LOW), and the workers use the idle cores it saw, so it
    takes the AEAD back only when the host is full (IDLE_TO_KEEP) and then
    waits RETRY_AFTER before handing off again.
    """

    def __init__(self, mode: str, idle_cores: Callable[[], float | None] = lambda: None) -> None:
        if mode not in CRYPTO_MODES:
            raise ValueError(f"crypto placement {mode!r}: use one of {', '.join(CRYPTO_MODES)}")
        self.mode = mode
        self.idle_cores = idle_cores
        self.offloading = mode == "workers"
        self._start = -1.0
        self._busy = 0.0
        self._retry_at = 0.0
        self.busy = 0.0  # the last window's busy fraction
        self.idle = 0.0  # idle cores in the last window (0 if unknown)

    def work(self, seconds: float, now: float) -> None:
        """The edge spent `seconds` handling traffic, up to `now`."""
        if self._start < 0:
            self._start = now
        self._busy += seconds
        span = now - self._start
        if span < BUSY_WINDOW:
            return
        self.busy = min(1.0, self._busy / span)
        self._start, self._busy = now, 0.0
        if self.mode != "auto":
            return
        idle = self.idle_cores()
        self.idle = idle if idle is not None else 0.0
        if not self.offloading:
            if self.busy >= BUSY_HIGH and self.idle >= IDLE_TO_OFFLOAD and now >= self._retry_at:
                self.offloading = True
        elif self.busy <= BUSY_LOW:
            self.offloading = False
        elif self.idle < IDLE_TO_KEEP:
            self.offloading = False
            self._retry_at = now + RETRY_AFTER

    @property
    def inline(self) -> bool:
        return not self.offloading


class HostIdle:
    """Idle cores among `cpus` between calls, from /proc/stat (idle + iowait ticks)."""

    def __init__(self, cpus: set[int], path: str = "/proc/stat") -> None:
        self.cpus = cpus
        self.path = path
        self._last = self._read()

    def _read(self) -> dict[int, tuple[int, int]] | None:
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except OSError:
            return None
        out: dict[int, tuple[int, int]] = {}
        for line in text.split(b"\n"):
            if not line.startswith(b"cpu") or line[3:4] == b" ":
                continue
            name, *fields = line.split()
            try:
                cpu = int(name[3:])
                ticks = [int(x) for x in fields[:8]]
            except ValueError:
                continue
            if cpu in self.cpus and len(ticks) >= 5:
                out[cpu] = (ticks[3] + ticks[4], sum(ticks))
        return out

    def __call__(self) -> float | None:
        now, last = self._read(), self._last
        self._last = now
        if not now or not last:
            return None
        idle = 0.0
        for cpu, (i1, t1) in now.items():
            i0, t0 = last.get(cpu, (i1, t1))
            if t1 > t0:
                idle += (i1 - i0) / (t1 - t0)
        return idle
