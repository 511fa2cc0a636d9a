"""What every long-running fabric process shares: stopping cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
from typing import Any


def stop_on_signals() -> list[bool]:
    """A flag set by SIGTERM or SIGINT; service loops run while not flag[0]."""
    stop = [False]

    def _stop(*_: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return stop
