"""OpenVPN's control channel in a worker: the connections this worker holds, by client
session id (edges send every control packet of one client session to the same worker:
base.Forward with the session id as affinity).

A connection is made only for a client that echoed a valid cookie (server.py): its
first packet after our stateless hard reset acks our message 0 and names our session
id. A renegotiation that reaches a worker without the connection (it was restarted, or
the set of workers changed) is taken over from the connection's session record, which
carries both session ids: any worker can serve any session.

Keys a key exchange produced are committed to the broker (authority.py), which
publishes the session to every edge; the commit's reply goes back to the connection
(control.py), which then pushes the client's options.

A client certificate is accepted (TLS verify, at depth 0 after OpenSSL checked the chain)
when it is not revoked (`[openvpn] crl`) and names a peer: its fingerprint, or its CN's
identity (server.cn_identity). With `enroll = "cn"` an unknown CN is asked of the broker
(a commit with `admit`), which adds the peer or says why not; the worker takes the
peer from the reply at once (the broker publishes it to all too).
"""

from __future__ import annotations

import hashlib
from typing import Any

from fabric.control.records import PeerRecord, RecordError, SessionRecord
from fabric.protocols.base import ControlResult, Outgoing, Protocol, WorkerHost, WorkerSide
from fabric.protocols.openvpn.constants import P_CONTROL_SOFT_RESET_V1
from fabric.protocols.openvpn.control import ControlSession, ExitRequested, Failed, KeyExchanged
from fabric.protocols.openvpn.pki import PkiError, cert_common_name
from fabric.protocols.openvpn.server import SERVER_KEY, ServerConfig, cn_identity, cookie_valid
from fabric.protocols.openvpn.tls import TlsContext, TlsError
from fabric.protocols.openvpn.wire import ControlPacket, WireError

NAME = "openvpn"
MAX_CONNECTIONS = 100_000  # connections one worker holds (each a TLS object or two)


class OvpnWorker(WorkerSide):
    def __init__(self, protocol: Protocol, host: WorkerHost) -> None:
        self.protocol = protocol
        self.host = host
        self.config: ServerConfig | None = None
        self.context: TlsContext | None = None
        self.connections: dict[bytes, ControlSession] = {}  # client session id -> connection
        self.records: dict[int, SessionRecord] = {}  # this protocol's sessions, by id
        self.by_client: dict[bytes, set[int]] = {}  # client session id -> session ids
        self.halts: dict[bytes, bytes] = {}  # connections to tell to stop at the next tick

    # --- records ------------------------------------------------------------------------

    def on_record(self, key: bytes, value: dict[str, Any] | None) -> None:
        if key != SERVER_KEY or value is None:
            return
        config = ServerConfig.from_wire(value)
        try:
            self.context = TlsContext(config.ca, config.cert, config.key, server=True)
        except TlsError as exc:
            raise ValueError(f"openvpn/server: {exc}") from None
        self.config = config

    def on_session(self, record: SessionRecord) -> None:
        client = record.params.get("client_sid")
        if isinstance(client, bytes):
            self.records[record.id] = record
            self.by_client.setdefault(client, set()).add(record.id)

    def on_session_gone(self, sid: int) -> None:
        record = self.records.pop(sid, None)
        if record is None:
            return
        client = record.params.get("client_sid")
        left = self.by_client.get(client, set()) if isinstance(client, bytes) else set()
        left.discard(sid)
        if left or not isinstance(client, bytes):
            return
        self.by_client.pop(client, None)
        conn = self.connections.get(client)
        if conn is not None and conn.primary is not None and conn.closing_at is None:
            # its last session went: ended, replaced by a newer connection, or the peer removed
            removed = conn.peer is None or conn.peer not in self.host.peers
            self.halts[client] = b"HALT" if removed else b"RESTART"

    def pending_count(self) -> int:
        return sum(1 for c in self.connections.values() if c.primary is None)

    # --- control datagrams ----------------------------------------------------------------

    def _drop(self, reason: str) -> ControlResult:
        self.host.count("drop_" + reason)
        return ControlResult()

    def _verify(self, der: bytes) -> bool:
        cfg = self.config
        if cfg is not None and cfg.revoked(der):
            self.host.count("drop_openvpn_revoked_certificate")
            return False
        ident = self._identify(der)
        if self._peer(ident) is not None:
            return True
        if cfg is None or cfg.enroll != "cn" or ident == hashlib.sha256(der).digest():
            return False
        reply = self.host.commit({"protocol": NAME, "admit": True, "peer": ident, "certificate": der})
        if reply is None or not reply.get("ok"):
            reason = "broker_unavailable" if reply is None else str(reply.get("reason", "refused"))
            self.host.count("drop_openvpn_enroll_" + reason)
            return False
        try:
            peer = PeerRecord.from_wire(reply["peer"])
        except (RecordError, KeyError, TypeError, ValueError):
            self.host.count("drop_openvpn_enroll_bad_reply")
            return False
        if peer.public != ident or peer.protocol != NAME:
            return False
        self.host.peers[ident] = peer  # the broker's update brings the same record
        self.host.count("openvpn_enrolled")
        return True

    def _identify(self, der: bytes) -> bytes:
        """The peer a client certificate is: its fingerprint when that is a peer, else its
        CN's identity (a client of an existing PKI); the fingerprint without a CN."""
        fp = hashlib.sha256(der).digest()
        if self._peer(fp) is not None:
            return fp
        try:
            cn = cert_common_name(der)
        except PkiError:
            return fp
        return cn_identity(cn) if cn else fp

    def _peer(self, public: bytes) -> Any:
        peer = self.host.peers.get(public)
        return peer if peer is not None and peer.protocol == NAME else None

    def control(self, datagram: bytes, addr: bytes, now: float, edge: int = 0) -> ControlResult:
        cfg, ctx = self.config, self.context
        if cfg is None or ctx is None:
            return self._drop("not_ready")
        try:
            packet, wrap_id, wrap_time = cfg.wrapper().unwrap(datagram)
            p = ControlPacket.unpack(packet)
        except WireError as exc:
            return self._drop(exc.reason)
        conn = self.connections.get(p.session_id) or self._connect(p, addr, edge, now)
        if conn is None:
            return ControlResult()
        conn.edge = edge
        conn.receive(p, wrap_id, wrap_time, addr, now)
        session = self._events(conn, now)
        return ControlResult(conn.datagrams_to_send(now), session)

    def _connect(self, p: ControlPacket, addr: bytes, edge: int, now: float) -> ControlSession | None:
        cfg, ctx = self.config, self.context
        assert cfg is not None and ctx is not None
        if len(self.connections) >= MAX_CONNECTIONS:
            self._drop("too_many_connections")
            return None
        conn: ControlSession | None
        if p.remote_session_id is not None and p.key_id == 0 and p.opcode != P_CONTROL_SOFT_RESET_V1 \
                and cookie_valid(cfg.cookie_key, addr, p.session_id, p.remote_session_id, now):
            conn = ControlSession(cfg, ctx, p.session_id, p.remote_session_id, addr, edge, now,
                                  self._verify, self._peer, identify=self._identify)
            self.host.count("openvpn_connections")
        else:
            conn = self._take_over(p, addr, edge, now)
            if conn is None:
                self._drop("unknown_session" if p.remote_session_id is None else "bad_cookie")
                return None
        self.connections[p.session_id] = conn
        return conn

    def _take_over(self, p: ControlPacket, addr: bytes, edge: int, now: float) -> ControlSession | None:
        """A renegotiation of a connection this worker does not hold, from its record."""
        if p.opcode != P_CONTROL_SOFT_RESET_V1:
            return None
        ids = self.by_client.get(p.session_id)
        record = max((self.records[i] for i in ids or ()), key=lambda r: r.created, default=None)
        if record is None:
            return None
        server_sid = record.params.get("server_sid")
        if not isinstance(server_sid, bytes) or (p.remote_session_id not in (None, server_sid)):
            return None
        cfg, ctx = self.config, self.context
        assert cfg is not None and ctx is not None
        conn = ControlSession(cfg, ctx, p.session_id, server_sid, addr, edge, now, self._verify, self._peer,
                              fresh=False, identify=self._identify)
        conn.peer, conn.cipher = record.peer, str(record.params.get("cipher"))
        conn.ekm = bool(record.params.get("ekm"))
        conn.v1 = bool(record.params.get("v1"))
        conn.primary = int(record.params.get("key_id", 0))
        peer_id = record.params.get("peer_id")
        conn.peer_id = peer_id if isinstance(peer_id, int) else None
        self.host.count("openvpn_takeovers")
        return conn

    def _events(self, conn: ControlSession, now: float) -> SessionRecord | None:
        """Act on what the connection asks for; the session committed, if any."""
        session = None
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, KeyExchanged):
                session = self._commit(conn, ev, now)
            elif isinstance(ev, ExitRequested):
                reply = self.host.commit({"protocol": NAME, "role": "end", "peer": conn.peer,
                                          "client_sid": conn.client_sid})
                if reply is not None and reply.get("ok"):
                    self.host.count("openvpn_exits")
            elif isinstance(ev, Failed):
                self.host.count("drop_openvpn_" + ev.reason)
        for reason, n in conn.drops.items():
            self.host.count("drop_" + reason, n)
        conn.drops.clear()
        return session

    def _commit(self, conn: ControlSession, ev: KeyExchanged, now: float) -> SessionRecord | None:
        k = ev.keys
        reply = self.host.commit({
            "protocol": NAME, "role": "session", "peer": ev.peer, "key_id": ev.key_id, "cipher": ev.cipher,
            "ekm": ev.ekm, "v1": ev.v1, "encrypt_key": k.encrypt_key, "encrypt_iv": k.encrypt_implicit_iv,
            "decrypt_key": k.decrypt_key, "decrypt_iv": k.decrypt_implicit_iv,
            "client_sid": conn.client_sid, "server_sid": conn.server_sid, "endpoint": conn.addr,
        })
        if reply is None or not reply.get("ok"):
            reason = "broker_unavailable" if reply is None else str(reply.get("reason", "refused"))
            conn.refused(ev.key_id, reason)
            return None
        session = SessionRecord.from_wire(reply["session"])
        conn.committed(ev.key_id, session, now)
        self.on_session(session)
        return session

    # --- timers -------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for client, message in self.halts.items():
            conn = self.connections.get(client)
            if conn is not None:
                conn.halt(now, message)
        self.halts.clear()
        for sid, conn in list(self.connections.items()):
            timer = conn.get_timer()
            if timer is None or timer > now:
                continue
            conn.handle_timer(now)
            datagrams = conn.datagrams_to_send(now)
            self._events(conn, now)
            if datagrams:
                out.append(Outgoing(conn.edge, conn.addr, datagrams))
            if conn.closed:
                del self.connections[sid]
        return out
