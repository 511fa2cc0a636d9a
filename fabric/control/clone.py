"""Clone-pattern subscriber (ZeroMQ Guide, clonecli6): snapshot + updates + heartbeats.

Subscribe first, then ask for a snapshot; buffer updates until the snapshot ends,
then apply only updates newer than the snapshot. A gap in sequence numbers or a
new broker epoch triggers a fresh snapshot; silence longer than DEAD_AFTER marks
the broker dead (state is kept: existing sessions keep running without it).

Consumers see only `on_set(key, value)` and `on_delete(key)`: a re-snapshot is
turned into the difference against the state they already have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from fabric.control import zpoll
from fabric.control.kvmsg import HUGZ, ICANHAZ, KTHXBAI, KVError, KVMsg
from fabric.ops.log import Log

DEAD_AFTER = 3.0  # seconds without a heartbeat
SNAPSHOT_RETRY = 2.0

log = Log("clone")


class CloneClient:
    def __init__(
        self,
        ctx: zmq.Context,
        pub_endpoint: str,
        snapshot_endpoint: str,
        on_set: Callable[[bytes, dict[str, Any]], None],
        on_delete: Callable[[bytes], None],
        curve: dict[int, Any] | None = None,
    ) -> None:
        self.ctx = ctx
        self.snapshot_endpoint = snapshot_endpoint
        self.curve = curve or {}
        self.on_set = on_set
        self.on_delete = on_delete
        self.state: dict[bytes, dict[str, Any]] = {}
        self.seq = 0
        self.epoch = 0
        self.synced = False
        self.alive = False
        self.last_heard = 0.0
        self.snapshots = 0
        self._fresh = False
        self.bad_messages = 0
        self.sub = ctx.socket(zmq.SUB)
        self._setopts(self.sub)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.RCVHWM, 100000)
        self.sub.connect(pub_endpoint)
        self.snap: zmq.Socket | None = None
        self._pending: list[KVMsg] = []
        self._snap_state: dict[bytes, dict[str, Any]] = {}
        self._snap_sent = 0.0
        self._registered: set[zmq.Socket] = set()

    def _setopts(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        for opt, val in self.curve.items():
            sock.setsockopt(opt, val)

    def sockets(self) -> list[zmq.Socket]:
        return [s for s in (self.sub, self.snap) if s is not None]

    def register(self, poller: zmq.Poller | zpoll.Poller) -> None:
        """Keep `poller` watching exactly this client's current sockets (the snapshot
        socket comes and goes)."""
        registered = self._registered
        socks = set(self.sockets())
        for s in socks - registered:
            poller.register(s, zmq.POLLIN)
        for s in registered - socks:
            poller.unregister(s)
        self._registered = socks

    def handle_ready(self, ready: dict[Any, int], now: float) -> None:
        """Handle whatever of this client's sockets `poller.poll()` reported ready."""
        for s in self.sockets():
            if s in ready:
                self.handle(s, now)

    def request_snapshot(self, now: float) -> None:
        if self.snap is not None:
            self.snap.close(0)
        self.snap = self.ctx.socket(zmq.DEALER)
        self._setopts(self.snap)
        self.snap.connect(self.snapshot_endpoint)
        self.snap.send_multipart([ICANHAZ, b""])
        self.synced = False
        self._pending = []
        self._snap_state = {}
        self._snap_sent = now

    def handle(self, sock: zmq.Socket, now: float) -> None:
        """Read everything ready on `sock` (one of self.sockets())."""
        for _ in range(10000):
            if sock.closed:
                return
            try:
                msg = KVMsg.recv(sock)
            except zmq.Again:
                return
            except KVError as exc:
                self.bad_messages += 1
                log.warning("dropped malformed broker message", error=str(exc))
                continue
            self.last_heard = now
            if not self.alive:
                self.alive = True
                log.info("broker reachable")
            if sock is self.snap:
                self._on_snapshot(msg, now)
            else:
                self._on_update(msg, now)

    def _on_snapshot(self, msg: KVMsg, now: float) -> None:
        if msg.key == KTHXBAI:
            if self.snap is not None:
                self.snap.close(0)
            self.snap = None
            self._install(self._snap_state, msg.seq, msg.epoch)
            for m in self._pending:
                if m.epoch == self.epoch and m.seq > self.seq:
                    self._on_update(m, now)
            self._pending = []
        elif msg.value is not None:
            self._snap_state[msg.key] = msg.value

    def _install(self, new: dict[bytes, dict[str, Any]], seq: int, epoch: int) -> None:
        old = self.state
        self.state = new
        self.seq, self.epoch, self.synced = seq, epoch, True
        self._fresh = True  # no update applied since this snapshot yet
        self.snapshots += 1
        for key in [k for k in old if k not in new]:
            self.on_delete(key)
        for key, value in new.items():
            if old.get(key) != value:
                self.on_set(key, value)
        log.info("snapshot installed", seq=seq, epoch=epoch, keys=len(new))

    def _on_update(self, msg: KVMsg, now: float) -> None:
        if not self.synced:
            self._pending.append(msg)
            return
        if msg.epoch != self.epoch:
            log.warning("broker restarted, re-snapshotting", epoch=msg.epoch)
            self.request_snapshot(now)
            return
        if msg.key == HUGZ:
            if msg.seq > self.seq:  # a heartbeat ahead of us: updates we never saw
                self._gap("missed updates", msg.seq, now)
            return
        if msg.seq <= self.seq:
            return
        if msg.seq != self.seq + 1:
            self._gap("sequence gap", msg.seq, now)
            return
        self._fresh = False
        self.seq = msg.seq
        if msg.value is None:
            if self.state.pop(msg.key, None) is not None:
                self.on_delete(msg.key)
        else:
            self.state[msg.key] = msg.value
            self.on_set(msg.key, msg.value)

    def _gap(self, what: str, got: int, now: float) -> None:
        """Updates are missing: re-snapshot. Right after a snapshot this is the slow
        joiner (ZeroMQ Guide ch. 5): the SUB socket was still connecting when the broker
        published the next update (seen in the next update or heartbeat). The new
        snapshot repairs it, so it is news only when it happens mid-stream."""
        (log.info if self._fresh else log.warning)(f"{what}, re-snapshotting", have=self.seq, got=got)
        self.request_snapshot(now)

    def tick(self, now: float) -> None:
        """Call about once a second: detects a dead broker and retries snapshots."""
        if self.alive and now - self.last_heard > DEAD_AFTER:
            self.alive = False
            log.warning("broker silent, keeping current sessions", seconds=round(now - self.last_heard, 1))
        if not self.synced and now - self._snap_sent > SNAPSHOT_RETRY:
            self.request_snapshot(now)

    def close(self) -> None:
        for s in self.sockets():
            s.close(0)
