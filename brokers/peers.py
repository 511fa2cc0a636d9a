"""A peer as the broker keeps it: its record (fabric.control.records.PeerRecord) and where
it came from (the config file, or `fabric peer add`)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from fabric.control.records import DEFAULT_PROTOCOL, PeerRecord


def b64(key: bytes) -> str:
    """A peer's key as admin replies and client configs spell it (standard base64)."""
    return base64.b64encode(key).decode()



@dataclass
class Peer:
    name: str
    public: bytes
    allowed_ips: list[str]
    psk: bytes | None = None
    keepalive: int = 0
    source: str = "runtime"  # "config": from the TOML file (re-read at every start); "runtime": `fabric peer add`
    protocol: str = DEFAULT_PROTOCOL

    def record(self) -> PeerRecord:
        return PeerRecord(self.name, self.public, tuple(self.allowed_ips), self.protocol, self.psk, self.keepalive)

    def value(self) -> dict[str, Any]:
        return self.record().to_wire()

    def to_state(self) -> dict[str, Any]:
        return {**self.value(), "source": self.source}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Peer:
        r = PeerRecord.from_wire(d)
        return cls(r.name, r.public, list(r.allowed_ips), r.psk, r.keepalive,
                   "config" if d.get("source") == "config" else "runtime", r.protocol)
