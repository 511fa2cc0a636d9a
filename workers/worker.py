"""The crypto worker (DESIGN.md, "worker"): AEAD over batches, and the protocols' handshakes.

A worker holds keys it received from the broker and nothing that must outlive
it: kill one and only its in-flight frames are lost; start one and it takes
work as soon as it has connected to the edges (invariant 3).

Pipeline per frame (like wireguard-go send.go / receive.go, minus the ordering
stages, which the edges own through the session table):
  DECRYPT    open the AEAD of one session's datagrams with the counters they
             carry (the session's protocol: fabric/protocols/base.py SessionKeys),
             check the inner packets (length, source against the peer's allowed
             IPs), return plaintexts and counters to the edge, which commits them
             to the replay window.
  ENCRYPT    seal with the counters the edge reserved, return datagrams for the
             edge to send.
  HANDSHAKE  control datagrams of the frame's protocol (WireGuard: an initiation
             or a response): the protocol's WorkerSide runs them, committing new
             sessions to the broker; the result (datagrams and the session) goes
             back to the edge that sent them.
  INITIATE   start a handshake to a peer (the fabric has traffic for it and no
             session): the protocol builds it, the edge sends it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import zmq

from fabric.control import frames, zmqcurve
from fabric.control.clone import CloneClient
from fabric.control.frames import Frame, FrameError
from fabric.control.records import (
    EDGE,
    PEER,
    SESSION,
    EdgeRecord,
    PeerRecord,
    RecordError,
    SessionRecord,
    key_id,
    key_public,
    worker_identity,
)
from fabric.control.reqclient import ReqClient, RequestTimeout
from fabric.dataplane import aead
from fabric.dataplane.engine import CryptoEngine
from fabric.ops import metrics
from fabric.ops.log import Log
from fabric.ops.paths import StateDir
from fabric.ops.service import stop_on_signals
from fabric.protocols import registry
from fabric.protocols.base import ControlResult, Protocol, WorkerSide

log = Log("worker")


class Worker:
    """One crypto worker. `broker` (HOST:PORT of a broker's --tcp) makes it a remote
    worker: it reaches the broker and the edges over tcp with `keys` (CURVE)."""

    def __init__(self, sd: StateDir, wid: int, ctx: zmq.Context | None = None,
                 broker: str | None = None, keys: zmqcurve.Curve | None = None,
                 protocols: dict[str, Protocol] | None = None) -> None:
        self.sd = sd
        self.id = wid
        self.ctx = ctx or zmq.Context()
        self.remote = broker is not None
        if broker is not None:
            if keys is None:
                raise RuntimeError("a remote worker needs --key and --server-key (CURVE)")
            pub, snap, commit, stats, _ = zmqcurve.tcp_endpoints(broker.removeprefix("tcp://"), 5)
        else:
            keys = zmqcurve.local(sd)
            pub, snap, commit, stats = sd.broker_pub, sd.broker_snapshot, sd.broker_commit, sd.broker_stats
        self.client_opts = keys.client if keys else None
        self.edges: dict[int, EdgeRecord] = {}
        self.results: dict[int, zmq.Socket] = {}
        self.counters: dict[str, int] = {}
        self.session_packets: dict[int, int] = {}
        self.frame_stats = metrics.FrameStats()  # time and packets per frame handled
        self.metrics_addr: str | None = None  # its /metrics endpoint, announced in reports
        self.peers: dict[bytes, PeerRecord] = {}
        self.protocols = protocols or registry()
        # TCP segments bound for the TUN are coalesced (fabric/dataplane/gro.py); FABRIC_NO_GRO=1
        # writes them one by one (for measurements)
        self.engine = CryptoEngine(self.count, self.protocols, gro=os.environ.get("FABRIC_NO_GRO") != "1",
                                   packets=self.session_packets)
        self.sessions = self.engine.sessions  # session id -> keys
        self.sides: dict[int, WorkerSide] = {p.number: p.worker(self) for p in self.protocols.values()}
        self.pull = zmqcurve.apply(self.ctx.socket(zmq.PULL), self.client_opts)
        self.pull.setsockopt(zmq.RCVHWM, 1000)
        self.pull.setsockopt(zmq.LINGER, 0)
        # control datagrams meant for this worker (a protocol's affinity): one DEALER on
        # every edge's control ROUTER, known there by this worker's identity
        self.affine = zmqcurve.apply(self.ctx.socket(zmq.DEALER), self.client_opts)
        self.affine.setsockopt(zmq.ROUTING_ID, worker_identity(wid))
        self.affine.setsockopt(zmq.RCVHWM, 1000)
        self.affine.setsockopt(zmq.LINGER, 0)
        self.stats = zmqcurve.apply(self.ctx.socket(zmq.PUSH), self.client_opts)
        self.stats.setsockopt(zmq.SNDHWM, 10)
        self.stats.setsockopt(zmq.LINGER, 0)
        self.stats.connect(stats)
        self.broker = ReqClient(self.ctx, commit, curve=self.client_opts)
        self.clone = CloneClient(self.ctx, pub, snap, self.on_set, self.on_delete, curve=self.client_opts)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- state from the broker -------------------------------------------------

    def on_set(self, key: bytes, v: dict[str, Any]) -> None:
        try:
            if key.startswith(PEER):
                peer = PeerRecord.from_wire(v)
                self.peers[peer.public] = peer
                self.engine.set_peer(peer)
            elif key.startswith(SESSION):
                record = SessionRecord.from_wire(v)
                self.engine.install(record)
                proto = self.protocols.get(record.protocol)
                if proto is not None:
                    self.sides[proto.number].on_session(record)
            elif key.startswith(EDGE):
                self._connect_edge(EdgeRecord.from_wire(v))
            else:
                for side in self.sides.values():
                    side.on_record(key, v)
        except (RecordError, KeyError, TypeError, ValueError) as exc:
            self.count("bad_update")
            log.warning("ignored malformed update", key=key, error=str(exc))

    def on_delete(self, key: bytes) -> None:
        pub = key_public(key)
        sid = key_id(key, SESSION)
        eid = key_id(key, EDGE)
        if pub is not None:
            self.peers.pop(pub, None)
            self.engine.remove_peer(pub)
        elif sid is not None:
            self.engine.remove(sid)
            for side in self.sides.values():
                side.on_session_gone(sid)
        elif eid is not None:
            self._disconnect_edge(eid)
        else:
            for side in self.sides.values():
                side.on_record(key, None)

    def _connect_edge(self, v: EdgeRecord) -> None:
        eid = v.id
        old = self.edges.get(eid)
        if old == v:
            return
        if old is not None:
            self._disconnect_edge(eid)
        work, result = (v.work_tcp, v.result_tcp) if self.remote else (v.work, v.result)
        if not work or not result:
            return  # a remote worker can only serve edges that listen on tcp
        self.pull.connect(work)
        control = v.control_tcp if self.remote else v.control
        if control:
            self.affine.connect(control)
        push = zmqcurve.apply(self.ctx.socket(zmq.PUSH), self.client_opts)
        push.setsockopt(zmq.SNDHWM, 1000)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.IMMEDIATE, 1)
        push.connect(result)
        self.results[eid] = push
        self.edges[eid] = v
        log.info("connected to edge", edge=eid)

    def _disconnect_edge(self, eid: int) -> None:
        v = self.edges.pop(eid, None)
        if v is None:
            return
        for conn, ep in ((self.pull, v.work_tcp if self.remote else v.work),
                         (self.affine, v.control_tcp if self.remote else v.control)):
            if ep:
                try:
                    conn.disconnect(ep)
                except zmq.ZMQError:
                    pass
        push = self.results.pop(eid, None)
        if push is not None:
            push.close(0)
        log.info("disconnected from edge", edge=eid)

    # --- frames -----------------------------------------------------------------

    def _send(self, edge: int, frame: Frame) -> None:
        sock = self.results.get(edge)
        if sock is None:
            self.count("drop_unknown_edge", max(1, len(frame.packets)))
            return
        try:
            frames.send_parts(sock, frame.encode())
        except zmq.Again:
            self.count("drop_edge_busy", max(1, len(frame.packets)))

    def handle(self, parts: list[Any], now: float) -> None:
        try:
            frame = frames.decode(parts)
        except FrameError as exc:
            self.count("drop_bad_frame")
            log.debug("bad frame", error=str(exc))
            return
        if frame.kind == frames.DECRYPT:
            self.decrypt(frame, now)
        elif frame.kind == frames.ENCRYPT:
            self.encrypt(frame, now)
        elif frame.kind == frames.HANDSHAKE:
            side = self.sides.get(frame.proto)
            if side is None:
                self.count("drop_unknown_protocol", len(frame.packets))
                return
            for pkt in frame.packets:
                self._result(frame, side.control(bytes(pkt), frame.addr, now, frame.edge))
        elif frame.kind == frames.INITIATE:
            self.initiate(frame, now)
        else:
            self.count("drop_bad_frame")

    def decrypt(self, frame: Frame, now: float) -> None:
        result = self.engine.decrypt(frame, now)
        if result is not None:
            self._send(frame.edge, result)

    def encrypt(self, frame: Frame, now: float) -> None:
        result = self.engine.encrypt(frame, now)
        if result is not None:
            self._send(frame.edge, result)

    def initiate(self, frame: Frame, now: float) -> None:
        side = self.sides.get(frame.proto)
        try:
            peer = msgpack.unpackb(frame.extra or b"", raw=False)["peer"]
            if side is None or not isinstance(peer, bytes):
                raise ValueError("no such protocol or peer")
        except (KeyError, TypeError, ValueError, msgpack.UnpackException):
            self.count("drop_unknown_peer")
            return
        self._result(frame, side.initiate(peer, frame.addr, now))

    def _result(self, frame: Frame, result: ControlResult) -> None:
        """Hand a control step's datagrams (and its new session) to the edge."""
        if result.session is not None:
            self.engine.install(result.session)
            self.count("handshakes")
            self._send(frame.edge, Frame(
                frames.HANDSHAKE_OUT, frame.edge, result.session.id, 0, frame.addr, result.datagrams,
                extra=msgpack.packb(result.session.public().to_wire(), use_bin_type=True), proto=frame.proto,
            ))
        elif result.datagrams:
            self._send(frame.edge, Frame(frames.UDP_SEND, frame.edge, 0, 0, frame.addr, result.datagrams,
                                         proto=frame.proto))

    def commit(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the broker to commit (WorkerHost.commit); None if it is unavailable."""
        if not self.clone.alive:
            # no heartbeat from the broker: do not stall the data path waiting for it
            self.count("drop_broker_unavailable")
            return None
        try:
            return self.broker.call({"op": "commit", **req}, timeout=0.5)
        except RequestTimeout:
            self.count("drop_broker_unavailable")
            log.warning("handshake not committed: broker unavailable")
            return None

    # --- loop -----------------------------------------------------------------------

    def report(self) -> None:
        rep = {
            "role": "worker", "id": self.id, "pid": os.getpid(),
            "counters": {**self.counters, **self.frame_stats.counters()}, "gauges": metrics.worker_gauges(self),
            **({"metrics": self.metrics_addr} if self.metrics_addr else {}),
            "sessions": {sid: {"packets": n} for sid, n in self.session_packets.items()},
            **self.engine.take_ended(),
        }
        try:
            self.stats.send(msgpack.packb(rep, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def tick_protocols(self, now: float) -> None:
        """The protocols' timers (retransmissions): what is due goes out through its edge."""
        for number, side in self.sides.items():
            for out in side.tick(now):
                self._send(out.edge, Frame(frames.UDP_SEND, out.edge, 0, 0, out.addr, out.datagrams, proto=number))

    def serve(self, stop: list[bool]) -> None:
        self.clone.request_snapshot(time.time())
        next_tick = next_timers = 0.0
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.affine, zmq.POLLIN)
        while not stop[0]:
            self.clone.register(poller)
            ready = dict(poller.poll(100))
            now = time.time()
            self.clone.handle_ready(ready, now)
            for sock in (self.pull, self.affine):
                if sock not in ready:
                    continue
                for _ in range(64):
                    bufs = frames.recv_parts(sock)
                    if bufs is None:
                        break
                    t0 = time.perf_counter()
                    self.handle(bufs, now)
                    self.frame_stats.observe(bufs[0], time.perf_counter() - t0)
            if now >= next_timers:
                self.tick_protocols(now)
                next_timers = now + 0.1
            if now >= next_tick:
                self.clone.tick(now)
                self.report()
                next_tick = now + 1.0


def run(sd: StateDir, wid: int | None, broker: str | None = None, keys: zmqcurve.Curve | None = None,
        metrics_addr: str | None = None) -> int:
    sd.ensure()  # the broker may start later; ZeroMQ connects when it appears
    if wid is None:  # --id auto (compose replicas run one command): the first free id
        wid, lock = _free_id(sd)
    else:
        lock = sd.lock(f"worker-{wid}")
    exporter = metrics.start(metrics_addr, "worker", wid)
    worker = Worker(sd, wid, broker=broker, keys=keys)
    if exporter is not None:
        worker.metrics_addr = exporter.address
        exporter.source = lambda f: metrics.worker_metrics(f, worker)
    stop = stop_on_signals()
    log.info("worker running", worker=wid, aead=aead.describe())
    try:
        worker.serve(stop)
    finally:
        worker.ctx.destroy(0)
        os.close(lock)
    return 0


def _free_id(sd: StateDir) -> tuple[int, int]:
    """The lowest worker id no running worker of this state dir holds, and its lock."""
    for wid in range(256):
        try:
            return wid, sd.lock(f"worker-{wid}")
        except RuntimeError:
            continue
    raise RuntimeError(f"all 256 worker ids of {sd.root} are taken; stop some workers first")
