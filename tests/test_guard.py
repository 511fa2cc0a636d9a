"""The handshake guard (fabric/protocols/wireguard/guard.py): verdicts, budgets, bans, whitepaper 5.4.7."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.control import frames
from fabric.dataplane.ratelimit import TokenBucket
from fabric.protocols.wireguard.constants import (
    COOKIE_REPLIES_PER_SECOND,
    COOKIE_REPLIES_PER_SOURCE_BURST,
    HANDSHAKE_RATE_BURST,
    HANDSHAKES_PER_SECOND,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
    UNDER_LOAD_HOLD,
)
from fabric.protocols.wireguard.guard import (
    BAN_DROPS_PER_SECOND,
    BAN_TIME,
    COOKIE,
    MAX_BANNED,
    PASS,
    SAMPLE,
    HandshakeGuard,
    source_key,
)
from fabric.protocols.wireguard.noise import (
    CookieChecker,
    CookieJar,
    StaticKeys,
    compute_mac1,
    create_initiation,
    mac1_key_for,
)

SERVER = StaticKeys.from_private(bytes(range(32)))
CLIENT = StaticKeys.from_private(bytes(range(1, 33)))
A = frames.pack_addr("198.18.1.2", 40000)
B = frames.pack_addr("198.18.3.2", 40000)
T0 = 1000.0


def initiation(now: float = T0, cookie: bytes | None = None) -> bytes:
    msg, _ = create_initiation(CLIENT, SERVER.public, bytes(32), 1, now, cookie=cookie)
    return msg


def forged() -> bytes:
    """What a flood sends: a valid mac1 over random fields, mac2 zero."""
    body = bytearray(b"\x01\x00\x00\x00" + os.urandom(112) + bytes(32))
    body[116:132] = compute_mac1(mac1_key_for(SERVER.public), bytes(body))
    return bytes(body)


def make(shared: list[float] | None = None) -> tuple[HandshakeGuard, dict[str, int]]:
    counts: dict[str, int] = {}

    def count(name: str, n: int) -> None:
        counts[name] = counts.get(name, 0) + n

    if shared is None:
        g = HandshakeGuard(CookieChecker(SERVER.public), count=count)
    else:
        def set_shared(t: float) -> None:
            shared[0] = t
        g = HandshakeGuard(CookieChecker(SERVER.public), lambda: shared[0], set_shared, count)
    return g, counts


def load(g: HandshakeGuard, now: float) -> None:
    """Put the guard under load with valid handshakes from many sources."""
    for i in range(UNDER_LOAD_HANDSHAKES_PER_SECOND + 1):
        g.check(forged(), frames.pack_addr(f"198.18.5.{i % 250 + 1}", 1000 + i), now)
    assert g.under_load(now)


def test_token_bucket_burst_then_rate_and_bounded_memory() -> None:
    b = TokenBucket(20, 5, max_keys=100)
    assert [b.allow(b"k", T0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.allow(b"k", T0 + 0.04)  # 20/s: one token after 50 ms
    assert b.allow(b"k", T0 + 0.06)
    assert not b.allow(b"k", T0 + 0.06)
    assert b.allow(b"other", T0)  # per key
    for i in range(1000):
        b.allow(i.to_bytes(4, "big"), T0 + i)  # each new key is idle a second later
    assert len(b.buckets) <= 100


def test_not_under_load_mac1_decides() -> None:
    g, _ = make()
    assert g.check(initiation(), A, T0) is PASS
    bad = bytearray(initiation())
    bad[120] ^= 1
    assert g.check(bytes(bad), A, T0) == "bad_mac1"
    assert not g.under_load(T0)


def test_trips_under_load_and_holds() -> None:
    g, _ = make()
    for _ in range(UNDER_LOAD_HANDSHAKES_PER_SECOND):
        assert g.check(forged(), A, T0) is PASS
    assert not g.under_load(T0)
    assert g.check(forged(), A, T0) is COOKIE  # the 65th in a second: cookies from now on
    assert g.under_load(T0 + UNDER_LOAD_HOLD - 0.01)
    assert not g.under_load(T0 + UNDER_LOAD_HOLD + 0.01)


def test_under_load_is_shared_by_the_edges_of_a_host() -> None:
    shared = [0.0]
    a, _ = make(shared)
    b, _ = make(shared)
    load(a, T0)
    assert shared[0] > T0
    b.refresh(T0)
    assert b.under_load(T0)
    assert b.check(forged(), A, T0) is COOKIE


def test_under_load_cookie_replies_are_bounded_per_source_then_cost_no_hash() -> None:
    g, counts = make()
    load(g, T0)
    now = T0 + 0.001
    verdicts = [g.check(forged(), A, now) for _ in range(20)]
    assert verdicts[:COOKIE_REPLIES_PER_SOURCE_BURST] == [COOKIE] * COOKIE_REPLIES_PER_SOURCE_BURST
    assert set(verdicts[COOKIE_REPLIES_PER_SOURCE_BURST:]) == {"cookie_ratelimited"}
    # over the budget, a bad mac1 is not even looked at (no hash spent on it)
    junk = b"\x01\x00\x00\x00" + os.urandom(128) + bytes(16)  # mac2 zero, mac1 wrong
    assert g.check(junk, A, now) == "cookie_ratelimited"
    # another source has its own budget; its bad mac1 is caught before a cookie is made
    assert g.check(junk, B, now) == "bad_mac1"
    assert g.check(forged(), B, now) is COOKIE
    assert counts == {}


def test_under_load_total_cookie_budget() -> None:
    g, _ = make()
    g.until = T0 + 10  # under load
    now = T0 + 0.001
    got = [g.check(forged(), frames.pack_addr(f"198.18.{i // 250 + 10}.{i % 250 + 1}", 1), now)
           for i in range(COOKIE_REPLIES_PER_SECOND + 50)]
    assert got.count(COOKIE) == COOKIE_REPLIES_PER_SECOND
    assert got.count("cookie_budget") == 50


def test_under_load_a_valid_cookie_buys_a_handshake_within_the_rate_limit() -> None:
    g, _ = make()
    load(g, T0)
    now = T0 + 0.01
    first = initiation(now)
    assert g.check(first, A, now) is COOKIE
    reply = g.cookies.create_reply(first, A, now)
    jar = CookieJar(SERVER.public)
    jar.consume_reply(reply, first[116:132], now)
    cookie = jar.current(now)
    assert cookie is not None
    with_mac2 = [initiation(now, cookie) for _ in range(HANDSHAKE_RATE_BURST + 2)]
    got = [g.check(m, A, now) for m in with_mac2]
    assert got == [PASS] * HANDSHAKE_RATE_BURST + ["ratelimited"] * 2
    # the cookie is bound to the source address and port (5.4.7)
    assert g.check(initiation(now, cookie), frames.pack_addr("198.18.1.2", 40001), now) is COOKIE


def test_total_handshake_budget_bounds_what_reaches_workers() -> None:
    g, _ = make()
    got = [g.check(initiation(), frames.pack_addr(f"198.18.{i // 250 + 10}.{i % 250 + 1}", 1), T0)
           for i in range(UNDER_LOAD_HANDSHAKES_PER_SECOND)]
    assert got == [PASS] * UNDER_LOAD_HANDSHAKES_PER_SECOND
    assert HANDSHAKES_PER_SECOND > UNDER_LOAD_HANDSHAKES_PER_SECOND
    g, _ = make()
    g.total.buckets[b""] = (0.0, T0)  # spent
    assert g.check(initiation(), A, T0 + 0.001) == "handshake_budget"
    assert g.check(initiation(), A, T0 + 0.01) is PASS  # 250/s: a token every 4 ms


def test_a_flooding_source_is_banned_and_samples_keep_the_ban() -> None:
    g, counts = make()
    load(g, T0)
    now = T0 + 0.01
    for _ in range(BAN_DROPS_PER_SECOND + COOKIE_REPLIES_PER_SOURCE_BURST):
        g.check(forged(), A, now)
    assert list(g.banned) == [source_key(A)] and g.dirty
    assert counts["bans"] == 1
    g.dirty = False
    # while banned, what arrives is one datagram in SAMPLE: each stands for SAMPLE
    later = now + BAN_TIME - 1
    for _ in range(BAN_DROPS_PER_SECOND // SAMPLE + 1):
        g.check(forged(), A, later)
    assert g.banned[source_key(A)] >= later + BAN_TIME - 0.01  # renewed
    assert counts["drop_kernel_banned"] == (BAN_DROPS_PER_SECOND // SAMPLE + 1) * (SAMPLE - 1)
    g.expire(later + BAN_TIME + 0.1)
    assert not g.banned and g.dirty


def test_bad_mac1_floods_are_banned_too_and_the_ban_list_is_bounded() -> None:
    g, counts = make()
    junk = b"\x01\x00\x00\x00" + bytes(144)
    for i in range(MAX_BANNED + 3):
        src = frames.pack_addr(f"198.18.{i // 250 + 10}.{i % 250 + 1}", 1)
        for _ in range(BAN_DROPS_PER_SECOND):
            g.check(junk, src, T0)
    assert len(g.banned) == MAX_BANNED
    assert counts["ban_list_full"] == 3


def test_source_keys() -> None:
    assert source_key(frames.pack_addr("198.18.1.2", 1)) == source_key(frames.pack_addr("198.18.1.2", 2))
    v6a = frames.pack_addr("2001:db8:1:2::5", 1)
    v6b = frames.pack_addr("2001:db8:1:2:ffff::9", 2)
    assert source_key(v6a) == source_key(v6b) and len(source_key(v6a)) == 8
    assert source_key(frames.pack_addr("2001:db8:1:3::5", 1)) != source_key(v6a)


@given(st.binary(min_size=148, max_size=148), st.floats(0, 10), st.booleans())
@settings(max_examples=300, deadline=None)
def test_any_initiation_sized_datagram_gets_a_verdict(data: bytes, dt: float, loaded: bool) -> None:
    g, _ = make()
    if loaded:
        g.until = T0 + 100
    v = g.check(data, A, T0 + dt)
    assert v in (PASS, COOKIE, "bad_mac1", "cookie_ratelimited", "cookie_budget", "ratelimited",
                 "handshake_budget")
    if v is PASS or v is COOKIE:  # nothing unauthenticated gets that far without mac1
        assert g.cookies.check_mac1(data)
