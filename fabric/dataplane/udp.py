"""The edge's UDP sockets: SO_REUSEPORT, large buffers, and GSO runs.

UDP GSO (Linux 4.18+, as wireguard-go conn/bind_std.go): one sendmsg carries a run
of equal-size datagrams (the last may be shorter) that the kernel splits.
"""

from __future__ import annotations

import socket

from fabric.ops import preflight

UDP_SEGMENT = 103  # SOL_UDP option
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
BUFFER_BYTES = 4 << 20


def gso_runs(sizes: list[int]) -> list[tuple[int, int]]:
    """Split datagram sizes into [start, end) runs one GSO send can carry:
    all of one size, except that the last may be shorter."""
    runs = []
    i, n = 0, len(sizes)
    while i < n:
        size = sizes[i]
        j, total = i + 1, size
        while j < n and j - i < GSO_MAX_SEGMENTS and sizes[j] == size and total + size <= GSO_MAX_BYTES:
            total += size
            j += 1
        if j < n and j - i < GSO_MAX_SEGMENTS and sizes[j] < size and total + sizes[j] <= GSO_MAX_BYTES:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def open_udp(listen: str, port: int, reuseport: bool) -> socket.socket:
    """An edge's non-blocking UDP socket (preflight.bind_udp), with 4 MiB buffers."""
    sock = preflight.bind_udp(listen, port, reuseport)
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER_BYTES)
    sock.setblocking(False)
    return sock
