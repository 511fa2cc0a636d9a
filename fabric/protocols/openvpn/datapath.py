"""OpenVPN's AEAD data channel (openvpn-protocol.md §3.1; crypto.c openvpn_encrypt_aead /
openvpn_decrypt_aead, ssl.c tls_prepend_opcode_v2): the AEAD of one key's batches.

    P_DATA_V2:  [op 9 | key id] [peer-id, 3 bytes] [packet id, 4] [tag, 16] [ciphertext]
                AAD = the first 8 bytes; nonce = packet id || implicit IV (8 bytes)
    P_DATA_V1:  [op 6 | key id] [packet id, 4] [tag, 16] [ciphertext]; AAD = packet id

The tag comes before the ciphertext (2.6; `cryptography` wants it after). A plaintext
equal to the ping string is a keepalive (ping.c): it is returned as an empty
plaintext, which the edge counts and does not write to the TUN; an OCC message
(occ.c) is consumed here, and OCC_EXIT ends the session (the edge is told through
the drop reason `end_session`). Runs in an edge or a worker alike; the packet ids
come from the edge (reserved before sealing, committed to the replay window after
opening), as WireGuard's counters do.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from fabric.control.records import RecordError, SessionRecord
from fabric.dataplane import ippacket
from fabric.protocols.base import END_SESSION, SessionKeys
from fabric.protocols.openvpn.constants import (
    OCC_EXIT,
    OCC_MAGIC,
    P_DATA_V1,
    P_DATA_V2,
    PING_STRING,
)

TAG = 16
KEY_SIZES = {"AES-256-GCM": 32, "AES-128-GCM": 16, "CHACHA20-POLY1305": 32}
_AEADS: dict[str, Callable[[bytes], Any]] = {
    "AES-256-GCM": AESGCM, "AES-128-GCM": AESGCM, "CHACHA20-POLY1305": ChaCha20Poly1305,
}
_U32 = struct.Struct(">I")
V2_HEADER = 8
V1_HEADER = 5


class OvpnKeys(SessionKeys):
    """One key id's data keys: cipher, keys and implicit IVs of both directions."""

    __slots__ = ("sid", "peer", "created", "cipher", "peer_id", "key_id", "_seal", "_open",
                 "_seal_iv", "_open_iv", "_first", "v1")

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
        aead = _AEADS[cipher]
        self._seal = aead(ek).encrypt
        self._open = aead(dk).decrypt
        self._seal_iv, self._open_iv = ei, di
        # what goes before the packet id of what we send: op 9 | key id and the peer-id,
        # or op 6 | key id for a client without peer-id (P_DATA_V1: its AAD is the packet id)
        self.v1 = bool(params.get("v1"))
        self._first = bytes([(P_DATA_V1 << 3) | key_id]) if self.v1 else \
            bytes([(P_DATA_V2 << 3) | key_id]) + peer_id.to_bytes(3, "big")

    def open(self, datagrams: Sequence[bytes | memoryview], allowed: Callable[[bytes], Any],
             drops: dict[str, int]) -> tuple[list[bytes], list[int], list[int]]:
        # the hot loop of every received packet: bytes slices (no bytes() calls), the IPv4
        # header read inline (WireGuard's open does the same); other packets as before
        opn, iv, unpack, key_id = self._open, self._open_iv, _U32.unpack_from, self.key_id
        inner_length = ippacket.inner_length
        plain: list[bytes] = []
        counters: list[int] = []
        sizes: list[int] = []
        last_src, last_ok = b"", False
        for pkt in datagrams:
            if type(pkt) is not bytes:
                pkt = bytes(pkt)  # a worker's frames hold memoryviews: one copy
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
            pid_bytes = pkt[head - 4 : head]
            try:
                # P_DATA_V2: AAD = opcode, peer-id and packet id; P_DATA_V1: the packet id
                pt = opn(pid_bytes + iv, pkt[head + TAG :] + pkt[head : head + TAG],
                         pkt[:V2_HEADER] if head == V2_HEADER else pid_bytes)
            except InvalidTag:
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
            (pid,) = unpack(pid_bytes)
            counters.append(pid)
            sizes.append(size)
        return plain, counters, sizes

    def seal(self, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        seal, iv, first, pack, v1 = self._seal, self._seal_iv, self._first, _U32.pack, self.v1
        out: list[bytes] = []
        append = out.append
        counter = counter0
        for pkt in packets:
            pid = pack(counter)
            counter += 1
            head = first + pid
            # an empty packet is a ping; the AEAD takes a memoryview as it is
            ct = seal(pid + iv, pkt if len(pkt) else PING_STRING, pid if v1 else head)
            append(head + ct[-TAG:] + ct[:-TAG])
        return out
