"""The tests' own Internet checksum (RFC 1071 4.1), written the textbook way so the
segmenting and coalescing tests do not check fabric's checksums with fabric's code
(fabric/dataplane/gro.py fold, _offload.c)."""

from __future__ import annotations


def ones_sum(data: bytes) -> int:
    """The one's complement sum of `data` as 16-bit big-endian words: end-around
    carry after every word, a trailing odd byte padded with zero."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes) -> int:
    """The checksum field's value: the complement of the sum."""
    return ~ones_sum(data) & 0xFFFF
