"""Typed records that cross process boundaries.

The broker publishes them over the Clone pattern (`kvmsg`: a msgpack map per key),
keeps them in `broker.state`, and a worker hands an edge the public copy of a
session it just committed (HANDSHAKE_OUT). This module is the only code that
knows their keys on the wire: `to_wire` builds the map, `from_wire` checks every
field and raises RecordError (a counted drop for the receiver) on anything
malformed. Protocol-specific fields travel in `params` (public) and `keys`
(secret; absent from a public copy); the protocol package reads them.

Keys of the key-value store:

    server              the server's own identity (WireGuard: its static key pair)
    peer/<base64 key>   a peer (PeerRecord)
    session/<id>        a session (SessionRecord)
    edge/<id>           where an edge takes work (announced from its reports)
    worker/<id>         a worker that reports (edges pick one by affinity among them)
    pending/<index>     a handshake the fabric initiated (WireGuard's; its own format)
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

ADDR_SIZE = 18  # control.frames.pack_addr: 16-byte IP (v4-mapped for IPv4), 2-byte port
NO_ADDR = bytes(ADDR_SIZE)
DEFAULT_PROTOCOL = "wireguard"  # records from before protocols were recorded

SERVER = b"server"
PEER = b"peer/"
SESSION = b"session/"
EDGE = b"edge/"
WORKER = b"worker/"
PENDING = b"pending/"


class RecordError(ValueError):
    """A record that is not well formed."""


def peer_key(public: bytes) -> bytes:
    return PEER + base64.b64encode(public)


def session_key(sid: int) -> bytes:
    return SESSION + b"%d" % sid


def edge_key(eid: int) -> bytes:
    return EDGE + b"%d" % eid


def worker_key(wid: int) -> bytes:
    return WORKER + b"%d" % wid


def worker_identity(wid: int) -> bytes:
    """The routing id a worker's DEALER gives itself on every edge's control ROUTER."""
    return b"w%d" % wid


def pending_key(index: int) -> bytes:
    return PENDING + b"%d" % index


def key_id(key: bytes, prefix: bytes) -> int | None:
    """The number after `prefix` in `key` (session/7 -> 7), None if it is not one."""
    rest = key[len(prefix):]
    return int(rest) if key.startswith(prefix) and rest.isdigit() and len(rest) < 20 else None


def key_public(key: bytes) -> bytes | None:
    """The public key of a peer/<base64> key, None if it does not decode to 32 bytes."""
    if not key.startswith(PEER):
        return None
    try:
        raw = base64.b64decode(key[len(PEER):], validate=True)
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


# --- field checks ----------------------------------------------------------------------


def _int(d: Mapping[str, Any], name: str, hi: int = 2**64) -> int:
    v = d.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < hi:
        raise RecordError(f"{name}: expected an integer in 0..{hi - 1}, got {v!r}")
    return v


def _float(d: Mapping[str, Any], name: str) -> float:
    v = d.get(name)
    if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
        raise RecordError(f"{name}: expected a number, got {v!r}")
    return float(v)


def _bytes(d: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    v = d.get(name)
    if not isinstance(v, bytes) or (size is not None and len(v) != size):
        raise RecordError(f"{name}: expected {size or 'some'} bytes, got {type(v).__name__}")
    return v


def _str(d: Mapping[str, Any], name: str, default: str | None = None) -> str:
    v = d.get(name, default)
    if not isinstance(v, str) or not v or len(v) > 256:
        raise RecordError(f"{name}: expected a short string, got {v!r}")
    return v


def _map(d: Mapping[str, Any], name: str) -> dict[str, Any]:
    v = d.get(name) or {}
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise RecordError(f"{name}: expected a map with string keys")
    return dict(v)


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session: a set of data keys between the fabric and one peer.

    `data_key` is what the peer's data datagrams carry to name it (WireGuard: the
    receiver index the fabric chose); `slot` its place in the host-shared session
    table; `initiator` means the fabric may send on it at once (it initiated, or
    the protocol confirmed the peer holds the keys). `params` and `keys` are the
    protocol's (WireGuard: remote_index; send_key and recv_key)."""

    id: int
    slot: int
    peer: bytes
    protocol: str
    data_key: int
    created: float
    initiator: bool = False
    endpoint: bytes = NO_ADDR
    params: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "slot": self.slot, "peer": self.peer, "protocol": self.protocol,
            "data_key": self.data_key, "created": self.created, "initiator": self.initiator,
            "endpoint": self.endpoint, "params": self.params,
        }
        if self.keys is not None:
            d["keys"] = self.keys
        return d

    def public(self) -> SessionRecord:
        """The copy without keys (what a handshake result tells the edge at once)."""
        return replace(self, keys=None)

    @classmethod
    def from_wire(cls, d: Any) -> SessionRecord:
        if not isinstance(d, dict):
            raise RecordError("a session record is a map")
        if "data_key" not in d and "local_index" in d:
            d = _legacy_session(d)
        endpoint = d.get("endpoint") or NO_ADDR
        if not isinstance(endpoint, bytes) or len(endpoint) != ADDR_SIZE:
            endpoint = NO_ADDR
        keys = d.get("keys")
        if keys is not None and (not isinstance(keys, dict) or not all(isinstance(k, str) for k in keys)):
            raise RecordError("keys: expected a map with string keys")
        return cls(
            _int(d, "id"), _int(d, "slot", 2**32), _bytes(d, "peer"), _str(d, "protocol", DEFAULT_PROTOCOL),
            _int(d, "data_key", 2**32), _float(d, "created"), bool(d.get("initiator")), endpoint,
            _map(d, "params"), keys,
        )


def _legacy_session(d: dict[str, Any]) -> dict[str, Any]:
    """A WireGuard session as broker.state and its updates held it before records were typed."""
    keys = {k: d[k] for k in ("send_key", "recv_key") if k in d}
    return {**d, "protocol": DEFAULT_PROTOCOL, "data_key": d.get("local_index"),
            "params": {"remote_index": d.get("remote_index")}, "keys": keys or None}


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A peer: its identity key, the protocol it speaks, its tunnel addresses."""

    name: str
    public: bytes
    allowed_ips: tuple[str, ...]
    protocol: str = DEFAULT_PROTOCOL
    psk: bytes | None = None  # WireGuard's preshared key
    keepalive: int = 0  # seconds between the fabric's keepalives (0: none)
    params: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "public": self.public, "allowed_ips": list(self.allowed_ips),
                "protocol": self.protocol, "psk": self.psk, "keepalive": self.keepalive,
                "params": self.params}

    @classmethod
    def from_wire(cls, d: Any) -> PeerRecord:
        if not isinstance(d, dict):
            raise RecordError("a peer record is a map")
        ips = d.get("allowed_ips")
        if not isinstance(ips, list | tuple) or not all(isinstance(i, str) for i in ips):
            raise RecordError("allowed_ips: expected a list of networks")
        psk = d.get("psk")
        if psk is not None and (not isinstance(psk, bytes) or len(psk) != 32):
            raise RecordError("psk: expected 32 bytes")
        return cls(_str(d, "name"), _bytes(d, "public", 32), tuple(ips), _str(d, "protocol", DEFAULT_PROTOCOL),
                   psk, _int({"k": d.get("keepalive") or 0}, "k", 65536), _map(d, "params"))


@dataclass(frozen=True, slots=True)
class EdgeRecord:
    """Where an edge takes work and returns results (ipc, and tcp for remote workers)."""

    id: int
    work: str
    result: str
    work_tcp: str | None = None
    result_tcp: str | None = None
    control: str | None = None  # ROUTER for control datagrams with an affinity
    control_tcp: str | None = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "work": self.work, "result": self.result}
        for name in ("work_tcp", "result_tcp", "control", "control_tcp"):
            if getattr(self, name):
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_wire(cls, d: Any) -> EdgeRecord:
        if not isinstance(d, dict):
            raise RecordError("an edge record is a map")
        def opt(name: str) -> str | None:
            v = d.get(name)
            return v if isinstance(v, str) and v else None
        return cls(_int(d, "id", 65536), str(d.get("work") or ""), str(d.get("result") or ""),
                   opt("work_tcp"), opt("result_tcp"), opt("control"), opt("control_tcp"))
