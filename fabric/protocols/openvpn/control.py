"""One client's control channel at the server, sans I/O (the style of aioquic's
QuicConnection): packets and `now` in, datagrams, timers and events out.

A ControlSession is one client session id (a connection): the wrapping's packet ids
and replay window, and per key id a KeyState (openvpn-protocol.md 1.3, 2, 5): its
reliable streams, its TLS, its key exchange. The worker side (workerside.py) owns the
sessions, commits the keys an exchange produced to the broker and tells the session.

    receive(packet, wrap_id, wrap_time, addr, now)   an unwrapped, parsed control packet
    datagrams_to_send(now)                           wrapped packets for the client
    get_timer() / handle_timer(now)                  retransmissions, hand-window, reneg-sec
    next_event()                                     KeyExchanged, ExitRequested, Failed
    committed(key_id, session) / refused(key_id, reason)
    renegotiate(now) / halt(now)

Flow of a key state (ssl.c tls_process_state, server side):
    (soft reset) -> TLS handshake -> client key method 2 -> our key method 2 and the
    keys (KeyExchanged) -> committed: active; with key id 0 also the PUSH_REPLY
    (at once if the client asked for early push, IV_PROTO_REQUEST_PUSH; else when its
    PUSH_REQUEST comes).
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fabric.control.records import PeerRecord, SessionRecord
from fabric.protocols.openvpn import keys as km
from fabric.protocols.openvpn.constants import (
    ACK_LIMIT_DEDICATED,
    ACK_LIMIT_PIGGYBACK,
    HANDSHAKE_WINDOW_DEFAULT,
    KEY_ID_MAX,
    P_ACK_V1,
    P_CONTROL_HARD_RESET_CLIENT_V2,
    P_CONTROL_SOFT_RESET_V1,
    P_CONTROL_V1,
    PACKET_ID_MAX,
    PUSH_BUNDLE_SIZE,
)
from fabric.protocols.openvpn.reliable import ReliableReceive, ReliableSend
from fabric.protocols.openvpn.server import ServerConfig
from fabric.protocols.openvpn.tls import TlsContext, TlsError, TlsServer
from fabric.protocols.openvpn.wire import ControlPacket
from fabric.protocols.openvpn.wrap import ReplayWindow

TLS_CHUNK = 1100  # TLS bytes per control packet: with headers within TLS_MTU_DEFAULT (1250)
IV_PROTO_DATA_V2 = 1 << 1  # ssl.h: the client takes P_DATA_V2 and a peer-id
CLOSE_AFTER = 10.0  # a halted session lingers this long for its last message's acks


@dataclass(frozen=True, slots=True)
class KeyExchanged:
    """A key state finished key method 2: commit these keys (the worker side does)."""

    key_id: int
    peer: bytes  # the client certificate's fingerprint (the peer's identity)
    cipher: str
    keys: km.DataKeys
    ekm: bool
    v1: bool = False


@dataclass(frozen=True, slots=True)
class ExitRequested:
    """The client said EXIT (explicit-exit-notify with cc-exit)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The connection is over (a reason for the counters and the log)."""

    reason: str
    detail: str = ""


Event = KeyExchanged | ExitRequested | Failed


@dataclass
class KeyState:
    key_id: int
    send: ReliableSend
    recv: ReliableReceive
    tls: TlsServer
    created: float
    state: str = "tls"  # tls -> keys (exchanged, not committed) -> active; failed
    out: bytearray = field(default_factory=bytearray)  # TLS bytes waiting for the send window
    session_id: int = 0  # the committed session


class ControlSession:
    """One connection (client session id) at the server.

    `fresh`: it starts from our stateless hard reset (the edge sent it as message 0
    with wrap packet id 1), so message ids go on from 1 each way and wrap ids from 2
    (ssl.c session_skip_to_pre_start). Otherwise it is taken over from a session record
    (a renegotiation reaching a worker that did not hold the connection): only new
    key states follow, and `peer`, `cipher`, `ekm` come from the record."""

    def __init__(self, config: ServerConfig, context: TlsContext, client_sid: bytes, server_sid: bytes,
                 addr: bytes, edge: int, now: float, verify: Callable[[bytes], bool],
                 peers: Callable[[bytes], PeerRecord | None], fresh: bool = True,
                 identify: Callable[[bytes], bytes] | None = None) -> None:
        self.config, self.context = config, context
        self.client_sid, self.server_sid = client_sid, server_sid
        self.addr, self.edge = addr, edge
        self.verify, self.peers = verify, peers
        # the peer a certificate (DER) is: its SHA-256 by default (workerside: or its CN's identity)
        self.identify = identify or (lambda der: hashlib.sha256(der).digest())
        self.wrap = config.wrapper()
        self.replay = ReplayWindow()
        self.wrap_id = 2 if fresh else 1
        # taken over, ids start again from 1: with a time after the previous holder's (its
        # start's, which may be this very second) the client's replay window starts a new
        # sequence (packet_id.c packet_id_test) rather than refusing them as replays
        self.net_time = int(now) if fresh else int(now) + 1
        self.created = self.last_rx = now
        self.keys: dict[int, KeyState] = {}
        self.primary: int | None = None  # the newest active key id
        self.primary_since = now
        self.reneg_at = self._reneg_deadline(now)
        self.peer: bytes | None = None
        self.peer_id: int | None = None
        self.cipher: str | None = None
        self.ekm = False
        self.v1 = False  # P_DATA_V1: a client without peer-id
        self.iv_proto = 0
        self.pushed = False
        self.closing_at: float | None = None
        self.closed = False
        self.drops: dict[str, int] = {}
        self._events: deque[Event] = deque()
        if fresh:
            self.keys[0] = self._key_state(0, 1, now)

    # --- helpers ----------------------------------------------------------------------

    def _key_state(self, key_id: int, first_id: int, now: float) -> KeyState:
        tls = TlsServer.with_context(self.context, self.verify)
        return KeyState(key_id, ReliableSend(first_id), ReliableReceive(first_id), tls, now)

    def _reneg_deadline(self, now: float) -> float:
        sec = self.config.reneg_sec
        # init.c: a server renegotiates at a random 90-100 % of reneg-sec
        return now + sec * random.uniform(0.9, 1.0) if sec > 0 else float("inf")

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _fail(self, reason: str, detail: str = "") -> None:
        if not self.closed:
            self.closed = True
            self._events.append(Failed(reason, detail))

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # --- receive ----------------------------------------------------------------------

    def receive(self, p: ControlPacket, wrap_id: int, wrap_time: int, addr: bytes, now: float) -> None:
        if self.closed:
            return
        if self.wrap.replay_protected:
            # crypto.c crypto_check_replay, on the long-form id of the wrapping
            if not self.replay.check(wrap_id, wrap_time, now):
                self._drop("replay")
                return
            self.replay.add(wrap_id, wrap_time, now)
        elif addr != self.addr:
            self._drop("control_from_other_address")  # ssl.c tls_pre_decrypt, unauthenticated
            return
        if p.acks and p.remote_session_id != self.server_sid:
            self._drop("bad_remote_session_id")
            return
        self.addr = addr  # authenticated: the client may have moved
        self.last_rx = now
        op, kid = p.opcode, p.key_id
        ks = self.keys.get(kid)
        if op == P_CONTROL_SOFT_RESET_V1:
            if kid == 0:
                self._drop("bad_key_id")
                return
            if ks is None or (ks.state == "active" and kid != self.primary):
                ks = self._new_key(kid, now, initiated=False)
        elif op == P_CONTROL_HARD_RESET_CLIENT_V2:
            self._drop("reset_at_worker")  # edges answer these
            return
        elif op not in (P_CONTROL_V1, P_ACK_V1):
            self._drop("unexpected_opcode")
            return
        if ks is None:
            self._drop("unknown_key_id")
            return
        if p.acks:
            ks.send.on_acks(p.acks)
        if p.message_id is not None:
            ks.recv.on_packet(p.message_id, p.payload)
        try:
            for payload in ks.recv.read():
                if payload:
                    ks.tls.feed(payload)
            self._advance(ks, now)
        except TlsError as exc:
            self._key_failed(ks, exc.reason, str(exc))

    def _new_key(self, kid: int, now: float, initiated: bool) -> KeyState:
        """A soft reset (ssl.c key_state_soft_reset): a new key state on `kid`, its
        streams from message id 0, ours opening with our own soft reset."""
        ks = self._key_state(kid, 0, now)
        ks.send.queue(b"", P_CONTROL_SOFT_RESET_V1)
        self.keys[kid] = ks
        # keep the primary key (data still flows on it) and this one; older ones go
        for old in [k for k in self.keys if k not in (kid, self.primary)]:
            del self.keys[old]
        return ks

    def _key_failed(self, ks: KeyState, reason: str, detail: str) -> None:
        ks.state = "failed"
        self._pump(ks)  # a TLS alert, if any, still goes out
        if ks.key_id == self.primary or self.primary is None:
            self._fail(reason, detail)
        else:
            self._drop("renegotiation_" + reason)
            del self.keys[ks.key_id]

    def _advance(self, ks: KeyState, now: float) -> None:
        """Move a key state on as far as what was received allows."""
        if ks.state == "tls" and ks.tls.handshake_done:
            records = ks.tls.read_records()
            if records:
                self._key_method_2(ks, records[0], now)
                records = records[1:]
        else:
            records = ks.tls.read_records() if ks.tls.handshake_done else []
        for rec in records:
            self._control_message(ks, rec, now)
        self._pump(ks)

    def _key_method_2(self, ks: KeyState, record: bytes, now: float) -> None:
        try:
            msg, _ = km.parse_client_prefix(record)
        except km.KeyMethodError as exc:
            raise TlsError("protocol", f"key method 2: {exc}") from None
        der = ks.tls.peer_certificate_der
        if der is None:
            raise TlsError("no_certificate")
        fp = self.identify(der)
        if self.peer is not None and fp != self.peer:
            raise TlsError("refused_certificate", "another certificate than the connection's")
        if self.peers(fp) is None:
            raise TlsError("refused_certificate", "not a peer of this fabric (removed?)")
        if self.cipher is None:  # the first key: negotiate (ssl_ncp.c)
            self.iv_proto = km.iv_proto(msg.peer_info)
            # ssl.c: without IV_PROTO_DATA_V2 the client takes no peer-id and sends P_DATA_V1,
            # which edges match by its address (no float then, as in mudp.c)
            self.v1 = not self.iv_proto & IV_PROTO_DATA_V2
            cipher = km.select_cipher_for(msg, self.config.ciphers)
            if cipher is None:
                ks.tls.write(b"AUTH_FAILED,no common data cipher\0")
                raise TlsError("protocol", f"no common cipher: client offers {msg.peer_info.get('IV_CIPHERS')!r}")
            self.cipher = cipher
            self.ekm = bool(self.iv_proto & km.IV_PROTO_TLS_KEY_EXPORT)
            self.peer = fp
        source = km.KeySource.new_server()
        ks.tls.write(km.build_server(source, km.mirror_options(msg.options)))
        if self.ekm:
            key2 = km.key_expansion_ekm(ks.tls)
        else:
            key2 = km.key_expansion_prf(msg.source, source, self.client_sid, self.server_sid)
        assert self.cipher is not None
        ks.state = "keys"
        self._events.append(KeyExchanged(ks.key_id, fp, self.cipher, km.data_keys(key2, self.cipher, True),
                                         self.ekm, self.v1))

    def committed(self, key_id: int, session: SessionRecord, now: float) -> None:
        """The broker made the key's session: it becomes the primary key."""
        ks = self.keys.get(key_id)
        if ks is None or ks.state != "keys":
            return
        ks.state, ks.session_id = "active", session.id
        self.primary, self.primary_since = key_id, now
        self.reneg_at = self._reneg_deadline(now)
        peer_id = session.params.get("peer_id")
        self.peer_id = peer_id if isinstance(peer_id, int) else self.peer_id
        if key_id == 0 and self.iv_proto & km.IV_PROTO_REQUEST_PUSH:
            self._push_reply(ks)  # multi.c: push at once to a client that asked for it
        self._pump(ks)

    def refused(self, key_id: int, reason: str) -> None:
        ks = self.keys.get(key_id)
        if ks is not None:
            self._key_failed(ks, "commit_" + reason, "the broker refused the session")

    def _control_message(self, ks: KeyState, record: bytes, now: float) -> None:
        """Control-channel messages: NUL-terminated strings, one per record."""
        for text in record.split(b"\0"):
            if not text:
                continue
            if text == b"PUSH_REQUEST":
                if ks.state == "active":
                    self._push_reply(ks)
                else:
                    self._drop("push_request_early")  # the client repeats it every 5 s
            elif text == b"EXIT" or text.startswith(b"EXIT,"):
                self._events.append(ExitRequested())
                self.closing_at = now
            else:
                self._drop("control_message")

    # --- PUSH_REPLY (push.c) --------------------------------------------------------------

    def push_options(self) -> list[str]:
        """What the client is told (openvpn-protocol.md 4.2, 4.3)."""
        cfg = self.config
        peer = self.peers(self.peer) if self.peer is not None else None
        mine = [ipaddress.ip_interface(a) for a in (peer.allowed_ips if peer else ())]
        opts: list[str] = []
        for net in cfg.networks():
            client = next((a for a in mine if a.version == net.version and a.ip in net.network), None)
            if client is None:
                continue
            if net.version == 4:
                opts += [f"route-gateway {net.ip}", "topology subnet", f"ifconfig {client.ip} {net.netmask}"]
            else:
                opts.append(f"ifconfig-ipv6 {client.ip}/{net.network.prefixlen} {net.ip}")
        opts += [f"ping {cfg.ping}", f"ping-restart {cfg.ping_restart}", *cfg.push]
        if self.peer_id is not None and not self.v1:
            opts.append(f"peer-id {self.peer_id}")
        if self.cipher is not None:
            opts.append(f"cipher {self.cipher}")
        if self.iv_proto & km.IV_PROTO_CC_EXIT_NOTIFY:
            opts.append("protocol-flags cc-exit" + (" tls-ekm" if self.ekm else ""))
        elif self.ekm:
            opts.append("key-derivation tls-ekm")
        return opts

    def _push_reply(self, ks: KeyState) -> None:
        """PUSH_REPLY, split with push-continuation past PUSH_BUNDLE_SIZE (push.c
        send_push_options: 2 on every message but the last, 1 on the last)."""
        messages: list[str] = []
        current = "PUSH_REPLY"
        cap = PUSH_BUNDLE_SIZE - 84  # push.c send_push_reply: room for the continuation
        for opt in self.push_options():
            if len(current) + 1 + len(opt) >= cap and current != "PUSH_REPLY":
                messages.append(current + ",push-continuation 2")
                current = "PUSH_REPLY"
            current += "," + opt
        if messages:
            current += ",push-continuation 1"
        messages.append(current)
        for m in messages:
            ks.tls.write(m.encode() + b"\0")
        self.pushed = True

    # --- timers ----------------------------------------------------------------------------

    def renegotiate(self, now: float) -> None:
        """Start a new key from our side (ssl.c tls_multi_process: reneg-sec)."""
        if self.closed or self.primary is None:
            return
        kid = self.primary % KEY_ID_MAX + 1  # 1..7, then 1 again (ssl.c key_state_init)
        ks = self.keys.get(kid)
        if ks is not None and ks.state in ("tls", "keys"):
            return  # one is under way
        self._new_key(kid, now, initiated=True)
        self.reneg_at = float("inf")  # until that key is committed

    def halt(self, now: float, message: bytes = b"HALT") -> None:
        """Tell the client to stop (forward.c: HALT exits, RESTART reconnects), then close."""
        ks = self.keys.get(self.primary) if self.primary is not None else None
        if ks is not None and not self.closed:
            try:
                ks.tls.write(message + b"\0")
                self._pump(ks)
            except TlsError:
                pass
        self.closing_at = now

    def get_timer(self) -> float | None:
        if self.closed or not self.keys:
            return 0.0  # due: the owner removes it
        times = [self.reneg_at]
        for ks in self.keys.values():
            t = ks.send.next_timer()
            if t is not None:
                times.append(t)
            if ks.state in ("tls", "keys"):
                times.append(ks.created + HANDSHAKE_WINDOW_DEFAULT)
        if self.closing_at is not None:
            times.append(self.closing_at + CLOSE_AFTER)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        if not self.keys:  # a renegotiation taken over from a record failed: nothing left
            self.closed = True
            return
        if self.closing_at is not None and (now >= self.closing_at + CLOSE_AFTER or all(
                ks.send.all_acked for ks in self.keys.values())):
            self.closed = True
            return
        for ks in list(self.keys.values()):
            if ks.state in ("tls", "keys") and now > ks.created + HANDSHAKE_WINDOW_DEFAULT:
                # ssl.c tls_process: "TLS key negotiation failed to occur within hand-window"
                self._key_failed(ks, "hand_window", "key negotiation did not finish in time")
        if now >= self.reneg_at and self.closing_at is None:
            self.renegotiate(now)

    # --- send ----------------------------------------------------------------------------

    def _pump(self, ks: KeyState) -> None:
        """TLS output into the send window, in chunks that fit a control packet."""
        ks.out += ks.tls.pull()
        while ks.out and ks.send.available > 0:
            chunk = bytes(ks.out[:TLS_CHUNK])
            del ks.out[:TLS_CHUNK]
            ks.send.queue(chunk, P_CONTROL_V1)

    def _wrap(self, p: ControlPacket) -> bytes:
        if self.wrap_id >= PACKET_ID_MAX:  # never reuse a wrap id: a new time starts a new sequence
            self.net_time += 1
            self.wrap_id = 1
        out = self.wrap.wrap(p.pack(), self.wrap_id, self.net_time)
        self.wrap_id += 1
        return out

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out: list[bytes] = []
        for ks in self.keys.values():
            self._pump(ks)
            for mid, payload in ks.send.due(now):
                acks = ks.recv.acks_to_send(ACK_LIMIT_PIGGYBACK)
                p = ControlPacket(ks.send.opcode(mid), ks.key_id, self.server_sid, tuple(acks),
                                  self.client_sid if acks else None, mid, payload)
                out.append(self._wrap(p))
            if ks.recv.has_pending_acks:
                acks = ks.recv.acks_to_send(ACK_LIMIT_DEDICATED)
                out.append(self._wrap(ControlPacket(P_ACK_V1, ks.key_id, self.server_sid, tuple(acks),
                                                    self.client_sid)))
        return out
