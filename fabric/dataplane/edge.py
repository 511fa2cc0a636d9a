"""The edge (DESIGN.md, "edge"): one SO_REUSEPORT UDP socket and one TUN queue.

Receive path (UDP -> TUN):
  1. read a batch of datagrams; classify by type (whitepaper 5.4);
  2. transport: receiver index -> session; drop expired sessions; group by
     (session, source), then drop the counters the shared replay window has
     surely seen (one read of the window per group);
     handshake: mac1 checked here, and under load mac2 or a cookie reply (5.4.7);
  3. open the AEAD of each group here, or PUSH the group as one frame to any
     worker (the crypto placement, fabric/dataplane/engine.py; handshakes always go);
  4. on the result, commit the counters to the shared window under the slot
     lock (replays dropped here, after the tag verified), then write to TUN.
Send path (TUN -> UDP):
  1. read a batch of IP packets; route by allowed IPs to a peer and its newest
     confirmed session; with none, stage a few packets and ask a worker to
     initiate a handshake to the peer's last endpoint (at most once per
     REKEY_TIMEOUT), and send the staged packets when the session arrives;
  2. reserve a run of send counters per session under the slot lock (one lock
     per session per batch);
  3. seal here or PUSH to any worker (as in 3. above); on the result, send the
     datagrams to the peer's current endpoint.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from fabric.control import frames, zpoll
from fabric.control import zmqcurve as curve
from fabric.control.clone import CloneClient
from fabric.control.frames import NO_ADDR, Frame, FrameError
from fabric.dataplane import ippacket, sockfilter, tun
from fabric.dataplane.engine import CryptoEngine, CryptoPlacement, HostIdle, peer_info
from fabric.dataplane.gro import VNET_HDR_LEN
from fabric.dataplane.reorder import ReorderBuffer
from fabric.dataplane.sessiontable import SessionTable
from fabric.ops import metrics, preflight
from fabric.ops.log import Log
from fabric.ops.paths import StateDir
from fabric.ops.service import stop_on_signals
from fabric.protocols.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    KEEPALIVE_TIMEOUT,
    MAX_DATAGRAM,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from fabric.protocols.wireguard.crypto import key_from_base64
from fabric.protocols.wireguard.guard import (
    COOKIE,
    MAX_FILTER_INDEXES,
    PASS,
    SAMPLE,
    SAMPLE_MALFORMED,
    SAMPLE_UNKNOWN_INDEX,
    HandshakeGuard,
    filter_program,
)
from fabric.protocols.wireguard.noise import CookieChecker

log = Log("edge")

BATCH = 64
VNET_MAX = MAX_DATAGRAM + VNET_HDR_LEN
STAGED_MAX = 16  # packets kept per peer while its handshake runs
REORDER_TIMEOUT = 0.05  # a result missing this long is given up (its worker died)
# UDP GSO (Linux 4.18+, as wireguard-go conn/bind_std.go): one sendmsg carries a run
# of equal-size datagrams (the last may be shorter) that the kernel splits.
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000


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
_RX_HEAD = struct.Struct("<IIQ")
_HS_SIZES = {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE, MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE}


@dataclass
class EdgeSession:
    sid: int
    slot: int
    peer: bytes
    local_index: int
    created: float
    initiator: bool = False


@dataclass
class EdgePeer:
    public: bytes
    name: str
    keepalive: int
    sessions: list[int] = field(default_factory=list)  # newest first
    stats: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # rx/tx bytes, rx/tx packets
    endpoint: bytes = NO_ADDR  # last known, to initiate handshakes to
    staged: list[bytes] = field(default_factory=list)
    last_initiation: float = 0.0


def open_udp(listen: str, port: int, reuseport: bool) -> socket.socket:
    """The edge's non-blocking UDP socket (preflight.bind_udp), with 4 MiB buffers."""
    sock = preflight.bind_udp(listen, port, reuseport)
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, 4 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, 4 << 20)
    sock.setblocking(False)
    return sock


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
    ) -> None:
        self.sd = sd
        self.id = eid
        self.ctx = ctx or zmq.Context()
        self.port = port if reuseport else port + eid
        # The UDP socket and the TUN queue are opened by attach(), once the first
        # snapshot is installed: a socket joining the SO_REUSEPORT group (and a
        # queue joining the TUN) takes its share of flows at once, and without
        # sessions it could only drop them (unknown_index, no_route).
        self.listen, self.reuseport = listen, reuseport
        self.sock: socket.socket | None = None
        self.gso = False
        self.v6 = False
        self.tun_name = tun_name
        self._ensure_tun(tun_name, address)
        self.tun_fd = -1
        self.table = SessionTable(sd.session_table)
        self.sessions: dict[int, EdgeSession] = {}
        self.by_index: dict[int, int] = {}
        self.peers: dict[bytes, EdgePeer] = {}
        self.routes: ippacket.PrefixTable[bytes] = ippacket.PrefixTable()
        self.cookies: CookieChecker | None = None
        self.guard: HandshakeGuard | None = None  # made with the cookie checker (server key)
        # the socket filter (fabric/protocols/wireguard/guard.py "the kernel's share"); FABRIC_NO_SOCKET_FILTER=1
        # leaves every datagram to userspace (for comparisons)
        self.filter_wanted = os.environ.get("FABRIC_NO_SOCKET_FILTER") != "1"
        self.filter_on = False
        self.filter_dirty = True  # sessions changed since the filter was built
        self._reported_load = False
        self.counters: dict[str, int] = defaultdict(int)
        self.session_packets: dict[int, int] = defaultdict(int)
        self.order: ReorderBuffer[Frame] = ReorderBuffer(REORDER_TIMEOUT)
        # the AEAD of data frames runs here or in workers (fabric/dataplane/engine.py)
        self.engine = CryptoEngine(self._count, gro=os.environ.get("FABRIC_NO_GRO") != "1")
        self.placement = CryptoPlacement(crypto, HostIdle(_usable_cpus()))
        self._addr_cache: dict[Any, bytes] = {}
        self._sa_cache: dict[bytes, Any] = {}
        self.metrics_addr: str | None = None  # its /metrics endpoint, announced in reports
        self.curve = curve.local(sd)
        if tcp and self.curve is None:
            raise RuntimeError(f"tcp endpoints need CURVE: run `fabric keys init --state-dir {sd.root}` first")
        self.auth = curve.Authenticator(self.ctx, sd) if self.curve else None
        server_opts = self.curve.server if self.curve else None
        client_opts = self.curve.client if self.curve else None
        self.tcp = curve.tcp_endpoints(tcp, 2) if tcp else []
        self.work = self.ctx.socket(zmq.PUSH)
        curve.apply(self.work, server_opts)
        self.work.setsockopt(zmq.SNDHWM, 1000)
        self.work.setsockopt(zmq.LINGER, 0)
        self.work.setsockopt(zmq.IMMEDIATE, 1)
        self.work.bind(sd.edge_work(eid))
        self.result = self.ctx.socket(zmq.PULL)
        curve.apply(self.result, server_opts)
        self.result.setsockopt(zmq.RCVHWM, 1000)
        self.result.setsockopt(zmq.LINGER, 0)
        self.result.bind(sd.edge_result(eid))
        for sock, ep in zip((self.work, self.result), self.tcp, strict=False):
            try:
                sock.bind(ep)
            except zmq.ZMQError as exc:
                raise RuntimeError(f"cannot bind {ep}: {exc} (pick another --tcp port)") from None
        self.stats = self.ctx.socket(zmq.PUSH)
        curve.apply(self.stats, client_opts)
        self.stats.setsockopt(zmq.SNDHWM, 10)
        self.stats.setsockopt(zmq.LINGER, 0)
        self.stats.connect(sd.broker_stats)
        self.clone = CloneClient(self.ctx, sd.broker_pub, sd.broker_snapshot, self.on_set, self.on_delete,
                                 curve=client_opts)

    @staticmethod
    def _ensure_tun(name: str, address: list[str] | None) -> None:
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

    def drop(self, reason: str, n: int = 1) -> None:
        self.counters["drop_" + reason] += n

    def _count(self, name: str, n: int) -> None:
        self.counters[name] += n

    # --- state from the broker --------------------------------------------------

    def on_set(self, key: bytes, v: dict[str, Any]) -> None:
        try:
            if key == b"server":
                if self.cookies is None or self.cookies.local_public != v["public"]:
                    self.cookies = CookieChecker(v["public"])
                    if self.guard is None:
                        self.guard = HandshakeGuard(self.cookies, self.table.under_load_until,
                                                    self.table.set_under_load_until, self._count)
                    else:
                        self.guard.cookies = self.cookies
            elif key.startswith(b"peer/"):
                self._set_peer(v)
                self.engine.peers[v["public"]] = peer_info(v)
            elif key.startswith(b"session/"):
                # keys for inline crypto (the public copy has none) before install_session
                # sends the packets staged for this session
                self.engine.install(v)
                self.install_session(v)
                if int(v["id"]) not in self.sessions:  # refused (stale): keep no keys
                    self.engine.remove(int(v["id"]))
        except (KeyError, TypeError, ValueError) as exc:
            self.counters["bad_update"] += 1
            log.warning("ignored malformed update", key=key, error=str(exc))

    def _set_peer(self, v: dict[str, Any]) -> None:
        pub = v["public"]
        old = self.peers.get(pub)
        peer = EdgePeer(pub, str(v["name"]), int(v.get("keepalive") or 0))
        if old is not None:
            peer.stats, peer.endpoint, peer.staged = old.stats, old.endpoint, old.staged
        self.peers[pub] = peer
        peer.sessions = sorted(
            (sid for sid, s in self.sessions.items() if s.peer == pub),
            key=lambda i: -self.sessions[i].created,
        )
        self.routes.remove_value(pub)
        for net in v["allowed_ips"]:
            self.routes.add(net, pub)

    def on_delete(self, key: bytes) -> None:
        if key.startswith(b"session/") and key[8:].isdigit():
            self._remove_session(int(key[8:]))

        elif key.startswith(b"peer/"):
            try:
                pub = key_from_base64(key[5:].decode())
            except ValueError:
                return
            peer = self.peers.pop(pub, None)
            self.engine.peers.pop(pub, None)
            self.routes.remove_value(pub)
            if peer:
                for sid in list(peer.sessions):
                    self._remove_session(sid)

    def install_session(self, v: dict[str, Any]) -> None:
        sid = int(v["id"])
        if sid in self.sessions:
            return
        s = EdgeSession(sid, int(v["slot"]), v["peer"], int(v["local_index"]), float(v["created"]),
                        bool(v.get("initiator")))
        endpoint = v.get("endpoint") or NO_ADDR
        if len(endpoint) != frames.ADDR_SIZE:
            endpoint = NO_ADDR
        if not self.table.claim(s.slot, sid, s.created, endpoint, confirmed=s.initiator):
            self.counters["stale_session"] += 1
            return
        self.sessions[sid] = s
        self.by_index[s.local_index] = sid
        self.filter_dirty = True
        peer = self.peers.get(s.peer)
        if peer is not None:
            peer.sessions.append(sid)
            peer.sessions.sort(key=lambda i: -self.sessions[i].created)
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
        if self.by_index.get(s.local_index) == sid:
            del self.by_index[s.local_index]
            self.filter_dirty = True
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

    def _sockaddr(self, addr: bytes) -> Any:
        sa = self._sa_cache.get(addr)
        if sa is None:
            host, port = frames.unpack_addr(addr)
            if self.v6:
                if ":" not in host:
                    host = "::ffff:" + host
                sa = (host, port, 0, 0)
            elif ":" in host:
                return None
            else:
                sa = (host, port)
            if len(self._sa_cache) > 65536:
                self._sa_cache.clear()
            self._sa_cache[addr] = sa
        return sa

    # --- receive path -----------------------------------------------------------------

    def under_load(self, now: float) -> bool:
        return self.guard is not None and self.guard.under_load(now)

    def on_udp(self, now: float) -> None:
        groups: dict[tuple[int, bytes], tuple[list[bytes], list[int]]] = {}
        handshakes: dict[bytes, list[bytes]] = defaultdict(list)
        assert self.sock is not None  # on_udp runs once attached
        recv = self.sock.recvfrom
        counters = self.counters
        unpack = _RX_HEAD.unpack_from
        # the group of the last transport datagram: the next from the same source
        # address to the same receiver index joins it without another look-up
        last_receiver, last_sa = -1, None
        last_pkts: list[bytes] = []
        last_ctrs: list[int] = []
        received = 0
        guard = self.guard
        if guard is not None:
            guard.refresh(now)  # the host-wide under-load state, once per batch
        for _ in range(BATCH):
            try:
                data, sa = recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError:
                counters["udp_errors"] += 1
                break
            received += 1
            n = len(data)
            if n >= TRANSPORT_MIN_SIZE:
                head, receiver, counter = unpack(data, 0)
                if head == MSG_TRANSPORT and receiver == last_receiver and sa == last_sa:
                    last_pkts.append(data)  # type 4 with zero reserved bytes (whitepaper 5.4.6)
                    last_ctrs.append(counter)
                    continue
            if n < 4 or data[1:4] != b"\x00\x00\x00":
                if n == SAMPLE_MALFORMED and self.filter_on:  # one in SAMPLE the filter dropped
                    counters["drop_kernel_malformed"] += SAMPLE
                elif n == SAMPLE_UNKNOWN_INDEX and self.filter_on:
                    counters["drop_kernel_unknown_index"] += SAMPLE
                else:
                    self.drop("short" if n < 4 else "bad_type")
                continue
            kind = data[0]
            if kind == MSG_TRANSPORT:
                if n < TRANSPORT_MIN_SIZE:
                    self.drop("short")
                    continue
                sid = self.by_index.get(receiver)
                if sid is None:
                    self.drop("unknown_index")
                    continue
                s = self.sessions[sid]
                if now - s.created > REJECT_AFTER_TIME:  # whitepaper 6.1
                    self.drop("expired")
                    continue
                key = (sid, self._addr(sa))
                group = groups.get(key)
                if group is None:
                    group = groups[key] = ([], [])
                group[0].append(data)
                group[1].append(counter)
                last_receiver, last_sa = receiver, sa
                last_pkts, last_ctrs = group
            elif kind in _HS_SIZES:
                if n != _HS_SIZES[kind]:
                    self.drop("bad_size")
                    continue
                if kind == MSG_COOKIE_REPLY or guard is None:
                    self.drop("unexpected_cookie" if guard else "not_ready")
                    continue
                addr = self._addr(sa)
                verdict = guard.check(data, addr, now)  # fabric/protocols/wireguard/guard.py, whitepaper 5.4.7
                if verdict is PASS:
                    handshakes[addr].append(data)
                elif verdict is COOKIE:
                    self._send_cookie(data, addr, sa, now)
                else:
                    self.drop(verdict)
            else:
                self.drop("bad_type")
        counters["udp_in"] += received
        for (sid, addr), (pkts, ctrs) in groups.items():
            # a cheap filter before the AEAD: counters the shared window surely saw
            # (the window itself is updated after the tag verified: commit_rx)
            old = self.table.seen_many(self.sessions[sid].slot, sid, ctrs)
            if any(old):
                pkts = [p for p, replayed in zip(pkts, old, strict=True) if not replayed]
                self.drop("replay", len(ctrs) - len(pkts))
                if not pkts:
                    continue
            self._crypt(Frame(frames.DECRYPT, self.id, sid, 0, addr, pkts), now)
        for addr, pkts in handshakes.items():
            self._push(Frame(frames.HANDSHAKE, self.id, 0, 0, addr, pkts))

    def _send_cookie(self, data: bytes, addr: bytes, sa: Any, now: float) -> None:
        assert self.cookies is not None and self.sock is not None
        reply = self.cookies.create_reply(data, addr, now)
        try:
            self.sock.sendto(reply, sa)
            self.counters["cookie_replies"] += 1
        except OSError:
            self.drop("udp_send")

    def _crypt(self, frame: Frame, now: float) -> None:
        """Run a DECRYPT/ENCRYPT frame here (inline) or push it to a worker, as the
        placement says (fabric/dataplane/engine.py); inline also when no worker takes it."""
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

    # --- send path ------------------------------------------------------------------

    def sending_session(self, pub: bytes, now: float, sending: bool = True) -> EdgeSession | None:
        """The newest confirmed, unexpired session of a peer (whitepaper 5.4.5, 6.1).

        When `sending` and we initiated that session, start a new handshake once
        it is REKEY_AFTER_TIME old (whitepaper 6.2: upon sending, not on a timer).
        """
        peer = self.peers.get(pub)
        if peer is None:
            return None
        for sid in peer.sessions:
            s = self.sessions[sid]
            if now - s.created >= REJECT_AFTER_TIME:
                continue
            if self.table.read(s.slot).confirmed:
                if sending and s.initiator and now - s.created >= REKEY_AFTER_TIME:
                    self.request_handshake(peer, now)
                return s
        return None

    def request_handshake(self, peer: EdgePeer, now: float) -> bool:
        """Ask a worker to initiate a handshake to `peer` (at most once per REKEY_TIMEOUT)."""
        if now - peer.last_initiation < REKEY_TIMEOUT:
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
        self._push(Frame(frames.INITIATE, self.id, 0, 0, endpoint, [], extra=extra))
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
        received = 0
        for _ in range(BATCH):
            try:
                pkt = read(fd, VNET_MAX)[VNET_HDR_LEN:]  # no offloads asked: the header is all zero
            except BlockingIOError:
                break
            except OSError:
                self.counters["tun_errors"] += 1
                break
            received += 1
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
                if self.request_handshake(peer, now) and len(peer.staged) < STAGED_MAX:
                    peer.staged.append(pkt)
                    self.counters["staged"] += 1
                else:
                    self.drop("no_session")
                continue
            last_group = groups[s.sid]
            last_group.append(pkt)
            last_dst = dst
        self.counters["tun_in"] += received
        for sid, pkts in groups.items():
            self._encrypt(self.sessions[sid], pkts, now)

    def _encrypt(self, s: EdgeSession, pkts: list[bytes], now: float) -> None:
        got = self.table.reserve(s.slot, s.sid, len(pkts), now)
        if got is None:
            self.drop("stale_session", len(pkts))
            return
        first, endpoint = got
        if endpoint == NO_ADDR:
            self.drop("no_endpoint", len(pkts))
            return
        self._crypt(Frame(frames.ENCRYPT, self.id, s.sid, first, endpoint, pkts), now)

    def keepalives(self, now: float) -> None:
        """Once a second: passive and persistent keepalives (whitepaper 6.5), and a new
        handshake when data we sent got no answer for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
        (whitepaper 6.4: the peer may have lost the session, e.g. it restarted)."""
        for peer in self.peers.values():
            s = self.sending_session(peer.public, now, sending=False)
            if s is None:
                continue
            if self.table.unanswered(s.slot, s.sid, now, KEEPALIVE_TIMEOUT + REKEY_TIMEOUT):
                self.request_handshake(peer, now)
            due = self.table.keepalive_due(s.slot, s.sid, now, KEEPALIVE_TIMEOUT, peer.keepalive)
            if due is not None:
                counter, endpoint = due
                if s.initiator and now - s.created >= REKEY_AFTER_TIME:  # a keepalive is a send
                    self.request_handshake(peer, now)
                self.counters["keepalives"] += 1
                self._crypt(Frame(frames.ENCRYPT, self.id, s.sid, counter, endpoint, [b""]), now)

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
        accepted = self.table.commit_rx(s.slot, s.sid, frame.counters, frame.addr, now)
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

    def _udp_send(self, frame: Frame) -> None:
        sa = self._sockaddr(frame.addr)
        if sa is None or self.sock is None:
            self.drop("no_route_v6" if self.sock else "not_attached", len(frame.packets))
            return
        s = self.sessions.get(frame.session_id)
        peer = self.peers.get(s.peer) if s else None
        pkts = frame.packets
        sizes = [len(d) for d in pkts]
        sent = sent_bytes = 0
        if self.gso and len(pkts) > 1:
            sendmsg = self.sock.sendmsg
            for i, j in gso_runs(sizes):
                try:
                    if j - i == 1:
                        self.sock.sendto(pkts[i], sa)
                    else:
                        seg = [(17, UDP_SEGMENT, struct.pack("=H", sizes[i]))]  # SOL_UDP
                        sendmsg([b"".join(pkts[i:j])], seg, 0, sa)
                        self.counters["gso_sends"] += 1
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP) and j - i > 1:
                        self.gso = False  # the kernel or device refuses: plain sends from now on
                        log.warning("UDP GSO unavailable, sending datagrams one by one", error=str(exc))
                        sent, sent_bytes = self._send_each(pkts[i:], sa, sent, sent_bytes)
                        break
                    self.drop("udp_send", j - i)
                    continue
                sent += j - i
                sent_bytes += sum(sizes[i:j])
        else:
            sent, sent_bytes = self._send_each(pkts, sa, 0, 0)
        if peer is not None:
            peer.stats[1] += sent_bytes
            peer.stats[3] += sent
        self.counters["udp_out"] += sent
        if s is not None:
            self.session_packets[s.sid] += sent

    def _send_each(self, pkts: Any, sa: Any, sent: int, sent_bytes: int) -> tuple[int, int]:
        assert self.sock is not None
        sendto = self.sock.sendto
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
            session = msgpack.unpackb(frame.extra or b"", raw=False, strict_map_key=False)
            if not isinstance(session, dict):
                raise ValueError("not a map")
            session["endpoint"] = frame.addr
            self.install_session(session)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            self.drop("bad_frame")
            return
        self.sync_filter()  # the client's first transport datagram follows the response
        if frame.packets:
            self._udp_send(frame)
            self.counters["handshake_responses"] += 1
        s = self.sessions.get(frame.session_id)
        if s is not None and s.initiator:
            # the responder may not send until it hears from us: confirm at once
            got = self.table.reserve(s.slot, s.sid, 1, time.time(), data=False)
            if got is not None and got[1] != NO_ADDR:
                self._crypt(Frame(frames.ENCRYPT, self.id, s.sid, got[0], got[1], [b""]), time.time())

    # --- loop -----------------------------------------------------------------------------

    def report(self, now: float) -> None:
        loaded = self.under_load(now)
        if loaded != self._reported_load:
            self._reported_load = loaded
            if loaded:
                log.warning("under load: handshakes need a cookie (mac2)", edge=self.id)
            else:
                log.info("no longer under load", edge=self.id)
        if self.sock is not None:
            # what the kernel dropped for the socket: the filter's drops and a full buffer's
            drops = sockfilter.socket_drops(self.sock)
            if drops is not None:
                self.counters["udp_socket_drops"] = drops
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
            **({"work_tcp": self.tcp[0], "result_tcp": self.tcp[1]} if self.tcp else {}),
            "port": self.port, "counters": dict(self.counters), "gauges": metrics.edge_gauges(self),
            **({"metrics": self.metrics_addr} if self.metrics_addr else {}),
            "peers": {p.public: p.stats for p in self.peers.values()},
            "sessions": sessions,
        }
        try:
            self.stats.send(msgpack.packb(rep, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def sync_filter(self) -> None:
        """Rebuild and swap in the socket filter if the sessions or the bans changed."""
        guard = self.guard
        if not self.filter_on or not (self.filter_dirty or (guard is not None and guard.dirty)):
            return
        assert self.sock is not None
        indexes = list(self.by_index) if len(self.by_index) <= MAX_FILTER_INDEXES else None
        banned = list(guard.banned) if guard is not None else []
        try:
            sockfilter.attach(self.sock, filter_program(indexes, banned))
        except (OSError, sockfilter.FilterError) as exc:
            self.filter_on = False
            sockfilter.detach(self.sock)
            log.warning("socket filter unavailable: every datagram reaches the edge", error=str(exc))
            return
        self.filter_dirty = False
        if guard is not None:
            guard.dirty = False
        self.counters["filter_updates"] += 1

    def attach(self) -> None:
        """Join the UDP port and the TUN device (see __init__)."""
        self.sock = open_udp(self.listen, self.port, self.reuseport)
        self.filter_on = self.filter_wanted
        self.filter_dirty = True
        self.sync_filter()
        self.v6 = self.sock.family == socket.AF_INET6
        self.gso = os.environ.get("FABRIC_NO_GSO") != "1"
        self.tun_fd = tun.open_queue(self.tun_name)

    def serve(self, stop: list[bool]) -> None:
        now = time.time()
        self.clone.request_snapshot(now)
        self.report(now)
        poller = zpoll.Poller()  # one system call per pass (zmq.Poller: six)
        poller.register(self.result, zmq.POLLIN)
        next_tick = now + 1.0
        udp_fd = -1
        clock = time.perf_counter
        placement = self.placement
        while not stop[0]:
            self.clone.register(poller)
            ready = poller.poll(200)
            t0 = clock()
            now = time.time()
            self.clone.handle_ready(ready, now)
            if self.sock is None and self.clone.synced:
                self.attach()
                assert self.sock is not None
                udp_fd = self.sock.fileno()
                poller.register(udp_fd, zmq.POLLIN)
                poller.register(self.tun_fd, zmq.POLLIN)
            if self.result in ready:
                self.on_result(now)
            elif self.order.waiting:
                self._release(now)  # a result may be lost: time it out
            tun_ready = self.tun_fd in ready
            if udp_fd in ready:
                wrote = self.counters["tun_out"]
                self.on_udp(now)
                # what we wrote to the TUN is often answered at once (an echo reply, a TCP
                # ACK the kernel sent while we wrote): read it now, without another poll
                tun_ready = tun_ready or self.counters["tun_out"] != wrote
            if tun_ready:
                self.on_tun(now)
            if self.filter_dirty or (self.guard is not None and self.guard.dirty):
                self.sync_filter()
            if now >= next_tick:
                if self.guard is not None:
                    self.guard.expire(now)
                self.clone.tick(now)
                if self.auth is not None:
                    self.auth.tick(now)
                if self.sock is not None:
                    self.keepalives(now)
                self.report(now)
                next_tick = now + 1.0
            placement.work(clock() - t0, t0)

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.clone.close()
        for s in (self.work, self.result, self.stats):
            s.close(0)
        if self.sock is not None:
            self.sock.close()
            os.close(self.tun_fd)
        self.table.close()


def _usable_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except OSError:
        return set(range(os.cpu_count() or 1))


def run(sd: StateDir, eid: int, listen: str, port: int, tun_name: str, address: list[str] | None,
        reuseport: bool, tcp: str | None = None, metrics_addr: str | None = None,
        crypto: str = "auto") -> int:
    # The broker may start later: ZeroMQ connects whenever it appears, and until
    # then the edge has no sessions and counts what it drops.
    sd.ensure()
    lock = sd.lock(f"edge-{eid}")
    exporter = metrics.start(metrics_addr, "edge", eid)  # a taken port fails before the TUN is touched
    edge = Edge(sd, eid, listen=listen, port=port, tun_name=tun_name, address=address, reuseport=reuseport,
                tcp=tcp, crypto=crypto)
    if exporter is not None:
        edge.metrics_addr = exporter.address
        exporter.source = lambda f: metrics.edge_metrics(f, edge)
    stop = stop_on_signals()
    log.info("edge running", edge=eid, port=edge.port, tun=tun_name, crypto=crypto)
    try:
        edge.serve(stop)
    finally:
        edge.close()
        edge.ctx.destroy(0)
        os.close(lock)
    return 0
