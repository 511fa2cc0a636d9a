"""Just enough of IPv4/IPv6 headers to route and to check sources (no parsing beyond that)."""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

T = TypeVar("T")


def inner_length(pkt: bytes | memoryview) -> int:
    """Length the IP header claims; 0 if `pkt` is not a plausible IPv4/IPv6 packet."""
    n = len(pkt)
    if n < 20:
        return 0
    v = pkt[0] >> 4
    if v == 4:
        total = (pkt[2] << 8) | pkt[3]
        return total if 20 <= total <= n else 0
    if v == 6 and n >= 40:
        total = 40 + ((pkt[4] << 8) | pkt[5])
        return total if total <= n else 0
    return 0


def source(pkt: bytes | memoryview) -> bytes:
    """Raw source address (4 or 16 bytes) of a packet that passed inner_length."""
    return bytes(pkt[12:16]) if pkt[0] >> 4 == 4 else bytes(pkt[8:24])


def destination(pkt: bytes | memoryview) -> bytes | None:
    """Raw destination address, or None if the packet is too short to have one."""
    n = len(pkt)
    if n >= 20 and pkt[0] >> 4 == 4:
        return bytes(pkt[16:20])
    if n >= 40 and pkt[0] >> 4 == 6:
        return bytes(pkt[24:40])
    return None


class PrefixTable(Generic[T]):
    """Longest-prefix match over allowed IPs (IPv4 and IPv6), with a lookup cache."""

    CACHE_MAX = 65536

    def __init__(self) -> None:
        self._entries: dict[int, list[tuple[int, int, T]]] = {4: [], 6: []}
        self._cache: dict[bytes, T | None] = {}

    def clear(self) -> None:
        self._entries = {4: [], 6: []}
        self._cache.clear()

    def add(self, network: str, value: T) -> None:
        """Route `network` to `value`; a network routed elsewhere moves (cryptokey routing:
        an allowed IP belongs to one peer, whitepaper 2)."""
        net = ipaddress.ip_network(network, strict=False)
        bits = net.max_prefixlen
        mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
        key = (net.prefixlen, int(net.network_address) & mask)
        lst = [e for e in self._entries[net.version] if (e[0], e[1]) != key]
        self._entries[net.version] = lst
        lst.append((*key, value))
        lst.sort(key=lambda e: -e[0])
        self._cache.clear()

    def remove_value(self, value: T) -> None:
        for v in (4, 6):
            self._entries[v] = [e for e in self._entries[v] if e[2] != value]
        self._cache.clear()

    def lookup(self, raw: bytes) -> T | None:
        try:
            return self._cache[raw]
        except KeyError:
            pass
        version, bits = (4, 32) if len(raw) == 4 else (6, 128)
        addr = int.from_bytes(raw, "big")
        found = None
        for plen, netbits, value in self._entries[version]:
            if (addr >> (bits - plen) if plen else 0) == (netbits >> (bits - plen) if plen else 0):
                found = value
                break
        if len(self._cache) >= self.CACHE_MAX:
            self._cache.clear()
        self._cache[raw] = found
        return found
