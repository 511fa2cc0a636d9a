"""WireGuard (whitepaper section numbers in comments) behind fabric.protocols.base.

    constants   specification and implementation constants
    crypto      HASH, MAC, HMAC, KDF, DH, AEAD, XAEAD (5.4)
    messages    wire formats (5.4.2, 5.4.3, 5.4.6, 5.4.7)
    noise       Noise_IKpsk2 handshake and cookies (5.4.2-5.4.7)
    guard       what a handshake may cost an edge, and its socket filter (5.4.7)
    edgeside    classification, the guard's verdicts and the timer policy at an edge
    handshakes  handshakes in a worker, committed through the broker
    authority   the broker's rules for commits (TAI64N, flood, receiver indexes)
    datapath    the AEAD of a session's batches (5.4.6)
    timers      the rules of 6, for the edges and the endpoint alike
    profile     the wg-quick configuration of a new peer
    endpoint    a whole sans-I/O endpoint (timers of 6 included): the peer in tests
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabric.control.records import SessionRecord
from fabric.protocols.base import CounterSpace, Protocol, WorkerHost
from fabric.protocols.wireguard.constants import (
    MAX_SESSIONS_PER_PEER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REPLAY_WINDOW_SIZE,
    SESSION_KEEP_TIME,
)


class WireGuard(Protocol):
    name = "wireguard"
    number = 0
    # whitepaper 5.4.6 and 6.1: 64-bit counters from 0, never REJECT_AFTER_MESSAGES;
    # RFC 6479 window of 8128 behind the newest (wireguard-go replay/replay.go)
    counters = CounterSpace(bits=64, first=0, limit=REJECT_AFTER_MESSAGES, window=REPLAY_WINDOW_SIZE)

    def __init__(self) -> None:
        self.lifetime = REJECT_AFTER_TIME
        self.keep_time = SESSION_KEEP_TIME
        self.max_sessions_per_peer = MAX_SESSIONS_PER_PEER

    def describe(self, record: SessionRecord) -> dict[str, Any]:
        return {"cipher": "CHACHA20-POLY1305"}  # whitepaper 5.4.6: AEAD

    def edge(self, count: Callable[[str, int], None], shared_load: Any = None) -> Any:
        from fabric.protocols.wireguard.edgeside import WgEdge

        return WgEdge(self, count, shared_load)

    def worker(self, host: WorkerHost) -> Any:
        from fabric.protocols.wireguard.handshakes import WgWorker

        return WgWorker(self, host)

    def authority(self) -> Any:
        from fabric.protocols.wireguard.authority import WgAuthority

        return WgAuthority(self)

    def keys(self, record: SessionRecord) -> Any:
        from fabric.protocols.wireguard.datapath import WgKeys

        return WgKeys(record) if record.keys else None

    def client_profile(self, reply: dict[str, Any], endpoint: str) -> str:
        from fabric.protocols.wireguard.profile import wg_quick

        return wg_quick(reply, endpoint)
