"""What edges and workers report to the broker once a second: checked, kept, turned into rates.

A report is a PUSH of cumulative counters keyed by (role, id, pid): a lost report
costs nothing, and a restarted process adds to, rather than replaces, its
predecessor's totals. `sanitize_report` vets every field of what arrives (invariant
7: garbage on the stats socket is a counted drop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _small_int(v: Any, hi: int = 2**63) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < hi


def sanitize_report(r: Any) -> dict[str, Any] | None:
    """A stats report with every field checked, or None if any is malformed."""
    if not isinstance(r, dict) or r.get("role") not in ("edge", "worker"):
        return None
    if not _small_int(r.get("id"), 65536) or not _small_int(r.get("pid"), 2**32):
        return None
    counters = r.get("counters", {})
    peers = r.get("peers", {})
    sessions = r.get("sessions", {})
    if not (isinstance(counters, dict) and isinstance(peers, dict) and isinstance(sessions, dict)):
        return None
    if not all(isinstance(k, str) and _small_int(v) for k, v in counters.items()):
        return None
    for k, v in peers.items():
        if not isinstance(k, bytes) or not isinstance(v, list) or len(v) != 4 or not all(map(_small_int, v)):
            return None
    clean_sessions = {}
    for k, v in sessions.items():
        if not _small_int(k) or not isinstance(v, dict) or not _small_int(v.get("packets", 0)):
            return None
        ep, last_rx = v.get("endpoint", ""), v.get("last_rx", 0.0)
        if not isinstance(ep, str) or not isinstance(last_rx, int | float):
            return None
        clean_sessions[k] = {"packets": v.get("packets", 0), "endpoint": ep[:64], "last_rx": float(last_rx)}
    out = {"role": r["role"], "id": r["id"], "pid": r["pid"], "counters": counters, "peers": peers,
           "sessions": clean_sessions}
    gauges = r.get("gauges", {})
    if not isinstance(gauges, dict) or not all(isinstance(k, str) and _small_int(v) for k, v in gauges.items()):
        return None
    out["gauges"] = gauges
    ended = r.get("ended", [])
    if not isinstance(ended, list) or len(ended) > 4096 or not all(_small_int(v) for v in ended):
        return None
    out["ended"] = ended
    for key in ("work", "result", "work_tcp", "result_tcp", "control", "control_tcp", "metrics"):
        if key in r:
            if not isinstance(r[key], str) or len(r[key]) > 200:
                return None
            out[key] = r[key]
    return out


@dataclass
class Reports:
    """Latest counters from each process (role, id, pid); totals are sums over them."""

    latest: dict[tuple[str, int, int], tuple[float, dict[str, Any]]] = field(default_factory=dict)
    # the report before the latest one, for rates (`fabric status`: packets per second)
    previous: dict[tuple[str, int, int], tuple[float, dict[str, Any]]] = field(default_factory=dict)

    def add(self, report: dict[str, Any], now: float) -> None:
        key = (str(report["role"]), int(report["id"]), int(report["pid"]))
        if key in self.latest:
            self.previous[key] = self.latest[key]
        self.latest[key] = (now, report)

    def rates(self, key: tuple[str, int, int]) -> dict[str, float]:
        """Per-second increase of each counter between the last two reports of one process."""
        if key not in self.previous or key not in self.latest:
            return {}
        (t0, r0), (t1, r1) = self.previous[key], self.latest[key]
        dt = t1 - t0
        if dt <= 0:
            return {}
        c0 = r0.get("counters", {})
        return {k: round(max(0, v - c0.get(k, 0)) / dt, 1) for k, v in r1.get("counters", {}).items()}
