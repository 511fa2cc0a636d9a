"""The AEAD of data frames, protocol-neutral, shared by workers and edges.

A `CryptoEngine` holds session keys (each protocol's `SessionKeys`, built from the
records the broker publishes) and peers' allowed IPs, and turns a DECRYPT or
ENCRYPT frame into its result frame (TUN_WRITE or UDP_SEND). It does no I/O and
reads no clock: the caller passes `now`, sends or delivers the result, and counts
through `count`. A worker runs every frame an edge pushes through one; an edge
runs frames through its own when that is quicker than a round trip to a worker
(docs/architecture.md, "Where the AEAD runs"). The counters come from the edge in
both cases (reserved before sealing, committed to the replay window after
opening), so where the AEAD runs changes nothing about invariants 1 and 2.

The protocol opens and seals (`SessionKeys.open`/`seal`, with the inner packet's
length and source checked in the same pass); the engine keeps sessions and
lifetimes, and coalesces TCP segments for the TUN (fabric/dataplane/gro.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fabric.control import frames
from fabric.control.frames import Frame
from fabric.control.records import PeerRecord, SessionRecord
from fabric.dataplane import gro, ippacket
from fabric.protocols.base import END_SESSION, Protocol, SessionKeys

MAX_ENDED = 4096  # sessions ended per report (the peer repeats its goodbye)


class CryptoEngine:
    """Sessions' keys and peers' allowed IPs, and the AEAD over frames of them.

    `count(name, n)` receives what happened (decrypted, encrypted, drop_*);
    `packets`, if given, adds up packets per session id. `gro` coalesces the TCP
    segments a DECRYPT frame yields (fabric/dataplane/gro.py).
    """

    def __init__(self, count: Callable[[str, int], None], protocols: Mapping[str, Protocol],
                 gro: bool = True, packets: dict[int, int] | None = None) -> None:
        self.count = count
        self.protocols = protocols
        self.gro = gro
        self.packets = packets
        self.sessions: dict[int, SessionKeys] = {}
        self.expires: dict[int, float] = {}  # session id -> the protocol's end of its life
        self.allowed: dict[bytes, ippacket.PrefixTable[bool]] = {}  # peer -> its allowed IPs
        self.ended: set[int] = set()  # sessions whose peer said goodbye (reported, then ended)

    def set_peer(self, peer: PeerRecord) -> None:
        table: ippacket.PrefixTable[bool] = ippacket.PrefixTable()
        for net in peer.allowed_ips:
            table.add(net, True)
        self.allowed[peer.public] = table

    def remove_peer(self, public: bytes) -> None:
        self.allowed.pop(public, None)

    def install(self, record: SessionRecord) -> bool:
        """Keep a session's keys (RecordError on keys that are not its protocol's);
        False if the record carries none, or its protocol is not run here."""
        if record.id in self.sessions:
            return True
        proto = self.protocols.get(record.protocol)
        if proto is None:
            return False
        keys = proto.keys(record)
        if keys is None:
            return False
        self.sessions[record.id] = keys
        self.expires[record.id] = proto.expires(record)
        return True

    def take_ended(self) -> dict[str, list[int]]:
        """For a report: the sessions whose peer said goodbye since the last one."""
        if not self.ended:
            return {}
        out, self.ended = sorted(self.ended), set()
        return {"ended": out[:MAX_ENDED]}

    def remove(self, sid: int) -> None:
        self.sessions.pop(sid, None)
        self.expires.pop(sid, None)
        if self.packets is not None:
            self.packets.pop(sid, None)

    def session(self, frame: Frame, now: float) -> tuple[SessionKeys | None, Frame | None]:
        """The frame's session, or None and the (empty) result the edge waits for."""
        s = self.sessions.get(frame.session_id)
        if s is None:
            self.count("drop_unknown_session", len(frame.packets))
        elif now > self.expires[frame.session_id]:  # WireGuard: REJECT_AFTER_TIME (6.1)
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
        allowed = self.allowed.get(s.peer)
        if allowed is None:
            self.count("drop_unknown_peer", len(frame.packets))
            return self._empty(frame)
        drops: dict[str, int] = {}
        plain, counters, sizes = s.open(frame.packets, allowed.lookup, drops)
        for reason, n in drops.items():
            self.count("drop_" + reason, n)
        if drops.get(END_SESSION):  # the peer said goodbye inside the data (OpenVPN's OCC_EXIT)
            self.ended.add(s.sid)
        self.count("decrypted", len(plain))
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
            self.count("gro_packets", len(out))
        else:  # no coalescing, or one packet (nothing to merge with)
            out = [gro.PLAIN + p if p else p for p in plain]
            aux = [x for size in sizes for x in (1, size)]
            order = list(range(len(plain)))
        return Frame(frames.TUN_WRITE, frame.edge, s.sid, 0, frame.addr, out, aux,
                     seq=frame.seq, counters=[counters[i] for i in order])

    def encrypt(self, frame: Frame, now: float) -> Frame | None:
        """ENCRYPT -> UDP_SEND: datagrams with counters counter0, counter0 + 1, ..."""
        s, empty = self.session(frame, now)
        if s is None:
            return empty
        out = s.seal(frame.counter0, frame.packets)
        self.count("encrypted", len(out))
        if self.packets is not None:
            self.packets[s.sid] = self.packets.get(s.sid, 0) + len(out)
        return Frame(frames.UDP_SEND, frame.edge, s.sid, 0, frame.addr, out, seq=frame.seq)
