"""fabric/dataplane/ippacket.py: header lengths, addresses and longest-prefix match."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fabric.dataplane.ippacket import PrefixTable, destination, inner_length, source

FUZZ = settings(max_examples=300, deadline=None)


def v4(payload: bytes = b"", total: int | None = None, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    total = 20 + len(payload) if total is None else total
    head = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return head + payload


def v6(payload: bytes = b"", plen: int | None = None, src: str = "fd00::1", dst: str = "fd00::2") -> bytes:
    plen = len(payload) if plen is None else plen
    head = struct.pack(">IHBB16s16s", 6 << 28, plen, 17, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return head + payload


# --- inner_length, source, destination ---------------------------------------------------


def test_valid_v4() -> None:
    pkt = v4(b"x" * 30)
    assert inner_length(pkt) == 50
    assert inner_length(pkt + bytes(14)) == 50  # padding after the packet is not part of it
    assert source(pkt) == bytes([10, 0, 0, 1])
    assert destination(pkt) == bytes([10, 0, 0, 2])
    assert inner_length(memoryview(pkt)) == 50 and destination(memoryview(pkt)) == bytes([10, 0, 0, 2])


def test_valid_v6() -> None:
    pkt = v6(b"y" * 8)
    assert inner_length(pkt) == 48
    assert inner_length(pkt + bytes(16)) == 48
    assert source(pkt) == ipaddress.IPv6Address("fd00::1").packed
    assert destination(pkt) == ipaddress.IPv6Address("fd00::2").packed
    assert inner_length(v6()) == 40  # header only


@pytest.mark.parametrize("pkt", [
    b"", b"\x45", v4()[:19],  # shorter than a header
    v4(b"abc", total=24),  # claims more than there is
    v4(b"abc", total=19),  # claims less than a header
    v4(total=0),
    v6()[:39], v6(b"ab", plen=3), v6(plen=0xFFFF),
    b"\x00" * 60, b"\x50" + bytes(59), b"\xff" * 60,  # versions 0, 5, 15
    b"\x60" + bytes(20),  # v6 version nibble but v4-sized
])
def test_short_or_garbage_is_zero(pkt: bytes) -> None:
    assert inner_length(pkt) == 0


def test_destination_of_short_packets() -> None:
    assert destination(b"") is None
    assert destination(v4()[:19]) is None
    assert destination(v6()[:39]) is None
    assert destination(b"\x00" * 60) is None
    assert destination(v6()[:40]) == ipaddress.IPv6Address("fd00::2").packed


@FUZZ
@given(st.binary(max_size=100))
@example(b"\x45" + bytes(19))
@example(b"\x60" + bytes(39))
def test_fuzz_parsers_never_raise(pkt: bytes) -> None:
    n = inner_length(pkt)
    assert n == 0 or (20 <= n <= len(pkt))
    assert inner_length(memoryview(pkt)) == n
    d = destination(pkt)
    assert d is None or len(d) in (4, 16)
    if n:
        assert d is not None
        assert len(source(pkt)) == len(d)
        version = pkt[0] >> 4
        assert (version, len(d)) in ((4, 4), (6, 16))


@FUZZ
@given(st.binary(max_size=64), st.binary(max_size=16), st.booleans())
def test_fuzz_valid_headers(payload: bytes, trailer: bytes, six: bool) -> None:
    pkt = v6(payload) if six else v4(payload)
    assert inner_length(pkt + trailer) == len(pkt)
    assert inner_length(pkt[:-1]) == 0  # one byte short of what the header claims


# --- PrefixTable ---------------------------------------------------------------------------


def raw(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def test_longest_prefix_v4() -> None:
    t: PrefixTable[str] = PrefixTable()
    t.add("10.0.0.0/8", "eight")
    t.add("10.1.0.0/16", "sixteen")
    t.add("10.1.2.3/32", "host")
    t.add("10.1.2.0/24", "twentyfour")  # added after the /32: order does not matter
    assert t.lookup(raw("10.1.2.3")) == "host"
    assert t.lookup(raw("10.1.2.4")) == "twentyfour"
    assert t.lookup(raw("10.1.3.1")) == "sixteen"
    assert t.lookup(raw("10.200.0.1")) == "eight"
    assert t.lookup(raw("11.0.0.1")) is None
    assert t.lookup(raw("fd00::1")) is None  # the other family is separate


def test_default_routes() -> None:
    t: PrefixTable[str] = PrefixTable()
    t.add("0.0.0.0/0", "v4 default")
    t.add("::/0", "v6 default")
    t.add("192.168.0.0/16", "lan")
    assert t.lookup(raw("1.2.3.4")) == "v4 default"
    assert t.lookup(raw("255.255.255.255")) == "v4 default"
    assert t.lookup(raw("192.168.9.9")) == "lan"
    assert t.lookup(raw("2001:db8::1")) == "v6 default"


def test_longest_prefix_v6() -> None:
    t: PrefixTable[str] = PrefixTable()
    t.add("fd00::/8", "eight")
    t.add("fd00:1::/32", "thirtytwo")
    t.add("fd00:1::5/128", "host")
    t.add("fd00:1::/127", "onetwentyseven")
    assert t.lookup(raw("fd00:1::5")) == "host"
    assert t.lookup(raw("fd00:1::1")) == "onetwentyseven"
    assert t.lookup(raw("fd00:1::2")) == "thirtytwo"
    assert t.lookup(raw("fdff::1")) == "eight"
    assert t.lookup(raw("fe80::1")) is None
    assert t.lookup(raw("10.0.0.1")) is None


def test_host_bits_in_network_are_ignored() -> None:
    t: PrefixTable[str] = PrefixTable()
    t.add("10.1.2.3/24", "net")
    assert t.lookup(raw("10.1.2.200")) == "net"


def test_remove_value_and_cache() -> None:
    t: PrefixTable[str] = PrefixTable()
    t.add("10.0.0.0/8", "a")
    t.add("10.1.0.0/16", "b")
    t.add("fd00::/64", "b")
    assert t.lookup(raw("10.1.0.1")) == "b"  # now cached
    t.remove_value("b")
    assert t.lookup(raw("10.1.0.1")) == "a"
    assert t.lookup(raw("fd00::1")) is None
    t.add("10.1.0.0/16", "c")
    assert t.lookup(raw("10.1.0.1")) == "c"  # adding invalidates the cache too
    t.remove_value("nobody")
    assert t.lookup(raw("10.1.0.1")) == "c"
    t.clear()
    assert t.lookup(raw("10.1.0.1")) is None


def test_cache_is_bounded() -> None:
    t: PrefixTable[int] = PrefixTable()
    t.CACHE_MAX = 8  # type: ignore[misc]
    t.add("10.0.0.0/8", 1)
    for i in range(100):
        assert t.lookup(bytes([10, 0, 0, i])) == 1
        assert len(t._cache) <= 8


networks_v4 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=4),
                        st.integers(0, 32))
networks_v6 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=6),
                        st.integers(0, 128))


def reference(entries: list[tuple[ipaddress._BaseNetwork, int]], addr: ipaddress._BaseAddress) -> int | None:
    best = None
    for net, value in entries:  # the first added wins among equal prefixes
        if addr in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, value)
    return None if best is None else best[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(networks_v4 | networks_v6, max_size=12, unique=True), st.lists(st.ip_addresses(), max_size=12),
       st.data())
def test_lookup_matches_reference(nets: list, addrs: list, data: st.DataObject) -> None:
    t: PrefixTable[int] = PrefixTable()
    entries = list(zip(nets, range(len(nets)), strict=True))
    for net, value in entries:
        t.add(str(net), value)
    # probe the given addresses, plus addresses inside and at the edges of each network
    probes = list(addrs)
    for net in nets:
        probes += [net.network_address, net.broadcast_address]
    for addr in probes:
        assert t.lookup(addr.packed) == reference(entries, addr), (addr, nets)
    if entries:
        gone = data.draw(st.sampled_from(range(len(entries))))
        t.remove_value(gone)
        entries = [e for e in entries if e[1] != gone]
        for addr in probes:
            assert t.lookup(addr.packed) == reference(entries, addr)


def test_a_network_routed_again_moves_to_its_new_value() -> None:
    """Cryptokey routing (whitepaper 2): an allowed IP belongs to one peer only."""
    from fabric.dataplane.ippacket import PrefixTable

    t: PrefixTable[str] = PrefixTable()
    t.add("198.18.0.0/16", "a")
    t.add("198.18.5.0/24", "b")
    assert t.lookup(bytes([198, 18, 5, 1])) == "b"
    t.add("198.18.5.0/24", "a")
    assert t.lookup(bytes([198, 18, 5, 1])) == "a"
    t.remove_value("a")
    assert t.lookup(bytes([198, 18, 5, 1])) is None and t.lookup(bytes([198, 18, 6, 1])) is None
