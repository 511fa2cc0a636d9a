"""WireGuard's rules at the broker: what a worker may commit (whitepaper 5.1, 5.4).

* responder (a peer's initiation): the TAI64N timestamp is newer than the peer's
  last (byte order is time order), the previous initiation is
  INITIATION_FLOOD_INTERVAL old, and the receiver index is unused;
* pending (the fabric initiates): the index is unused and the peer has fewer than
  MAX_SESSIONS_PER_PEER handshakes pending; the state is published as
  `pending/<index>` for whichever worker receives the response;
* initiator (the response arrived): the pending state exists, and is used up
  either way (one response per initiation).

The newest timestamp per peer is persisted with the broker's state, so an old
initiation stays refused across broker restarts (invariant 5).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from fabric.control.records import SERVER, PeerRecord, SessionRecord, pending_key
from fabric.protocols.base import (
    Authority,
    NewSession,
    PeerProvision,
    Protocol,
    Publish,
    ServerSetup,
    SetupError,
)
from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.constants import (
    INITIATION_FLOOD_INTERVAL,
    MAX_SESSIONS_PER_PEER,
    REKEY_TIMEOUT,
    TIMESTAMP_SIZE,
)

PENDING_LIFETIME = 3 * REKEY_TIMEOUT  # a pending initiation is forgotten after this


def _u32(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32


def _key(v: Any) -> bool:
    return isinstance(v, bytes) and len(v) == 32


class WgAuthority(Authority):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.private = self.public = b""  # the server's static key pair (start)
        self.last_timestamp: dict[bytes, bytes] = {}  # peer -> newest TAI64N committed
        self.last_initiation: dict[bytes, float] = {}  # peer -> when (broker clock)
        self.pending: dict[int, dict[str, Any]] = {}  # local index -> pending record

    # --- the server and its peers ----------------------------------------------------

    def start(self, setup: ServerSetup) -> list[tuple[bytes, dict[str, Any]]]:
        """The server's static key pair: `server.key` in the state directory (0600),
        made on the first start. Published as `server` (edges check mac1 and make
        cookies with the public half; workers handshake with the private one)."""
        path = setup.root / "server.key"
        if path.exists():
            try:
                self.private = crypto.key_from_base64(path.read_text())
            except ValueError as exc:
                raise SetupError(f"{path}: {exc}; remove it to generate a new server key") from None
        else:
            self.private = crypto.generate_private_key()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(crypto.key_to_base64(self.private) + "\n")
        self.public = crypto.public_key(self.private)
        return [(SERVER, {"public": self.public, "private": self.private})]

    def describe(self) -> dict[str, Any]:
        return {"public_key": crypto.key_to_base64(self.public)}

    def new_peer(self, req: dict[str, Any]) -> PeerProvision:
        """A key pair for the client (or the public key it gave), and a preshared key
        if asked for (whitepaper 5.2); the private halves are told once."""
        private = None
        if req.get("public_key"):
            public = crypto.key_from_base64(req["public_key"])
        else:
            private = crypto.generate_private_key()
            public = crypto.public_key(private)
        psk = crypto.generate_private_key() if req.get("psk") else None
        return PeerProvision(public, psk, {
            "private_key": crypto.key_to_base64(private) if private else None,
            "preshared_key": crypto.key_to_base64(psk) if psk else None,
            "server_public_key": crypto.key_to_base64(self.public),
        })

    # --- commits ------------------------------------------------------------------------

    def _index_used(self, index: int, sessions: Iterable[SessionRecord]) -> bool:
        name = self.protocol.name
        return index in self.pending or any(s.protocol == name and s.data_key == index for s in sessions)

    def commit(self, req: dict[str, Any], peer: PeerRecord, sessions: Iterable[SessionRecord],
               now: float) -> NewSession | Publish | str:
        role = req.get("role", "responder")
        raw = req.get("local_index")
        index = raw if isinstance(raw, int) and _u32(raw) else -1
        if role == "initiator":
            pending = self.pending.get(index)
            if pending is None or pending["peer"] != peer.public:
                return "no_pending_handshake"
            del self.pending[index]  # one response per initiation: used up either way
            return self._session(req, index, initiator=True, unpublish=pending_key(index))
        if index < 0 or self._index_used(index, sessions):
            return "index_in_use"
        if role == "pending":
            state = req.get("state")
            if not isinstance(state, dict):
                return "bad_request"
            if sum(1 for p in self.pending.values() if p["peer"] == peer.public) >= MAX_SESSIONS_PER_PEER:
                return "handshake_pending"
            value = {"peer": peer.public, "local_index": index, "state": state, "created": now}
            self.pending[index] = value
            return Publish(pending_key(index), value, "initiations")
        if role != "responder":
            return "bad_request"
        ts = req.get("timestamp")
        if not isinstance(ts, bytes) or len(ts) != TIMESTAMP_SIZE:
            return "bad_request"
        if ts <= self.last_timestamp.get(peer.public, bytes(TIMESTAMP_SIZE)):
            return "stale_timestamp"
        if now - self.last_initiation.get(peer.public, 0.0) < INITIATION_FLOOD_INTERVAL:
            return "flood"
        new = self._session(req, index, initiator=False)
        if isinstance(new, NewSession):
            def done(pub: bytes = peer.public, ts: bytes = ts) -> None:
                self.last_timestamp[pub] = ts
                self.last_initiation[pub] = now
            new.on_commit = done
        return new

    @staticmethod
    def _session(req: dict[str, Any], index: int, initiator: bool,
                 unpublish: bytes | None = None) -> NewSession | str:
        remote, send, recv = req.get("remote_index"), req.get("send_key"), req.get("recv_key")
        if not _u32(remote) or not _key(send) or not _key(recv):
            return "bad_request"
        endpoint = req.get("endpoint", b"")
        return NewSession(index, {"remote_index": remote}, {"send_key": send, "recv_key": recv},
                          initiator, endpoint if isinstance(endpoint, bytes) else b"", unpublish=unpublish)

    def tick(self, now: float) -> list[tuple[bytes, dict[str, Any] | None]]:
        gone = [i for i, p in self.pending.items() if now - p["created"] > PENDING_LIFETIME]
        for i in gone:
            del self.pending[i]
        return [(pending_key(i), None) for i in gone]

    def forget_peer(self, public: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        gone = [i for i, p in self.pending.items() if p["peer"] == public]
        for i in gone:
            del self.pending[i]
        self.last_timestamp.pop(public, None)
        self.last_initiation.pop(public, None)
        return [(pending_key(i), None) for i in gone]

    def records(self) -> list[tuple[bytes, dict[str, Any]]]:
        """What the broker publishes of this authority's state (pending initiations)."""
        return [(pending_key(i), p) for i, p in self.pending.items()]

    def state(self) -> dict[str, Any]:
        return {"peers": {pub: {"last_timestamp": ts, "last_initiation": self.last_initiation.get(pub, 0.0)}
                          for pub, ts in self.last_timestamp.items()}}

    def load(self, state: dict[str, Any]) -> None:
        peers = state.get("peers") or {}
        if not isinstance(peers, dict):
            return
        for pub, d in peers.items():
            ts = d.get("last_timestamp") if isinstance(d, dict) else None
            if isinstance(pub, bytes) and isinstance(ts, bytes) and len(ts) == TIMESTAMP_SIZE:
                self.last_timestamp[pub] = ts
                t = d.get("last_initiation", 0.0)
                self.last_initiation[pub] = float(t) if isinstance(t, int | float) else 0.0

    def pending_count(self) -> int:
        return len(self.pending)
