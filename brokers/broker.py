"""The session broker: authority for peers and sessions (DESIGN.md, "broker").

Sockets (endpoints from fabric.ops.paths.StateDir):
  PUB     key-value updates with sequence numbers and a heartbeat (Clone pattern)
  ROUTER  snapshots on request (ICANHAZ? ... KTHXBAI)
  ROUTER  handshake commits from workers (REQ): the commit's protocol checks it
          (its Authority, fabric/protocols/base.py; WireGuard: a unique receiver
          index, a TAI64N newer than the peer's last, the flood interval:
          fabric/protocols/wireguard/authority.py), then the broker assigns a
          session id (monotonic, persisted) and a session-table slot, keeps at most
          the protocol's number of sessions per peer, publishes and persists.
  PULL    counters from edges and workers, once a second (also announces edges)
  REP     admin requests (`fabric admin`, `fabric peer`)
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import time
from typing import Any

import msgpack
import zmq

from brokers.admin import EDGE_GONE_AFTER, AdminRequests
from brokers.peers import Peer
from brokers.reports import Reports, sanitize_report
from fabric.control import zmqcurve as curve
from fabric.control.kvmsg import HUGZ, ICANHAZ, KTHXBAI, KVMsg
from fabric.control.records import (
    DEFAULT_PROTOCOL,
    SessionRecord,
    edge_key,
    peer_key,
    session_key,
    worker_key,
)
from fabric.dataplane.sessiontable import DEFAULT_SLOTS
from fabric.ops import metrics
from fabric.ops.config import ConfigError, PeerConfig, check_overlaps
from fabric.ops.log import Log
from fabric.ops.paths import StateDir
from fabric.ops.service import stop_on_signals
from fabric.protocols import registry
from fabric.protocols.base import (
    Admit,
    Authority,
    EndSessions,
    NewSession,
    Protocol,
    Publish,
    ServerSetup,
    SetupError,
)

log = Log("broker")

STATE_VERSION = 2  # 1: sessions and peers as WireGuard's maps, TAI64N kept with each peer
READS_VERSIONS = (1, 2)


class Broker:
    def __init__(
        self,
        state_dir: StateDir,
        addresses: list[str],
        listen_port: int,
        endpoint: str | None = None,
        config_peers: list[PeerConfig] | None = None,
        slots: int = DEFAULT_SLOTS,
        tcp: str | None = None,
        protocols: dict[str, Protocol] | None = None,
        ports: dict[str, int] | None = None,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`ports`: the protocols this fabric serves, each on its UDP port (default:
        WireGuard on `listen_port`); `options`: a protocol's own settings by name."""
        self.sd = state_dir
        self.tcp = tcp
        if isinstance(addresses, str):
            addresses = addresses.split(",")
        self.addresses = list(addresses)
        self.interfaces = [ipaddress.ip_interface(a) for a in self.addresses]
        self.listen_port = listen_port
        self.ports = dict(ports) if ports else {DEFAULT_PROTOCOL: listen_port}
        self.endpoint = endpoint
        self.slots = slots
        self.epoch = secrets.randbits(63)
        self.started = time.time()
        self.seq = 0
        self.kv: dict[bytes, dict[str, Any]] = {}
        self.peers: dict[bytes, Peer] = {}
        self.sessions: dict[int, SessionRecord] = {}
        self.protocols = protocols or registry()
        self.authorities: dict[str, Authority] = {n: p.authority() for n, p in self.protocols.items()}
        self.next_sid = 1
        self.edges: dict[int, dict[str, Any]] = {}
        self.workers: dict[int, float] = {}  # worker id -> last report
        self.reports = Reports()
        self.counters: dict[str, int] = {}
        self.metrics_addr: str | None = None  # its own /metrics endpoint (admin status lists all)
        self.admin_requests = AdminRequests(self)
        identities: list[tuple[bytes, dict[str, Any]]] = []
        for name, authority in self.authorities.items():  # e.g. WireGuard's server.key, made on first start
            if name not in self.ports:
                continue  # not served: no identity made
            setup = ServerSetup(self.sd.root, tuple(self.interfaces), self.ports[name], (options or {}).get(name, {}))
            try:
                identities += authority.start(setup)
            except SetupError as exc:
                raise ConfigError(str(exc)) from None
        self._load_state()
        self._merge_config_peers(config_peers or [])
        check_overlaps([(p.name, p.allowed_ips) for p in self.peers.values()])
        self._persist()
        for key, value in identities:
            self._publish(key, value)

    # --- state --------------------------------------------------------------

    def _load_state(self) -> None:
        path = self.sd.broker_state
        if not path.exists():
            self.next_sid = self._sid_floor()
            return
        try:
            data = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
            if data.get("version") not in READS_VERSIONS:
                raise ValueError(f"state version {data.get('version')}")
            peers: dict[bytes, Peer] = {}
            sessions: dict[int, SessionRecord] = {}
            for d in data["peers"]:
                p = Peer.from_state(d)
                peers[p.public] = p
            for d in data["sessions"]:
                rec = SessionRecord.from_wire(d)
                if rec.peer in peers and rec.protocol in self.protocols:
                    sessions[rec.id] = rec
            protocols = data.get("protocols") or {}
            if data.get("version") == 1:  # WireGuard's TAI64N lived with each peer
                protocols = {DEFAULT_PROTOCOL: {"peers": {
                    d["public"]: {"last_timestamp": d.get("last_timestamp"),
                                  "last_initiation": d.get("last_initiation", 0.0)} for d in data["peers"]}}}
            next_sid = int(data["next_sid"])
            # all or nothing: a half-read state would be published half
            self.peers, self.sessions = peers, sessions
            self.next_sid = max(next_sid, self._sid_floor())
            for name, authority in self.authorities.items():
                state = protocols.get(name)
                if isinstance(state, dict):
                    authority.load(state)
        except Exception as exc:
            # Never reuse session ids (and so slot generations): start above any past id.
            bad = path.with_suffix(".corrupt")
            os.replace(path, bad)
            log.error("broker state unreadable, starting empty", error=str(exc), moved_to=bad)
            self.next_sid = self._sid_floor()
            return
        for p in self.peers.values():
            self._publish(peer_key(p.public), p.value())
        for sid, s in self.sessions.items():
            self._publish(session_key(sid), s.to_wire())
        log.info("resumed state", peers=len(self.peers), sessions=len(self.sessions))

    def _merge_config_peers(self, config_peers: list[PeerConfig]) -> None:
        """Persisted peers meet the config file's (docs/architecture.md, "Peers").

        The file is authoritative for what it names: its peers replace persisted ones
        with the same name or key, a runtime peer whose allowed IPs overlap one of
        them is dropped (with a warning), and a peer that came from the file but is
        no longer in it is forgotten. Runtime peers (`fabric peer add`) otherwise
        survive restarts unchanged.
        """
        names = {pc.name for pc in config_peers}
        keys = {pc.public_key for pc in config_peers}
        nets = [(pc.name, ipaddress.ip_network(n)) for pc in config_peers for n in pc.allowed_ips]
        for p in list(self.peers.values()):
            if p.public in keys:
                continue  # replaced below, keeping its handshake timestamp
            if p.source == "config" and p.name not in names:
                self._drop_peer(p)
                log.info("peer no longer in the config file, removed", peer=p.name)
            elif p.name in names:
                self._drop_peer(p)
                log.warning("peer replaced by the config file's peer of the same name", peer=p.name)
            else:
                clash = next((name for name, net in nets for mine in p.allowed_ips
                              if net.version == ipaddress.ip_network(mine).version
                              and net.overlaps(ipaddress.ip_network(mine))), None)
                if clash is not None:
                    self._drop_peer(p)
                    log.warning("runtime peer removed: its allowed IPs overlap a peer of the config file; "
                                "add it again with other addresses", peer=p.name, config_peer=clash)
        for pc in config_peers:
            self._put_peer(Peer(pc.name, pc.public_key, pc.allowed_ips, pc.preshared_key, pc.persistent_keepalive,
                                source="config"), persist=False)

    @staticmethod
    def _sid_floor() -> int:
        # Session ids grow across restarts even if the state file is lost:
        # milliseconds since the epoch, times 4096 ids per millisecond.
        return int(time.time() * 1000) << 12

    def _persist(self) -> None:
        data = {
            "version": STATE_VERSION,
            "peers": [p.to_state() for p in self.peers.values()],
            "sessions": [s.to_wire() for s in self.sessions.values()],
            "next_sid": self.next_sid,
            "protocols": {name: a.state() for name, a in self.authorities.items()},
        }
        path = self.sd.broker_state
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgpack.packb(data, use_bin_type=True))
        os.replace(tmp, path)

    # --- publishing (Clone pattern) ----------------------------------------

    def _publish(self, key: bytes, value: dict[str, Any] | None) -> None:
        self.seq += 1
        if value is None:
            self.kv.pop(key, None)
        else:
            self.kv[key] = value
        if hasattr(self, "pub"):
            try:
                KVMsg(key, self.seq, self.epoch, value).send(self.pub)
            except zmq.Again:
                self.count("pub_dropped")

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _put_peer(self, peer: Peer, persist: bool = True) -> None:
        if peer.protocol not in self.protocols:
            raise ConfigError(f"peer {peer.name}: unknown protocol {peer.protocol!r}")
        self.peers[peer.public] = peer
        self._publish(peer_key(peer.public), peer.value())
        if persist:
            self._persist()

    def _drop_peer(self, peer: Peer) -> None:
        """Forget a peer with its sessions and pending handshakes (published). The peer's
        record goes first: a process that sees the sessions end then knows why (an
        OpenVPN worker tells the client HALT, not RESTART)."""
        del self.peers[peer.public]
        self._publish(peer_key(peer.public), None)
        for sid in [sid for sid, s in self.sessions.items() if s.peer == peer.public]:
            self._delete_session(sid)
        for authority in self.authorities.values():
            for key, value in authority.forget_peer(peer.public):
                self._publish(key, value)

    def _delete_session(self, sid: int) -> None:
        if self.sessions.pop(sid, None) is not None:
            self._publish(session_key(sid), None)

    def pending_count(self) -> int:
        return sum(a.pending_count() for a in self.authorities.values())

    # --- handshake commits --------------------------------------------------

    def commit(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        """A worker's commit, checked by its protocol's Authority."""
        name = req.get("protocol", DEFAULT_PROTOCOL)
        authority = self.authorities.get(name) if isinstance(name, str) else None
        if authority is None:
            return {"ok": False, "reason": "unknown_protocol"}
        pub = req.get("peer")
        peer = self.peers.get(pub) if isinstance(pub, bytes) else None
        if req.get("admit") is True:
            return self._admit(name, authority, peer, req, now)
        if peer is None or peer.protocol != name:
            return {"ok": False, "reason": "unknown_peer"}
        verdict = authority.commit(req, peer.record(), self.sessions.values(), now)
        if isinstance(verdict, str):
            return {"ok": False, "reason": verdict}
        if isinstance(verdict, Publish):
            self._publish(verdict.key, verdict.value)
            if verdict.event:
                self.count(verdict.event)
            return {"ok": True}
        if isinstance(verdict, EndSessions):
            ended = [sid for sid in verdict.ids if self.sessions.get(sid) is not None
                     and self.sessions[sid].peer == peer.public]
            for sid in ended:
                self._delete_session(sid)
            if ended:
                self.count(verdict.event, len(ended))
                self._persist()
                log.info("sessions ended", peer=peer.name, sessions=",".join(map(str, ended)))
            return {"ok": True, "ended": ended}
        if verdict.unpublish is not None:
            self._publish(verdict.unpublish, None)
        reply = self._new_session(peer, verdict, now)
        if reply.get("ok"):
            if verdict.on_commit is not None:
                verdict.on_commit()
            self._persist()
        return reply

    def _admit(self, protocol: str, authority: Authority, peer: Peer | None, req: dict[str, Any],
               now: float) -> dict[str, Any]:
        """A worker asks for the peer its handshake named (Authority.admit): the peer as it
        is, or added now with the next free tunnel address(es); the reply carries it."""
        if peer is not None:
            if peer.protocol != protocol:
                return {"ok": False, "reason": "unknown_peer"}
            return {"ok": True, "peer": peer.value()}
        verdict = authority.admit(req, now)
        if isinstance(verdict, str):
            self.count("admit_refused")
            return {"ok": False, "reason": verdict}
        assert isinstance(verdict, Admit)
        if verdict.public != req.get("peer") or len(verdict.public) != 32:
            return {"ok": False, "reason": "bad_request"}
        try:
            ips = self.admin_requests._next_free_ips()
        except ValueError:
            self.count("admit_no_address")
            return {"ok": False, "reason": "no_free_address"}
        names = {p.name for p in self.peers.values()}
        name = verdict.name[:64]
        for n in range(2, 2 + len(names) + 1):  # bounded: one of these is free
            if name not in names:
                break
            tail = f"~{n}"
            name = verdict.name[:64 - len(tail)] + tail
        new = Peer(name, verdict.public, ips, protocol=protocol)
        self._put_peer(new)
        self.count(verdict.event)
        log.info("peer enrolled", peer=name, protocol=protocol, allowed_ips=",".join(ips))
        return {"ok": True, "peer": new.value()}

    def _new_session(self, peer: Peer, new: NewSession, now: float) -> dict[str, Any]:
        proto = self.protocols[peer.protocol]
        for sid in [sid for sid, s in self.sessions.items()  # a data key names one session
                    if (s.protocol == peer.protocol and s.data_key == new.data_key)
                    or (sid in new.ends and s.peer == peer.public)]:
            self._delete_session(sid)
        used = {s.slot for s in self.sessions.values()}
        mine = sorted((s.created, sid) for sid, s in self.sessions.items() if s.peer == peer.public)
        while len(mine) >= proto.max_sessions_per_peer:
            _, old = mine.pop(0)
            used.discard(self.sessions[old].slot)
            self._delete_session(old)
        slot = next((i for i in range(1, self.slots) if i not in used), None)
        if slot is None:
            return {"ok": False, "reason": "table_full"}
        sid = self.next_sid
        self.next_sid += 1
        endpoint = new.endpoint if len(new.endpoint) == 18 else bytes(18)
        session = SessionRecord(sid, slot, peer.public, peer.protocol, new.data_key, now, new.initiator,
                                endpoint, new.params, new.keys)
        self.sessions[sid] = session
        wire = session.to_wire()
        self._publish(session_key(sid), wire)
        self.count("handshakes")
        log.info("session committed", peer=peer.name, session=sid, slot=slot, initiator=new.initiator,
                 protocol=peer.protocol)
        return {"ok": True, "session": wire}

    def admin(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        """An admin request (brokers/admin.py); always a reply."""
        return self.admin_requests.handle(req, now)

    def _peer_totals(self) -> dict[bytes, list[int]]:
        return self.admin_requests._peer_totals()

    # --- stats and edge registry -------------------------------------------

    def on_report(self, report: dict[str, Any], now: float) -> None:
        clean = sanitize_report(report)
        if clean is None:
            self.count("bad_report")
            return
        report = clean
        role, rid = report["role"], report["id"]
        self.reports.add(report, now)
        for sid in report["ended"]:
            self._end(sid, "goodbye in the data")
        if role == "edge":
            value = {"id": rid, "work": report.get("work", ""), "result": report.get("result", ""),
                     **{k: report[k] for k in ("work_tcp", "result_tcp", "control", "control_tcp")
                        if report.get(k)}}
            self.edges[rid] = {"seen": now, **value}
            if self.kv.get(edge_key(rid)) != value:
                self._publish(edge_key(rid), value)
        else:  # a worker: edges pick one among those listed for a protocol's affinity
            self.workers[rid] = now
            if worker_key(rid) not in self.kv:
                self._publish(worker_key(rid), {"id": rid})

    def _end(self, sid: int, why: str) -> None:
        """A peer said goodbye on session `sid`: end it and what its protocol ends with it."""
        record = self.sessions.get(sid)
        if record is None:
            return
        ids = self.authorities[record.protocol].ended(record, self.sessions.values())
        ended = [i for i in ids if i in self.sessions and self.sessions[i].peer == record.peer]
        for i in ended:
            self._delete_session(i)
        if ended:
            self.count("sessions_ended", len(ended))
            self._persist()
            peer = self.peers.get(record.peer)
            log.info("sessions ended", peer=peer.name if peer else "?", sessions=",".join(map(str, ended)),
                     reason=why)

    def _end_silent(self, now: float) -> None:
        """Peers whose protocol has a silence limit (OpenVPN's ping-restart) and whose
        sessions received nothing that long, on any edge: their sessions end."""
        limits = {name: a.silence_limit() for name, a in self.authorities.items()}
        if not any(limits.values()):
            return
        last_rx: dict[int, float] = {}
        for _, r in self.reports.latest.values():
            for sid, info in r.get("sessions", {}).items():
                last_rx[sid] = max(last_rx.get(sid, 0.0), info.get("last_rx", 0.0))
        newest: dict[bytes, float] = {}
        for sid, s in self.sessions.items():
            if limits.get(s.protocol):
                newest[s.peer] = max(newest.get(s.peer, 0.0), s.created, last_rx.get(sid, 0.0))
        for pub, seen in newest.items():
            peer = self.peers.get(pub)
            limit = limits.get(peer.protocol) if peer else None
            if peer is None or not limit or now - seen <= limit:
                continue
            gone = [sid for sid, s in self.sessions.items() if s.peer == pub]
            for sid in gone:
                self._delete_session(sid)
            self.count("sessions_silent", len(gone))
            self._persist()
            log.info("sessions ended", peer=peer.name, sessions=",".join(map(str, gone)),
                     reason=f"nothing received for {limit:g}s")

    def tick(self, now: float) -> None:
        self._end_silent(now)
        changed = False
        for sid, s in list(self.sessions.items()):
            if now > self.protocols[s.protocol].forget_at(s):  # WireGuard 6.3: keys erased
                self._delete_session(sid)
                changed = True
        if changed:
            self._persist()
        for authority in self.authorities.values():
            for key, value in authority.tick(now):
                self._publish(key, value)
        for rid, seen in list(self.workers.items()):
            if now - seen > EDGE_GONE_AFTER:
                del self.workers[rid]
                self._publish(worker_key(rid), None)
        for rid, e in list(self.edges.items()):
            if now - e["seen"] > EDGE_GONE_AFTER:
                del self.edges[rid]
                self._publish(edge_key(rid), None)
                log.info("edge gone", edge=rid)
        try:
            KVMsg(HUGZ, self.seq, self.epoch).send(self.pub)
        except zmq.Again:
            pass
        auth = getattr(self, "auth", None)
        if auth is not None:
            auth.tick(now)

    # --- sockets ----------------------------------------------------------------

    def bind(self, ctx: zmq.Context) -> None:
        """Bind every socket on ipc (and on tcp HOST:PORT..PORT+4 with --tcp).

        With CURVE keys in the state dir every socket is a CURVE server and a ZAP
        handler admits only authorized keys (invariant 6); tcp requires it.
        """
        self.ctx = ctx
        self.curve = curve.local(self.sd)
        if self.tcp and self.curve is None:
            raise RuntimeError(
                f"tcp endpoints need CURVE: run `fabric keys init --state-dir {self.sd.root}` first"
            )
        self.auth = curve.Authenticator(ctx, self.sd) if self.curve else None
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100000)
        self.snap = ctx.socket(zmq.ROUTER)
        self.commits = ctx.socket(zmq.ROUTER)
        self.stats = ctx.socket(zmq.PULL)
        self.adm = ctx.socket(zmq.REP)
        tcp = curve.tcp_endpoints(self.tcp, 5) if self.tcp else [None] * 5
        for (sock, ep), tcp_ep in zip((
            (self.pub, self.sd.broker_pub),
            (self.snap, self.sd.broker_snapshot),
            (self.commits, self.sd.broker_commit),
            (self.stats, self.sd.broker_stats),
            (self.adm, self.sd.admin),
        ), tcp, strict=True):
            sock.setsockopt(zmq.LINGER, 0)
            curve.apply(sock, self.curve.server if self.curve else None)
            sock.bind(ep)
            if tcp_ep:
                try:
                    sock.bind(tcp_ep)
                except zmq.ZMQError as exc:
                    raise RuntimeError(f"cannot bind {tcp_ep}: {exc} (pick another --tcp port)") from None

    def _serve_snapshot(self) -> None:
        parts = self.snap.recv_multipart(zmq.NOBLOCK)
        if len(parts) < 2 or parts[1] != ICANHAZ:
            self.count("bad_snapshot_request")
            return
        ident = parts[0]
        for key, value in self.kv.items():
            KVMsg(key, self.seq, self.epoch, value).send(self.snap, ident)
        KVMsg(KTHXBAI, self.seq, self.epoch).send(self.snap, ident)

    def _serve_commit(self, now: float) -> None:
        parts = self.commits.recv_multipart(zmq.NOBLOCK)
        if len(parts) != 3 or parts[1] != b"":
            self.count("bad_commit_frame")
            return
        try:
            req = msgpack.unpackb(parts[2], raw=False, strict_map_key=False)
            reply = self.commit(req, now) if isinstance(req, dict) else {"ok": False, "reason": "bad_request"}
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            self.count("bad_commit")
            reply = {"ok": False, "reason": "bad_request", "error": str(exc)}
        self.commits.send_multipart([parts[0], b"", msgpack.packb(reply, use_bin_type=True)])

    def _serve_admin(self, now: float) -> None:
        raw = self.adm.recv(zmq.NOBLOCK)
        try:
            req = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            reply = self.admin(req, now) if isinstance(req, dict) else {"ok": False, "error": "request must be a map"}
        except Exception as exc:  # the admin socket must always answer
            self.count("bad_admin")
            reply = {"ok": False, "error": f"malformed request: {exc}"}
        self.adm.send(msgpack.packb(reply, use_bin_type=True))

    def _drain_stats(self, now: float) -> None:
        for _ in range(1000):
            try:
                raw = self.stats.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                rep = msgpack.unpackb(raw, raw=False, strict_map_key=False)
                if not isinstance(rep, dict):
                    raise ValueError("not a map")
            except Exception:
                self.count("bad_report")
                continue
            self.on_report(rep, now)  # never raises: sanitize_report vets everything

    def serve(self, stop: list[bool]) -> None:
        poller = zmq.Poller()
        for s in (self.snap, self.commits, self.stats, self.adm):
            poller.register(s, zmq.POLLIN)
        next_tick = 0.0
        while not stop[0]:
            ready = dict(poller.poll(250))
            now = time.time()
            try:
                if self.snap in ready:
                    self._serve_snapshot()
                if self.commits in ready:
                    self._serve_commit(now)
                if self.stats in ready:
                    self._drain_stats(now)
                if self.adm in ready:
                    self._serve_admin(now)
            except zmq.Again:
                pass
            if now >= next_tick:
                self.tick(now)
                next_tick = now + 1.0


def run(state_dir: StateDir, addresses: list[str], listen_port: int, endpoint: str | None,
        config_peers: list[PeerConfig], tcp: str | None = None, metrics_addr: str | None = None,
        ports: dict[str, int] | None = None, options: dict[str, dict[str, Any]] | None = None) -> int:
    state_dir.ensure()
    lock = state_dir.lock("broker")
    exporter = metrics.start(metrics_addr, "broker", 0)
    broker = Broker(state_dir, addresses, listen_port, endpoint, config_peers, tcp=tcp, ports=ports, options=options)
    if exporter is not None:
        broker.metrics_addr = exporter.address
        exporter.source = lambda f: metrics.broker_metrics(f, broker, EDGE_GONE_AFTER)
    ctx = zmq.Context()
    try:
        broker.bind(ctx)
    except BaseException:
        ctx.destroy(0)
        os.close(lock)
        raise
    stop = stop_on_signals()
    log.info("broker running", state_dir=state_dir.root, peers=len(broker.peers))
    try:
        broker.serve(stop)
    finally:
        if broker.auth is not None:
            broker.auth.stop()
        ctx.destroy(0)
        os.close(lock)
    return 0
