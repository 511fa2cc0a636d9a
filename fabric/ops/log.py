"""Structured logging: one line per event, `key=value` pairs, quiet by default."""

from __future__ import annotations

import logging
import sys
from typing import Any

_configured = False


class _KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            record.levelname.lower(),
            record.name,
            record.getMessage(),
        ]
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append("exc=" + _fmt(self.formatException(record.exc_info).splitlines()[-1]))
        return " ".join(parts)


def _fmt(v: Any) -> str:
    s = str(v)
    return repr(s) if (" " in s or not s) else s


def setup(verbosity: int = 0) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv; lines go to stderr."""
    global _configured
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger("fabric")
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_KVFormatter())
        root.addHandler(handler)
        root.propagate = False
        _configured = True
    root.setLevel(level)


class Log:
    """A logger taking structured fields: log.info("session committed", peer=name)."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(f"fabric.{name}")

    def _emit(self, level: int, msg: str, fields: dict[str, Any], exc: bool = False) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, msg, extra={"fields": fields}, exc_info=exc)

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, fields, exc=True)
