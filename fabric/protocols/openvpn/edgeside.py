"""OpenVPN at an edge: datagrams classified by their first byte, hard resets answered
without state, the rest of the control channel pinned to one worker, the timer policy.

* P_DATA_V2 (openvpn-protocol.md 3.1): grouped by data key = peer-id << 3 | key id,
  the packet id being the counter the session table checks and the AEAD's nonce.
  P_DATA_V1 carries no peer-id: a client that announced no P_DATA_V2 (IV_PROTO) is pushed
  none, and its packets are matched by their source address to its session's peer-id,
  as mudp.c does; such a client cannot float.
* P_CONTROL_HARD_RESET_CLIENT_V2 (1.1): answered here with the server's hard reset,
  whose session id is a cookie (server.py), as OpenVPN 2.6 answers statelessly
  (ssl_pkt.c tls_reset_standalone); bounded per source and per edge, so a flood of
  resets costs an HMAC each and no memory.
* every other control packet: authenticated (tls-crypt or tls-auth), then forwarded
  to the worker that its client session id picks (Forward), where its TLS lives.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from fabric.control.records import PeerRecord, SessionRecord
from fabric.dataplane.ratelimit import TokenBucket
from fabric.protocols.base import EdgeSide, Forward, Keepalive, Protocol, Reply, Split
from fabric.protocols.openvpn.constants import (
    DATA_V1_MIN_SIZE,
    DATA_V2_MIN_SIZE,
    P_CONTROL_HARD_RESET_CLIENT_V2,
    P_CONTROL_HARD_RESET_CLIENT_V3,
    P_CONTROL_HARD_RESET_SERVER_V2,
    P_DATA_V1,
    P_DATA_V2,
    P_FIRST_OPCODE,
    P_LAST_OPCODE,
    PING_STRING,
)
from fabric.protocols.openvpn.server import SERVER_KEY, ServerConfig, cookie_now
from fabric.protocols.openvpn.wire import ControlPacket, WireError

# implementation: what one source and one edge may cost (resets answered, packets forwarded)
RESETS_PER_SOURCE = 10.0  # a client retransmits its reset after 2, 4, 8 s (reliable.c)
RESETS_BURST = 5.0
RESETS_PER_EDGE = 1000.0
CONTROL_PER_SOURCE = 200.0  # a TLS handshake is about ten packets each way
CONTROL_BURST = 100.0
CONTROL_PER_EDGE = 10000.0
_EDGE = b"edge"
_HEAD_V2 = struct.Struct(">II")  # P_DATA_V2: opcode | key id | peer-id, then the packet id
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _packed(sa: Any) -> bytes:
    """A socket address as the 18 bytes of a session's endpoint (v4 as v4-mapped v6)."""
    host, port = str(sa[0]), int(sa[1])
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    else:
        raw = _V4_MAPPED + socket.inet_aton(host)
    return raw + port.to_bytes(2, "big")


class OvpnEdge(EdgeSide):
    def __init__(self, protocol: Protocol, count: Callable[[str, int], None]) -> None:
        self.protocol = protocol
        self._count = count
        self.config: ServerConfig | None = None
        self.resets = TokenBucket(RESETS_PER_SOURCE, RESETS_BURST)
        self.resets_edge = TokenBucket(RESETS_PER_EDGE, RESETS_PER_EDGE)
        self.control_src = TokenBucket(CONTROL_PER_SOURCE, CONTROL_BURST)
        self.control_edge = TokenBucket(CONTROL_PER_EDGE, CONTROL_PER_EDGE)
        self.v1_peers: dict[bytes, int] = {}  # a P_DATA_V1 client's address -> its peer-id
        self.v1_sessions: dict[int, bytes] = {}  # session id -> that address
        # the server cannot start a connection: no initiations, nothing staged
        self.unanswered_after = None
        self.handshake_retry = math.inf
        self.staged_max = 0

    def on_record(self, key: bytes, value: dict[str, Any]) -> None:
        if key == SERVER_KEY:
            self.config = ServerConfig.from_wire(value)

    # --- receive ------------------------------------------------------------------------

    def split(self, datagrams: Sequence[bytes], sources: Sequence[Any], filtered: bool) -> Split:
        out = Split()
        groups, control, drops = out.groups, out.control, out.drops
        unpack = _HEAD_V2.unpack_from
        # a batch is mostly one session's datagrams from one address: the group of the
        # previous P_DATA_V2 datagram takes the next with the same first word and source
        last_word: int | None = None
        last_src: Any = None
        last_pkts: list[bytes] = []
        last_pids: list[int] = []
        for pkt, src in zip(datagrams, sources, strict=True):
            if not pkt:
                drops["short"] = drops.get("short", 0) + 1
                continue
            op = pkt[0] >> 3
            if op == P_DATA_V2:
                if len(pkt) < DATA_V2_MIN_SIZE:
                    drops["short"] = drops.get("short", 0) + 1
                    continue
                word, pid = unpack(pkt)
                if not pid:  # packet_id.c packet_id_test: 0 is never valid
                    drops["zero_packet_id"] = drops.get("zero_packet_id", 0) + 1
                    continue
                if word == last_word and src == last_src:
                    last_pkts.append(pkt)
                    last_pids.append(pid)
                    continue
                # data key = peer-id << 3 | key id: the first word without the opcode
                key = ((word & 0xFFFFFF) << 3) | (word >> 24 & 7)
                got = groups.get((key, src))
                if got is None:
                    got = groups[(key, src)] = ([pkt], [pid])
                else:
                    got[0].append(pkt)
                    got[1].append(pid)
                last_word, last_src, last_pkts, last_pids = word, src, got[0], got[1]
            elif op == P_DATA_V1:
                peer_id = self.v1_peers.get(_packed(src)) if self.v1_peers and len(pkt) >= DATA_V1_MIN_SIZE else None
                pid = int.from_bytes(pkt[1:5], "big") if peer_id is not None else 0
                if peer_id is None or not pid:
                    reason = "v1_unknown_source" if peer_id is None else "zero_packet_id"
                    drops[reason] = drops.get(reason, 0) + 1
                    continue
                key = (peer_id << 3) | (pkt[0] & 7)
                got = groups.get((key, src))
                if got is None:
                    groups[(key, src)] = ([pkt], [pid])
                else:
                    got[0].append(pkt)
                    got[1].append(pid)
            elif P_FIRST_OPCODE <= op <= P_LAST_OPCODE:
                control.append((pkt, src))
            else:
                drops["bad_opcode"] = drops.get("bad_opcode", 0) + 1
        return out

    # --- sessions: clients without peer-id are known by their address (mudp.c) -------------

    def on_session(self, record: SessionRecord) -> None:
        if record.params.get("v1") and len(record.endpoint) == 18:
            peer_id = record.params.get("peer_id")
            if isinstance(peer_id, int):
                self.v1_peers[record.endpoint] = peer_id
                self.v1_sessions[record.id] = record.endpoint

    def on_session_gone(self, sid: int) -> None:
        addr = self.v1_sessions.pop(sid, None)
        if addr is not None and addr not in self.v1_sessions.values():
            self.v1_peers.pop(addr, None)

    def control(self, datagram: bytes, addr: bytes, now: float) -> str | Reply | Forward:
        cfg = self.config
        if cfg is None:
            return "not_ready"
        op = datagram[0] >> 3
        source = addr[:16]
        if op == P_CONTROL_HARD_RESET_CLIENT_V3:
            return "tls_crypt_v2"  # not offered: fabric's profiles use tls-crypt v1
        if op == P_CONTROL_HARD_RESET_CLIENT_V2:
            if not self.resets.allow(source, now):
                return "reset_rate_source"
            if not self.resets_edge.allow(_EDGE, now):
                return "reset_rate_edge"
        else:
            if not self.control_src.allow(source, now):
                return "control_rate_source"
            if not self.control_edge.allow(_EDGE, now):
                return "control_rate_edge"
        wrap = cfg.wrapper()
        try:
            packet, _, _ = wrap.unwrap(datagram)
            p = ControlPacket.unpack(packet)
        except WireError as exc:
            return exc.reason
        if op != P_CONTROL_HARD_RESET_CLIENT_V2:
            return Forward(p.session_id)
        if p.message_id != 0 or p.acks:
            return "bad_reset"
        server_sid = cookie_now(cfg.cookie_key, addr, p.session_id, now)
        reply = ControlPacket(P_CONTROL_HARD_RESET_SERVER_V2, 0, server_sid, (0,), p.session_id, 0)
        # the first wrapped packet of our side: id 1 (the worker's session goes on from 2)
        return Reply(wrap.wrap(reply.pack(), 1, int(now)), "hard_reset_replies")

    # --- timers -------------------------------------------------------------------------

    def keepalive(self, peer: PeerRecord) -> Keepalive:
        """ping.c: the ping string when nothing was sent for `ping` seconds (pushed to the
        client with ping-restart, so the client restarts if the server goes silent)."""
        ping = float(self.config.ping) if self.config is not None else 10.0
        return Keepalive(0.0, ping, PING_STRING)

