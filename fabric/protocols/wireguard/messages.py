"""WireGuard wire formats (whitepaper 5.4.2, 5.4.3, 5.4.6, 5.4.7).

Every parser here takes untrusted bytes and either returns a value or raises
MessageError whose `reason` is a short token used as a drop-counter label.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fabric.protocols.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MAX_DATAGRAM,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)


class MessageError(ValueError):
    """A datagram that is not a well-formed WireGuard message."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_SIZES = {
    MSG_INITIATION: INITIATION_SIZE,
    MSG_RESPONSE: RESPONSE_SIZE,
    MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}

_INIT = struct.Struct("<I I 32s 48s 28s 16s 16s")
_RESP = struct.Struct("<I I I 32s 16s 16s 16s")
_COOKIE = struct.Struct("<I I 24s 32s")
TRANSPORT = struct.Struct("<I I Q")  # type, receiver index, counter (5.4.6): the one place it is spelt
_TYPE = struct.Struct("<I")


def message_type(data: bytes | memoryview) -> int:
    """Classify a datagram by its first four bytes (type, then three zero bytes).

    Checks the size each type requires; raises MessageError("short"|"long"|"bad_type"|"bad_size").
    """
    n = len(data)
    if n < 4:
        raise MessageError("short", f"{n} bytes")
    if n > MAX_DATAGRAM:
        raise MessageError("long", f"{n} bytes")
    (word,) = _TYPE.unpack_from(data, 0)
    if word == MSG_TRANSPORT:
        if n < TRANSPORT_MIN_SIZE:
            raise MessageError("short", f"transport of {n} bytes")
        return MSG_TRANSPORT
    size = _SIZES.get(word)
    if size is None:
        raise MessageError("bad_type", f"type word {word:#x}")
    if n != size:
        raise MessageError("bad_size", f"type {word} must be {size} bytes, got {n}")
    return word


@dataclass(frozen=True, slots=True)
class Initiation:
    """Handshake initiation (whitepaper 5.4.2)."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def pack(self) -> bytes:
        return _INIT.pack(
            MSG_INITIATION,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Initiation:
        if message_type(data) != MSG_INITIATION:
            raise MessageError("bad_type", "not an initiation")
        _, sender, eph, static, ts, mac1, mac2 = _INIT.unpack(data)
        return cls(sender, eph, static, ts, mac1, mac2)


@dataclass(frozen=True, slots=True)
class Response:
    """Handshake response (whitepaper 5.4.3)."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def pack(self) -> bytes:
        return _RESP.pack(
            MSG_RESPONSE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Response:
        if message_type(data) != MSG_RESPONSE:
            raise MessageError("bad_type", "not a response")
        _, sender, receiver, eph, empty, mac1, mac2 = _RESP.unpack(data)
        return cls(sender, receiver, eph, empty, mac1, mac2)


@dataclass(frozen=True, slots=True)
class CookieReply:
    """Cookie reply (whitepaper 5.4.7)."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE.pack(MSG_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie)

    @classmethod
    def unpack(cls, data: bytes) -> CookieReply:
        if message_type(data) != MSG_COOKIE_REPLY:
            raise MessageError("bad_type", "not a cookie reply")
        _, receiver, nonce, cookie = _COOKIE.unpack(data)
        return cls(receiver, nonce, cookie)


def parse_transport_header(data: bytes | memoryview) -> tuple[int, int]:
    """(receiver index, counter) of a transport message (whitepaper 5.4.6)."""
    if len(data) < TRANSPORT_MIN_SIZE:
        raise MessageError("short", f"transport of {len(data)} bytes")
    word, receiver, counter = TRANSPORT.unpack_from(data, 0)
    if word != MSG_TRANSPORT:
        raise MessageError("bad_type", "not a transport message")
    return receiver, counter


def transport_header(receiver: int, counter: int) -> bytes:
    return TRANSPORT.pack(MSG_TRANSPORT, receiver, counter)


def mac1_offset(data: bytes | memoryview) -> int:
    """Offset of mac1 in a handshake message: the last 32 bytes are mac1, mac2."""
    return len(data) - 32

