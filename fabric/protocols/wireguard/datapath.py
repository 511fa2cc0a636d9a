"""WireGuard transport data (whitepaper 5.4.6): the AEAD of one session's batches.

Runs in an edge (inline) or a worker alike (fabric.dataplane.engine calls it);
the counters come from the edge (reserved before sealing, committed to the replay
window after opening), so where this runs changes nothing about invariants 1 and 2.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from fabric.control.records import RecordError, SessionRecord
from fabric.dataplane import aead, ippacket
from fabric.protocols.base import SessionKeys
from fabric.protocols.wireguard.constants import (
    MSG_TRANSPORT,
    PADDING_MULTIPLE,
    TRANSPORT_HEADER_SIZE,
)
from fabric.protocols.wireguard.messages import TRANSPORT

# 5.4.6: type(4) receiver(4) counter(LE64), then the ciphertext of the plaintext padded
# to 16 bytes and its tag; no AAD; nonce = 32 zero bits || LE64(counter)
LAYOUT = aead.Layout(header=TRANSPORT_HEADER_SIZE, counter_at=8, counter_len=8, tag_first=False,
                     aad_from=0, aad_to=0, pad=PADDING_MULTIPLE)
_NONCE_PREFIX = bytes(4)
_HEAD = struct.Struct("<II")  # type, receiver index: what open checks before the AEAD
_MIN_DATAGRAM = TRANSPORT_HEADER_SIZE + aead.TAG  # header and the AEAD tag of an empty plaintext


class WgKeys(SessionKeys):
    """One session's ChaCha20-Poly1305 keys, receiver indexes and age."""

    __slots__ = ("sid", "peer", "created", "local_index", "remote_index", "_header", "_want", "_seal",
                 "_open")

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
        self._header = TRANSPORT.pack(MSG_TRANSPORT, remote, 0)  # seal writes each counter
        # what a datagram of ours starts with (records hold u32 indexes; b"" matches nothing)
        self._want = _HEAD.pack(MSG_TRANSPORT, record.data_key) if 0 <= record.data_key < 2**32 else b""
        self._seal = aead.BatchAead("CHACHA20-POLY1305", send, LAYOUT, _NONCE_PREFIX, b"").seal
        self._open = aead.BatchAead("CHACHA20-POLY1305", recv, LAYOUT, _NONCE_PREFIX, b"").open

    def open(self, datagrams: Sequence[bytes | memoryview], allowed: Callable[[bytes], Any],
             drops: dict[str, int]) -> tuple[list[bytes], list[int], list[int]]:
        """Authenticate, trim the padding by the inner IP length (5.4.6) and check the
        inner source against the peer's allowed IPs (cryptokey routing, whitepaper 4)."""
        # the header first (a cheap pass), then one AEAD call for the batch
        want = self._want
        good: list[bytes | memoryview] = []
        for pkt in datagrams:
            if len(pkt) < _MIN_DATAGRAM:
                drops["short"] = drops.get("short", 0) + 1
            elif pkt[:8] != want:  # type 4 and our receiver index (bytes or memoryview alike)
                drops["unknown_index"] = drops.get("unknown_index", 0) + 1
            else:
                good.append(pkt)
        opened, opened_counters = self._open(good)
        inner_length = ippacket.inner_length
        plain: list[bytes] = []
        counters: list[int] = []
        sizes: list[int] = []
        last_src, last_ok = b"", False  # a batch's packets mostly share one source
        for pt, counter, pkt in zip(opened, opened_counters, good, strict=True):
            if pt is None:
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
            sizes.append(len(pkt))
        return plain, counters, sizes

    def seal(self, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        """Pad to 16 bytes (5.4.6) and seal, the batch in one AEAD call."""
        return self._seal(self._header, counter0, packets)
