"""WireGuard at an edge: datagrams classified by header, handshakes guarded, timers.

`split` is the receive path's first step (fabric/dataplane/edge.py): transport
datagrams grouped by (receiver index, source) with their counters (whitepaper
5.4.6), handshake messages set aside for the control path, the rest counted as
drops, and the socket filter's samples counted as what the kernel dropped
(fabric/protocols/wireguard/guard.py, "the kernel's share"). `control` is the
guard's verdict on a handshake (5.4.7): to a worker, a cookie reply, or a drop.
The timer policy (whitepaper 6) is data the edge's protocol-neutral timers read.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from fabric.control.records import SERVER, PeerRecord, SessionRecord
from fabric.protocols.base import FORWARD, EdgeSide, Keepalive, Protocol, Reply, Split
from fabric.protocols.wireguard import timers
from fabric.protocols.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from fabric.protocols.wireguard.guard import (
    COOKIE,
    PASS,
    SAMPLE,
    SAMPLE_MALFORMED,
    SAMPLE_UNKNOWN_INDEX,
    HandshakeGuard,
    filter_program,
)
from fabric.protocols.wireguard.messages import TRANSPORT
from fabric.protocols.wireguard.noise import CookieChecker

_SIZES = {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE, MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE}
_ZERO3 = b"\x00\x00\x00"
STAGED_MAX = 16  # packets kept per peer while its handshake runs


class WgEdge(EdgeSide):
    """WireGuard at one edge. `shared_load`: the host-wide "under load until" time as
    (read, write) callables (the session table's header), or None for the edge's own."""

    def __init__(self, protocol: Protocol, count: Callable[[str, int], None],
                 shared_load: tuple[Callable[[], float], Callable[[float], None]] | None = None) -> None:
        self.protocol = protocol
        self._count = count
        self._shared = shared_load
        self.cookies: CookieChecker | None = None
        self.guard: HandshakeGuard | None = None  # made with the cookie checker (server key)
        self.unanswered_after = timers.NEW_HANDSHAKE_AFTER  # whitepaper 6.4
        self.handshake_retry = REKEY_TIMEOUT
        self.staged_max = STAGED_MAX

    def on_record(self, key: bytes, value: dict[str, Any]) -> None:
        if key != SERVER:
            return
        public = value["public"]
        if not isinstance(public, bytes) or len(public) != 32:
            raise ValueError("server: public is a 32-byte key")
        if self.cookies is None or self.cookies.local_public != public:
            self.cookies = CookieChecker(public)
            if self.guard is None:
                read, write = self._shared if self._shared else (None, None)
                self.guard = HandshakeGuard(self.cookies, read, write, self._count)
            else:
                self.guard.cookies = self.cookies

    # --- receive ------------------------------------------------------------------------

    def split(self, datagrams: Sequence[bytes], sources: Sequence[Any], filtered: bool) -> Split:
        out = Split()
        groups, control, drops = out.groups, out.control, out.drops
        unpack = TRANSPORT.unpack_from
        # the group of the last transport datagram: the next from the same source to the
        # same receiver index joins it without another look-up
        last_receiver, last_sa = -1, None
        last_pkts: list[bytes] = []
        last_ctrs: list[int] = []
        for data, sa in zip(datagrams, sources, strict=True):
            n = len(data)
            if n >= TRANSPORT_MIN_SIZE:
                head, receiver, counter = unpack(data, 0)
                if head == MSG_TRANSPORT:  # type 4 with zero reserved bytes (whitepaper 5.4.6)
                    if receiver == last_receiver and sa == last_sa:
                        last_pkts.append(data)
                        last_ctrs.append(counter)
                        continue
                    group = groups.get((receiver, sa))
                    if group is None:
                        group = groups[(receiver, sa)] = ([], [])
                    group[0].append(data)
                    group[1].append(counter)
                    last_receiver, last_sa = receiver, sa
                    last_pkts, last_ctrs = group
                    continue
            if n < 4 or data[1:4] != _ZERO3:
                if filtered and n == SAMPLE_MALFORMED:  # one in SAMPLE of what the filter dropped
                    reason, k = "kernel_malformed", SAMPLE
                elif filtered and n == SAMPLE_UNKNOWN_INDEX:
                    reason, k = "kernel_unknown_index", SAMPLE
                else:
                    reason, k = ("short" if n < 4 else "bad_type"), 1
                drops[reason] = drops.get(reason, 0) + k
                continue
            kind = data[0]
            if kind == MSG_TRANSPORT:
                reason = "short"
            elif kind not in _SIZES:
                reason = "bad_type"
            elif n != _SIZES[kind]:
                reason = "bad_size"
            elif kind == MSG_COOKIE_REPLY:
                reason = "unexpected_cookie"  # the fabric answers cookies, it does not ask
            else:
                control.append((data, sa))
                continue
            drops[reason] = drops.get(reason, 0) + 1
        return out

    def begin(self, now: float) -> None:
        if self.guard is not None:
            self.guard.refresh(now)  # the host-wide under-load state, once per batch

    def control(self, datagram: bytes, addr: bytes, now: float) -> str | Reply:
        guard = self.guard
        if guard is None:
            return "not_ready"
        verdict = guard.check(datagram, addr, now)  # fabric/protocols/wireguard/guard.py, 5.4.7
        if verdict is PASS:
            return FORWARD
        if verdict is COOKIE:
            assert self.cookies is not None
            return Reply(self.cookies.create_reply(datagram, addr, now), "cookie_replies")
        return verdict

    # --- the kernel's share -----------------------------------------------------------------

    def filter_program(self, data_keys: Collection[int]) -> bytes | None:
        from fabric.protocols.wireguard.guard import MAX_FILTER_INDEXES

        banned = list(self.guard.banned) if self.guard is not None else []
        return filter_program(data_keys if len(data_keys) <= MAX_FILTER_INDEXES else None, banned)

    @property
    def filter_dirty(self) -> bool:
        return self.guard is not None and self.guard.dirty

    def filter_built(self) -> None:
        if self.guard is not None:
            self.guard.dirty = False

    # --- timers (whitepaper 6) ----------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self.guard is not None:
            self.guard.expire(now)

    def keepalive(self, peer: PeerRecord) -> Keepalive:
        # 6.5: passive after KEEPALIVE_TIMEOUT of receiving alone; persistent if configured
        return Keepalive(timers.PASSIVE_KEEPALIVE, float(peer.keepalive), b"")

    def rekey_on_send(self, session: SessionRecord, now: float) -> bool:
        # 6.2: the initiator of a session rekeys upon sending once it is REKEY_AFTER_TIME old
        return timers.rekey_on_send(session.initiator, now - session.created)

    def confirm_payload(self, session: SessionRecord) -> bytes | None:
        # 5.4.5: the responder may not send until it hears from us: a keepalive at once
        return b"" if session.initiator else None

    def under_load(self, now: float) -> bool:
        return self.guard is not None and self.guard.under_load(now)

    def gauges(self, now: float) -> dict[str, int]:
        # 1 while the host is under load (handshakes need a cookie in mac2); sources whose
        # handshakes the socket filter drops
        return {"under_load": int(self.under_load(now)),
                "banned_sources": len(self.guard.banned) if self.guard is not None else 0}
