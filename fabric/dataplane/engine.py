"""Transport data crypto (whitepaper 5.4.6), shared by workers and edges.

A `CryptoEngine` holds session keys and peers' allowed IPs as the broker
publishes them, and turns a DECRYPT or ENCRYPT frame into its result frame
(TUN_WRITE or UDP_SEND). It does no I/O and reads no clock: the caller passes
`now`, sends or delivers the result, and counts through `count`. A worker runs
every frame an edge pushes through one; an edge runs small batches through its
own when that is quicker than a round trip to a worker (edge "inline crypto",
docs/architecture.md). The counters come from the edge in both cases (reserved
before encrypting, committed to the replay window after decrypting), so where
the AEAD runs changes nothing about invariants 1 and 2.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fabric.control import frames
from fabric.control.frames import Frame
from fabric.dataplane import gro, ippacket
from fabric.protocols.wireguard.constants import (
    CRYPTO_MODES,
    MSG_TRANSPORT,
    PADDING_MULTIPLE,
    REJECT_AFTER_TIME,
    TRANSPORT_HEADER_SIZE,
)

_HDR = struct.Struct("<IIQ")
_NONCE = struct.Struct("<4xQ")
_ZEROS = bytes(PADDING_MULTIPLE)
_MIN_DATAGRAM = TRANSPORT_HEADER_SIZE + 16  # header and the AEAD tag of an empty plaintext
ZERO_PSK = bytes(32)


@dataclass
class PeerInfo:
    psk: bytes
    allowed: ippacket.PrefixTable[bool]


@dataclass
class SessionKeys:
    sid: int
    peer: bytes
    local_index: int
    remote_index: int
    created: float
    seal: Any
    open: Any


def peer_info(v: dict[str, Any]) -> PeerInfo:
    """A peer record of the broker (peer/<key>) as the engine needs it."""
    table: ippacket.PrefixTable[bool] = ippacket.PrefixTable()
    for net in v["allowed_ips"]:
        table.add(net, True)
    return PeerInfo(v.get("psk") or ZERO_PSK, table)


def session_keys(v: dict[str, Any]) -> SessionKeys | None:
    """A session record (session/<id>) with its keys; None for one without keys
    (the public copy an edge gets with a handshake result)."""
    send, recv = v.get("send_key"), v.get("recv_key")
    if not send or not recv:
        return None
    return SessionKeys(int(v["id"]), v["peer"], int(v["local_index"]), int(v["remote_index"]),
                       float(v["created"]), ChaCha20Poly1305(send), ChaCha20Poly1305(recv))


class CryptoEngine:
    """Sessions' keys and peers' allowed IPs, and the AEAD over frames of them.

    `count(name, n)` receives what happened (decrypted, encrypted, drop_*);
    `packets`, if given, adds up packets per session id. `gro` coalesces the TCP
    segments a DECRYPT frame yields (fabric/dataplane/gro.py).
    """

    def __init__(self, count: Callable[[str, int], None], gro: bool = True,
                 packets: dict[int, int] | None = None) -> None:
        self.count = count
        self.gro = gro
        self.packets = packets
        self.sessions: dict[int, SessionKeys] = {}
        self.peers: dict[bytes, PeerInfo] = {}

    def install(self, v: dict[str, Any]) -> bool:
        """Keep a session's keys (ValueError/KeyError/TypeError on a malformed record);
        False if the record carries none."""
        sid = int(v["id"])
        if sid in self.sessions:
            return True
        keys = session_keys(v)
        if keys is None:
            return False
        self.sessions[sid] = keys
        return True

    def remove(self, sid: int) -> None:
        self.sessions.pop(sid, None)
        if self.packets is not None:
            self.packets.pop(sid, None)

    def session(self, frame: Frame, now: float) -> tuple[SessionKeys | None, Frame | None]:
        """The frame's session, or None and the (empty) result the edge waits for."""
        s = self.sessions.get(frame.session_id)
        if s is None:
            self.count("drop_unknown_session", len(frame.packets))
        elif now - s.created > REJECT_AFTER_TIME:  # whitepaper 6.1
            self.count("drop_expired", len(frame.packets))
            s = None
        if s is None:
            return None, self._empty(frame)
        return s, None

    @staticmethod
    def _empty(frame: Frame) -> Frame | None:
        # the edge releases results in order: an ordered frame gets an empty answer
        if not frame.seq:
            return None
        kind = frames.TUN_WRITE if frame.kind == frames.DECRYPT else frames.UDP_SEND
        return Frame(kind, frame.edge, frame.session_id, 0, frame.addr, [], seq=frame.seq)

    def decrypt(self, frame: Frame, now: float) -> Frame | None:
        """DECRYPT -> TUN_WRITE: the authenticated plaintexts (coalesced where they can
        be) and every datagram's counter, for the edge to commit; None if nothing is
        owed to the edge."""
        s, empty = self.session(frame, now)
        if s is None:
            return empty
        peer = self.peers.get(s.peer)
        if peer is None:
            self.count("drop_unknown_peer", len(frame.packets))
            return self._empty(frame)
        count = self.count
        opn = s.open.decrypt
        allowed = peer.allowed.lookup
        local = s.local_index
        unpack, nonce, inner_length = _HDR.unpack_from, _NONCE.pack, ippacket.inner_length
        plain: list[bytes] = []
        counters: list[int] = []
        sizes: list[int] = []
        last_src, last_ok = b"", False  # a frame's packets mostly share one source
        for pkt in frame.packets:
            size = len(pkt)
            if size < _MIN_DATAGRAM:
                count("drop_short", 1)
                continue
            kind, receiver, counter = unpack(pkt, 0)
            if kind != MSG_TRANSPORT or receiver != local:
                count("drop_unknown_index", 1)
                continue
            try:
                pt = opn(nonce(counter), pkt[TRANSPORT_HEADER_SIZE:], None)
            except InvalidTag:
                count("drop_decrypt", 1)
                continue
            if pt:  # an empty plaintext is a keepalive (whitepaper 6.5)
                v = pt[0] >> 4
                if v == 4 and len(pt) >= 20:  # IPv4 inline: inner_length and source
                    n = (pt[2] << 8) | pt[3]
                    if not 20 <= n <= len(pt):
                        n = 0
                    src = pt[12:16]
                else:
                    n = inner_length(pt)
                    src = pt[8:24] if n else b""
                if not n:
                    count("drop_bad_inner", 1)
                    continue
                if src != last_src:
                    last_src, last_ok = src, bool(allowed(src))
                if not last_ok:  # whitepaper 4: cryptokey routing
                    count("drop_source_not_allowed", 1)
                    continue
                if n != len(pt):
                    pt = pt[:n]  # the padding (5.4.6) goes
            plain.append(pt)
            counters.append(counter)
            sizes.append(size)
        count("decrypted", len(plain))
        if self.packets is not None:
            self.packets[s.sid] = self.packets.get(s.sid, 0) + len(plain)
        if not plain and not frame.seq:
            return None
        out: list[bytes] = []
        aux: list[int] = []
        order: list[int] = []
        if self.gro and len(plain) > 1:  # one packet has nothing to merge with
            for data, members in gro.coalesce(plain):
                out.append(data)
                if len(members) == 1:  # most often: an ACK, or a packet of another kind
                    aux += (1, sizes[members[0]])
                else:
                    aux += (len(members), sum(sizes[i] for i in members))
                order += members
            count("gro_packets", len(out))
        else:  # no coalescing, or one packet (nothing to merge with)
            out = [gro.PLAIN + p if p else p for p in plain]
            aux = [x for size in sizes for x in (1, size)]
            order = list(range(len(plain)))
        return Frame(frames.TUN_WRITE, frame.edge, s.sid, 0, frame.addr, out, aux,
                     seq=frame.seq, counters=[counters[i] for i in order])

    def encrypt(self, frame: Frame, now: float) -> Frame | None:
        """ENCRYPT -> UDP_SEND: transport datagrams with counters counter0, counter0+1, ..."""
        s, empty = self.session(frame, now)
        if s is None:
            return empty
        seal = s.seal.encrypt
        out: list[bytes] = []
        append = out.append
        counter = frame.counter0
        hdr, nonce, join, remote = _HDR.pack, _NONCE.pack, b"".join, s.remote_index
        for pkt in frame.packets:
            pad = -len(pkt) % PADDING_MULTIPLE  # whitepaper 5.4.6: one copy, padding included
            append(hdr(MSG_TRANSPORT, remote, counter) + seal(nonce(counter), join((pkt, _ZEROS[:pad])) if pad else pkt, None))
            counter += 1
        self.count("encrypted", len(out))
        if self.packets is not None:
            self.packets[s.sid] = self.packets.get(s.sid, 0) + len(out)
        return Frame(frames.UDP_SEND, frame.edge, s.sid, 0, frame.addr, out, seq=frame.seq)


# Where an edge runs the AEAD of its data frames (`fabric edge --crypto`):
#   edge     always in the edge (when it holds the session's keys)
#   workers  always in a worker (the edge only moves packets)
#   auto     in the edge, and in workers while the edge is saturated and the host
#            has idle cores for them (CryptoPlacement below)
BUSY_WINDOW = 0.1  # seconds over which an edge measures how busy it is
BUSY_HIGH = 0.9  # busier than this: hand crypto to workers (auto, with idle cores)
BUSY_LOW = 0.5  # less busy than this while handing off: take crypto back
IDLE_TO_OFFLOAD = 1.0  # idle cores the host needs before workers take the AEAD
IDLE_TO_KEEP = 0.25  # fewer idle cores while handing off: the host is full, take it back
RETRY_AFTER = 5.0  # seconds inline after giving up for want of cores, before trying again


class CryptoPlacement:
    """Decides, per data frame, whether the edge runs the AEAD itself (`inline`).

    A round trip through a worker costs four ZeroMQ hand-offs (edge -> worker ->
    edge, each through two I/O threads): that dominates idle latency and, with no
    idle core beside the edge, throughput too (docs/performance.md: one edge on
    a 2-core VM shared with the client, 764 -> 434 Mbit/s up with the AEAD in a
    worker). Workers pay only when they add cores that would otherwise idle: a
    saturated edge on a host with idle cores. Sans-I/O: the edge reports its
    working time with `work(seconds, now)`; `idle_cores()` (given) says how many
    of the host's cores idled since it was last asked, None if unknown.
    Hysteresis keeps it from flapping: handed off, the edge is less busy for the
    same traffic (BUSY_LOW), and the workers use the idle cores it saw, so it
    takes the AEAD back only when the host is full (IDLE_TO_KEEP) and then
    waits RETRY_AFTER before handing off again.
    """

    def __init__(self, mode: str, idle_cores: Callable[[], float | None] = lambda: None) -> None:
        if mode not in CRYPTO_MODES:
            raise ValueError(f"crypto placement {mode!r}: use one of {', '.join(CRYPTO_MODES)}")
        self.mode = mode
        self.idle_cores = idle_cores
        self.offloading = mode == "workers"
        self._start = -1.0
        self._busy = 0.0
        self._retry_at = 0.0
        self.busy = 0.0  # the last window's busy fraction
        self.idle = 0.0  # idle cores in the last window (0 if unknown)

    def work(self, seconds: float, now: float) -> None:
        """The edge spent `seconds` handling traffic, up to `now`."""
        if self._start < 0:
            self._start = now
        self._busy += seconds
        span = now - self._start
        if span < BUSY_WINDOW:
            return
        self.busy = min(1.0, self._busy / span)
        self._start, self._busy = now, 0.0
        if self.mode != "auto":
            return
        idle = self.idle_cores()
        self.idle = idle if idle is not None else 0.0
        if not self.offloading:
            if self.busy >= BUSY_HIGH and self.idle >= IDLE_TO_OFFLOAD and now >= self._retry_at:
                self.offloading = True
        elif self.busy <= BUSY_LOW:
            self.offloading = False
        elif self.idle < IDLE_TO_KEEP:
            self.offloading = False
            self._retry_at = now + RETRY_AFTER

    @property
    def inline(self) -> bool:
        return not self.offloading


class HostIdle:
    """Idle cores among `cpus` between calls, from /proc/stat (idle + iowait ticks)."""

    def __init__(self, cpus: set[int], path: str = "/proc/stat") -> None:
        self.cpus = cpus
        self.path = path
        self._last = self._read()

    def _read(self) -> dict[int, tuple[int, int]] | None:
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except OSError:
            return None
        out: dict[int, tuple[int, int]] = {}
        for line in text.split(b"\n"):
            if not line.startswith(b"cpu") or line[3:4] == b" ":
                continue
            name, *fields = line.split()
            try:
                cpu = int(name[3:])
                ticks = [int(x) for x in fields[:8]]
            except ValueError:
                continue
            if cpu in self.cpus and len(ticks) >= 5:
                out[cpu] = (ticks[3] + ticks[4], sum(ticks))
        return out

    def __call__(self) -> float | None:
        now, last = self._read(), self._last
        self._last = now
        if not now or not last:
            return None
        idle = 0.0
        for cpu, (i1, t1) in now.items():
            i0, t0 = last.get(cpu, (i1, t1))
            if t1 > t0:
                idle += (i1 - i0) / (t1 - t0)
        return idle
