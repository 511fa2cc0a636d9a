"""The edge's UDP sockets: SO_REUSEPORT, large buffers, GSO runs and GRO reads.

UDP GSO (Linux 4.18+, as wireguard-go conn/bind_std.go): one sendmsg carries a run
of equal-size datagrams (the last may be shorter) that the kernel splits.

UDP GRO (Linux 5.0+, the UDP_GRO socket option; wireguard-go conn/bind_std.go and
conn/gso_linux.go): the kernel may hand one recvmsg a run of datagrams of one
source, all of one size but the last, with the size in a (SOL_UDP, UDP_GRO)
control message. Without the option, a GSO run a client sent (wireguard-go does)
is split back into datagrams in the kernel, one receive call each; with it, one
call takes the run and `split_gro` cuts it.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any

from fabric.dataplane import native
from fabric.ops import preflight

SOL_UDP = 17
UDP_SEGMENT = 103  # SOL_UDP option: the segment size of a send (GSO)
UDP_GRO = 104  # SOL_UDP option: coalesced receives, the segment size in a control message
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)  # the kernel puts an int (udp_cmsg_recv)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
BUFFER_BYTES = 4 << 20
MAX_RECEIVE = 65535  # the largest UDP payload, and so the largest coalesced run

_offload, _ = native.load("_offload")
_recv_batch: Callable[[int, int], tuple[list[bytes], list[Any], int]] | None = \
    _offload.recv_batch if _offload and native.WANTED else None


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


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced receives; False where the kernel has no UDP_GRO."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The segment size the kernel reported for a coalesced receive (0: one datagram)."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)  # an int, host order
    return 0


def split_gro(data: bytes, size: int) -> list[bytes]:
    """The datagrams of a coalesced receive: `size` bytes each, the last may be shorter."""
    if size <= 0 or len(data) <= size:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def receive_py(sock: Any, limit: int, gro: bool) -> tuple[list[bytes], list[Any], int]:
    """Up to `limit` datagrams from a non-blocking socket and their sources, and how
    many came as coalesced runs: one `recvmsg` per datagram or run (`recvfrom` where
    the socket has no UDP GRO). OSError only if nothing came before it."""
    datagrams: list[bytes] = []
    sources: list[Any] = []
    runs = 0
    try:
        if gro:
            recvmsg = sock.recvmsg
            while len(datagrams) < limit:
                data, anc, _flags, sa = recvmsg(MAX_RECEIVE, GRO_CMSG_SPACE)
                size = gro_size(anc) if anc else 0
                if size and len(data) > size:
                    run = split_gro(data, size)
                    datagrams += run
                    sources += [sa] * len(run)
                    runs += 1
                else:
                    datagrams.append(data)
                    sources.append(sa)
        else:
            recvfrom = sock.recvfrom
            while len(datagrams) < limit:
                data, sa = recvfrom(MAX_RECEIVE)
                datagrams.append(data)
                sources.append(sa)
    except BlockingIOError:
        pass
    except OSError:
        if not datagrams:
            raise
    return datagrams, sources, runs


def receive(sock: Any, limit: int, gro: bool) -> tuple[list[bytes], list[Any], int]:
    """`receive_py`'s contract, with one `recvmmsg` per 64 datagrams or runs (C,
    fabric/dataplane/_offload.c) for a kernel socket when the extension is built and
    FABRIC_NATIVE is not 0: ~0.9 instead of ~2.3 us per datagram (loopback), and no
    last call that only says EAGAIN."""
    if _recv_batch is not None and isinstance(sock, socket.socket):
        return _recv_batch(sock.fileno(), limit)
    return receive_py(sock, limit, gro)


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
