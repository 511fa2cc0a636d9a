"""fabric/control/zpoll.py over real ZeroMQ sockets (inproc and ipc) and pipes: it reports
what zmq.Poller would, with one epoll wait per call."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from fabric.control import zpoll
from fabric.control.zpoll import POLLIN, Poller


@pytest.fixture()
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def pair(ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
    pull = ctx.socket(zmq.PULL)
    pull.bind(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    return push, pull


def wait_ready(p: Poller, obj: object, timeout: float = 5.0) -> dict[object, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = p.poll(100)
        if obj in got:
            return got
    raise AssertionError(f"{obj!r} never reported ready")


def test_reports_zmq_sockets_and_fds(ctx: zmq.Context, tmp_path: Path) -> None:
    push, pull = pair(ctx, f"ipc://{tmp_path}/a")
    r, w = os.pipe()
    p = Poller()
    p.register(pull)
    p.register(r)
    assert p.poll(0) == {}
    push.send(b"x")
    assert wait_ready(p, pull) == {pull: POLLIN}
    assert pull.recv() == b"x"
    assert p.poll(0) == {}  # drained: no longer ready
    os.write(w, b"y")
    got = p.poll(1000)
    assert got == {r: POLLIN}
    os.read(r, 1)
    push.send(b"z")
    os.write(w, b"z")
    deadline = time.monotonic() + 5
    seen: dict[object, int] = {}
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.update(p.poll(100))
    assert seen == {pull: POLLIN, r: POLLIN}
    os.close(r)
    os.close(w)


def test_undrained_socket_is_reported_again_without_a_new_signal(ctx: zmq.Context) -> None:
    # the edge reads at most a batch per pass: what it left must come back at once,
    # although the socket's FD does not signal again for messages already queued
    push, pull = pair(ctx, "inproc://b")
    p = Poller()
    p.register(pull)
    for i in range(5):
        push.send(b"%d" % i)
    time.sleep(0.05)
    got: list[bytes] = []
    for _ in range(5):
        t0 = time.monotonic()
        assert pull in p.poll(2000)
        assert time.monotonic() - t0 < 1.0  # no waiting for the timeout
        got.append(pull.recv())  # one message per pass
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert p.poll(0) == {}


def test_socket_with_messages_before_register_is_ready(ctx: zmq.Context) -> None:
    push, pull = pair(ctx, "inproc://c")
    push.send(b"early")
    time.sleep(0.05)
    pull.getsockopt(zmq.EVENTS)  # consumes the FD's signal, as any use of the socket may
    p = Poller()
    p.register(pull)
    assert p.poll(0) == {pull: POLLIN}


def test_signal_consumed_elsewhere_is_caught_by_the_full_check(ctx: zmq.Context) -> None:
    push, pull = pair(ctx, "inproc://d")
    p = Poller()
    p.register(pull)
    assert p.poll(0) == {}
    push.send(b"m")
    time.sleep(0.05)
    pull.getsockopt(zmq.EVENTS)  # e.g. a send on the socket processed its commands
    # a quiet poll (nothing else ready) checks every socket
    assert wait_ready(p, pull, timeout=2.0) == {pull: POLLIN}
    # and under load (another fd always ready) the periodic check finds it
    pull.recv()
    r, w = os.pipe()
    p.register(r)
    os.write(w, b"busy")
    push.send(b"n")
    time.sleep(0.05)
    pull.getsockopt(zmq.EVENTS)
    found = False
    for _ in range(zpoll.FULL_CHECK_EVERY + 1):
        if pull in p.poll(0):
            found = True
            break
    assert found
    os.close(r)
    os.close(w)


def test_unregister_closed_socket_and_fd_reuse(ctx: zmq.Context) -> None:
    # the clone client closes its snapshot socket and opens another: the old one is
    # unregistered after it was closed, possibly after the new one took its fd number
    p = Poller()
    push, old = pair(ctx, "inproc://e")
    p.register(old)
    old.close(0)
    time.sleep(0.05)
    push2, new = pair(ctx, "inproc://f")
    p.register(new)
    p.unregister(old)  # closed: no error, and the new socket stays watched
    push2.send(b"ok")
    assert wait_ready(p, new) == {new: POLLIN}
    p.unregister(new)
    p.unregister(new)  # twice: nothing happens
    push2.send(b"again")
    time.sleep(0.05)
    assert p.poll(0) == {}


def test_timeout_and_flags() -> None:
    p = Poller()
    r, w = os.pipe()
    p.register(r)
    t0 = time.monotonic()
    assert p.poll(50) == {}
    assert time.monotonic() - t0 >= 0.04
    with pytest.raises(ValueError):
        p.register(w, zmq.POLLOUT)
    p.close()
    os.close(r)
    os.close(w)
