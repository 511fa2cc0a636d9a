"""WireGuard handshakes in a worker (whitepaper 5.4.2-5.4.5), committed through the broker.

Responder: consume the initiation, build the response, ask the broker to commit
the session (timestamp and flood checks, a unique receiver index: authority.py),
and only then hand the response to the edge with the session.
Initiator (the fabric has traffic for a peer without a session): build the
initiation and register its pending state with the broker, which publishes it as
`pending/<index>`, so that whichever worker gets the response can finish it.
"""

from __future__ import annotations

import secrets
import struct
from typing import Any

from fabric.control.records import PENDING, SERVER, SessionRecord, key_id
from fabric.protocols.base import ControlResult, Protocol, WorkerHost, WorkerSide
from fabric.protocols.wireguard.constants import MSG_INITIATION, MSG_RESPONSE
from fabric.protocols.wireguard.messages import MessageError, message_type
from fabric.protocols.wireguard.noise import (
    HandshakeError,
    InitiatorState,
    StaticKeys,
    check_mac1,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)

_RECEIVER = struct.Struct("<I")  # a response's receiver index, at offset 8 (5.4.3)
NAME = "wireguard"


def pending_value(st: InitiatorState) -> dict[str, Any]:
    """The pending/<index> record of an initiation (the broker publishes it)."""
    return {"psk": st.preshared_key, "ephemeral": st.ephemeral_private, "chain_key": st.chain_key,
            "hash": st.hash, "sent_at": st.sent_at, "mac1": st.mac1}


class WgWorker(WorkerSide):
    def __init__(self, protocol: Protocol, host: WorkerHost) -> None:
        self.protocol = protocol
        self.host = host
        self.static: StaticKeys | None = None
        self.pending: dict[int, InitiatorState] = {}

    def on_record(self, key: bytes, value: dict[str, Any] | None) -> None:
        if key == SERVER and value is not None:
            self.static = StaticKeys.from_private(value["private"])
            return
        index = key_id(key, PENDING)
        if index is None:
            return
        if value is None:
            self.pending.pop(index, None)
            return
        st = value["state"]
        self.pending[index] = InitiatorState(
            value["peer"], st["psk"], int(value["local_index"]), st["ephemeral"], st["chain_key"],
            st["hash"], float(st["sent_at"]), st["mac1"],
        )

    def pending_count(self) -> int:
        return len(self.pending)

    def _drop(self, reason: str) -> ControlResult:
        self.host.count("drop_" + reason)
        return ControlResult()

    def _session(self, reply: dict[str, Any] | None) -> SessionRecord | None:
        if reply is None:
            return None  # counted by the host (broker unavailable)
        if not reply.get("ok"):
            self.host.count("drop_" + str(reply.get("reason", "refused")))
            return None
        return SessionRecord.from_wire(reply["session"])

    def control(self, datagram: bytes, addr: bytes, now: float, edge: int = 0) -> ControlResult:
        if self.static is None:
            return self._drop("not_ready")
        try:
            kind = message_type(datagram)
        except MessageError as exc:
            return self._drop(exc.reason)
        if kind not in (MSG_INITIATION, MSG_RESPONSE):
            return self._drop("unexpected_handshake")
        if not check_mac1(self.static.mac1_key, datagram):
            return self._drop("bad_mac1")
        if kind == MSG_RESPONSE:
            return self._response(datagram, addr, now)
        try:
            init = consume_initiation(self.static, datagram, lambda pub: pub in self.host.peers)
        except (HandshakeError, MessageError) as exc:
            return self._drop(exc.reason)
        peer = self.host.peers[init.peer_public]
        for _ in range(3):  # a receiver index someone holds already: draw another
            local_index = secrets.randbits(32)
            try:
                response, keys = create_response(self.static, init, peer.psk or bytes(32), local_index, now)
            except HandshakeError as exc:
                return self._drop(exc.reason)
            reply = self.host.commit({
                "protocol": NAME, "role": "responder", "peer": init.peer_public, "timestamp": init.timestamp,
                "local_index": local_index, "remote_index": init.sender_index,
                "send_key": keys.send_key, "recv_key": keys.recv_key, "endpoint": addr,
            })
            if reply is not None and not reply.get("ok") and reply.get("reason") == "index_in_use":
                continue
            session = self._session(reply)
            return ControlResult([response], session) if session is not None else ControlResult()
        return self._drop("index_in_use")

    def initiate(self, peer: bytes, addr: bytes, now: float) -> ControlResult:
        """Start a handshake to a peer (whitepaper 5.4.2); the fabric is the initiator."""
        info = self.host.peers.get(peer)
        if info is None:
            return self._drop("unknown_peer")
        if self.static is None:
            return self._drop("not_ready")
        for _ in range(3):
            local_index = secrets.randbits(32)
            msg, st = create_initiation(self.static, peer, info.psk or bytes(32), local_index, now)
            reply = self.host.commit({"protocol": NAME, "role": "pending", "peer": peer,
                                      "local_index": local_index, "state": pending_value(st)})
            if reply is None:
                return ControlResult()
            if reply.get("ok"):
                self.pending[local_index] = st
                self.host.count("initiations")
                return ControlResult([msg])
            if reply.get("reason") != "index_in_use":
                return self._drop(str(reply.get("reason", "refused")))
        return ControlResult()

    def _response(self, datagram: bytes, addr: bytes, now: float) -> ControlResult:
        """Finish one of the fabric's own initiations (whitepaper 5.4.3)."""
        assert self.static is not None
        (receiver,) = _RECEIVER.unpack_from(datagram, 8)
        st = self.pending.get(receiver)
        if st is None:
            return self._drop("unknown_index")
        try:
            keys = consume_response(self.static, st, datagram, now)
        except (HandshakeError, MessageError) as exc:
            return self._drop(exc.reason)
        session = self._session(self.host.commit({
            "protocol": NAME, "role": "initiator", "peer": st.peer_public, "local_index": keys.local_index,
            "remote_index": keys.remote_index, "send_key": keys.send_key, "recv_key": keys.recv_key,
            "endpoint": addr,
        }))
        if session is None:
            return ControlResult()
        self.pending.pop(receiver, None)
        return ControlResult([], session)
