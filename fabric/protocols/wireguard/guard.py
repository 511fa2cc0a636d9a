"""What a handshake datagram may cost an edge: DoS mitigation (whitepaper 5.4.7).

Sans-I/O: bytes, a source address and `now` in, a verdict out. The edge acts on
the verdict (pushes the datagram to a worker, sends a cookie reply, or counts a
drop by its reason).

Every client config holds the server's public key, so anyone who ever had one can
make initiations with a valid mac1; only a Diffie-Hellman tells them from real ones.
The rules, in the order they are applied:

1. Not under load (fewer than UNDER_LOAD_HANDSHAKES_PER_SECOND handshakes with a
   valid mac1 reached this host's edges in the last second): mac1 is checked and
   the handshake goes on, within the edge's total handshake budget.
2. Under load (any edge of the host tripped it in the last UNDER_LOAD_HOLD; the
   state is shared through the session table's header): only a handshake whose
   mac2 carries a cookie we gave its source address may cost a Diffie-Hellman.
   * mac2 all zero (no cookie yet, as in every first attempt): it gets a cookie
     reply, if the source's cookie budget (COOKIE_REPLIES_PER_SOURCE) and the
     edge's (COOKIE_REPLIES_PER_SECOND) allow; cookie replies are cheap to ask
     for and dear to make (a random nonce, an XChaCha20-Poly1305, a send), so
     they are bounded. The budgets are checked before mac1: a datagram we will
     not answer costs no hash at all.
   * mac2 present but stale or forged: the same as no cookie.
   * mac2 valid: the per-source rate limit of wireguard-go (20 per second, burst
     5), then the edge's total handshake budget.
3. Whatever is refused is a counted drop, named by its reason.

Sources are keyed by IP address (IPv6 by its /64, as wireguard-go's ratelimiter):
a client behind the same address as an attacker shares its budgets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fabric.dataplane.ratelimit import TokenBucket
from fabric.protocols.wireguard.constants import (
    COOKIE_REPLIES_PER_SECOND,
    COOKIE_REPLIES_PER_SOURCE,
    COOKIE_REPLIES_PER_SOURCE_BURST,
    COOKIE_REPLY_SIZE,
    HANDSHAKE_RATE_BURST,
    HANDSHAKE_RATE_PER_SECOND,
    HANDSHAKES_PER_SECOND,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
    UNDER_LOAD_HOLD,
)
from fabric.protocols.wireguard.noise import CookieChecker

PASS = "pass"  # on to a worker
COOKIE = "cookie"  # answer with a cookie reply
_ZERO_MAC = bytes(16)
_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_key(addr: bytes) -> bytes:
    """The budget key of a packed address (frames.pack_addr: 16-byte IP, then port):
    the IPv4 address, or the /64 of an IPv6 address."""
    return addr[:16] if addr[:12] == _V4_MAPPED else addr[:8]


class HandshakeGuard:
    """The rules of the module docstring for one edge.

    `shared_until` / `set_shared_until` read and write the host-wide "under load
    until" time (the session table's header); without them the state is the edge's own.
    """

    def __init__(
        self,
        cookies: CookieChecker,
        shared_until: Callable[[], float] | None = None,
        set_shared_until: Callable[[float], None] | None = None,
        count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.cookies = cookies
        self._count = count or (lambda name, n: None)
        self._shared_until = shared_until
        self._set_shared_until = set_shared_until
        self.until = 0.0  # under load until this time (the last value seen or set)
        self.window_start = 0.0
        self.window_count = 0  # handshakes in the current one-second window
        self.cookie_per_source = TokenBucket(COOKIE_REPLIES_PER_SOURCE, COOKIE_REPLIES_PER_SOURCE_BURST)
        self.cookie_total = TokenBucket(COOKIE_REPLIES_PER_SECOND, COOKIE_REPLIES_PER_SECOND)
        self.per_source = TokenBucket(HANDSHAKE_RATE_PER_SECOND, HANDSHAKE_RATE_BURST)
        self.total = TokenBucket(HANDSHAKES_PER_SECOND, HANDSHAKES_PER_SECOND)
        # sources whose handshakes the kernel drops (see "the kernel's share" below)
        self.banned: dict[bytes, float] = {}  # source key -> banned until
        self.dirty = False  # the banned set changed since the edge last built its filter
        self.drops_window_start = 0.0
        self.source_drops: dict[bytes, int] = {}  # drops per source in the current second

    # --- under load ----------------------------------------------------------------

    def refresh(self, now: float) -> None:
        """Read the host-wide state (once per batch of datagrams, not per datagram)."""
        if self._shared_until is not None:
            shared = self._shared_until()
            if shared > self.until:
                self.until = shared

    def under_load(self, now: float) -> bool:
        return now < self.until

    def _note(self, now: float) -> None:
        """Count one handshake; past the threshold within a second, the host is under load."""
        if now - self.window_start >= 1.0:
            self.window_start, self.window_count = now, 0
        self.window_count += 1
        if self.window_count > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            until = now + UNDER_LOAD_HOLD
            if until - self.until > 0.1:  # write the shared state at most every 0.1 s
                self.until = until
                if self._set_shared_until is not None:
                    self._set_shared_until(until)

    # --- verdicts --------------------------------------------------------------------

    def check(self, data: bytes, addr: bytes, now: float) -> str:
        """Verdict on a handshake message (initiation or response, size already
        checked) from packed address `addr`: PASS, COOKIE or a drop reason."""
        verdict = self._verdict(data, addr, now)
        if verdict is not PASS and verdict is not COOKIE:
            self._dropped(source_key(addr), now)
        elif self.banned:
            key = source_key(addr)
            if key in self.banned:  # a sample of what the kernel drops, even if it goes on
                self._dropped(key, now)
        return verdict

    def _verdict(self, data: bytes, addr: bytes, now: float) -> str:
        cookies = self.cookies
        mac1_ok = False
        if now >= self.until:
            if not cookies.check_mac1(data):  # whitepaper 5.4.4: always checked
                return "bad_mac1"
            mac1_ok = True
            self._note(now)
            if now >= self.until:
                return PASS if self.total.allow(b"", now) else "handshake_budget"
        else:
            self._note(now)
        # under load (5.4.7): only a valid mac2 buys a Diffie-Hellman
        key = source_key(addr)
        if data[-16:] != _ZERO_MAC:
            if not mac1_ok:
                if not cookies.check_mac1(data):  # mac2 covers mac1: check it first
                    return "bad_mac1"
                mac1_ok = True
            if cookies.check_mac2(data, addr, now):
                if not self.per_source.allow(key, now):
                    return "ratelimited"
                return PASS if self.total.allow(b"", now) else "handshake_budget"
        # no cookie, or a stale one: a cookie reply, within the budgets, which are
        # checked before mac1 so that a datagram we will not answer costs no hash
        if not self.cookie_per_source.allow(key, now):
            return "cookie_ratelimited"
        if not self.cookie_total.allow(b"", now):
            return "cookie_budget"
        if not mac1_ok and not cookies.check_mac1(data):
            return "bad_mac1"
        return COOKIE

    # --- bans ------------------------------------------------------------------------

    def _dropped(self, key: bytes, now: float) -> None:
        """Count a drop against its source; past BAN_DROPS_PER_SECOND in a second, ban
        the source's handshakes (or extend its ban). What a banned source gets through
        is a sample: it stands for SAMPLE datagrams, the rest of which the kernel dropped."""
        if now - self.drops_window_start >= 1.0:
            self.drops_window_start = now
            self.source_drops.clear()
        banned = key in self.banned
        if banned:
            self._count("drop_kernel_banned", SAMPLE - 1)
        n = self.source_drops.get(key, 0) + (SAMPLE if banned else 1)
        self.source_drops[key] = n
        if n >= BAN_DROPS_PER_SECOND:
            if banned:
                self.banned[key] = now + BAN_TIME
            elif len(self.banned) < MAX_BANNED:
                self.banned[key] = now + BAN_TIME
                self.dirty = True
                self._count("bans", 1)
            else:
                self._count("ban_list_full", 1)
            self.source_drops[key] = 0

    def expire(self, now: float) -> None:
        """Lift the bans whose time is up (once a second)."""
        gone = [k for k, until in self.banned.items() if until <= now]
        for k in gone:
            del self.banned[k]
        if gone:
            self.dirty = True


# --------------------------------------------------------------------------- the kernel's share
#
# What the rules above would drop anyway is better dropped by the kernel, before it
# costs a recvfrom (fabric/dataplane/sockfilter.py). The edge's socket filter knows:
#   * the sizes and types of WireGuard messages (whitepaper 5.4): anything else is
#     malformed (short, truncated, oversized, random bytes, a reserved byte set);
#   * the receiver indexes of this fabric's sessions: a transport datagram to any
#     other index is dropped (up to MAX_FILTER_INDEXES sessions; beyond, userspace
#     checks them as before);
#   * banned sources: an address whose handshake datagrams were dropped here more
#     than BAN_DROPS_PER_SECOND times in a second loses its handshakes to the kernel
#     for BAN_TIME (renewed while it goes on). Transport datagrams are never banned
#     (a forged source address must not cut a client's session), and one handshake
#     in SAMPLE still comes through, so a client behind a banned address can still
#     connect, slowly, and the ban sees whether the flood goes on.
# Of what the kernel drops, one datagram in SAMPLE reaches userspace as a sample:
# truncated to SAMPLE_MALFORMED or SAMPLE_UNKNOWN_INDEX bytes (no WireGuard message is
# that short), or whole from a banned source. The edge counts each sample as SAMPLE
# drops (`drop_kernel_*`, estimates); the socket's exact drop count (filter and full
# buffer together) is `udp_socket_drops`.

SAMPLE_SHIFT = 6
SAMPLE = 1 << SAMPLE_SHIFT
SAMPLE_MALFORMED = 1
SAMPLE_UNKNOWN_INDEX = 2
MAX_FILTER_INDEXES = 1000
MAX_BANNED = 256
BAN_DROPS_PER_SECOND = 500
BAN_TIME = 10.0

_UDP = 8  # the UDP header the program sees first
_HANDSHAKE_SIZES = (("initiation", INITIATION_SIZE), ("response", RESPONSE_SIZE))


def filter_program(indexes: Iterable[int] | None, banned: Iterable[bytes]) -> bytes:
    """The edge's socket filter: `indexes` (receiver indexes of live sessions, or
    None to let every transport datagram through) and `banned` source keys
    (source_key(): a v4-mapped address or an IPv6 /64)."""
    from fabric.dataplane import sockfilter as bpf

    p = bpf.Program()
    p.ld_len()
    p.st(0)
    p.jump(bpf.BPF_JGE, _UDP + 4, None, "malformed")
    p.ld(bpf.BPF_W, _UDP)  # type and three reserved bytes, big-endian
    p.jump(bpf.BPF_JSET, 0x00FFFFFF, "malformed", None)
    p.rsh(24)
    p.jump(bpf.BPF_JEQ, MSG_TRANSPORT, "transport", None)
    p.jump(bpf.BPF_JEQ, MSG_INITIATION, "initiation", None)
    p.jump(bpf.BPF_JEQ, MSG_RESPONSE, "response", None)
    p.jump(bpf.BPF_JEQ, MSG_COOKIE_REPLY, "cookie", "malformed")
    # whitepaper 5.4.6: 16-byte header, plaintext, 16-byte tag (the plaintext is padded
    # to a multiple of 16 only up to the MTU: full-size packets may be any length)
    p.label("transport")
    p.ld_mem(0)
    p.jump(bpf.BPF_JGE, _UDP + TRANSPORT_MIN_SIZE, None, "malformed")
    if indexes is None:
        p.ja("pass")
    else:
        p.ld(bpf.BPF_W, _UDP + 4)  # receiver index, little-endian on the wire
        keys = sorted({int.from_bytes(i.to_bytes(4, "little"), "big") for i in indexes})
        bpf.search(p, keys, "pass", "unknown", "ix")
    for label, size in _HANDSHAKE_SIZES:
        p.label(label)
        p.ld_mem(0)
        p.jump(bpf.BPF_JEQ, _UDP + size, "handshake", "malformed")
    p.label("cookie")
    p.ld_mem(0)
    p.jump(bpf.BPF_JEQ, _UDP + COOKIE_REPLY_SIZE, "pass", "malformed")
    p.label("handshake")
    v4 = sorted({int.from_bytes(k[12:16], "big") for k in banned if len(k) == 16})
    v6 = sorted({(int.from_bytes(k[:4], "big"), int.from_bytes(k[4:8], "big")) for k in banned if len(k) == 8})
    if v4 or v6:
        p.ld(bpf.BPF_B, bpf.SKF_NET_OFF)
        p.rsh(4)
        p.jump(bpf.BPF_JEQ, 4, "v4" if v4 else "pass", None)
        p.jump(bpf.BPF_JEQ, 6, "v6_0" if v6 else "pass", "pass")
        if v4:
            p.label("v4")
            p.ld(bpf.BPF_W, bpf.SKF_NET_OFF + 12)
            bpf.search(p, v4, "banned", "pass", "b4")
        for i, (hi, lo) in enumerate(v6):
            nxt = f"v6_{i + 1}" if i + 1 < len(v6) else "pass"
            p.label(f"v6_{i}")
            p.ld(bpf.BPF_W, bpf.SKF_NET_OFF + 8)
            p.jump(bpf.BPF_JEQ, hi, None, nxt)
            p.ld(bpf.BPF_W, bpf.SKF_NET_OFF + 12)
            p.jump(bpf.BPF_JEQ, lo, "banned", nxt)
        p.label("banned")
        p.ld_random()
        p.and_(SAMPLE - 1)
        p.jump(bpf.BPF_JEQ, 0, "pass", "drop")
    else:
        p.ja("pass")
    for label, keep in (("malformed", SAMPLE_MALFORMED), ("unknown", SAMPLE_UNKNOWN_INDEX)):
        p.label(label)
        p.ld_random()
        p.and_(SAMPLE - 1)
        p.jump(bpf.BPF_JEQ, 0, None, "drop")
        p.ret(_UDP + keep)
    p.label("pass")
    p.ret(bpf.PASS_ALL)
    p.label("drop")
    p.ret(0)
    return p.assemble()
