"""Per-key token buckets (wireguard-go `ratelimiter`), protocol-neutral."""

from __future__ import annotations

MAX_TRACKED = 65536  # keys a bucket remembers before it forgets the idle ones


class TokenBucket:
    """Per-key token buckets: `rate` tokens a second, at most `burst` (wireguard-go
    ratelimiter). Memory is bounded: past MAX_TRACKED keys, the full (idle) buckets
    are forgotten, and if that is not enough, all of them."""

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_TRACKED) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.max_keys = max_keys
        self.buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, key: bytes, now: float) -> bool:
        got = self.buckets.get(key)
        if got is None:
            tokens = self.burst
            if len(self.buckets) >= self.max_keys:
                self._forget_idle(now)
        else:
            tokens = min(self.burst, got[0] + (now - got[1]) * self.rate)
        if tokens >= 1.0:
            self.buckets[key] = (tokens - 1.0, now)
            return True
        self.buckets[key] = (tokens, now)
        return False

    def _forget_idle(self, now: float) -> None:
        full = self.burst / self.rate if self.rate > 0 else float("inf")
        self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < full}
        if len(self.buckets) >= self.max_keys:
            self.buckets.clear()
