"""The edge (DESIGN.md, "edge"): a UDP socket per wire protocol and one TUN queue.

Every edge of a host binds the same ports with SO_REUSEPORT and opens a queue of
the same multiqueue TUN device; what is protocol-specific it asks the socket's
protocol (fabric/protocols/base.py). The pipeline, in the order of this file:

Receive path (UDP -> TUN), per socket:
  1. read a batch of datagrams; the protocol splits them by header
     (EdgeSide.split): data grouped by (session key, source) with their counters,
     control datagrams set aside, the rest counted as drops;
  2. data: session key -> session; drop expired sessions; drop the counters the
     shared replay window has surely seen (one read of the window per group);
  3. open the AEAD of each group here, or PUSH the group as one frame to any
     worker (the crypto placement, fabric/dataplane/placement.py); control
     datagrams, after the data: the protocol's verdict on each (EdgeSide.control),
     to a worker (one frame per source), a reply from this socket, or a drop;
  4. on the result, commit the counters to the shared window under the slot
     lock (replays dropped here, after the tag verified), then write to TUN.
Send path (TUN -> UDP):
  1. read a batch of IP packets; route by allowed IPs to a peer and its newest
     confirmed, unexpired session; with none, stage a few packets and ask a
     worker to initiate a handshake to the peer's last endpoint (at most once per
     the protocol's retry interval), and send them when the session arrives;
  2. reserve a run of send counters per session under the slot lock (one lock
     per session per batch);
  3. seal here or PUSH to any worker (as in 3. above); on the result, send the
     datagrams to the peer's current endpoint from its protocol's socket.
After a pass that received a burst and read little from the TUN, wait a moment
before polling again so the next batch is bigger (receive moderation,
fabric/dataplane/moderation.py).
Timers, once a second: keepalives and handshakes for data gone unanswered, as
each protocol's policy says (EdgeSide.keepalive, unanswered_after).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

import msgpack
import zmq

from fabric.control import frames, zmqcurve, zpoll
from fabric.control.clone import CloneClient
from fabric.control.frames import MAX_DATAGRAM, NO_ADDR, Frame, FrameError
from fabric.control.records import (
    EDGE,
    PEER,
    SESSION,
    WORKER,
    PeerRecord,
    RecordError,
    SessionRecord,
    key_id,
    key_public,
    worker_identity,
)
from fabric.dataplane import aead, ippacket, moderation, segment, sockfilter, tun, udp
from fabric.dataplane.engine import CryptoEngine
from fabric.dataplane.gro import VNET_HDR_LEN
from fabric.dataplane.placement import CryptoPlacement, HostIdle
from fabric.dataplane.reorder import ReorderBuffer
from fabric.dataplane.sessiontable import SessionTable
from fabric.ops import metrics
from fabric.ops.log import Log
from fabric.ops.paths import StateDir
from fabric.ops.service import stop_on_signals
from fabric.protocols import registry
from fabric.protocols.base import FORWARD, EdgeSide, Forward, Protocol, Reply

log = Log("edge")

BATCH = 64  # TUN reads and result frames per pass
RECEIVE_MAX = 256  # datagrams per pass (UDP GRO may bring runs of them)
VNET_MAX = MAX_DATAGRAM + VNET_HDR_LEN
REORDER_TIMEOUT = 0.05  # a result missing this long is given up (its worker died)


class EdgeIO(TypingProtocol):
    """Where an edge's sockets and TUN queue come from: the kernel (KernelIO), or
    in-memory fakes in tests (fabric/testbed/fakes.py)."""

    def ensure_tun(self, name: str, address: list[str] | None) -> None: ...

    def open_tun_queue(self, name: str) -> int: ...

    def open_udp(self, listen: str, port: int, reuseport: bool) -> Any: ...


class KernelIO:
    """A multiqueue TUN device and SO_REUSEPORT UDP sockets."""

    def ensure_tun(self, name: str, address: list[str] | None) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            exists = bool(ipr.link_lookup(ifname=name))
        try:
            if not exists:
                tun.create(name, address)
            elif address:
                tun.configure(name, address)
        except Exception as exc:  # another edge raced us to the same address: fine
            if "exists" not in str(exc).lower():
                raise

    def open_tun_queue(self, name: str) -> int:
        fd = tun.open_queue(name)
        tun.enable_offload(fd)
        return fd

    def open_udp(self, listen: str, port: int, reuseport: bool) -> Any:
        return udp.open_udp(listen, port, reuseport)


@dataclass
class EdgeSession:
    sid: int
    slot: int
    peer: bytes
    record: SessionRecord  # the public copy
    listener: Listener
    expires: float  # the protocol's end of its life: it neither sends nor receives after


@dataclass
class EdgePeer:
    record: PeerRecord
    sessions: list[int] = field(default_factory=list)  # newest first
    stats: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # rx/tx bytes, rx/tx packets
    endpoint: bytes = NO_ADDR  # last known, to initiate handshakes to
    staged: list[bytes] = field(default_factory=list)
    last_initiation: float = 0.0

    @property
    def public(self) -> bytes:
        return self.record.public


@dataclass
class Listener:
    """One protocol's UDP socket at this edge, and what its datagrams name."""

    protocol: Protocol
    side: EdgeSide
    port: int
    sock: Any = None
    v6: bool = False
    gso: bool = False
    gro: bool = False
    filter_on: bool = False
    filter_dirty: bool = True  # sessions changed since the filter was built
    by_key: dict[int, int] = field(default_factory=dict)  # data key -> session id

    def fileno(self) -> int:
        return int(self.sock.fileno())


class Edge:
    def __init__(
        self,
        sd: StateDir,
        eid: int,
        *,
        listen: str = "::",
        port: int = 51820,
        tun_name: str = "fabric0",
        address: list[str] | None = None,
        reuseport: bool = True,
        ctx: zmq.Context | None = None,
        tcp: str | None = None,
        crypto: str = "auto",
        rx_usecs: int = moderation.DEFAULT_USECS,
        protocols: dict[str, Protocol] | None = None,
        ports: dict[str, int] | None = None,
        io: EdgeIO | None = None,
    ) -> None:
        """`protocols` (default: every protocol fabric speaks) by name, each on
        `ports[name]` (default: WireGuard on `port`); `io`: the kernel by default;
        `rx_usecs`: receive moderation (fabric/dataplane/moderation.py, 0: off)."""
        self.sd = sd
        self.id = eid
        self.ctx = ctx or zmq.Context()
        self.io: EdgeIO = io or KernelIO()
        self.protocols = protocols or registry()
        ports = ports or {"wireguard": port}
        # The UDP sockets and the TUN queue are opened by attach(), once the first
        # snapshot is installed: a socket joining the SO_REUSEPORT group (and a
        # queue joining the TUN) takes its share of flows at once, and without
        # sessions it could only drop them (unknown index, no route).
        self.listen, self.reuseport = listen, reuseport
        self.table = SessionTable(sd.session_table)
        self.counters: dict[str, int] = defaultdict(int)
        shared = (self.table.under_load_until, self.table.set_under_load_until)
        self.listeners: dict[str, Listener] = {}
        for name, proto in self.protocols.items():
            if name in ports:
                p = ports[name] if reuseport else ports[name] + eid
                self.listeners[name] = Listener(proto, proto.edge(self._count, shared), p)
        self.port = next(iter(self.listeners.values())).port if self.listeners else port
        self.tun_name = tun_name
        self.io.ensure_tun(tun_name, address)
        self.tun_fd = -1
        self.attached = False
        self.sessions: dict[int, EdgeSession] = {}
        self.peers: dict[bytes, EdgePeer] = {}
        self.routes: ippacket.PrefixTable[bytes] = ippacket.PrefixTable()
        # the socket filter (e.g. fabric/protocols/wireguard/guard.py, "the kernel's share");
        # FABRIC_NO_SOCKET_FILTER=1 leaves every datagram to userspace (for comparisons)
        self.filter_wanted = os.environ.get("FABRIC_NO_SOCKET_FILTER") != "1"
        self._reported_load = False
        self.session_packets: dict[int, int] = defaultdict(int)
        self.order: ReorderBuffer[Frame] = ReorderBuffer(REORDER_TIMEOUT)
        # the AEAD of data frames runs here or in workers (fabric/dataplane/engine.py)
        self.engine = CryptoEngine(self._count, self.protocols, gro=os.environ.get("FABRIC_NO_GRO") != "1")
        self.placement = CryptoPlacement(crypto, HostIdle(_usable_cpus()))
        self.moderation = moderation.Moderation(rx_usecs)
        self._addr_cache: dict[Any, bytes] = {}
        self._sa_cache: dict[tuple[bool, bytes], Any] = {}
        self.metrics_addr: str | None = None  # its /metrics endpoint, announced in reports
        self.curve = zmqcurve.local(sd)
        if tcp and self.curve is None:
            raise RuntimeError(f"tcp endpoints need CURVE: run `fabric keys init --state-dir {sd.root}` first")
        self.auth = zmqcurve.Authenticator(self.ctx, sd) if self.curve else None
        server_opts = self.curve.server if self.curve else None
        client_opts = self.curve.client if self.curve else None
        self.tcp = zmqcurve.tcp_endpoints(tcp, 3) if tcp else []
        self.work = self.ctx.socket(zmq.PUSH)
        zmqcurve.apply(self.work, server_opts)
        self.work.setsockopt(zmq.SNDHWM, 1000)
        self.work.setsockopt(zmq.LINGER, 0)
        self.work.setsockopt(zmq.IMMEDIATE, 1)
        self.work.bind(sd.edge_work(eid))
        self.result = self.ctx.socket(zmq.PULL)
        zmqcurve.apply(self.result, server_opts)
        self.result.setsockopt(zmq.RCVHWM, 1000)
        self.result.setsockopt(zmq.LINGER, 0)
        self.result.bind(sd.edge_result(eid))
        # control datagrams for one worker in particular (Forward: a protocol's affinity)
        self.control = self.ctx.socket(zmq.ROUTER)
        zmqcurve.apply(self.control, server_opts)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.SNDHWM, 1000)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(sd.edge_control(eid))
        self.workers: set[int] = set()  # the workers the broker lists (worker/<id>)
        for sock, ep in zip((self.work, self.result, self.control), self.tcp, strict=False):
            try:
                sock.bind(ep)
            except zmq.ZMQError as exc:
                raise RuntimeError(f"cannot bind {ep}: {exc} (pick another --tcp port)") from None
        self.stats = self.ctx.socket(zmq.PUSH)
        zmqcurve.apply(self.stats, client_opts)
        self.stats.setsockopt(zmq.SNDHWM, 10)
        self.stats.setsockopt(zmq.LINGER, 0)
        self.stats.connect(sd.broker_stats)
        self.clone = CloneClient(self.ctx, sd.broker_pub, sd.broker_snapshot, self.on_set, self.on_delete,
                                 curve=client_opts)

    def drop(self, reason: str, n: int = 1) -> None:
        self.counters["drop_" + reason] += n

    def _count(self, name: str, n: int) -> None:
        self.counters[name] += n

    @property
    def sock(self) -> Any:
        """The first protocol's socket (WireGuard's), None until attached."""
        first = next(iter(self.listeners.values()), None)
        return first.sock if first is not None else None

    # --- state from the broker --------------------------------------------------

    def on_set(self, key: bytes, v: dict[str, Any]) -> None:
        try:
            if key.startswith(PEER):
                self._set_peer(PeerRecord.from_wire(v))
            elif key.startswith(SESSION):
                record = SessionRecord.from_wire(v)
                # keys for inline crypto (the public copy has none) before install_session
                # sends the packets staged for this session
                self.engine.install(record)
                self.install_session(record)
                if record.id not in self.sessions:  # refused (stale): keep no keys
                    self.engine.remove(record.id)
            elif key.startswith(WORKER):
                wid = key_id(key, WORKER)
                if wid is not None:
                    self.workers.add(wid)
            elif not key.startswith(EDGE):
                for lst in self.listeners.values():
                    lst.side.on_record(key, v)
        except (RecordError, KeyError, TypeError, ValueError) as exc:
            self.counters["bad_update"] += 1
            log.warning("ignored malformed update", key=key, error=str(exc))

    def _set_peer(self, record: PeerRecord) -> None:
        pub = record.public
        old = self.peers.get(pub)
        peer = EdgePeer(record)
        if old is not None:
            peer.stats, peer.endpoint, peer.staged = old.stats, old.endpoint, old.staged
        self.peers[pub] = peer
        peer.sessions = sorted(
            (sid for sid, s in self.sessions.items() if s.peer == pub),
            key=lambda i: -self.sessions[i].record.created,
        )
        self.engine.set_peer(record)
        self.routes.remove_value(pub)
        for net in record.allowed_ips:
            self.routes.add(net, pub)

    def on_delete(self, key: bytes) -> None:
        sid = key_id(key, SESSION)
        if sid is not None:
            self._remove_session(sid)
            return
        wid = key_id(key, WORKER)
        if wid is not None:
            self.workers.discard(wid)
            return
        pub = key_public(key)
        if pub is not None:
            peer = self.peers.pop(pub, None)
            self.engine.remove_peer(pub)
            self.routes.remove_value(pub)
            if peer:
                for s in list(peer.sessions):
                    self._remove_session(s)

    def install_session(self, record: SessionRecord) -> None:
        sid = record.id
        if sid in self.sessions:
            return
        lst = self.listeners.get(record.protocol)
        if lst is None:
            self.counters["drop_unknown_protocol"] += 1
            return
        endpoint = record.endpoint
        if not self.table.claim(record.slot, sid, record.created, endpoint, confirmed=record.initiator,
                                first=lst.protocol.counters.first):
            self.counters["stale_session"] += 1
            return
        s = EdgeSession(sid, record.slot, record.peer, record.public(), lst,
                        lst.protocol.expires(record))
        self.sessions[sid] = s
        lst.by_key[record.data_key] = sid
        lst.filter_dirty = True
        lst.side.on_session(s.record)
        peer = self.peers.get(s.peer)
        if peer is not None:
            peer.sessions.append(sid)
            peer.sessions.sort(key=lambda i: -self.sessions[i].record.created)
            if endpoint != NO_ADDR:
                peer.endpoint = endpoint
            if peer.staged:
                now = time.time()
                staged, peer.staged = peer.staged, []
                sending = self.sending_session(peer.public, now)
                if sending is not None:
                    self._encrypt(sending, staged, now)

    def _remove_session(self, sid: int) -> None:
        self.engine.remove(sid)
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        s.listener.side.on_session_gone(sid)
        by_key = s.listener.by_key
        if by_key.get(s.record.data_key) == sid:
            del by_key[s.record.data_key]
            s.listener.filter_dirty = True
        peer = self.peers.get(s.peer)
        if peer is not None and sid in peer.sessions:
            peer.sessions.remove(sid)
        self.session_packets.pop(sid, None)

    # --- addresses ------------------------------------------------------------------

    def _addr(self, sa: Any) -> bytes:
        a = self._addr_cache.get(sa)
        if a is None:
            a = frames.pack_addr(sa[0], sa[1])
            if len(self._addr_cache) > 65536:
                self._addr_cache.clear()
            self._addr_cache[sa] = a
        return a

    def _sockaddr(self, v6: bool, addr: bytes) -> Any:
        sa = self._sa_cache.get((v6, addr))
        if sa is None:
            host, port = frames.unpack_addr(addr)
            if v6:
                if ":" not in host:
                    host = "::ffff:" + host
                sa = (host, port, 0, 0)
            elif ":" in host:
                return None
            else:
                sa = (host, port)
            if len(self._sa_cache) > 65536:
                self._sa_cache.clear()
            self._sa_cache[(v6, addr)] = sa
        return sa

    # --- receive path -----------------------------------------------------------------

    def under_load(self, now: float) -> bool:
        return any(lst.side.under_load(now) for lst in self.listeners.values())

    def _receive(self, lst: Listener) -> tuple[list[bytes], list[Any]]:
        """Up to RECEIVE_MAX datagrams and their sources (fabric/dataplane/udp.py: with
        UDP GRO one receive may bring a run of datagrams of one source)."""
        try:
            datagrams, sources, runs = udp.receive(lst.sock, RECEIVE_MAX, lst.gro)
        except OSError:
            self.counters["udp_errors"] += 1
            return [], []
        if runs:
            self.counters["gro_receives"] += runs
        return datagrams, sources

    def on_udp(self, lst: Listener, now: float) -> int:
        """One batch from `lst`'s socket; returns the bytes received."""
        datagrams, sources = self._receive(lst)
        if not datagrams:
            return 0
        self.counters["udp_in"] += len(datagrams)
        side = lst.side
        split = side.split(datagrams, sources, lst.filter_on)  # 1.
        counters = self.counters
        for reason, n in split.drops.items():
            counters["drop_" + reason] += n
        by_key, sessions, table = lst.by_key, self.sessions, self.table
        limit, window = lst.protocol.counters.limit, lst.protocol.counters.window
        for (key, sa), (pkts, ctrs) in split.groups.items():  # 2.
            sid = by_key.get(key)
            if sid is None:
                counters["drop_unknown_index"] += len(pkts)
                continue
            s = sessions[sid]
            if now > s.expires:  # WireGuard: REJECT_AFTER_TIME (whitepaper 6.1)
                counters["drop_expired"] += len(pkts)
                continue
            # a cheap filter before the AEAD: counters the shared window surely saw
            # (the window itself is updated after the tag verified: commit_rx)
            old = table.seen_many(s.slot, sid, ctrs, limit, window)
            if any(old):
                pkts = [p for p, replayed in zip(pkts, old, strict=True) if not replayed]
                counters["drop_replay"] += len(ctrs) - len(pkts)
                if not pkts:
                    continue
            self._crypt(Frame(frames.DECRYPT, self.id, sid, 0, self._addr(sa), pkts), now)  # 3.
        if split.control:
            side.begin(now)
            forward: dict[bytes, list[bytes]] = defaultdict(list)
            for data, sa in split.control:
                addr = self._addr(sa)
                verdict = side.control(data, addr, now)
                if verdict is FORWARD:
                    forward[addr].append(data)
                elif isinstance(verdict, Forward):
                    self._push_to(verdict.affinity, Frame(frames.HANDSHAKE, self.id, 0, 0, addr, [data],
                                                          proto=lst.protocol.number))
                elif isinstance(verdict, Reply):
                    try:
                        lst.sock.sendto(verdict.datagram, sa)
                        counters[verdict.event] += 1
                    except OSError:
                        self.drop("udp_send")
                else:
                    counters["drop_" + verdict] += 1
            for addr, pkts in forward.items():
                self._push(Frame(frames.HANDSHAKE, self.id, 0, 0, addr, pkts, proto=lst.protocol.number))
        return sum(map(len, datagrams))

    def _crypt(self, frame: Frame, now: float) -> None:
        """Run a DECRYPT/ENCRYPT frame here (inline) or push it to a worker, as the
        placement says (fabric/dataplane/placement.py); inline also when no worker takes it."""
        here = frame.session_id in self.engine.sessions  # the keys came with the session
        if not here or not self.placement.inline:
            if self._push(frame, fallback=here) or not here:
                return
        engine = self.engine
        result = engine.decrypt(frame, now) if frame.kind == frames.DECRYPT else engine.encrypt(frame, now)
        self.counters["frames_inline"] += 1
        self.counters["packets_inline"] += len(frame.packets)
        if result is None:
            return
        if self.order.inflight:
            # results of frames pushed earlier are still out: this one waits its turn
            seq = self.order.reserve()
            if seq:
                self.order.sent(seq, now)
                result.seq = seq
                self.order.arrived(seq, result)
                self._release(now)
                return
        self._deliver(result, now)

    def _push(self, frame: Frame, fallback: bool = False) -> bool:
        """PUSH to any worker; False if none takes it (a drop, unless the caller has
        a `fallback`)."""
        if frame.kind in (frames.ENCRYPT, frames.DECRYPT):
            frame.seq = self.order.reserve()  # results come back in this order
        try:
            frames.send_parts(self.work, frame.encode())
        except zmq.Again:
            if not fallback:
                self.drop("no_worker", len(frame.packets))
            return False
        self.order.sent(frame.seq, time.time())
        self.counters["frames_pushed"] += 1  # with packets_pushed: the batch size
        self.counters["packets_pushed"] += len(frame.packets)
        return True

    def worker_for(self, affinity: bytes) -> int | None:
        """The worker `affinity` picks: the same on every edge that lists the same workers
        (rendezvous hashing: a worker joining or leaving moves only its own share)."""
        if not self.workers:
            return None
        return max(self.workers, key=lambda w: hashlib.blake2s(affinity + b"%d" % w, digest_size=8).digest())

    def _push_to(self, affinity: bytes, frame: Frame) -> None:
        """Send a control frame to the worker its affinity picks; to any worker if that
        one is not connected to this edge (its state is lost then: the peer retries)."""
        wid = self.worker_for(affinity)
        if wid is not None:
            try:
                self.control.send(worker_identity(wid), zmq.NOBLOCK | zmq.SNDMORE)
                frames.send_parts(self.control, frame.encode())
                self.counters["frames_affine"] += 1
                return
            except zmq.ZMQError:  # EHOSTUNREACH (ROUTER_MANDATORY) or a full queue
                self.counters["affine_worker_unreachable"] += 1
        self._push(frame)

    # --- send path ------------------------------------------------------------------

    def sending_session(self, pub: bytes, now: float, sending: bool = True) -> EdgeSession | None:
        """The newest confirmed, unexpired session of a peer (WireGuard: whitepaper
        5.4.5, 6.1). When `sending`, the protocol may ask for a new handshake
        (WireGuard 6.2: the initiator, REKEY_AFTER_TIME after the session began)."""
        peer = self.peers.get(pub)
        if peer is None:
            return None
        for sid in peer.sessions:
            s = self.sessions[sid]
            if now > s.expires:
                continue
            if self.table.read(s.slot).confirmed:
                if sending and s.listener.side.rekey_on_send(s.record, now):
                    self.request_handshake(peer, now)
                return s
        return None

    def request_handshake(self, peer: EdgePeer, now: float) -> bool:
        """Ask a worker to initiate a handshake to `peer` (at most once per the
        protocol's retry interval); False if there is nowhere to send it."""
        lst = self.listeners.get(peer.record.protocol)
        if lst is None:
            return False
        if now - peer.last_initiation < lst.side.handshake_retry:
            return True
        endpoint = peer.endpoint
        for sid in peer.sessions:
            view = self.table.read(self.sessions[sid].slot)
            if view.session_id == sid and view.endpoint != NO_ADDR:
                endpoint = view.endpoint
                break
        if endpoint == NO_ADDR:
            return False
        peer.last_initiation = now
        self.counters["initiations"] += 1
        extra = msgpack.packb({"peer": peer.public}, use_bin_type=True)
        self._push(Frame(frames.INITIATE, self.id, 0, 0, endpoint, [], extra=extra, proto=lst.protocol.number))
        return True

    def on_tun(self, now: float) -> None:
        groups: dict[int, list[bytes]] = defaultdict(list)
        chosen: dict[bytes, EdgeSession | None] = {}
        read = os.read
        fd = self.tun_fd
        destination = ippacket.destination
        # the group of the last packet: the next one to the same IPv4 destination joins
        # it without another route look-up
        last_dst = b""
        last_group: list[bytes] = []
        packets: list[bytes] = []
        split = segment.split
        for _ in range(BATCH):
            try:
                data = read(fd, VNET_MAX)
            except BlockingIOError:
                break
            except OSError:
                self.counters["tun_errors"] += 1
                break
            if len(data) <= VNET_HDR_LEN:
                self.drop("bad_inner")
                continue
            if data[1] or data[0] & 1:  # a super packet, or a checksum to finish (segment.py)
                try:
                    packets += split(data)
                except ValueError:
                    self.drop("bad_offload")
                    continue
                self.counters["tso_reads"] += 1
                if len(packets) >= RECEIVE_MAX:
                    break
            else:
                packets.append(data[VNET_HDR_LEN:])
        for pkt in packets:
            if len(pkt) >= 20 and pkt[0] >> 4 == 4:
                dst = pkt[16:20]
                if dst == last_dst:
                    last_group.append(pkt)
                    continue
            else:
                got = destination(pkt)
                if got is None:
                    self.drop("bad_inner")
                    continue
                dst = got
            pub = self.routes.lookup(dst)
            if pub is None:
                self.drop("no_route")
                continue
            if pub not in chosen:
                chosen[pub] = self.sending_session(pub, now)
            s = chosen[pub]
            if s is None:
                peer = self.peers[pub]
                lst = self.listeners.get(peer.record.protocol)
                staged_max = lst.side.staged_max if lst is not None else 0
                if self.request_handshake(peer, now) and len(peer.staged) < staged_max:
                    peer.staged.append(pkt)
                    self.counters["staged"] += 1
                else:
                    self.drop("no_session")
                continue
            last_group = groups[s.sid]
            last_group.append(pkt)
            last_dst = dst
        self.counters["tun_in"] += len(packets)
        for sid, pkts in groups.items():
            self._encrypt(self.sessions[sid], pkts, now)

    def _encrypt(self, s: EdgeSession, pkts: list[bytes], now: float) -> None:
        got = self.table.reserve(s.slot, s.sid, len(pkts), now, limit=s.listener.protocol.counters.limit)
        if got is None:
            self.drop("stale_session", len(pkts))
            return
        first, endpoint = got
        if endpoint == NO_ADDR:
            self.drop("no_endpoint", len(pkts))
            return
        self._crypt(Frame(frames.ENCRYPT, self.id, s.sid, first, endpoint, pkts), now)

    def keepalives(self, now: float) -> None:
        """Once a second, per peer with a sending session, as its protocol says
        (WireGuard: passive and persistent keepalives, whitepaper 6.5, and a new
        handshake when data we sent got no answer for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT,
        6.4: the peer may have lost the session, e.g. it restarted)."""
        for peer in self.peers.values():
            s = self.sending_session(peer.public, now, sending=False)
            if s is None:
                continue
            side = s.listener.side
            after = side.unanswered_after
            if after is not None and self.table.unanswered(s.slot, s.sid, now, after):
                self.request_handshake(peer, now)
            policy = side.keepalive(peer.record)
            due = self.table.keepalive_due(s.slot, s.sid, now, policy.passive, policy.persistent,
                                           limit=s.listener.protocol.counters.limit)
            if due is not None:
                counter, endpoint = due
                if side.rekey_on_send(s.record, now):  # a keepalive is a send
                    self.request_handshake(peer, now)
                self.counters["keepalives"] += 1
                self._crypt(Frame(frames.ENCRYPT, self.id, s.sid, counter, endpoint, [policy.payload]), now)

    # --- results -----------------------------------------------------------------------

    def on_result(self, now: float) -> None:
        recv = frames.recv_parts
        for _ in range(BATCH):
            parts = recv(self.result)
            if parts is None:
                return
            try:
                frame = frames.decode(parts)
            except FrameError as exc:
                self.drop("bad_frame")
                log.debug("bad result frame", error=str(exc))
                continue
            if frame.seq == 0:
                self._deliver(frame, now)
            elif self.order.arrived(frame.seq, frame):
                self._release(now)
            else:
                self.drop("late_result", len(frame.packets))

    def _deliver(self, frame: Frame, now: float) -> None:
        if frame.kind == frames.TUN_WRITE:
            self._tun_write(frame, now)
        elif frame.kind == frames.UDP_SEND:
            self._udp_send(frame)
        elif frame.kind == frames.HANDSHAKE_OUT:
            self._handshake_out(frame)
        else:
            self.drop("bad_frame")

    def _release(self, now: float) -> None:
        lost = self.order.lost
        for frame in self.order.release(now):
            self._deliver(frame, now)
        if self.order.lost != lost:
            self.counters["results_lost"] += self.order.lost - lost

    def _tun_write(self, frame: Frame, now: float) -> None:
        s = self.sessions.get(frame.session_id)
        if s is None:
            self.drop("unknown_session", len(frame.packets))
            return
        space = s.listener.protocol.counters
        accepted = self.table.commit_rx(s.slot, s.sid, frame.counters, frame.addr, now, space.limit, space.window)
        if accepted is None:
            self.drop("stale_session", len(frame.counters))
            return
        peer = self.peers.get(s.peer)
        write = os.write
        counters = self.counters
        n_ok = rx_bytes = 0
        aux = frame.aux
        k = 0  # the first datagram of this packet in `accepted`
        for i, pkt in enumerate(frame.packets):
            count, size = aux[2 * i], aux[2 * i + 1]
            ok = sum(accepted[k : k + count])
            k += count
            if ok < count:
                # a replay inside: drop the packet (for a super packet, its other segments
                # too; their counters are spent, TCP sends them again)
                self.drop("replay", count - ok)
                if ok:
                    self.drop("replay_merged", ok)
                continue
            n_ok += count
            rx_bytes += size
            if len(pkt):
                try:
                    write(self.tun_fd, pkt)
                    counters["tun_out"] += count
                    if count > 1:
                        counters["tun_out_merged"] += 1
                except OSError:
                    self.drop("tun_write", count)
            else:
                counters["keepalives_in"] += 1
        if peer is not None:
            peer.stats[0] += rx_bytes
            peer.stats[2] += n_ok
        self.session_packets[s.sid] += n_ok

    def _listener_of(self, frame: Frame) -> Listener | None:
        s = self.sessions.get(frame.session_id)
        if s is not None:
            return s.listener
        for lst in self.listeners.values():
            if lst.protocol.number == frame.proto:
                return lst
        return None

    def _udp_send(self, frame: Frame) -> None:
        lst = self._listener_of(frame)
        if lst is None or lst.sock is None:
            self.drop("not_attached", len(frame.packets))
            return
        sa = self._sockaddr(lst.v6, frame.addr)
        if sa is None:
            self.drop("no_route_v6", len(frame.packets))
            return
        s = self.sessions.get(frame.session_id)
        peer = self.peers.get(s.peer) if s else None
        pkts = frame.packets
        sizes = [len(d) for d in pkts]
        sent = sent_bytes = 0
        sock = lst.sock
        if lst.gso and len(pkts) > 1:
            sendmsg = sock.sendmsg
            for i, j in udp.gso_runs(sizes):
                try:
                    if j - i == 1:
                        sock.sendto(pkts[i], sa)
                    else:
                        seg = [(17, udp.UDP_SEGMENT, struct.pack("=H", sizes[i]))]  # SOL_UDP
                        sendmsg([b"".join(pkts[i:j])], seg, 0, sa)
                        self.counters["gso_sends"] += 1
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP) and j - i > 1:
                        lst.gso = False  # the kernel or device refuses: plain sends from now on
                        log.warning("UDP GSO unavailable, sending datagrams one by one", error=str(exc))
                        sent, sent_bytes = self._send_each(sock, pkts[i:], sa, sent, sent_bytes)
                        break
                    self.drop("udp_send", j - i)
                    continue
                sent += j - i
                sent_bytes += sum(sizes[i:j])
        else:
            sent, sent_bytes = self._send_each(sock, pkts, sa, 0, 0)
        if peer is not None:
            peer.stats[1] += sent_bytes
            peer.stats[3] += sent
        self.counters["udp_out"] += sent
        if s is not None:
            self.session_packets[s.sid] += sent

    def _send_each(self, sock: Any, pkts: Any, sa: Any, sent: int, sent_bytes: int) -> tuple[int, int]:
        sendto = sock.sendto
        for d in pkts:
            try:
                sendto(d, sa)
            except OSError:
                self.drop("udp_send")
                continue
            sent += 1
            sent_bytes += len(d)
        return sent, sent_bytes

    def _handshake_out(self, frame: Frame) -> None:
        try:
            record = SessionRecord.from_wire(msgpack.unpackb(frame.extra or b"", raw=False,
                                                            strict_map_key=False))
        except (RecordError, ValueError, msgpack.UnpackException):
            self.drop("bad_frame")
            return
        from dataclasses import replace

        record = replace(record, endpoint=frame.addr)
        self.install_session(record)
        s = self.sessions.get(record.id)
        if s is not None:
            self.sync_filter(s.listener)  # the client's first data datagram follows the response
        if frame.packets:
            self._udp_send(frame)
            self.counters["handshake_responses"] += 1
        if s is None:
            return
        payload = s.listener.side.confirm_payload(s.record)
        if payload is not None:
            # the peer may not send until it hears from us: confirm at once
            got = self.table.reserve(s.slot, s.sid, 1, time.time(), data=False,
                                     limit=s.listener.protocol.counters.limit)
            if got is not None and got[1] != NO_ADDR:
                self._crypt(Frame(frames.ENCRYPT, self.id, s.sid, got[0], got[1], [payload]), time.time())

    # --- the socket filter ----------------------------------------------------------------

    def sync_filter(self, lst: Listener) -> None:
        """Rebuild and swap in a socket's filter if its sessions or its protocol's
        state (bans) changed."""
        if not lst.filter_on or not (lst.filter_dirty or lst.side.filter_dirty):
            return
        try:
            program = lst.side.filter_program(lst.by_key.keys())
            if program is None:
                sockfilter.detach(lst.sock)
            else:
                sockfilter.attach(lst.sock, program)
        except (OSError, sockfilter.FilterError) as exc:
            lst.filter_on = False
            sockfilter.detach(lst.sock)
            log.warning("socket filter unavailable: every datagram reaches the edge",
                        protocol=lst.protocol.name, error=str(exc))
            return
        lst.filter_dirty = False
        lst.side.filter_built()
        self.counters["filter_updates"] += 1

    # --- loop -----------------------------------------------------------------------------

    def gauges(self, now: float) -> dict[str, int]:
        """The protocols' own gauges, summed (e.g. under_load, banned_sources)."""
        out: dict[str, int] = {}
        for lst in self.listeners.values():
            for k, v in lst.side.gauges(now).items():
                out[k] = out.get(k, 0) + v
        return out

    def report(self, now: float) -> None:
        loaded = self.under_load(now)
        if loaded != self._reported_load:
            self._reported_load = loaded
            if loaded:
                log.warning("under load: handshakes need a cookie (mac2)", edge=self.id)
            else:
                log.info("no longer under load", edge=self.id)
        drops_total = 0
        for lst in self.listeners.values():
            if lst.sock is not None:
                # what the kernel dropped for the socket: the filter's drops and a full buffer's
                drops = sockfilter.socket_drops(lst.sock) if isinstance(lst.sock, socket.socket) else None
                drops_total += drops or 0
        if self.attached:
            self.counters["udp_socket_drops"] = drops_total
        sessions = {}
        for sid, s in self.sessions.items():
            view = self.table.read(s.slot)
            peer = self.peers.get(s.peer)
            if peer is not None and view.session_id == sid and view.endpoint != NO_ADDR:
                peer.endpoint = view.endpoint
            sessions[sid] = {
                "packets": self.session_packets.get(sid, 0),
                "endpoint": frames.format_addr(view.endpoint) if view.session_id == sid else "",
                "last_rx": view.last_rx,
            }
        rep = {
            "role": "edge", "id": self.id, "pid": os.getpid(),
            "work": self.sd.edge_work(self.id), "result": self.sd.edge_result(self.id),
            "control": self.sd.edge_control(self.id),
            **({"work_tcp": self.tcp[0], "result_tcp": self.tcp[1], "control_tcp": self.tcp[2]}
               if self.tcp else {}),
            "port": self.port, "counters": dict(self.counters), "gauges": metrics.edge_gauges(self),
            **({"metrics": self.metrics_addr} if self.metrics_addr else {}),
            "peers": {p.public: p.stats for p in self.peers.values()},
            "sessions": sessions,
            **self.engine.take_ended(),
        }
        try:
            self.stats.send(msgpack.packb(rep, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def attach(self) -> None:
        """Join the UDP ports and the TUN device (see __init__)."""
        gso = os.environ.get("FABRIC_NO_GSO") != "1"
        gro = os.environ.get("FABRIC_NO_UDP_GRO") != "1"
        for lst in self.listeners.values():
            lst.sock = self.io.open_udp(self.listen, lst.port, self.reuseport)
            lst.v6 = lst.sock.family == socket.AF_INET6
            real = isinstance(lst.sock, socket.socket)
            lst.gso = gso and real
            lst.gro = gro and real and udp.enable_gro(lst.sock)
            lst.filter_on = self.filter_wanted and real
            lst.filter_dirty = True
            self.sync_filter(lst)
        self.tun_fd = self.io.open_tun_queue(self.tun_name)
        self.attached = True

    def serve(self, stop: list[bool]) -> None:
        now = time.time()
        self.clone.request_snapshot(now)
        self.report(now)
        poller = zpoll.Poller()  # one system call per pass (zmq.Poller: six)
        poller.register(self.result, zmq.POLLIN)
        next_tick = now + 1.0
        by_fd: dict[int, Listener] = {}
        clock = time.perf_counter
        placement = self.placement
        moderate = self.moderation.after_pass
        if self.moderation.usecs:
            moderation.tighten_timer_slack()
        while not stop[0]:
            self.clone.register(poller)
            ready = poller.poll(200)
            t0 = clock()
            now = time.time()
            self.clone.handle_ready(ready, now)
            if not self.attached and self.clone.synced:
                self.attach()
                for lst in self.listeners.values():
                    by_fd[lst.fileno()] = lst
                    poller.register(lst.fileno(), zmq.POLLIN)
                poller.register(self.tun_fd, zmq.POLLIN)
            if self.result in ready:
                self.on_result(now)
            elif self.order.waiting:
                self._release(now)  # a result may be lost: time it out
            tun_ready = self.tun_fd in ready
            counters = self.counters
            udp_before, tun_before = counters["udp_in"], counters["tun_in"]
            received_bytes = 0
            for fd, lst in by_fd.items():
                if fd in ready:
                    wrote = self.counters["tun_out"]
                    received_bytes += self.on_udp(lst, now)
                    # what we wrote to the TUN is often answered at once (an echo reply, a TCP
                    # ACK the kernel sent while we wrote): read it now, without another poll
                    tun_ready = tun_ready or self.counters["tun_out"] != wrote
            if tun_ready:
                self.on_tun(now)
            for lst in by_fd.values():
                if lst.filter_dirty or lst.side.filter_dirty:
                    self.sync_filter(lst)
            if now >= next_tick:
                for lst in self.listeners.values():
                    lst.side.tick(now)
                self.clone.tick(now)
                if self.auth is not None:
                    self.auth.tick(now)
                if self.attached:
                    self.keepalives(now)
                self.report(now)
                next_tick = now + 1.0
            placement.work(clock() - t0, t0)
            received = counters["udp_in"] - udp_before
            if received:
                wait = moderate(received, received_bytes, counters["tun_in"] - tun_before, received >= RECEIVE_MAX)
                if wait:
                    counters["rx_waits"] += 1
                    time.sleep(wait)

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.clone.close()
        for s in (self.work, self.result, self.control, self.stats):
            s.close(0)
        for lst in self.listeners.values():
            if lst.sock is not None:
                lst.sock.close()
        if self.tun_fd >= 0:
            os.close(self.tun_fd)
        self.table.close()


def _usable_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except OSError:
        return set(range(os.cpu_count() or 1))


def run(sd: StateDir, eid: int, listen: str, port: int, tun_name: str, address: list[str] | None,
        reuseport: bool, tcp: str | None = None, metrics_addr: str | None = None,
        crypto: str = "auto", ports: dict[str, int] | None = None,
        rx_usecs: int = moderation.DEFAULT_USECS) -> int:
    """`ports`: each protocol's UDP port (default: WireGuard on `port`); `rx_usecs`:
    receive moderation (fabric/dataplane/moderation.py, 0: off)."""
    # The broker may start later: ZeroMQ connects whenever it appears, and until
    # then the edge has no sessions and counts what it drops.
    sd.ensure()
    lock = sd.lock(f"edge-{eid}")
    exporter = metrics.start(metrics_addr, "edge", eid)  # a taken port fails before the TUN is touched
    edge = Edge(sd, eid, listen=listen, port=port, tun_name=tun_name, address=address, reuseport=reuseport,
                tcp=tcp, crypto=crypto, ports=ports, rx_usecs=rx_usecs)
    if exporter is not None:
        edge.metrics_addr = exporter.address
        exporter.source = lambda f: metrics.edge_metrics(f, edge)
    stop = stop_on_signals()
    log.info("edge running", edge=eid, port=edge.port, tun=tun_name, crypto=crypto, rx_usecs=rx_usecs,
             aead=aead.describe(),
             segment="native" if segment.NATIVE else "pure Python")
    try:
        edge.serve(stop)
    finally:
        edge.close()
        edge.ctx.destroy(0)
        os.close(lock)
    return 0

