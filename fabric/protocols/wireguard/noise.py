"""Noise_IKpsk2 handshake and cookies of WireGuard, with no I/O and no clock.

Every function takes `now` where time matters. Section numbers refer to the
WireGuard whitepaper. The responder side is split into consume_initiation and
create_response so the session authority (the broker) can commit the handshake
between the two steps.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.constants import (
    CONSTRUCTION,
    COOKIE_REFRESH_TIME,
    IDENTIFIER,
    KEY_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MSG_INITIATION,
    MSG_RESPONSE,
)
from fabric.protocols.wireguard.crypto import (
    CryptoError,
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    kdf,
    mac,
)
from fabric.protocols.wireguard.messages import (
    CookieReply,
    Initiation,
    MessageError,
    Response,
    message_type,
)

ZERO_KEY = bytes(KEY_SIZE)

# whitepaper 5.4.2: the first chaining key and hash are constants
INITIAL_CHAIN_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN_KEY + IDENTIFIER)


class HandshakeError(Exception):
    """A handshake message we refuse. `reason` is a drop-counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class StaticKeys:
    """A static identity and the keys derived from its public half (5.4.4, 5.4.7)."""

    private: bytes
    public: bytes
    mac1_key: bytes
    cookie_key: bytes

    @classmethod
    def from_private(cls, private: bytes) -> StaticKeys:
        pub = crypto.public_key(private)
        return cls(private, pub, hash_(LABEL_MAC1 + pub), hash_(LABEL_COOKIE + pub))


@dataclass(frozen=True)
class Keypair:
    """Transport keys of one session (whitepaper 5.4.5)."""

    send_key: bytes
    recv_key: bytes
    local_index: int  # what the peer puts in the receiver field of our transport
    remote_index: int  # what we put in the receiver field of transport to the peer
    is_initiator: bool
    created: float


@dataclass(frozen=True)
class ConsumedInitiation:
    """What the responder learnt from a valid initiation, before it answers."""

    peer_public: bytes
    sender_index: int
    timestamp: bytes
    remote_ephemeral: bytes
    chain_key: bytes
    hash: bytes


@dataclass
class InitiatorState:
    """The initiator's secrets between sending an initiation and its response."""

    peer_public: bytes
    preshared_key: bytes
    local_index: int
    ephemeral_private: bytes
    chain_key: bytes
    hash: bytes
    sent_at: float
    mac1: bytes = b""


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return hash_(h + data)


def _peer_hash(peer_public: bytes) -> bytes:
    return _mix_hash(INITIAL_HASH, peer_public)


# --- MACs (whitepaper 5.4.4) -----------------------------------------------


def mac1_key_for(public: bytes) -> bytes:
    return hash_(LABEL_MAC1 + public)


def compute_mac1(mac1_key: bytes, msg: bytes | memoryview) -> bytes:
    """mac1 = MAC(HASH(LABEL_MAC1 || Spub_receiver), msg up to mac1)."""
    return mac(mac1_key, bytes(msg[: len(msg) - 32]))


def check_mac1(mac1_key: bytes, msg: bytes | memoryview) -> bool:
    if len(msg) < 32:
        return False
    expected = compute_mac1(mac1_key, msg)
    return _consteq(expected, bytes(msg[len(msg) - 32 : len(msg) - 16]))


def _consteq(a: bytes, b: bytes) -> bool:
    import hmac as _h

    return _h.compare_digest(a, b)


def _seal_macs(body: bytearray, mac1_key: bytes, cookie: bytes | None) -> bytes:
    """Fill mac1 and (with a cookie) mac2 into the last 32 bytes of `body`."""
    n = len(body)
    body[n - 32 : n - 16] = mac(mac1_key, bytes(body[: n - 32]))
    if cookie is not None:
        body[n - 16 :] = mac(cookie, bytes(body[: n - 16]))
    return bytes(body)


# --- initiation (whitepaper 5.4.2) -----------------------------------------


def create_initiation(
    local: StaticKeys,
    peer_public: bytes,
    preshared_key: bytes,
    local_index: int,
    now: float,
    cookie: bytes | None = None,
    ephemeral_private: bytes | None = None,
) -> tuple[bytes, InitiatorState]:
    """Build a handshake initiation to `peer_public`; returns (datagram, state)."""
    ck = INITIAL_CHAIN_KEY
    h = _peer_hash(peer_public)
    e_priv = ephemeral_private or crypto.generate_private_key()
    e_pub = crypto.public_key(e_priv)
    (ck,) = kdf(ck, e_pub, 1)
    h = _mix_hash(h, e_pub)
    ck, k = kdf(ck, dh(e_priv, peer_public), 2)
    enc_static = aead_encrypt(k, 0, local.public, h)
    h = _mix_hash(h, enc_static)
    ck, k = kdf(ck, dh(local.private, peer_public), 2)
    enc_ts = aead_encrypt(k, 0, crypto.tai64n(now), h)
    h = _mix_hash(h, enc_ts)
    body = bytearray(Initiation(local_index, e_pub, enc_static, enc_ts).pack())
    data = _seal_macs(body, mac1_key_for(peer_public), cookie)
    state = InitiatorState(peer_public, preshared_key, local_index, e_priv, ck, h, now, data[-32:-16])
    return data, state


def consume_initiation(
    local: StaticKeys,
    data: bytes,
    known_peer: Callable[[bytes], bool],
) -> ConsumedInitiation:
    """Decrypt and authenticate an initiation (mac1 is the caller's check).

    `known_peer(public)` says whether the initiator's static key is a configured peer.
    Raises MessageError or HandshakeError ("decrypt", "unknown_peer", "bad_key").
    """
    msg = Initiation.unpack(data)
    ck = INITIAL_CHAIN_KEY
    h = _peer_hash(local.public)
    (ck,) = kdf(ck, msg.ephemeral, 1)
    h = _mix_hash(h, msg.ephemeral)
    try:
        ck, k = kdf(ck, dh(local.private, msg.ephemeral), 2)
        peer_public = aead_decrypt(k, 0, msg.encrypted_static, h)
    except CryptoError as exc:
        raise HandshakeError("decrypt", "initiation static") from exc
    h = _mix_hash(h, msg.encrypted_static)
    if not known_peer(peer_public):
        raise HandshakeError("unknown_peer", crypto.key_to_base64(peer_public))
    try:
        ck, k = kdf(ck, dh(local.private, peer_public), 2)
        timestamp = aead_decrypt(k, 0, msg.encrypted_timestamp, h)
    except CryptoError as exc:
        raise HandshakeError("decrypt", "initiation timestamp") from exc
    h = _mix_hash(h, msg.encrypted_timestamp)
    return ConsumedInitiation(peer_public, msg.sender, timestamp, msg.ephemeral, ck, h)


# --- response (whitepaper 5.4.3) -------------------------------------------


def create_response(
    local: StaticKeys,
    init: ConsumedInitiation,
    preshared_key: bytes,
    local_index: int,
    now: float,
    cookie: bytes | None = None,
    ephemeral_private: bytes | None = None,
) -> tuple[bytes, Keypair]:
    """Answer a consumed initiation; returns (datagram, responder's transport keys)."""
    ck, h = init.chain_key, init.hash
    e_priv = ephemeral_private or crypto.generate_private_key()
    e_pub = crypto.public_key(e_priv)
    (ck,) = kdf(ck, e_pub, 1)
    h = _mix_hash(h, e_pub)
    try:
        (ck,) = kdf(ck, dh(e_priv, init.remote_ephemeral), 1)
        (ck,) = kdf(ck, dh(e_priv, init.peer_public), 1)
    except CryptoError as exc:
        raise HandshakeError("bad_key", "low-order public key") from exc
    ck, t, k = kdf(ck, preshared_key, 3)
    h = _mix_hash(h, t)
    empty = aead_encrypt(k, 0, b"", h)
    body = bytearray(Response(local_index, init.sender_index, e_pub, empty).pack())
    data = _seal_macs(body, mac1_key_for(init.peer_public), cookie)
    # whitepaper 5.4.5: initiator sends with the first key, the responder with the second
    t_recv, t_send = kdf(ck, b"", 2)
    return data, Keypair(t_send, t_recv, local_index, init.sender_index, False, now)


def consume_response(local: StaticKeys, state: InitiatorState, data: bytes, now: float) -> Keypair:
    """Complete the handshake as initiator. Raises MessageError/HandshakeError."""
    msg = Response.unpack(data)
    if msg.receiver != state.local_index:
        raise HandshakeError("unknown_index", "response to another initiation")
    ck, h = state.chain_key, state.hash
    (ck,) = kdf(ck, msg.ephemeral, 1)
    h = _mix_hash(h, msg.ephemeral)
    try:
        (ck,) = kdf(ck, dh(state.ephemeral_private, msg.ephemeral), 1)
        (ck,) = kdf(ck, dh(local.private, msg.ephemeral), 1)
    except CryptoError as exc:
        raise HandshakeError("bad_key", "low-order ephemeral") from exc
    ck, t, k = kdf(ck, state.preshared_key, 3)
    h = _mix_hash(h, t)
    try:
        aead_decrypt(k, 0, msg.encrypted_nothing, h)
    except CryptoError as exc:
        raise HandshakeError("decrypt", "response") from exc
    t_send, t_recv = kdf(ck, b"", 2)
    return Keypair(t_send, t_recv, state.local_index, msg.sender, True, now)


# --- cookies (whitepaper 5.4.7) --------------------------------------------


def encode_source(host: str, port: int) -> bytes:
    """The bytes a cookie is bound to: the source IP address and port."""
    import ipaddress

    return ipaddress.ip_address(host).packed + struct.pack(">H", port)


@dataclass
class CookieChecker:
    """Responder side of the cookie mechanism: mac1/mac2 checks and cookie replies."""

    local_public: bytes
    random: Callable[[int], bytes] = os.urandom
    _secret: bytes = b""
    _secret_time: float = field(default=float("-inf"))

    def __post_init__(self) -> None:
        self.mac1_key = hash_(LABEL_MAC1 + self.local_public)
        self.cookie_key = hash_(LABEL_COOKIE + self.local_public)

    def check_mac1(self, msg: bytes | memoryview) -> bool:
        return check_mac1(self.mac1_key, msg)

    def _cookie(self, source: bytes, now: float) -> bytes:
        if now - self._secret_time >= COOKIE_REFRESH_TIME:
            self._secret = self.random(KEY_SIZE)
            self._secret_time = now
        return mac(self._secret, source)

    def check_mac2(self, msg: bytes | memoryview, source: bytes, now: float) -> bool:
        """True if mac2 carries a cookie we gave `source` within COOKIE_REFRESH_TIME."""
        if len(msg) < 32 or now - self._secret_time >= COOKIE_REFRESH_TIME:
            return False
        cookie = mac(self._secret, source)
        return _consteq(mac(cookie, bytes(msg[:-16])), bytes(msg[-16:]))

    def create_reply(self, msg: bytes | memoryview, source: bytes, now: float) -> bytes:
        """Cookie reply to a handshake message `msg` from `source` (whitepaper 5.4.7)."""
        kind = message_type(msg)
        if kind not in (MSG_INITIATION, MSG_RESPONSE):
            raise MessageError("bad_type", "cookies answer handshake messages only")
        (sender,) = struct.unpack_from("<I", msg, 4)
        nonce = self.random(24)
        cookie = self._cookie(source, now)
        enc = crypto.xaead_encrypt(self.cookie_key, nonce, cookie, bytes(msg[-32:-16]))
        return CookieReply(sender, nonce, enc).pack()


@dataclass
class CookieJar:
    """Initiator side: remembers the cookie a responder gave us (whitepaper 5.4.7)."""

    peer_public: bytes
    cookie: bytes | None = None
    received_at: float = float("-inf")

    def __post_init__(self) -> None:
        self.cookie_key = hash_(LABEL_COOKIE + self.peer_public)

    def current(self, now: float) -> bytes | None:
        if self.cookie is not None and now - self.received_at < COOKIE_REFRESH_TIME:
            return self.cookie
        return None

    def consume_reply(self, data: bytes, last_mac1: bytes, now: float) -> None:
        """Take a cookie reply to the message whose mac1 was `last_mac1`."""
        reply = CookieReply.unpack(data)
        try:
            self.cookie = crypto.xaead_decrypt(
                self.cookie_key, reply.nonce, reply.encrypted_cookie, last_mac1
            )
        except CryptoError as exc:
            raise HandshakeError("decrypt", "cookie reply") from exc
        self.received_at = now
