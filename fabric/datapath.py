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

from fabric import frames, gro, ippacket
from fabric.constants import (
    CRYPTO_MODES,
    MSG_TRANSPORT,
    PADDING_MULTIPLE,
    REJECT_AFTER_TIME,
    TRANSPORT_HEADER_SIZE,
)
from fabric.frames import Frame

_HDR = struct.Struct("<IIQ")
_NONCE = struct.Struct("<4xQ")
_ZEROS = bytes(PADDING_MULTIPLE)
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
    segments a DECRYPT frame yields (fabric/gro.py).
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
        plain: list[bytes] = []
        counters: list[int] = []
        sizes: list[int] = []
        for pkt in frame.packets:
            if len(pkt) < TRANSPORT_HEADER_SIZE + 16:
                count("drop_short", 1)
                continue
            kind, receiver, counter = _HDR.unpack_from(pkt, 0)
            if kind != MSG_TRANSPORT or receiver != local:
                count("drop_unknown_index", 1)
                continue
            try:
                pt = opn(_NONCE.pack(counter), pkt[TRANSPORT_HEADER_SIZE:], None)
            except InvalidTag:
                count("drop_decrypt", 1)
                continue
            if pt:  # an empty plaintext is a keepalive (whitepaper 6.5)
                n = ippacket.inner_length(pt)
                if not n:
                    count("drop_bad_inner", 1)
                    continue
                if not allowed(ippacket.source(pt)):  # whitepaper 4: cryptokey routing
                    count("drop_source_not_allowed", 1)
                    continue
                pt = pt[:n]  # the padding (5.4.6) goes
            plain.append(pt)
            counters.append(counter)
            sizes.append(len(pkt))
        count("decrypted", len(plain))
        if self.packets is not None:
            self.packets[s.sid] = self.packets.get(s.sid, 0) + len(plain)
        if not plain and not frame.seq:
            return None
        out: list[bytes] = []
        aux: list[int] = []
        order: list[int] = []
        if self.gro:
            for data, members in gro.coalesce(plain):
                out.append(data)
                aux += (len(members), sum(sizes[i] for i in members))
                order += members
            count("gro_packets", len(out))
        else:
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
#            has cores beyond the edges' (CryptoPlacement below)
BUSY_WINDOW = 0.1  # seconds over which an edge measures how busy it is
BUSY_HIGH = 0.9  # busier than this: hand crypto to workers (auto, with spare cores)
BUSY_LOW = 0.5  # less busy than this while handing off: take crypto back


class CryptoPlacement:
    """Decides, per data frame, whether the edge runs the AEAD itself (`inline`).

    A round trip through a worker costs four ZeroMQ hand-offs (edge -> worker ->
    edge, each through two I/O threads), which dominates idle latency and, on a
    host with no core to spare, throughput too (docs/performance.md). Workers pay
    only when they add cores the edges cannot use: one busy flow on one edge with
    idle cores beside it. Sans-I/O: the edge reports its working time with
    `work(seconds, now)` and the cores and edges it knows of with `capacity()`.
    The gap between BUSY_HIGH and BUSY_LOW keeps it from flapping: offloaded,
    the edge itself is less busy for the same traffic.
    """

    def __init__(self, mode: str, cores: int = 1, edges: int = 1) -> None:
        if mode not in CRYPTO_MODES:
            raise ValueError(f"crypto placement {mode!r}: use one of {', '.join(CRYPTO_MODES)}")
        self.mode = mode
        self.cores, self.edges = cores, edges
        self.offloading = mode == "workers"
        self._start = -1.0
        self._busy = 0.0
        self.busy = 0.0  # the last window's busy fraction

    def capacity(self, cores: int, edges: int) -> None:
        self.cores, self.edges = cores, max(1, edges)

    @property
    def spare_cores(self) -> bool:
        return self.cores > self.edges

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
        if not self.offloading and self.busy >= BUSY_HIGH and self.spare_cores:
            self.offloading = True
        elif self.offloading and (self.busy <= BUSY_LOW or not self.spare_cores):
            self.offloading = False

    @property
    def inline(self) -> bool:
        return not self.offloading
