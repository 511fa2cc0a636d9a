"""Segmentation offload for packets read from the TUN (TSO and USO in userspace, as
wireguard-go's tun/offload_linux.go does since 0.0.20230223).

A TUN queue with IFF_VNET_HDR whose device was given TUNSETOFFLOAD(TUN_F_CSUM |
TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6)
(fabric/dataplane/tun.py `enable_offload`) hands the edge what a NIC with those
offloads gets from the kernel: behind each struct virtio_net_hdr
(include/uapi/linux/virtio_net.h), either one packet whose transport checksum may be
partial (VIRTIO_NET_HDR_F_NEEDS_CSUM: the field holds the pseudo-header sum; virtio
1.1 5.1.6.2), or a TCP or UDP "super packet" of up to 64 KB. One read then brings
what took up to ~45 reads, and the kernel's TCP stack handles one skb. `split` cuts
it into gso_size segments as the NIC would (net/ipv4/tcp_offload.c
tcp_gso_segment): the IP header copied with its length, IPv4 id (+1 a segment) and
header checksum, TCP sequence numbers advanced, FIN and PSH on the last segment
only, CWR on the first only, UDP lengths, and every transport checksum complete.

Two implementations, one behaviour: `fabric.dataplane._offload` (C, built by `pip
install`) and `split_py` below; `FABRIC_NATIVE=0` selects the Python one (CI runs
both). Pure functions on bytes, no I/O, fuzzed in tests/test_segment.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from fabric.dataplane import native
from fabric.dataplane.gro import GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HDR, VNET_HDR_LEN, fold

GSO_UDP_L4 = 5  # include/uapi/linux/virtio_net.h VIRTIO_NET_HDR_GSO_UDP_L4
GSO_ECN = 0x80
F_NEEDS_CSUM = 1
MAX_SEGMENTS = 1024
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80


def _checksum(*parts: bytes | bytearray | memoryview) -> int:
    """RFC 1071: the complement of the one's complement sum of the parts, joined."""
    return ~fold(b"".join(parts)) & 0xFFFF


def _pseudo(ip: bytes | bytearray, v6: bool, proto: int, l4len: int) -> bytes:
    """RFC 793 3.1 / RFC 8200 8.1: the pseudo-header."""
    if v6:
        return bytes(ip[8:40]) + struct.pack("!II", l4len, proto)
    return bytes(ip[12:20]) + struct.pack("!BBH", 0, proto, l4len)


def split_py(data: bytes | memoryview) -> list[bytes]:
    """The IP packets of one TUN read (vnet header first), checksums complete;
    ValueError for anything malformed (the caller counts a drop)."""
    if len(data) < VNET_HDR_LEN:
        raise ValueError("shorter than the vnet header")
    flags, gso, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(data, 0)
    gso &= ~GSO_ECN
    pkt = bytes(data[VNET_HDR_LEN:])
    if gso == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            at = csum_start + csum_offset
            if at + 2 > len(pkt):
                raise ValueError("checksum offsets beyond the packet")
            c = ~fold(pkt[csum_start:]) & 0xFFFF
            pkt = pkt[:at] + struct.pack("!H", c or 0xFFFF) + pkt[at + 2 :]
        return [pkt]
    if gso not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):
        raise ValueError("a GSO type we did not ask for")
    if len(pkt) < 20:
        raise ValueError("too short for an IP header")
    version = pkt[0] >> 4
    if version not in (4, 6):
        raise ValueError("not IPv4 or IPv6")
    v6 = version == 6
    ihl = 40 if v6 else (pkt[0] & 15) * 4
    proto = pkt[6] if v6 else pkt[9]
    tcp = gso != GSO_UDP_L4
    if ihl < 20 or csum_start != ihl or proto != (6 if tcp else 17) or (gso == GSO_TCPV4 and v6) \
            or (gso == GSO_TCPV6 and not v6):
        raise ValueError("headers that do not match the GSO type (or IPv6 extension headers)")
    if tcp:
        if len(pkt) < ihl + 20:
            raise ValueError("too short for a TCP header")
        l4h = (pkt[ihl + 12] >> 4) * 4
    else:
        l4h = 8
    head = ihl + l4h
    if l4h < 8 or head > len(pkt) or gso_size == 0:
        raise ValueError("a bad transport header length or segment size")
    payload = len(pkt) - head
    count = -(-payload // gso_size) if payload else 1
    if count > MAX_SEGMENTS:
        raise ValueError("too many segments")
    (seq0,) = struct.unpack_from("!I", pkt, ihl + 4) if tcp else (0,)
    (id0,) = (0,) if v6 else struct.unpack_from("!H", pkt, 4)
    out: list[bytes] = []
    for i in range(count):
        off = i * gso_size
        body = pkt[head + off : head + off + gso_size]
        size = head + len(body)
        ip = bytearray(pkt[:ihl])
        if v6:
            struct.pack_into("!H", ip, 4, size - 40)
        else:
            struct.pack_into("!HH", ip, 2, size, (id0 + i) & 0xFFFF)
            struct.pack_into("!H", ip, 10, 0)
            struct.pack_into("!H", ip, 10, _checksum(ip))
        l4 = bytearray(pkt[ihl:head])
        if tcp:
            struct.pack_into("!I", l4, 4, (seq0 + off) & 0xFFFFFFFF)
            if i + 1 < count:
                l4[13] &= ~(_FIN | _PSH) & 0xFF
            if i:
                l4[13] &= ~_CWR & 0xFF
            at, proto = 16, 6
        else:
            struct.pack_into("!H", l4, 4, size - ihl)
            at, proto = 6, 17
        struct.pack_into("!H", l4, at, 0)
        c = _checksum(_pseudo(ip, v6, proto, size - ihl), l4, body)
        struct.pack_into("!H", l4, at, c if c or tcp else 0xFFFF)  # RFC 768: 0 is "none"
        out.append(bytes(ip) + bytes(l4) + body)
    return out


_offload, _ = native.load("_offload")
split_native: Callable[[bytes | memoryview], list[bytes]] | None = _offload.split if _offload else None
NATIVE = split_native is not None and native.WANTED
split: Callable[[bytes | memoryview], list[bytes]] = split_native if NATIVE and split_native else split_py
