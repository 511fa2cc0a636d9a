"""OpenVPN's AEAD data channel (openvpn-protocol.md §3.1; crypto.c openvpn_encrypt_aead /
openvpn_decrypt_aead, ssl.c tls_prepend_opcode_v2): the AEAD of one key's batches.

    P_DATA_V2:  [op 9 | key id] [peer-id, 3 bytes] [packet id, 4] [tag, 16] [ciphertext]
                AAD = the first 8 bytes; nonce = packet id || implicit IV (8 bytes)
    P_DATA_V1:  [op 6 | key id] [packet id, 4] [tag, 16] [ciphertext]; AAD = packet id

The tag comes before the ciphertext (2.6). A batch's AEAD is one call of
fabric.dataplane.aead (`V2_LAYOUT`, `V1_LAYOUT`). A plaintext equal to the ping
string is a keepalive (ping.c): it is returned as an empty
plaintext, which the edge counts and does not write to the TUN; an OCC message
(occ.c) is consumed here, and OCC_EXIT ends the session (the edge is told through
the drop reason `end_session`). Runs in an edge or a worker alike; the packet ids
come from the edge (reserved before sealing, committed to the replay window after
opening), as WireGuard's counters do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fabric.control.records import RecordError, SessionRecord
from fabric.dataplane import aead, ippacket
from fabric.protocols.base import END_SESSION, SessionKeys
from fabric.protocols.openvpn.constants import (
    OCC_EXIT,
    OCC_MAGIC,
    P_DATA_V1,
    P_DATA_V2,
    PING_STRING,
)

TAG = aead.TAG
KEY_SIZES = {"AES-256-GCM": 32, "AES-128-GCM": 16, "CHACHA20-POLY1305": 32}
V2_HEADER = 8
V1_HEADER = 5
# crypto.c openvpn_encrypt_aead: [header] [tag] [ciphertext], nonce = packet id (BE32) ||
# the implicit IV; an empty plaintext goes as the ping string (ping.c)
# P_DATA_V2: the AAD is the opcode, peer-id and packet id (ssl.c tls_prepend_opcode_v2)
V2_LAYOUT = aead.Layout(header=V2_HEADER, counter_at=4, counter_len=4, tag_first=True,
                        aad_from=0, aad_to=V2_HEADER, pad=1, empty=PING_STRING)
# P_DATA_V1: the AAD is the packet id alone
V1_LAYOUT = aead.Layout(header=V1_HEADER, counter_at=1, counter_len=4, tag_first=True,
                        aad_from=1, aad_to=V1_HEADER, pad=1, empty=PING_STRING)


class OvpnKeys(SessionKeys):
    """One key id's data keys: cipher, keys and implicit IVs of both directions."""

    __slots__ = ("sid", "peer", "created", "cipher", "peer_id", "key_id", "_seal", "_header",
                 "_open_v2", "_open_v1", "_open_key", "_open_iv", "v1")

    def __init__(self, record: SessionRecord) -> None:
        keys, params = record.keys or {}, record.params
        cipher = params.get("cipher")
        if cipher not in KEY_SIZES:
            raise RecordError(f"OpenVPN params: cipher {cipher!r} is not one of {', '.join(KEY_SIZES)}")
        size = KEY_SIZES[cipher]
        parts = [keys.get(k) for k in ("encrypt_key", "encrypt_iv", "decrypt_key", "decrypt_iv")]
        ek, ei, dk, di = (p if isinstance(p, bytes) else b"" for p in parts)
        if len(ek) != size or len(dk) != size or len(ei) != 8 or len(di) != 8:
            raise RecordError("OpenVPN keys: encrypt/decrypt keys of the cipher's size and 8-byte implicit IVs")
        peer_id, key_id = params.get("peer_id"), params.get("key_id")
        if not isinstance(peer_id, int) or not 0 <= peer_id < 1 << 24 or not isinstance(key_id, int) \
                or not 0 <= key_id < 8:
            raise RecordError("OpenVPN params: peer_id is 24 bits, key_id 3")
        self.sid, self.peer, self.created = record.id, record.peer, record.created
        self.cipher, self.peer_id, self.key_id = cipher, peer_id, key_id
        # what goes before the packet id of what we send: op 9 | key id and the peer-id,
        # or op 6 | key id for a client without peer-id (P_DATA_V1: its AAD is the packet id)
        self.v1 = bool(params.get("v1"))
        first = bytes([(P_DATA_V1 << 3) | key_id]) if self.v1 else \
            bytes([(P_DATA_V2 << 3) | key_id]) + peer_id.to_bytes(3, "big")
        self._header = first + bytes(4)  # seal writes each packet id
        self._seal = aead.BatchAead(cipher, ek, V1_LAYOUT if self.v1 else V2_LAYOUT, b"", ei).seal
        # what we receive: mostly one format; the other's AEAD is made when first needed
        self._open_key, self._open_iv = dk, di
        self._open_v2: aead.Aead | None = None
        self._open_v1: aead.Aead | None = None

    def _opener(self, v1: bool) -> aead.Aead:
        box = self._open_v1 if v1 else self._open_v2
        if box is None:
            box = aead.BatchAead(self.cipher, self._open_key, V1_LAYOUT if v1 else V2_LAYOUT, b"", self._open_iv)
            if v1:
                self._open_v1 = box
            else:
                self._open_v2 = box
        return box

    def _open_batch(self, good: list[bytes | memoryview], v1: int) -> tuple[list[bytes | None], list[int]]:
        """The plaintexts of `good` (None where the tag fails) and their packet ids, in
        order; `v1` of them are P_DATA_V1. One AEAD call per data format in the batch
        (in practice a batch has one)."""
        if not good:
            return [], []
        if v1 == 0 or v1 == len(good):
            return self._opener(v1 > 0).open(good)
        # both formats in one batch: each opens its own, then back to arrival order
        kinds = [d[0] >> 3 == P_DATA_V1 for d in good]
        parts = [zip(*self._opener(k).open([d for d, w in zip(good, kinds, strict=True) if w == k]), strict=True)
                 for k in (False, True)]
        merged = [next(parts[k]) for k in kinds]
        return [pt for pt, _ in merged], [c for _, c in merged]

    def open(self, datagrams: Sequence[bytes | memoryview], allowed: Callable[[bytes], Any],
             drops: dict[str, int]) -> tuple[list[bytes], list[int], list[int]]:
        # the hot loop of every received packet: the headers first (a cheap pass), then one
        # AEAD call; the IPv4 header read inline (WireGuard's open does the same)
        key_id = self.key_id
        good: list[bytes | memoryview] = []
        v1 = 0  # how many of them are P_DATA_V1
        for pkt in datagrams:
            size = len(pkt)
            first = pkt[0] if size else 0
            op = first >> 3
            if op == P_DATA_V2:
                head = V2_HEADER
            elif op == P_DATA_V1:
                head = V1_HEADER
            else:
                drops["bad_opcode"] = drops.get("bad_opcode", 0) + 1
                continue
            if size <= head + TAG or first & 7 != key_id:  # crypto.c: "missing payload"
                reason = "short" if size <= head + TAG else "bad_key_id"
                drops[reason] = drops.get(reason, 0) + 1
                continue
            good.append(pkt)
            if head == V1_HEADER:
                v1 += 1
        inner_length = ippacket.inner_length
        plain: list[bytes] = []
        counters: list[int] = []
        sizes: list[int] = []
        last_src, last_ok = b"", False
        opened, opened_counters = self._open_batch(good, v1)
        for pt, pid, pkt in zip(opened, opened_counters, good, strict=True):
            if pt is None:
                drops["decrypt"] = drops.get("decrypt", 0) + 1
                continue
            n = len(pt)
            if n >= 20 and pt[0] >> 4 == 4:
                # IPv4 (neither the ping string nor OCC's magic starts with a 4 nibble)
                total = (pt[2] << 8) | pt[3]
                if not 20 <= total <= n:
                    drops["bad_inner"] = drops.get("bad_inner", 0) + 1
                    continue
                src = pt[12:16]
                if src != last_src:
                    last_src, last_ok = src, bool(allowed(src))
                if not last_ok:  # the peer's tunnel addresses only
                    drops["source_not_allowed"] = drops.get("source_not_allowed", 0) + 1
                    continue
                if total != n:
                    pt = pt[:total]
            elif n == 16 and pt == PING_STRING:  # ping.c: a keepalive, not for the TUN
                pt = b""
            elif pt[:16] == OCC_MAGIC:  # occ.c: in TLS mode only OCC_EXIT comes
                reason = END_SESSION if pt[16:17] == bytes([OCC_EXIT]) else "occ"
                drops[reason] = drops.get(reason, 0) + 1
                continue
            elif pt:
                total = inner_length(pt)
                if not total:
                    drops["bad_inner"] = drops.get("bad_inner", 0) + 1
                    continue
                src = pt[12:16] if pt[0] >> 4 == 4 else pt[8:24]
                if src != last_src:
                    last_src, last_ok = src, bool(allowed(src))
                if not last_ok:  # the peer's tunnel addresses only
                    drops["source_not_allowed"] = drops.get("source_not_allowed", 0) + 1
                    continue
                if total != n:
                    pt = pt[:total]
            plain.append(pt)
            counters.append(pid)
            sizes.append(len(pkt))
        return plain, counters, sizes

    def seal(self, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        """Packet ids counter0, counter0 + 1, ...; an empty packet goes as a ping."""
        return self._seal(self._header, counter0, packets)
