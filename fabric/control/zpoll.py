"""One wait over raw file descriptors and ZeroMQ sockets, in one system call.

`zmq.Poller` (libzmq's zmq_poll) spends 2N + 2 system calls per call with N
ZeroMQ sockets: a first poll with timeout 0, one poll of each socket's mailbox
(ZMQ_EVENTS), the blocking poll, and the mailbox polls again. An edge polls two
ZeroMQ sockets beside its UDP socket and TUN queue, so every loop pass cost six
system calls where one would do; on this VM a system call after an idle spell
costs 10-20 us (docs/performance.md), and an idle ping pays for the pass.

`Poller` keeps zmq.Poller's interface (register, unregister, poll -> {obj:
POLLIN}) over one epoll set. A ZeroMQ socket is watched through its ZMQ_FD,
which becomes readable when the socket's state may have changed (zmq_getsockopt
ZMQ_FD: edge-triggered in effect); ZMQ_EVENTS then tells whether a message is
waiting. Because reading ZMQ_EVENTS (or a send on the socket) clears that
signal, a socket is checked again without waiting for its FD:

* in the next `poll` after it was reported ready (the caller may have left
  messages in it: the edge reads at most a batch per pass), and right after it
  was registered (it may hold messages already);
* every `poll` that found nothing, and every FULL_CHECK_EVERY calls, in case
  a send on the socket consumed the signal (the edge sends on none of the
  sockets it polls, so this is a safety net, not the common path).
"""

from __future__ import annotations

import select
from typing import Any

import zmq

POLLIN = zmq.POLLIN
FULL_CHECK_EVERY = 64  # calls between checks of every ZeroMQ socket


class Poller:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._by_fd: dict[int, Any] = {}  # fd -> the int itself, or its ZeroMQ socket
        self._socks: dict[zmq.Socket, int] = {}  # ZeroMQ socket -> its ZMQ_FD
        self._recheck: set[zmq.Socket] = set()
        self._calls = 0

    def register(self, obj: zmq.Socket | int, flags: int = POLLIN) -> None:
        """Watch `obj` (a ZeroMQ socket or a file descriptor) for input."""
        if flags != POLLIN:
            raise ValueError("only POLLIN is supported")
        if isinstance(obj, zmq.Socket):
            if obj in self._socks:
                return
            fd = int(obj.getsockopt(zmq.FD))  # type: ignore[arg-type]
            self._socks[obj] = fd
            self._recheck.add(obj)
        else:
            fd = obj
            if self._by_fd.get(fd) == fd:
                return
        old = self._by_fd.get(fd)
        if old is not None and old is not obj:
            self._forget(old)  # its fd was closed and the number came back
        self._by_fd[fd] = obj
        try:
            self._ep.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._ep.modify(fd, select.EPOLLIN)

    def unregister(self, obj: zmq.Socket | int) -> None:
        """Stop watching `obj`; a ZeroMQ socket may already be closed."""
        fd = self._socks.get(obj) if isinstance(obj, zmq.Socket) else obj
        if fd is None:
            return
        self._forget(obj)
        current = self._by_fd.get(fd)
        # a socket's fd number may belong to a newer socket by now; an int is itself
        if current is obj or (isinstance(obj, int) and current == obj):
            del self._by_fd[fd]
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass  # closed already: epoll dropped it

    def _forget(self, obj: Any) -> None:
        if isinstance(obj, zmq.Socket):
            self._socks.pop(obj, None)
            self._recheck.discard(obj)

    @staticmethod
    def _has_input(sock: zmq.Socket) -> bool:
        try:
            return not sock.closed and bool(int(sock.getsockopt(zmq.EVENTS)) & POLLIN)  # type: ignore[arg-type]
        except zmq.ZMQError:
            return False

    def poll(self, timeout: float | None = None) -> dict[Any, int]:
        """Wait up to `timeout` milliseconds (None: forever) for input; {obj: POLLIN}
        for every registered object that has some."""
        ready: dict[Any, int] = {}
        for s in self._recheck:
            if self._has_input(s):
                ready[s] = POLLIN
        wait = 0.0 if ready else (-1.0 if timeout is None else timeout / 1000.0)
        events = self._ep.poll(wait)
        by_fd = self._by_fd
        for fd, _ in events:  # registered for EPOLLIN: any event is input, an error or a hang-up
            obj = by_fd.get(fd)
            if obj is None or obj in ready:
                continue
            if isinstance(obj, zmq.Socket):
                if self._has_input(obj):
                    ready[obj] = POLLIN
            else:
                ready[obj] = POLLIN
        self._calls += 1
        if (not events and not ready) or self._calls % FULL_CHECK_EVERY == 0:
            for s in self._socks:  # a send may have consumed a socket's signal
                if s not in ready and self._has_input(s):
                    ready[s] = POLLIN
        self._recheck = {s for s in ready if isinstance(s, zmq.Socket)}
        return ready

    def close(self) -> None:
        self._ep.close()
