"""In-memory UDP and TUN for an edge (as wireguard-go's conn/bindtest and tun/tuntest).

A test builds a real `Edge` (and a real `Worker` and `Broker`, over ZeroMQ ipc in a
temporary state directory) in one process and drives packets through it without
namespaces or privileges: `FakeIO` hands the edge a `FakeUDP` socket on a `FakeNet`
and one end of a `FakeTun`; the test sends and receives on the other ends. The
netns tests stay for what only the kernel can show (offloads, SO_REUSEPORT, real
clients).

* `FakeNet`: datagrams between fake sockets by (host, port); a datagram to an
  address nobody holds is lost (and counted).
* `FakeUDP`: what the edge calls on a socket (recvfrom, sendto, fileno for epoll,
  family, close). Readable through an eventfd (EFD_SEMAPHORE: one count per
  datagram queued). No GSO, no socket filter: the edge checks for a real socket.
* `FakeTun`: a SOCK_SEQPACKET socket pair, so every read is one packet; the edge's
  end carries a virtio_net_hdr as a TUN opened with IFF_VNET_HDR does.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections import deque
from typing import Any

from fabric.dataplane.gro import VNET_HDR_LEN

Addr = tuple[str, int]


class FakeNet:
    """Fake UDP sockets, each bound to an (IPv4 host, port)."""

    def __init__(self) -> None:
        self.sockets: dict[Addr, FakeUDP] = {}
        self.lost = 0
        self._lock = threading.Lock()

    def socket(self, host: str, port: int) -> FakeUDP:
        with self._lock:
            if (host, port) in self.sockets:
                raise OSError(f"{host}:{port} is taken")
            sock = FakeUDP(self, (host, port))
            self.sockets[(host, port)] = sock
            return sock

    def deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        with self._lock:
            target = self.sockets.get((dst[0], dst[1]))
            if target is None:
                self.lost += 1
                return
        target.queue(bytes(data), src)


class FakeUDP:
    """One fake UDP socket (see the module docstring)."""

    family = socket.AF_INET

    def __init__(self, net: FakeNet, addr: Addr) -> None:
        self.net = net
        self.addr = addr
        self._queue: deque[tuple[bytes, Addr]] = deque()
        self._efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.closed = False

    def queue(self, data: bytes, src: Addr) -> None:
        self._queue.append((data, src))
        os.eventfd_write(self._efd, 1)

    def fileno(self) -> int:
        return self._efd

    def recvfrom(self, bufsize: int) -> tuple[bytes, Addr]:
        os.eventfd_read(self._efd)  # BlockingIOError when nothing waits, as a socket's recv
        data, src = self._queue.popleft()
        return data[:bufsize], src

    def sendto(self, data: bytes, addr: Any) -> int:
        self.net.deliver(self.addr, (addr[0], addr[1]), data)
        return len(data)

    def recv(self, timeout: float = 2.0) -> tuple[bytes, Addr] | None:
        """Wait (bounded) for one datagram; None if none came (for the test's side)."""
        ready, _, _ = select.select([self._efd], [], [], timeout)
        if not ready:
            return None
        try:
            return self.recvfrom(1 << 16)
        except BlockingIOError:
            return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with self.net._lock:
                self.net.sockets.pop(self.addr, None)
            os.close(self._efd)


class FakeTun:
    """A TUN queue in memory: `edge_fd` is the edge's, `inject`/`read` the test's."""

    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        self._edge, self._test = a, b
        self.edge_fd = a.fileno()

    def inject(self, packet: bytes) -> None:
        """An IP packet the host's stack sends into the tunnel."""
        self._test.send(bytes(VNET_HDR_LEN) + packet)

    def inject_offloaded(self, vnet_hdr: bytes, packet: bytes) -> None:
        """A read as a TUN with offloads gives it: `vnet_hdr` (a struct virtio_net_hdr,
        e.g. a TSO super packet's) and the packet behind it."""
        self._test.send(vnet_hdr + packet)

    def read(self, timeout: float = 2.0) -> bytes | None:
        """The next packet the edge wrote (its virtio_net_hdr stripped), or None."""
        ready, _, _ = select.select([self._test], [], [], timeout)
        if not ready:
            return None
        data = self._test.recv(1 << 17)
        flags, gso_type = struct.unpack_from("<BB", data, 0)
        if gso_type:
            raise AssertionError("a coalesced super packet: give the edge FABRIC_NO_GRO=1 to see segments")
        return data[VNET_HDR_LEN:]

    def close(self) -> None:
        self._edge.close()
        self._test.close()


class FakeIO:
    """What an edge opens (fabric.dataplane.edge.EdgeIO), all in memory: UDP sockets
    on `net` at `host`, and `tun`'s queue."""

    def __init__(self, net: FakeNet, host: str, tun: FakeTun) -> None:
        self.net, self.host, self.tun = net, host, tun

    def ensure_tun(self, name: str, address: list[str] | None) -> None:
        pass

    def open_tun_queue(self, name: str) -> int:
        return os.dup(self.tun.edge_fd)

    def open_udp(self, listen: str, port: int, reuseport: bool) -> FakeUDP:
        return self.net.socket(self.host, port)
