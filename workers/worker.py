"""The crypto worker (DESIGN.md, "worker"): AEAD over batches and the handshake.

A worker holds keys it received from the broker and nothing that must outlive
it: kill one and only its in-flight frames are lost; start one and it takes
work as soon as it has connected to the edges (invariant 3).

Pipeline per frame (like wireguard-go send.go / receive.go, minus the ordering
stages, which the edges own through the session table):
  DECRYPT    check receiver index, open the AEAD with the packet's counter as
             nonce, trim padding by the inner IP length, check the inner source
             against the peer's allowed IPs, return plaintexts and counters to
             the edge, which commits them to the replay window.
  ENCRYPT    pad to 16 bytes, seal with the counters the edge reserved, return
             transport datagrams for the edge to send.
  HANDSHAKE  consume an initiation, build the response, commit the session to
             the broker, return the response (and the session) to the edge;
             or consume the response to one of the fabric's own initiations.
  INITIATE   build an initiation to a peer (the fabric has traffic for it and
             no session), register its pending state with the broker, return
             the datagram to the edge.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from typing import Any

import msgpack
import zmq

from fabric.control import frames
from fabric.control import zmqcurve as curve
from fabric.control.clone import CloneClient
from fabric.control.frames import Frame, FrameError
from fabric.control.reqclient import ReqClient, RequestTimeout
from fabric.dataplane.engine import CryptoEngine, peer_info
from fabric.ops import metrics
from fabric.ops.log import Log
from fabric.ops.paths import StateDir
from fabric.ops.service import stop_on_signals
from fabric.protocols.wireguard.constants import MSG_INITIATION, MSG_RESPONSE
from fabric.protocols.wireguard.messages import MessageError, message_type
from fabric.protocols.wireguard.noise import (
    HandshakeError,
    InitiatorState,
    StaticKeys,
    check_mac1,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)

log = Log("worker")

class Worker:
    """One crypto worker. `broker` (HOST:PORT of a broker's --tcp) makes it a remote
    worker: it reaches the broker and the edges over tcp with `keys` (CURVE)."""

    def __init__(self, sd: StateDir, wid: int, ctx: zmq.Context | None = None,
                 broker: str | None = None, keys: curve.Curve | None = None) -> None:
        self.sd = sd
        self.id = wid
        self.ctx = ctx or zmq.Context()
        self.remote = broker is not None
        if broker is not None:
            if keys is None:
                raise RuntimeError("a remote worker needs --key and --server-key (CURVE)")
            pub, snap, commit, stats, _ = curve.tcp_endpoints(broker.removeprefix("tcp://"), 5)
        else:
            keys = curve.local(sd)
            pub, snap, commit, stats = sd.broker_pub, sd.broker_snapshot, sd.broker_commit, sd.broker_stats
        self.client_opts = keys.client if keys else None
        self.static: StaticKeys | None = None
        self.pending: dict[int, InitiatorState] = {}
        self.edges: dict[int, dict[str, Any]] = {}
        self.results: dict[int, zmq.Socket] = {}
        self.counters: dict[str, int] = {}
        self.session_packets: dict[int, int] = {}
        self.frame_stats = metrics.FrameStats()  # time and packets per frame handled
        self.metrics_addr: str | None = None  # its /metrics endpoint, announced in reports
        # TCP segments bound for the TUN are coalesced (fabric/dataplane/gro.py); FABRIC_NO_GRO=1
        # writes them one by one (for measurements)
        self.engine = CryptoEngine(self.count, gro=os.environ.get("FABRIC_NO_GRO") != "1",
                                   packets=self.session_packets)
        self.sessions = self.engine.sessions  # session id -> keys
        self.peers = self.engine.peers  # public key -> psk, allowed IPs
        self.pull = curve.apply(self.ctx.socket(zmq.PULL), self.client_opts)
        self.pull.setsockopt(zmq.RCVHWM, 1000)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.stats = curve.apply(self.ctx.socket(zmq.PUSH), self.client_opts)
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
            if key == b"server":
                self.static = StaticKeys.from_private(v["private"])
            elif key.startswith(b"peer/"):
                self.peers[v["public"]] = peer_info(v)
            elif key.startswith(b"session/"):
                self.engine.install(v)
            elif key.startswith(b"edge/"):
                self._connect_edge(v)
            elif key.startswith(b"pending/"):
                st = v["state"]
                self.pending[int(v["local_index"])] = InitiatorState(
                    v["peer"], st["psk"], int(v["local_index"]), st["ephemeral"], st["chain_key"],
                    st["hash"], float(st["sent_at"]), st["mac1"],
                )
        except (KeyError, TypeError, ValueError) as exc:
            self.count("bad_update")
            log.warning("ignored malformed update", key=key, error=str(exc))

    def on_delete(self, key: bytes) -> None:
        if key.startswith(b"peer/"):
            from fabric.protocols.wireguard.crypto import key_from_base64

            try:
                self.peers.pop(key_from_base64(key[5:].decode()), None)
            except ValueError:
                pass
        elif key.startswith(b"session/") and key[8:].isdigit():
            self.engine.remove(int(key[8:]))
        elif key.startswith(b"edge/") and key[5:].isdigit():
            self._disconnect_edge(int(key[5:]))
        elif key.startswith(b"pending/") and key[8:].isdigit():
            self.pending.pop(int(key[8:]), None)

    def _connect_edge(self, v: dict[str, Any]) -> None:
        eid = int(v["id"])
        old = self.edges.get(eid)
        if old == v:
            return
        if old is not None:
            self._disconnect_edge(eid)
        work, result = (v.get("work_tcp"), v.get("result_tcp")) if self.remote else (v["work"], v["result"])
        if not work or not result:
            return  # a remote worker can only serve edges that listen on tcp
        v = {**v, "work": work, "result": result}
        self.pull.connect(work)
        push = curve.apply(self.ctx.socket(zmq.PUSH), self.client_opts)
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
        try:
            self.pull.disconnect(v["work"])
        except zmq.ZMQError:
            pass
        sock = self.results.pop(eid, None)
        if sock is not None:
            sock.close(0)
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
            for pkt in frame.packets:
                self.handshake(frame, bytes(pkt), now)
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

    def handshake(self, frame: Frame, pkt: bytes, now: float) -> None:
        if self.static is None:
            self.count("drop_not_ready")
            return
        try:
            kind = message_type(pkt)
        except MessageError as exc:
            self.count("drop_" + exc.reason)
            return
        if kind not in (MSG_INITIATION, MSG_RESPONSE):
            self.count("drop_unexpected_handshake")
            return
        if not check_mac1(self.static.mac1_key, pkt):
            self.count("drop_bad_mac1")
            return
        if kind == MSG_RESPONSE:
            self.handshake_response(frame, pkt, now)
            return
        try:
            init = consume_initiation(self.static, pkt, lambda pub: pub in self.peers)
        except (HandshakeError, MessageError) as exc:
            self.count("drop_" + exc.reason)
            return
        peer = self.peers[init.peer_public]
        for _ in range(3):
            local_index = secrets.randbits(32)
            try:
                response, keys = create_response(self.static, init, peer.psk, local_index, now)
            except HandshakeError as exc:
                self.count("drop_" + exc.reason)
                return
            reply = self._commit({
                "peer": init.peer_public, "timestamp": init.timestamp,
                "local_index": local_index, "remote_index": init.sender_index,
                "send_key": keys.send_key, "recv_key": keys.recv_key, "endpoint": frame.addr,
            })
            if reply is None:
                return
            if reply.get("ok"):
                self._handshake_done(frame, reply["session"], [response])
                return
            if reply.get("reason") != "index_in_use":
                self.count("drop_" + str(reply.get("reason", "refused")))
                return
        self.count("drop_index_in_use")

    def _commit(self, req: dict[str, Any]) -> dict[str, Any] | None:
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

    def initiate(self, frame: Frame, now: float) -> None:
        """Start a handshake to a peer (whitepaper 5.4.2); the fabric is the initiator."""
        try:
            peer_public = msgpack.unpackb(frame.extra or b"", raw=False)["peer"]
            peer = self.peers[peer_public]
        except (KeyError, TypeError, ValueError, msgpack.UnpackException):
            self.count("drop_unknown_peer")
            return
        if self.static is None:
            self.count("drop_not_ready")
            return
        for _ in range(3):
            local_index = secrets.randbits(32)
            msg, st = create_initiation(self.static, peer_public, peer.psk, local_index, now)
            reply = self._commit({
                "role": "pending", "peer": peer_public, "local_index": local_index,
                "state": {"psk": st.preshared_key, "ephemeral": st.ephemeral_private,
                          "chain_key": st.chain_key, "hash": st.hash, "sent_at": st.sent_at,
                          "mac1": st.mac1},
            })
            if reply is None:
                return
            if reply.get("ok"):
                self.pending[local_index] = st
                self.count("initiations")
                self._send(frame.edge, Frame(frames.UDP_SEND, frame.edge, 0, 0, frame.addr, [msg]))
                return
            if reply.get("reason") != "index_in_use":
                self.count("drop_" + str(reply.get("reason", "refused")))
                return

    def handshake_response(self, frame: Frame, pkt: bytes, now: float) -> None:
        """Finish one of the fabric's own initiations (whitepaper 5.4.3)."""
        assert self.static is not None
        (receiver,) = struct.unpack_from("<I", pkt, 8)
        st = self.pending.get(receiver)
        if st is None:
            self.count("drop_unknown_index")
            return
        try:
            keys = consume_response(self.static, st, pkt, now)
        except (HandshakeError, MessageError) as exc:
            self.count("drop_" + exc.reason)
            return
        reply = self._commit({
            "role": "initiator", "peer": st.peer_public, "local_index": keys.local_index,
            "remote_index": keys.remote_index, "send_key": keys.send_key, "recv_key": keys.recv_key,
            "endpoint": frame.addr,
        })
        if reply is None:
            return
        if not reply.get("ok"):
            self.count("drop_" + str(reply.get("reason", "refused")))
            return
        self.pending.pop(receiver, None)
        self._handshake_done(frame, reply["session"], [])

    def _handshake_done(self, frame: Frame, session: dict[str, Any], out: list[bytes]) -> None:
        self.engine.install(session)
        public = {k: v for k, v in session.items() if k not in ("send_key", "recv_key")}
        self.count("handshakes")
        self._send(frame.edge, Frame(
            frames.HANDSHAKE_OUT, frame.edge, int(session["id"]), 0, frame.addr, out,
            extra=msgpack.packb(public, use_bin_type=True),
        ))

    # --- loop -----------------------------------------------------------------------

    def report(self) -> None:
        rep = {
            "role": "worker", "id": self.id, "pid": os.getpid(),
            "counters": {**self.counters, **self.frame_stats.counters()}, "gauges": metrics.worker_gauges(self),
            **({"metrics": self.metrics_addr} if self.metrics_addr else {}),
            "sessions": {sid: {"packets": n} for sid, n in self.session_packets.items()},
        }
        try:
            self.stats.send(msgpack.packb(rep, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def serve(self, stop: list[bool]) -> None:
        self.clone.request_snapshot(time.time())
        next_tick = 0.0
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while not stop[0]:
            self.clone.register(poller)
            ready = dict(poller.poll(200))
            now = time.time()
            self.clone.handle_ready(ready, now)
            if self.pull in ready:
                for _ in range(64):
                    bufs = frames.recv_parts(self.pull)
                    if bufs is None:
                        break
                    t0 = time.perf_counter()
                    self.handle(bufs, now)
                    self.frame_stats.observe(bufs[0], time.perf_counter() - t0)
            if now >= next_tick:
                self.clone.tick(now)
                self.report()
                next_tick = now + 1.0


def run(sd: StateDir, wid: int | None, broker: str | None = None, keys: curve.Curve | None = None,
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
    log.info("worker running", worker=wid)
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
