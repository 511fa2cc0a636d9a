"""TCP receive coalescing for the TUN device (GRO in userspace, as wireguard-go's
tun/offload_linux.go does since 0.0.20230223).

The TUN queues are opened with IFF_VNET_HDR, so every packet written carries a
10-byte struct virtio_net_hdr (include/uapi/linux/virtio_net.h). Consecutive TCP
segments of one flow that arrive in one batch are joined into one "super packet"
with gso_type TCPV4/TCPV6: the kernel's TCP stack then handles one skb (and sends
about one ACK) where it would handle dozens, as Linux's own GRO does for a NIC
(net/ipv4/tcp_offload.c tcp_gro_receive gives the merge rules used here).

Two implementations, one behaviour: `coalesce_native` (`coalesce` in the C extension
fabric.dataplane._offload, fabric/dataplane/_offload.c, built by `pip install`) and
`coalesce_py` below, which holds the rules; `coalesce` is the native one unless it is
missing or FABRIC_NATIVE=0. Pure functions on bytes, no I/O: `coalesce` is run by
workers after decryption, and tests/test_gro.py checks and fuzzes both in memory and
holds them to identical outputs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from fabric.dataplane import native

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
PLAIN = bytes(VNET_HDR_LEN)  # no offload: the packet as it is
MAX_SUPER = 65535  # IPv4 total length / IPv6 payload length are 16 bits
_ACK, _PSH = 0x10, 0x08
_TCP = 6


def fold(data: bytes) -> int:
    """The one's complement sum (RFC 1071) of `data` as 16-bit big-endian words, folded
    to 16 bits, with 0xFFFF standing for zero: 2**16 = 1 (mod 0xFFFF), so the sum of
    the words is the whole number mod 0xFFFF (one C-speed big-int operation)."""
    if len(data) & 1:
        data += b"\x00"
    s = int.from_bytes(data, "big") % 0xFFFF
    return s or 0xFFFF


_V4 = struct.Struct("!xBxxxxHBB")  # RFC 791: ToS, flags + fragment offset, TTL, protocol
_TCP_HEAD = struct.Struct("!IIBB")  # RFC 793, from byte 4: seq, ack, data offset, flags
# One struct call per header and a tuple key instead of byte-by-byte indexing and a
# key joined from slices: coalesce_py() of 22 full segments 2.4-3.6 -> 1.8-2.9 us per
# segment (alternated, best of 15 each; docs/performance.md).


_Key = tuple[bytes, object, int, bytes]  # flow, header fields that must match, ACK, TCP options


def _candidate(pkt: bytes) -> tuple[_Key, int, int, int, bool, int, int] | None:
    """(flow key, ip header length, tcp header length, payload length, v6, seq, tcp
    flags) of a TCP segment that may be merged: data-carrying, flags ACK or ACK|PSH
    only, no IPv4 fragment, no IPv6 extension header. None otherwise.

    The key's first item is the flow (addresses and ports, as `_flow_of`); the rest
    must match too for a merge: ToS, DF, TTL and header lengths (IPv4) or version,
    class, label and hop limit (IPv6), the ACK number and the TCP options."""
    n = len(pkt)
    if n < 40:
        return None
    v = pkt[0] >> 4
    if v == 4:
        ihl = (pkt[0] & 15) * 4
        tos, frag, ttl, proto = _V4.unpack_from(pkt, 0)
        if proto != _TCP or ihl < 20 or frag & 0x3FFF or n < ihl + 20:
            return None  # not TCP, or a fragment (MF or offset)
        flow = pkt[12:24] if ihl == 20 else pkt[12:20] + pkt[ihl : ihl + 4]
        same: object = (tos, frag & 0x4000, ttl, ihl)
        v6 = False
    elif v == 6:
        ihl = 40
        if pkt[6] != _TCP or n < 60:
            return None
        flow = pkt[8:44]
        same = (pkt[0:4], pkt[7])
        v6 = True
    else:
        return None
    seq, ack, off, flags = _TCP_HEAD.unpack_from(pkt, ihl + 4)
    thl = (off >> 4) * 4
    payload = n - ihl - thl
    if thl < 20 or payload <= 0 or flags & ~_PSH != _ACK:
        return None
    # The segments' own TCP checksums are not verified: the AEAD authenticated every
    # byte (as the kernel's WireGuard marks decrypted packets CHECKSUM_UNNECESSARY,
    # drivers/net/wireguard/receive.c), and the super packet gets a fresh checksum.
    # the ACK number and the options (timestamps) must be equal for a merge
    return (flow, same, ack, pkt[ihl + 20 : ihl + thl]), ihl, thl, payload, v6, seq, flags


_MASKS: dict[tuple[bool, int, int], int] = {}


def _header_mask(v6: bool, ihl: int, hl: int) -> int:
    """A mask over the IP + TCP header (`hl` bytes, as one big-endian integer) that keeps
    what must be equal for two segments to merge and clears what may differ: IPv4
    total length, ID and header checksum, IPv6 payload length, TCP sequence number,
    PSH, window, checksum and urgent pointer. A header that equals a group's first
    under this mask has the group's key (`_candidate`) and is a valid candidate."""
    m = _MASKS.get((v6, ihl, hl))
    if m is None:
        m = (1 << (8 * hl)) - 1
        cleared = [(4, 2)] if v6 else [(2, 2), (4, 2), (10, 2)]
        cleared += [(ihl + 4, 4), (ihl + 14, 2), (ihl + 16, 2), (ihl + 18, 2)]
        for off, n in cleared:
            m &= ~(((1 << (8 * n)) - 1) << (8 * (hl - off - n)))
        m &= ~(_PSH << (8 * (hl - ihl - 14)))
        _MASKS[(v6, ihl, hl)] = m
    return m


class _Group:
    __slots__ = ("first", "ihl", "thl", "v6", "size", "total", "next_seq", "parts", "members", "closed", "psh",
                 "hl", "mask", "template", "seq_shift", "flags_shift")

    def __init__(self, pkt: bytes, index: int, ihl: int, thl: int, payload: int, v6: bool, seq: int,
                 flags: int) -> None:
        self.first = pkt
        self.ihl, self.thl, self.v6 = ihl, thl, v6
        # for coalesce_py()'s fast path: the next segment's header compared in one operation
        hl = self.hl = ihl + thl
        self.mask = _header_mask(v6, ihl, hl)
        self.template = int.from_bytes(pkt[:hl], "big") & self.mask
        self.seq_shift = 8 * (hl - ihl - 8)
        self.flags_shift = 8 * (hl - ihl - 14)
        self.size = payload  # gso_size: every segment but the last has it
        self.total = len(pkt)
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        self.parts: list[bytes | memoryview] = [pkt]
        self.members = [index]
        self.closed = bool(flags & _PSH)  # nothing follows a PSH (tcp_gro_receive)
        self.psh = False

    def add(self, pkt: bytes, index: int, payload: int, seq: int, flags: int) -> bool:
        if (
            self.closed
            or payload > self.size
            or seq != self.next_seq
            or self.total + payload > (MAX_SUPER + 40 if self.v6 else MAX_SUPER)
        ):
            return False
        self.parts.append(memoryview(pkt)[self.ihl + self.thl :])
        self.members.append(index)
        self.total += payload
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        if payload < self.size or flags & _PSH:
            self.closed = True  # a short segment or PSH ends the run
            self.psh = bool(flags & _PSH)
        return True

    def build(self) -> bytes:
        if len(self.parts) == 1:
            return PLAIN + self.first
        ihl, thl = self.ihl, self.thl
        head = bytearray(self.first[: ihl + thl])
        total = self.total
        if self.v6:
            head[4:6] = (total - 40).to_bytes(2, "big")
            gso = GSO_TCPV6
            pseudo = bytes(head[8:40]) + (total - 40).to_bytes(4, "big") + b"\x00\x00\x00\x06"
        else:
            head[2:4] = total.to_bytes(2, "big")
            head[10:12] = b"\x00\x00"
            head[10:12] = (~fold(bytes(head[:ihl])) & 0xFFFF).to_bytes(2, "big")  # RFC 791
            gso = GSO_TCPV4
            pseudo = bytes(head[12:20]) + b"\x00\x06" + (total - ihl).to_bytes(2, "big")
        if self.psh:
            head[ihl + 13] |= _PSH
        # CHECKSUM_PARTIAL: the field holds the pseudo-header sum, not complemented; the
        # kernel adds the segment (virtio spec 5.1.6.2, wireguard-go offload_linux.go)
        head[ihl + 16 : ihl + 18] = (fold(pseudo) & 0xFFFF).to_bytes(2, "big")
        vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso, ihl + thl, self.size, ihl, 16)
        self.parts[0] = memoryview(self.first)[ihl + thl :]
        return b"".join((vnet, head, *self.parts))


_FAST = True  # coalesce_py()'s fast path (tests compare it with the slow path alone)


def coalesce_py(packets: Sequence[bytes]) -> list[tuple[bytes, list[int]]]:
    """Packets to write to a TUN opened with IFF_VNET_HDR, each with the indexes of the
    input packets it carries (in order). Segments of one flow are merged only while
    they are consecutive in sequence space; the order within each flow is kept, and
    flows keep the position of their first packet. Empty inputs (keepalives) come
    back as empty outputs."""
    out: list[_Group | tuple[bytes, list[int]]] = []
    open_groups: dict[_Key, _Group] = {}
    last: _Group | None = None  # the group the previous packet went into
    from_bytes = int.from_bytes
    fast = _FAST
    for i, pkt in enumerate(packets):
        if last is not None and fast:
            # fast path, the common case of a run of one flow: the header equals the
            # previous packet's group's under its mask, so it has that group's key (the
            # open group of the key: nothing came between), and only add() may refuse
            hl = last.hl
            if len(pkt) > hl:
                h = from_bytes(pkt[:hl], "big")
                if h & last.mask == last.template and last.add(
                    pkt, i, len(pkt) - hl, (h >> last.seq_shift) & 0xFFFFFFFF, (h >> last.flags_shift) & 0xFF
                ):
                    continue
            last = None
        if not pkt:
            out.append((b"", [i]))
            continue
        c = _candidate(pkt)
        if c is None:
            # a packet of an open flow that cannot merge (a pure ACK, FIN...) ends that
            # flow's group, so it is written after the data before it
            if open_groups:
                flow = _flow_of(pkt)
                if flow is not None:
                    _close_flow(open_groups, flow)
            out.append((PLAIN + pkt, [i]))
            continue
        key, ihl, thl, payload, v6, seq, flags = c
        g = open_groups.get(key)
        if g is not None and g.add(pkt, i, payload, seq, flags):
            last = g
            continue
        if g is None:  # a new key of a flow with an open group (e.g. a new ACK number)
            _close_flow(open_groups, key[0])
        g = last = _Group(pkt, i, ihl, thl, payload, v6, seq, flags)
        open_groups[key] = g
        out.append(g)
    return [(o.build(), o.members) if isinstance(o, _Group) else o for o in out]


def _close_flow(open_groups: dict[_Key, _Group], flow: bytes) -> None:
    """End every open group of `flow` (the first item of their keys)."""
    for k in [k for k in open_groups if k[0] == flow]:
        del open_groups[k]


def _flow_of(pkt: bytes) -> bytes | None:
    """Addresses and ports of a TCP packet (the first item of its candidate key)."""
    n = len(pkt)
    if n >= 24 and pkt[0] >> 4 == 4 and pkt[9] == _TCP:
        ihl = (pkt[0] & 15) * 4
        return pkt[12:20] + pkt[ihl : ihl + 4] if n >= ihl + 4 else None
    if n >= 44 and pkt[0] >> 4 == 6 and pkt[6] == _TCP:
        return pkt[8:40] + pkt[40:44]
    return None


Coalesce = Callable[[Sequence[bytes]], list[tuple[bytes, list[int]]]]
# the C one takes any bytes-like items (coalesce_py needs bytes: its keys are hashed)
_Buffers = Sequence[bytes | bytearray | memoryview]
_offload, _ = native.load("_offload")
coalesce_native: Callable[[_Buffers], list[tuple[bytes, list[int]]]] | None = _offload.coalesce if _offload else None
NATIVE = coalesce_native is not None and native.WANTED
# C: ~0.09 us a segment where coalesce_py takes ~1.2-1.3 (22 or 64 full segments of one flow)
coalesce: Coalesce = coalesce_native if NATIVE and coalesce_native else coalesce_py
