"""WireGuard transport data (whitepaper 5.4.6): the AEAD of one session's batches.

Runs in an edge (inline) or a worker alike (fabric.dataplane.engine calls it);
the counters come from the edge (reserved before sealing, committed to the replay
window after opening), so where this runs changes nothing about invariants 1 and 2.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fabric.control.records import RecordError, SessionRecord
from fabric.dataplane import ippacket
from fabric.protocols.base import SessionKeys
from fabric.protocols.wireguard.constants import (
    MSG_TRANSPORT,
    PADDING_MULTIPLE,
    TRANSPORT_HEADER_SIZE,
)
from fabric.protocols.wireguard.messages import TRANSPORT

_NONCE = struct.Struct("<4xQ")  # the 96-bit nonce: 32 zero bits, then the counter
_ZEROS = bytes(PADDING_MULTIPLE)
_MIN_DATAGRAM = TRANSPORT_HEADER_SIZE + 16  # header and the AEAD tag of an empty plaintext


class WgKeys(SessionKeys):
    """One session's ChaCha20-Poly1305 keys, receiver indexes and age."""

    __slots__ = ("sid", "peer", "created", "local_index", "remote_index", "_seal", "_open")

    def __init__(self, record: SessionRecord) -> None:
        keys = record.keys or {}
        send, recv = keys.get("send_key"), keys.get("recv_key")
        remote = record.params.get("remote_index")
        if not isinstance(send, bytes) or len(send) != 32 or not isinstance(recv, bytes) or len(recv) != 32:
            raise RecordError("WireGuard keys: send_key and recv_key are 32 bytes")
        if not isinstance(remote, int) or isinstance(remote, bool) or not 0 <= remote < 2**32:
            raise RecordError("WireGuard params: remote_index is a u32")
        self.sid = record.id
        self.peer = record.peer
        self.created = record.created
        self.local_index = record.data_key
        self.remote_index = remote
        self._seal = ChaCha20Poly1305(send).encrypt
        self._open = ChaCha20Poly1305(recv).decrypt

    def open(self, datagrams: Sequence[bytes | memoryview], allowed: Callable[[bytes], Any],
             drops: dict[str, int]) -> tuple[list[bytes], list[int], list[int]]:
        """Authenticate, trim the padding by the inner IP length (5.4.6) and check the
        inner source against the peer's allowed IPs (cryptokey routing, whitepaper 4)."""
        opn = self._open
        local = self.local_index
        unpack, nonce, inner_length = TRANSPORT.unpack_from, _NONCE.pack, ippacket.inner_length
        plain: list[bytes] = []
        counters: list[int] = []
        sizes: list[int] = []
        last_src, last_ok = b"", False  # a batch's packets mostly share one source
        for pkt in datagrams:
            size = len(pkt)
            if size < _MIN_DATAGRAM:
                drops["short"] = drops.get("short", 0) + 1
                continue
            kind, receiver, counter = unpack(pkt, 0)
            if kind != MSG_TRANSPORT or receiver != local:
                drops["unknown_index"] = drops.get("unknown_index", 0) + 1
                continue
            try:
                pt = opn(nonce(counter), pkt[TRANSPORT_HEADER_SIZE:], None)
            except InvalidTag:
                drops["decrypt"] = drops.get("decrypt", 0) + 1
                continue
            if pt:  # an empty plaintext is a keepalive (whitepaper 6.5)
                v = pt[0] >> 4
                if v == 4 and len(pt) >= 20:  # IPv4 inline: inner_length and source
                    n = (pt[2] << 8) | pt[3]
                    if not 20 <= n <= len(pt):
                        n = 0
                    src = pt[12:16]
                else:
                    n = inner_length(pt)
                    src = pt[8:24] if n else b""
                if not n:
                    drops["bad_inner"] = drops.get("bad_inner", 0) + 1
                    continue
                if src != last_src:
                    last_src, last_ok = src, bool(allowed(src))
                if not last_ok:  # whitepaper 4: cryptokey routing
                    drops["source_not_allowed"] = drops.get("source_not_allowed", 0) + 1
                    continue
                if n != len(pt):
                    pt = pt[:n]  # the padding (5.4.6) goes
            plain.append(pt)
            counters.append(counter)
            sizes.append(size)
        return plain, counters, sizes

    def seal(self, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        """Pad to 16 bytes (5.4.6, one copy with the padding) and seal."""
        seal = self._seal
        out: list[bytes] = []
        append = out.append
        counter = counter0
        hdr, nonce, join, remote = TRANSPORT.pack, _NONCE.pack, b"".join, self.remote_index
        for pkt in packets:
            pad = -len(pkt) % PADDING_MULTIPLE
            append(hdr(MSG_TRANSPORT, remote, counter) + seal(nonce(counter), join((pkt, _ZEROS[:pad])) if pad else pkt, None))
            counter += 1
        return out
