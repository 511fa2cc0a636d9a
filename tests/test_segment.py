"""fabric.dataplane.segment: TSO/USO super packets from the TUN cut into segments,
both implementations (C and Python) held to one behaviour.

Checksums are verified with the tests' own RFC 1071 loop (tests/rfc1071.py), not with the
code under test."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rfc1071 import ones_sum

from fabric.dataplane import segment
from fabric.dataplane.gro import GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HDR

IMPLS: list[tuple[str, Callable[[bytes], list[bytes]]]] = [("python", segment.split_py)]
if segment.split_native is not None:  # (FABRIC_REQUIRE_NATIVE=1 makes its absence an error)
    IMPLS.append(("native", segment.split_native))


def l4_ok(pkt: bytes) -> bool:
    v6 = pkt[0] >> 4 == 6
    ihl = 40 if v6 else (pkt[0] & 15) * 4
    proto = pkt[6] if v6 else pkt[9]
    l4 = pkt[ihl:]
    pseudo = (pkt[8:40] + struct.pack("!II", len(l4), proto)) if v6 else \
        (pkt[12:20] + struct.pack("!BBH", 0, proto, len(l4)))
    return ones_sum(pseudo + l4) == 0xFFFF


def ip_ok(pkt: bytes) -> bool:
    return pkt[0] >> 4 == 6 or ones_sum(pkt[: (pkt[0] & 15) * 4]) == 0xFFFF


def ipv4(proto: int, l4: bytes, ident: int = 0x1234) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000, 64, proto, 0,
                      bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
    return hdr + l4


def ipv6(proto: int, l4: bytes) -> bytes:
    src = bytes.fromhex("20010002000000010000000000000001")
    dst = bytes.fromhex("20010002000000010000000000000002")
    return struct.pack("!IHBB", 0x60000000, len(l4), proto, 64) + src + dst + l4


def tcp(payload: bytes, seq: int = 1000, flags: int = 0x18, options: bytes = b"") -> bytes:
    off = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, off << 4, flags, 512, 0, 0) + options + payload


def udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 40000, 5201, 8 + len(payload), 0) + payload


def vnet(gso: int, gso_size: int, csum_start: int, csum_offset: int, flags: int = 1) -> bytes:
    return VNET_HDR.pack(flags, gso, 0, gso_size, csum_start, csum_offset)


def outcomes(data: bytes) -> list[list[bytes] | None]:
    """Each implementation's result for `data` (None: it refused with ValueError)."""
    results: list[list[bytes] | None] = []
    for _name, split in IMPLS:
        try:
            results.append(split(data))
        except ValueError:
            results.append(None)
    return results


@pytest.mark.parametrize("name,split", IMPLS)
@pytest.mark.parametrize("v6", [False, True])
def test_tcp_super_packet_becomes_mss_segments(name: str, split: Callable[[bytes], list[bytes]], v6: bool) -> None:
    payload = bytes(range(256)) * 20 + b"end"  # 5123 bytes: 3 full segments of 1400 and a short one
    pkt = ipv6(6, tcp(payload, seq=0xFFFFFF00, flags=0x80 | 0x18 | 0x01)) if v6 else \
        ipv4(6, tcp(payload, seq=0xFFFFFF00, flags=0x80 | 0x18 | 0x01))
    ihl = 40 if v6 else 20
    segs = split(vnet(GSO_TCPV6 if v6 else GSO_TCPV4, 1400, ihl, 16) + pkt)
    assert [len(s) - ihl - 20 for s in segs] == [1400, 1400, 1400, 923]
    assert b"".join(s[ihl + 20 :] for s in segs) == payload
    for i, s in enumerate(segs):
        assert ip_ok(s) and l4_ok(s), f"segment {i} checksum"
        if v6:
            assert struct.unpack_from("!H", s, 4)[0] == len(s) - 40
        else:
            assert struct.unpack_from("!HH", s, 2) == (len(s), 0x1234 + i)
        seq, flags = struct.unpack_from("!I", s, ihl + 4)[0], s[ihl + 13]
        assert seq == (0xFFFFFF00 + 1400 * i) & 0xFFFFFFFF  # wraps past 2**32
        last = i == len(segs) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last  # FIN, PSH
        assert bool(flags & 0x80) == (i == 0)  # CWR


@pytest.mark.parametrize("name,split", IMPLS)
@pytest.mark.parametrize("v6", [False, True])
def test_udp_super_packet_gets_lengths_and_checksums(name: str, split: Callable[[bytes], list[bytes]], v6: bool) -> None:
    payload = os.urandom(3000)
    pkt = ipv6(17, udp(payload)) if v6 else ipv4(17, udp(payload))
    ihl = 40 if v6 else 20
    segs = split(vnet(segment.GSO_UDP_L4, 1200, ihl, 6) + pkt)
    assert [len(s) - ihl - 8 for s in segs] == [1200, 1200, 600]
    for s in segs:
        assert ip_ok(s) and l4_ok(s)
        assert struct.unpack_from("!H", s, ihl + 4)[0] == len(s) - ihl
    assert b"".join(s[ihl + 8 :] for s in segs) == payload


@pytest.mark.parametrize("name,split", IMPLS)
def test_a_partial_checksum_is_completed(name: str, split: Callable[[bytes], list[bytes]]) -> None:
    """VIRTIO_NET_HDR_F_NEEDS_CSUM on a single packet: the field holds the
    pseudo-header sum, the device finishes it (virtio 1.1 5.1.6.2)."""
    pkt = bytearray(ipv4(6, tcp(b"hello world, a short segment")))
    l4len = len(pkt) - 20
    partial = ones_sum(bytes(pkt[12:20]) + struct.pack("!BBH", 0, 6, l4len))
    struct.pack_into("!H", pkt, 36, partial)
    (out,) = split(vnet(GSO_NONE, 0, 20, 16) + bytes(pkt))
    assert l4_ok(out) and out[:36] == pkt[:36] and out[38:] == pkt[38:]
    # no flag: returned as it is
    assert split(vnet(GSO_NONE, 0, 0, 0, flags=0) + bytes(pkt)) == [bytes(pkt)]


@pytest.mark.parametrize("name,split", IMPLS)
@pytest.mark.parametrize("data", [
    b"",
    bytes(9),
    vnet(GSO_NONE, 0, 20, 200) + ipv4(6, tcp(b"x")),  # checksum offset beyond the packet
    vnet(3, 1000, 20, 6) + ipv4(17, udp(b"x" * 3000)),  # UFO: never asked for
    vnet(GSO_TCPV4, 1000, 20, 16) + ipv6(6, tcp(b"x" * 3000)),  # type and version disagree
    vnet(GSO_TCPV4, 1000, 24, 16) + ipv4(6, tcp(b"x" * 3000)),  # csum_start is not the header's end
    vnet(GSO_TCPV4, 0, 20, 16) + ipv4(6, tcp(b"x" * 3000)),  # no segment size
    vnet(GSO_TCPV4, 1, 20, 16) + ipv4(6, tcp(b"x" * 3000)),  # thousands of segments
    vnet(GSO_TCPV4, 1000, 20, 16) + ipv4(17, udp(b"x" * 3000)),  # TCP type, UDP inside
    vnet(GSO_TCPV4, 1000, 20, 16) + ipv4(6, tcp(b""))[:30],  # truncated TCP header
])
def test_malformed_reads_are_refused(name: str, split: Callable[[bytes], list[bytes]], data: bytes) -> None:
    with pytest.raises(ValueError):
        split(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=9000), st.integers(1, 3000), st.booleans(), st.sampled_from([0, 4, 12]),
       st.integers(0, 255), st.integers(0, 2**32 - 1), st.sampled_from([GSO_TCPV4, GSO_TCPV6, segment.GSO_UDP_L4]))
def test_native_and_python_agree_on_valid_super_packets(payload: bytes, gso_size: int, v6: bool, opt: int,
                                                        flags: int, seq: int, gso: int) -> None:
    if gso == segment.GSO_UDP_L4:
        l4, off = udp(payload), 6
    else:
        l4, off = tcp(payload, seq=seq, flags=flags, options=bytes([1]) * opt), 16
    if gso == GSO_TCPV4:
        v6 = False
    elif gso == GSO_TCPV6:
        v6 = True
    pkt = ipv6(6 if off == 16 else 17, l4) if v6 else ipv4(6 if off == 16 else 17, l4)
    data = vnet(gso, gso_size, 40 if v6 else 20, off) + pkt
    results = outcomes(data)
    assert all(r == results[0] for r in results)
    if results[0] is not None:
        for s in results[0]:
            assert ip_ok(s) and l4_ok(s)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_never_crashes_and_both_agree(data: bytes) -> None:
    results = outcomes(data)
    assert all(r == results[0] for r in results)
