"""A sans-I/O WireGuard endpoint, in the style of aioquic's QuicConnection.

No sockets and no clock: the caller feeds datagrams (`receive_datagram`) and
inner IP packets (`send_packet`), fires timers (`get_timer`, `handle_timer`),
and collects what to transmit (`datagrams_to_send`) and what happened
(`next_event`). One local static identity talks to many peers.

`now` is in seconds and is also the clock of the TAI64N timestamps in our
handshake initiations (whitepaper 5.1, 5.4.2): pass wall-clock time
(`time.time()`), since a peer refuses an initiation whose timestamp is not newer
than the last one it accepted from us, even across our restarts.

Behaviour follows the whitepaper (section numbers in comments) and, where the
paper leaves a choice, wireguard-go (`device/timers.go`, `device/send.go`,
`device/receive.go`, `device/peer.go`).
"""

from __future__ import annotations

import ipaddress
import os
import random as _random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fabric.dataplane import ippacket
from fabric.dataplane.ratelimit import TokenBucket
from fabric.dataplane.replay import ReplayWindow
from fabric.protocols.wireguard import crypto, timers
from fabric.protocols.wireguard.constants import (
    HANDSHAKE_RATE_BURST,
    HANDSHAKE_RATE_PER_SECOND,
    INITIATION_FLOOD_INTERVAL,
    KEEPALIVE_TIMEOUT,
    KEY_SIZE,
    MAX_DATAGRAM,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    PADDING_MULTIPLE,
    REJECT_AFTER_MESSAGES,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REPLAY_WINDOW_SIZE,
    SESSION_KEEP_TIME,
    TIMESTAMP_SIZE,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
)
from fabric.protocols.wireguard.crypto import CryptoError
from fabric.protocols.wireguard.messages import (
    CookieReply,
    MessageError,
    Response,
    message_type,
    parse_transport_header,
    transport_header,
)
from fabric.protocols.wireguard.noise import (
    ZERO_KEY,
    CookieChecker,
    CookieJar,
    HandshakeError,
    InitiatorState,
    Keypair,
    StaticKeys,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    encode_source,
)

__all__ = [
    "Address",
    "Event",
    "HandshakeCompleted",
    "PacketDropped",
    "PacketReceived",
    "PeerStatus",
    "WireGuardEndpoint",
    "REKEY_TIMEOUT_JITTER_MAX",
    "MAX_STAGED_PACKETS",
]

Address = tuple[str, int]

# whitepaper 6.1: "REKEY-TIMEOUT + jitter", the jitter being up to 333 ms (wireguard-go)
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
# packets waiting for a handshake, per peer (wireguard-go QueueStagedSize)
MAX_STAGED_PACKETS = 128
# largest inner packet: once padded (5.4.6) and sealed it must still fit a UDP payload
MAX_PACKET = (MAX_DATAGRAM - TRANSPORT_MIN_SIZE) // PADDING_MULTIPLE * PADDING_MULTIPLE
REKEY_ON_RECEIVE_AGE = timers.REKEY_ON_RECEIVE_AGE  # 6.2 (timers.py)

_U16 = struct.Struct(">H")
_SYSRANDOM = _random.SystemRandom()


# --- events ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of what `next_event` returns."""


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(Event):
    """A new session with `peer_public` is usable for sending.

    The initiator reports it on consuming the response; the responder when the
    initiator's first transport message confirms the session (whitepaper 5.4.5).
    """

    peer_public: bytes
    is_initiator: bool


@dataclass(frozen=True, slots=True)
class PacketReceived(Event):
    """An authenticated inner IP packet from `peer_public`, padding removed."""

    peer_public: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class PacketDropped(Event):
    """A datagram or packet we refused; `reason` is a short drop-counter token.

    Tokens: short, long, bad_type, bad_size, bad_mac1, bad_mac2, rate_limited,
    decrypt, unknown_peer, bad_key, unknown_index, stale_timestamp, flood,
    replay, expired, bad_packet, source_not_allowed, no_route, no_endpoint,
    queue_full, handshake_timeout, unexpected_cookie.
    """

    reason: str
    peer_public: bytes | None = None


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A read-only snapshot of one peer (for tests, `wg show`-like output)."""

    public_key: bytes
    endpoint: Address | None
    previous_index: int | None
    current_index: int | None
    next_index: int | None
    handshake_pending: bool
    last_handshake: float | None
    staged: int


# --- internal state ----------------------------------------------------------


class _Session:
    """One set of transport keys (a wireguard-go Keypair): whitepaper 5.4.6."""

    __slots__ = ("keypair", "peer", "send_counter", "replay")

    def __init__(self, keypair: Keypair, peer: _Peer) -> None:
        self.keypair = keypair
        self.peer = peer
        self.send_counter = 0
        self.replay = ReplayWindow(REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE)

    def age(self, now: float) -> float:
        return now - self.keypair.created

    def expired(self, now: float) -> bool:
        # whitepaper 6.2: no message is sent or accepted after REJECT-AFTER-TIME
        return not timers.usable(self.age(now))

    def can_send(self, now: float) -> bool:
        return not self.expired(now) and self.send_counter < REJECT_AFTER_MESSAGES


@dataclass(eq=False)
class _Peer:
    public: bytes
    preshared_key: bytes
    allowed_ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    endpoint: Address | None
    persistent_keepalive: float
    cookie_jar: CookieJar
    # whitepaper 6.3: previous / current / next sessions
    previous: _Session | None = None
    current: _Session | None = None
    next: _Session | None = None
    # handshake
    initiator: InitiatorState | None = None
    last_mac1: bytes | None = None  # of the last handshake message we sent (5.4.7)
    last_timestamp: bytes = bytes(TIMESTAMP_SIZE)  # newest TAI64N accepted from the peer
    last_initiation_consumed: float = float("-inf")
    last_initiation_sent: float = float("-inf")
    handshake_started: float | None = None
    last_handshake: float | None = None
    sent_last_minute_handshake: bool = False
    need_another_keepalive: bool = False
    staged: deque[bytes] = field(default_factory=deque)
    # timers (absolute deadlines), whitepaper 6.2-6.5
    retransmit_at: float | None = None
    keepalive_at: float | None = None
    new_handshake_at: float | None = None
    persistent_at: float | None = None
    zero_keys_at: float | None = None

    def deadlines(self) -> list[float]:
        return [
            t
            for t in (
                self.retransmit_at,
                self.keepalive_at,
                self.new_handshake_at,
                self.persistent_at,
                self.zero_keys_at,
            )
            if t is not None
        ]


@dataclass(eq=False)
class _IndexEntry:
    """What a local index names: a pending initiation (session None) or a session."""

    peer: _Peer
    session: _Session | None


def _default_index() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _default_jitter() -> float:
    return _SYSRANDOM.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)


# --- the endpoint ------------------------------------------------------------


class WireGuardEndpoint:
    """One local WireGuard identity and its peers, with no I/O and no clock.

    `under_load(now)` says whether handshakes must carry a valid mac2 (cookie,
    whitepaper 5.3); `random_index()` yields 32-bit session indices and
    `jitter()` the retransmission jitter in seconds (both injectable for tests).
    """

    def __init__(
        self,
        static: StaticKeys,
        *,
        under_load: Callable[[float], bool] | None = None,
        random_index: Callable[[], int] | None = None,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        self.static = static
        self._under_load = under_load or (lambda now: False)
        self._random_index = random_index or _default_index
        self._jitter = jitter or _default_jitter
        self._cookies = CookieChecker(static.public)
        self._ratelimiter = TokenBucket(HANDSHAKE_RATE_PER_SECOND, HANDSHAKE_RATE_BURST)
        self._peers: dict[bytes, _Peer] = {}
        self._index: dict[int, _IndexEntry] = {}
        self._routes: ippacket.PrefixTable[bytes] = ippacket.PrefixTable()
        self._datagrams: list[tuple[bytes, Address]] = []
        self._events: deque[Event] = deque()

    # --- configuration -------------------------------------------------------

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: list[str] | None = None,
        endpoint: Address | None = None,
        persistent_keepalive: float = 0,
    ) -> None:
        """Add a peer, or reconfigure one (its allowed IPs are replaced, sessions kept).

        An allowed-IPs prefix belongs to one peer: adding it here takes it from
        any other peer (whitepaper 2, cryptokey routing).
        """
        if len(public_key) != KEY_SIZE:
            raise ValueError("a public key is 32 bytes")
        if public_key == self.static.public:
            raise ValueError("a peer cannot have our own public key")
        if preshared_key is not None and len(preshared_key) != KEY_SIZE:
            raise ValueError("a preshared key is 32 bytes")
        try:
            crypto.dh(self.static.private, public_key)
        except CryptoError as exc:
            raise ValueError("invalid peer public key") from exc
        nets = [ipaddress.ip_network(a, strict=False) for a in (allowed_ips or [])]
        psk = preshared_key if preshared_key is not None else ZERO_KEY
        peer = self._peers.get(public_key)
        if peer is None:
            peer = _Peer(public_key, psk, nets, endpoint, float(persistent_keepalive),
                         CookieJar(public_key))
            self._peers[public_key] = peer
        else:
            peer.preshared_key = psk
            peer.allowed_ips = nets
            if endpoint is not None:
                peer.endpoint = endpoint
            peer.persistent_keepalive = float(persistent_keepalive)
        self._routes.remove_value(public_key)
        for net in nets:
            self._routes.add(str(net), public_key)
        # wg(8): setting a persistent keepalive sends one at once ("as soon as possible")
        if peer.persistent_keepalive > 0 and peer.endpoint is not None:
            peer.persistent_at = 0.0
        elif peer.persistent_keepalive <= 0:
            peer.persistent_at = None

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer, its sessions and queued packets (no-op if unknown)."""
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self._routes.remove_value(public_key)
        for idx in [i for i, e in self._index.items() if e.peer is peer]:
            del self._index[idx]

    def peer_status(self, public_key: bytes) -> PeerStatus:
        peer = self._peers[public_key]

        def idx(s: _Session | None) -> int | None:
            return None if s is None else s.keypair.local_index

        return PeerStatus(
            public_key,
            peer.endpoint,
            idx(peer.previous),
            idx(peer.current),
            idx(peer.next),
            peer.initiator is not None,
            peer.last_handshake,
            len(peer.staged),
        )

    # --- public sans-I/O interface ---------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Process one UDP payload from `addr`. Never raises for bad input."""
        data = bytes(data)
        try:
            kind = message_type(data)
            if kind == MSG_TRANSPORT:
                self._receive_transport(data, addr, now)
            elif kind == MSG_INITIATION:
                self._receive_initiation(data, addr, now)
            elif kind == MSG_RESPONSE:
                self._receive_response(data, addr, now)
            elif kind == MSG_COOKIE_REPLY:
                self._receive_cookie_reply(data, now)
        except (MessageError, HandshakeError) as exc:
            self._drop(exc.reason)

    def send_packet(self, packet: bytes, now: float) -> None:
        """Send an inner IP packet (from the TUN side) to the peer that routes its destination."""
        packet = bytes(packet)
        dst = ippacket.destination(packet)
        if dst is None:
            self._drop("bad_packet")
            return
        if len(packet) > MAX_PACKET:
            self._drop("long")
            return
        key = self._routes.lookup(dst)
        if key is None:
            self._drop("no_route")
            return
        peer = self._peers[key]
        if len(peer.staged) >= MAX_STAGED_PACKETS:
            if peer.staged.popleft():
                self._drop("queue_full", peer)
        peer.staged.append(packet)
        self._send_staged(peer, now)

    def handle_timer(self, now: float) -> None:
        """Run every timer due at `now` (whitepaper 6.2-6.5)."""
        for peer in list(self._peers.values()):
            if peer.zero_keys_at is not None and now >= peer.zero_keys_at:
                peer.zero_keys_at = None
                self._zero_keys(peer)
            if peer.retransmit_at is not None and now >= peer.retransmit_at:
                peer.retransmit_at = None
                self._retransmit(peer, now)
            if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
                # 6.5: data sent, nothing heard for KEEPALIVE-TIMEOUT + REKEY-TIMEOUT
                peer.new_handshake_at = None
                self._send_initiation(peer, now, retry=False)
            if peer.keepalive_at is not None and now >= peer.keepalive_at:
                # 6.5: passive keepalive
                peer.keepalive_at = None
                self._send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.keepalive_at = now + KEEPALIVE_TIMEOUT
            if peer.persistent_at is not None and now >= peer.persistent_at:
                peer.persistent_at = None
                if peer.persistent_keepalive > 0:
                    self._send_keepalive(peer, now)

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called, None if no timer is armed."""
        times = [t for peer in self._peers.values() for t in peer.deadlines()]
        return min(times) if times else None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams to transmit, each with its destination; empties the queue."""
        out, self._datagrams = self._datagrams, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # --- helpers -----------------------------------------------------------------

    def _drop(self, reason: str, peer: _Peer | None = None) -> None:
        self._events.append(PacketDropped(reason, None if peer is None else peer.public))

    def _new_index(self, entry: _IndexEntry) -> int:
        for _ in range(64):
            idx = self._random_index() & 0xFFFFFFFF
            if idx not in self._index:
                self._index[idx] = entry
                return idx
        raise RuntimeError("random_index keeps returning indices in use")

    def _forget_session(self, session: _Session | None) -> None:
        if session is None:
            return
        idx = session.keypair.local_index
        entry = self._index.get(idx)
        if entry is not None and entry.session is session:
            del self._index[idx]

    def _forget_initiation(self, peer: _Peer) -> None:
        if peer.initiator is None:
            return
        idx = peer.initiator.local_index
        entry = self._index.get(idx)
        if entry is not None and entry.session is None and entry.peer is peer:
            del self._index[idx]
        peer.initiator = None

    # timer events, named as in wireguard-go device/timers.go

    def _traversal(self, peer: _Peer, now: float) -> None:
        if peer.persistent_keepalive > 0:
            peer.persistent_at = now + peer.persistent_keepalive

    def _authenticated_sent(self, peer: _Peer, now: float) -> None:
        self._traversal(peer, now)
        peer.keepalive_at = None

    def _authenticated_received(self, peer: _Peer, now: float) -> None:
        self._traversal(peer, now)
        peer.new_handshake_at = None

    def _session_derived(self, peer: _Peer, now: float) -> None:
        # 6.3: erase everything if no new handshake in 3 x REJECT-AFTER-TIME
        peer.zero_keys_at = now + SESSION_KEEP_TIME

    def _handshake_complete(self, peer: _Peer, now: float) -> None:
        peer.retransmit_at = None
        peer.handshake_started = None
        peer.sent_last_minute_handshake = False
        peer.last_handshake = now

    def _zero_keys(self, peer: _Peer) -> None:
        for s in (peer.previous, peer.current, peer.next):
            self._forget_session(s)
        peer.previous = peer.current = peer.next = None
        self._forget_initiation(peer)
        self._flush_staged(peer, "expired")

    def _flush_staged(self, peer: _Peer, reason: str) -> None:
        while peer.staged:
            if peer.staged.popleft():
                self._drop(reason, peer)

    # sending

    def _send_keepalive(self, peer: _Peer, now: float) -> None:
        # wireguard-go SendKeepalive: an empty packet rides the staged queue
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _send_staged(self, peer: _Peer, now: float) -> None:
        session = peer.current
        if session is None or not session.can_send(now):
            # 6.2 / 6.4: no usable session: queue and initiate a handshake
            self._send_initiation(peer, now, retry=False)
            return
        while peer.staged:
            if not session.can_send(now):
                self._send_initiation(peer, now, retry=False)
                return
            self._encrypt_and_send(peer, session, peer.staged.popleft(), now)
        # 6.2: the initiator rekeys after REKEY-AFTER-TIME or REKEY-AFTER-MESSAGES
        if timers.rekey_on_send(session.keypair.is_initiator, session.age(now), session.send_counter):
            self._send_initiation(peer, now, retry=False)

    def _encrypt_and_send(self, peer: _Peer, session: _Session, packet: bytes, now: float) -> None:
        if peer.endpoint is None:
            self._drop("no_endpoint", peer)
            return
        counter = session.send_counter
        session.send_counter += 1
        # 5.4.6: pad the plaintext to a multiple of 16 bytes (a keepalive stays empty)
        padded = packet + bytes(-len(packet) % PADDING_MULTIPLE)
        sealed = crypto.aead_encrypt(session.keypair.send_key, counter, padded, b"")
        self._datagrams.append(
            (transport_header(session.keypair.remote_index, counter) + sealed, peer.endpoint)
        )
        self._authenticated_sent(peer, now)
        if packet and peer.new_handshake_at is None:
            # 6.5: expect to hear back within KEEPALIVE-TIMEOUT + REKEY-TIMEOUT
            peer.new_handshake_at = now + timers.NEW_HANDSHAKE_AFTER

    def _send_initiation(self, peer: _Peer, now: float, *, retry: bool) -> None:
        """Send a handshake initiation (5.4.2), at most once per REKEY-TIMEOUT (6.1)."""
        if not retry:
            # a fresh reason to handshake restarts the REKEY-ATTEMPT-TIME budget (6.4)
            peer.handshake_started = now
            if now - peer.last_initiation_sent < REKEY_TIMEOUT:
                return
        if peer.endpoint is None:
            return
        if peer.handshake_started is None:
            peer.handshake_started = now
        self._forget_initiation(peer)
        entry = _IndexEntry(peer, None)
        idx = self._new_index(entry)
        data, state = create_initiation(
            self.static, peer.public, peer.preshared_key, idx, now,
            cookie=peer.cookie_jar.current(now),
        )
        peer.initiator = state
        peer.last_mac1 = state.mac1
        peer.last_initiation_sent = now
        self._datagrams.append((data, peer.endpoint))
        self._authenticated_sent(peer, now)
        # 6.4: retransmit after REKEY-TIMEOUT plus jitter
        peer.retransmit_at = now + REKEY_TIMEOUT + max(0.0, self._jitter())

    def _retransmit(self, peer: _Peer, now: float) -> None:
        started = peer.handshake_started if peer.handshake_started is not None else now
        if now - started >= REKEY_ATTEMPT_TIME:
            # 6.4: give up after REKEY-ATTEMPT-TIME, dropping what waited for the handshake
            self._forget_initiation(peer)
            peer.handshake_started = None
            peer.keepalive_at = None
            self._flush_staged(peer, "handshake_timeout")
            if peer.zero_keys_at is None:
                peer.zero_keys_at = now + SESSION_KEEP_TIME
            return
        self._send_initiation(peer, now, retry=True)

    # receiving

    def _check_macs(self, data: bytes, addr: Address, now: float) -> bool:
        """mac1 always, mac2 and the rate limit when under load (whitepaper 5.3, 5.4.4)."""
        if not self._cookies.check_mac1(data):
            self._drop("bad_mac1")
            return False
        if self._under_load(now):
            source = encode_source(addr[0], addr[1])
            if not self._cookies.check_mac2(data, source, now):
                # 5.4.7: answer with a cookie reply instead of doing the DH work
                self._datagrams.append((self._cookies.create_reply(data, source, now), addr))
                self._drop("bad_mac2")
                return False
            if not self._ratelimiter.allow(addr[0].encode(), now):
                self._drop("rate_limited")
                return False
        return True

    def _receive_initiation(self, data: bytes, addr: Address, now: float) -> None:
        if not self._check_macs(data, addr, now):
            return
        consumed = consume_initiation(self.static, data, lambda pub: pub in self._peers)
        peer = self._peers[consumed.peer_public]
        # 5.1: an initiation must carry a newer TAI64N than the last one (replay);
        # initiations closer than INITIATION_FLOOD_INTERVAL are refused (wireguard-go)
        if consumed.timestamp <= peer.last_timestamp:
            self._drop("stale_timestamp", peer)
            return
        if now - peer.last_initiation_consumed < INITIATION_FLOOD_INTERVAL:
            self._drop("flood", peer)
            return
        entry = _IndexEntry(peer, None)
        idx = self._new_index(entry)
        try:
            response, keypair = create_response(
                self.static, consumed, peer.preshared_key, idx, now,
                cookie=peer.cookie_jar.current(now),
            )
        except HandshakeError:
            del self._index[idx]
            raise
        peer.last_timestamp = consumed.timestamp
        peer.last_initiation_consumed = now
        session = _Session(keypair, peer)
        entry.session = session
        # 6.3 (wireguard-go BeginSymmetricSession): the responder keeps the new
        # session as "next" until the initiator's first transport message confirms it
        self._forget_session(peer.next)
        self._forget_session(peer.previous)
        peer.previous = None
        peer.next = session
        peer.last_mac1 = response[-32:-16]
        peer.endpoint = addr  # 2.1: roaming
        self._session_derived(peer, now)
        self._authenticated_received(peer, now)
        self._datagrams.append((response, addr))
        self._authenticated_sent(peer, now)

    def _receive_response(self, data: bytes, addr: Address, now: float) -> None:
        if not self._check_macs(data, addr, now):
            return
        msg = Response.unpack(data)
        entry = self._index.get(msg.receiver)
        state = None if entry is None or entry.session is not None else entry.peer.initiator
        if entry is None or state is None or state.local_index != msg.receiver:
            self._drop("unknown_index")
            return
        peer = entry.peer
        keypair = consume_response(self.static, state, data, now)
        peer.initiator = None
        session = _Session(keypair, peer)
        entry.session = session  # the initiation's index now names the session
        # 6.3 (wireguard-go BeginSymmetricSession, initiator side)
        if peer.next is not None:
            self._forget_session(peer.previous)
            self._forget_session(peer.current)
            peer.previous, peer.next = peer.next, None
        else:
            self._forget_session(peer.previous)
            peer.previous = peer.current
        peer.current = session
        peer.endpoint = addr  # 2.1: roaming
        self._session_derived(peer, now)
        self._handshake_complete(peer, now)
        self._authenticated_received(peer, now)
        self._events.append(HandshakeCompleted(peer.public, True))
        # 5.4.5-5.4.6: the initiator speaks first (key confirmation), with queued data
        # or a keepalive
        self._send_keepalive(peer, now)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        reply = CookieReply.unpack(data)
        entry = self._index.get(reply.receiver)
        if entry is None:
            self._drop("unknown_index")
            return
        peer = entry.peer
        if peer.last_mac1 is None:
            self._drop("unexpected_cookie", peer)
            return
        # 5.4.7: the cookie is used as mac2 key from the next handshake message on
        peer.cookie_jar.consume_reply(data, peer.last_mac1, now)

    def _receive_transport(self, data: bytes, addr: Address, now: float) -> None:
        receiver, counter = parse_transport_header(data)
        entry = self._index.get(receiver)
        if entry is None or entry.session is None:
            self._drop("unknown_index")
            return
        session, peer = entry.session, entry.peer
        if session.expired(now):
            self._drop("expired", peer)
            return
        if session.replay.seen(counter):  # cheap filter before the AEAD
            self._drop("replay", peer)
            return
        try:
            plain = crypto.aead_decrypt(
                session.keypair.recv_key, counter, data[TRANSPORT_HEADER_SIZE:], b""
            )
        except CryptoError:
            self._drop("decrypt", peer)
            return
        # RFC 6479 window, updated only once the tag verified (5.4.6)
        if not session.replay.accept(counter):
            self._drop("replay", peer)
            return
        peer.endpoint = addr  # 2.1: roaming
        if session is peer.next:
            # 5.4.5-5.4.6: the responder's session is confirmed by the first transport message
            self._forget_session(peer.previous)
            peer.previous, peer.current, peer.next = peer.current, session, None
            self._events.append(HandshakeCompleted(peer.public, False))
            self._handshake_complete(peer, now)
            self._send_staged(peer, now)
        current = peer.current
        if (
            not peer.sent_last_minute_handshake
            and current is not None
            and timers.rekey_on_receive(current.keypair.is_initiator, current.age(now))
        ):
            # 6.2: an initiator whose session nears REJECT-AFTER-TIME rekeys on receive
            peer.sent_last_minute_handshake = True
            self._send_initiation(peer, now, retry=False)
        self._authenticated_received(peer, now)
        if not plain:
            return  # 6.5: a keepalive, authenticated and not delivered
        # 6.5: answer received data within KEEPALIVE-TIMEOUT, with a keepalive if need be
        if peer.keepalive_at is None:
            peer.keepalive_at = now + KEEPALIVE_TIMEOUT
        else:
            peer.need_another_keepalive = True
        length = ippacket.inner_length(plain)
        if not length:
            self._drop("bad_packet", peer)
            return
        packet = plain[:length]
        if self._routes.lookup(ippacket.source(packet)) != peer.public:
            # whitepaper 2: the inner source must be one of the peer's allowed IPs
            self._drop("source_not_allowed", peer)
            return
        self._events.append(PacketReceived(peer.public, packet))
