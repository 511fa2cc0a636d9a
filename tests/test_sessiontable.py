"""fabric/dataplane/sessiontable.py: the host-shared session table (invariants 1 and 2).

Uses a table file under tmp_path; the cross-process tests fork real processes,
since fcntl locks only exclude other processes.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.control.frames import NO_ADDR, pack_addr
from fabric.dataplane import sessiontable
from fabric.dataplane.sessiontable import SLOT_SIZE, SessionTable
from fabric.protocols.wireguard.constants import REJECT_AFTER_MESSAGES

EP1 = pack_addr("192.0.2.1", 1000)
EP2 = pack_addr("2001:db8::2", 2000)
SLOTS = 16


@pytest.fixture
def table(tmp_path: Path):
    t = SessionTable(tmp_path / "table", slots=SLOTS)
    yield t
    t.close()


def set_counter(t: SessionTable, slot: int, value: int) -> None:
    sessiontable._COUNTER.pack_into(t.mm, slot * SLOT_SIZE + sessiontable.OFF_COUNTER, value)


# --- claim ----------------------------------------------------------------------------


def test_fresh_slot_is_free(table: SessionTable) -> None:
    v = table.read(1)
    assert (v.session_id, v.send_counter, v.flags, v.endpoint) == (0, 0, 0, NO_ADDR)
    assert not v.confirmed


def test_claim_and_reclaim(table: SessionTable) -> None:
    now = time.time()
    assert table.claim(3, 10, now, EP1)
    v = table.read(3)
    assert (v.session_id, v.send_counter, v.endpoint) == (10, 0, EP1)
    assert table.reserve(3, 10, 5, now) == (0, EP1)
    assert table.claim(3, 10, now)  # the same session again: nothing is reset
    assert table.read(3).send_counter == 5
    assert table.read(2).session_id == 0 and table.read(4).session_id == 0  # neighbours untouched


def test_claim_refuses_older_session(table: SessionTable) -> None:
    now = time.time()
    assert table.claim(1, 20, now)
    table.reserve(1, 20, 3, now)
    assert not table.claim(1, 19, now, EP2)
    v = table.read(1)
    assert (v.session_id, v.send_counter, v.endpoint) == (20, 3, NO_ADDR)
    assert table.reserve(1, 19, 1, now) is None
    assert table.commit_rx(1, 19, [1], EP2, now) is None


def test_claim_refuses_session_created_before_table(table: SessionTable) -> None:
    assert not table.claim(1, 5, table.created - 0.001)
    assert table.read(1).session_id == 0
    assert table.claim(1, 5, table.created)


def test_newer_session_resets_counters_window_and_flags(table: SessionTable) -> None:
    now = time.time()
    table.claim(2, 1, now, EP1)
    table.reserve(2, 1, 100, now)
    assert table.commit_rx(2, 1, [0, 1, 7], EP2, now) == [True, True, True]
    assert table.read(2).confirmed
    assert table.claim(2, 2, now)
    v = table.read(2)
    assert (v.session_id, v.send_counter, v.flags, v.endpoint, v.last_rx, v.last_tx) == (2, 0, 0, NO_ADDR, 0.0, 0.0)
    assert not table.seen(2, 2, 7)
    assert table.commit_rx(2, 2, [0, 1, 7], EP1, now) == [True, True, True]  # a fresh window
    assert table.reserve(2, 2, 1, now) == (0, EP1)


def test_claim_confirmed(table: SessionTable) -> None:
    now = time.time()
    assert table.claim(1, 3, now, EP1, confirmed=True)
    assert table.read(1).confirmed


def test_slot_bounds(table: SessionTable) -> None:
    for slot in (0, -1, SLOTS):
        with pytest.raises(IndexError):
            table.reserve(slot, 1, 1, 0.0)
        with pytest.raises(IndexError):
            table.read(slot)


# --- reserve ------------------------------------------------------------------------------


def test_reserve_hands_out_consecutive_runs(table: SessionTable) -> None:
    table.claim(1, 1, time.time(), EP1)
    assert table.reserve(1, 1, 4, 10.0) == (0, EP1)
    assert table.reserve(1, 1, 1, 11.0) == (4, EP1)
    assert table.reserve(1, 1, 10, 12.0) == (5, EP1)
    v = table.read(1)
    assert v.send_counter == 15 and v.last_tx == 12.0
    assert table.reserve(1, 2, 1, 13.0) is None  # not this slot's session


def test_reserve_stops_at_reject_after_messages(table: SessionTable) -> None:
    """The protocol's limit (WireGuard: REJECT_AFTER_MESSAGES, whitepaper 6.1)."""
    R = REJECT_AFTER_MESSAGES
    table.claim(1, 1, time.time(), EP1)
    set_counter(table, 1, R - 3)
    assert table.reserve(1, 1, 4, 1.0, limit=R) is None
    assert table.read(1).send_counter == R - 3  # nothing taken
    assert table.reserve(1, 1, 3, 1.0, limit=R) == (R - 3, EP1)
    assert table.reserve(1, 1, 1, 1.0, limit=R) is None
    assert table.keepalive_due(1, 1, 100.0, 0.0, 1.0, limit=R) is None
    # OpenVPN's 32-bit packet ids: the same slot, another limit
    table.claim(2, 2, time.time(), EP1)
    set_counter(table, 2, 2**32 - 2)
    assert table.reserve(2, 2, 3, 1.0, limit=2**32) is None
    assert table.reserve(2, 2, 2, 1.0, limit=2**32) == (2**32 - 2, EP1)
    assert table.reserve(2, 2, 1, 1.0, limit=2**32) is None


# --- receive ------------------------------------------------------------------------------


def test_commit_rx_refuses_replays(table: SessionTable) -> None:
    table.claim(1, 1, time.time())
    assert table.commit_rx(1, 1, [5, 3, 5, 9], EP1, 10.0) == [True, True, False, True]
    assert table.commit_rx(1, 1, [3, 4, 9, 10], EP2, 11.0) == [False, True, False, True]
    assert table.commit_rx(1, 1, [], EP2, 12.0) == []
    v = table.read(1)
    assert v.confirmed and v.endpoint == EP2 and v.last_rx == 11.0


def test_commit_rx_all_replays_changes_nothing(table: SessionTable) -> None:
    table.claim(1, 1, time.time())
    table.commit_rx(1, 1, [1], EP1, 10.0)
    assert table.commit_rx(1, 1, [1], EP2, 20.0) == [False]
    v = table.read(1)
    assert v.endpoint == EP1 and v.last_rx == 10.0  # a replay does not roam the peer


def test_commit_rx_window_edges(table: SessionTable) -> None:
    table.claim(1, 1, time.time())
    top = 100_000
    assert table.commit_rx(1, 1, [top], EP1, 1.0) == [True]
    window = sessiontable.replay.WINDOW_SIZE
    assert table.commit_rx(1, 1, [top - window - 1, top - window], EP1, 1.0) == [False, True]
    assert table.commit_rx(1, 1, [REJECT_AFTER_MESSAGES, 2**64 - 1], EP1, 1.0,
                           limit=REJECT_AFTER_MESSAGES) == [False, False]
    # a narrower window (OpenVPN's backtrack of 64)
    assert table.commit_rx(1, 1, [top - 65, top - 64], EP1, 1.0, window=64) == [False, True]


def test_seen_is_a_read_only_filter(table: SessionTable) -> None:
    table.claim(1, 1, time.time())
    assert not table.seen(1, 1, 4)
    assert not table.seen(1, 1, 4)  # did not record it
    table.commit_rx(1, 1, [4], EP1, 1.0)
    assert table.seen(1, 1, 4) and not table.seen(1, 1, 5)
    assert table.seen(1, 1, REJECT_AFTER_MESSAGES, limit=REJECT_AFTER_MESSAGES)
    # the slot moved on: the filter lets it through, the authoritative commit refuses it
    table.claim(1, 2, time.time())
    assert not table.seen(1, 1, 4)
    assert table.commit_rx(1, 1, [4], EP1, 1.0) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 20_000) | st.sampled_from([REJECT_AFTER_MESSAGES - 1, REJECT_AFTER_MESSAGES]),
                max_size=60))
def test_commit_rx_matches_seen(tmp_path_factory: pytest.TempPathFactory, counters: list[int]) -> None:
    t = SessionTable(tmp_path_factory.mktemp("st") / "t", slots=2)
    try:
        t.claim(1, 1, time.time())
        accepted = set()
        for c in counters:
            expect_new = not t.seen(1, 1, c, REJECT_AFTER_MESSAGES)
            got = t.commit_rx(1, 1, [c], EP1, 1.0, limit=REJECT_AFTER_MESSAGES)
            assert got == [expect_new]
            if got[0]:
                assert c not in accepted
                accepted.add(c)
            assert t.seen(1, 1, c, REJECT_AFTER_MESSAGES)
    finally:
        t.close()


# --- keepalives ---------------------------------------------------------------------------


def test_keepalive_needs_confirmed_session_with_endpoint(table: SessionTable) -> None:
    table.claim(1, 1, time.time())
    assert table.keepalive_due(1, 1, 100.0, 10.0, 25.0) is None  # never heard from the peer
    table.claim(2, 1, time.time(), EP1)
    assert table.keepalive_due(2, 1, 100.0, 10.0, 25.0) is None  # endpoint, but not confirmed


def test_passive_keepalive(table: SessionTable) -> None:
    table.claim(1, 1, time.time())
    table.commit_rx(1, 1, [0], EP1, 100.0)
    assert table.keepalive_due(1, 1, 109.9, 10.0, 0.0) is None
    assert table.keepalive_due(1, 1, 110.0, 10.0, 0.0) == (0, EP1)
    assert table.keepalive_due(1, 1, 110.0, 10.0, 0.0) is None  # only one edge sends it
    assert table.keepalive_due(1, 1, 500.0, 10.0, 0.0) is None  # we sent since we last received
    assert table.reserve(1, 1, 2, 501.0) == (1, EP1)  # the keepalive used counter 0
    table.commit_rx(1, 1, [1], EP1, 502.0)
    assert table.keepalive_due(1, 1, 511.0, 10.0, 0.0) is None  # 9 s since the receive
    assert table.keepalive_due(1, 1, 512.0, 10.0, 0.0) == (3, EP1)
    assert table.keepalive_due(1, 2, 1000.0, 10.0, 0.0) is None  # other session


def test_persistent_keepalive(table: SessionTable) -> None:
    table.claim(1, 1, time.time())
    table.commit_rx(1, 1, [0], EP1, 100.0)
    table.reserve(1, 1, 1, 100.0)
    assert table.keepalive_due(1, 1, 124.0, 10.0, 25.0) is None
    assert table.keepalive_due(1, 1, 125.0, 10.0, 25.0) == (1, EP1)
    assert table.keepalive_due(1, 1, 149.0, 10.0, 25.0) is None
    assert table.keepalive_due(1, 1, 150.0, 10.0, 25.0) == (2, EP1)
    assert table.keepalive_due(1, 1, 10_000.0, 10.0, 0.0) is None  # persistent off, nothing received


def test_unanswered_data(table: SessionTable) -> None:
    table.claim(1, 1, time.time(), EP1)
    assert not table.unanswered(1, 1, 100.0, 15.0)
    table.reserve(1, 1, 1, 10.0)
    table.reserve(1, 1, 1, 12.0)  # the first unanswered send counts
    assert not table.unanswered(1, 1, 24.9, 15.0)
    assert table.unanswered(1, 1, 25.0, 15.0)
    assert not table.unanswered(1, 1, 26.0, 15.0)  # once per stall
    table.reserve(1, 1, 1, 30.0)
    table.commit_rx(1, 1, [0], EP1, 31.0)  # an answer clears it
    assert not table.unanswered(1, 1, 100.0, 15.0)
    table.reserve(1, 1, 1, 40.0, data=False)  # keepalives do not count as data
    assert not table.unanswered(1, 1, 100.0, 15.0)


# --- the file ------------------------------------------------------------------------------


def test_reopen_shares_state(tmp_path: Path) -> None:
    a = SessionTable(tmp_path / "t", slots=SLOTS)
    a.claim(5, 9, time.time(), EP1)
    a.reserve(5, 9, 7, 1.0)
    b = SessionTable(tmp_path / "t", slots=SLOTS)
    try:
        assert b.created == a.created
        assert b.read(5).send_counter == 7
        assert b.reserve(5, 9, 1, 2.0) == (7, EP1)
        assert a.read(5).send_counter == 8
    finally:
        b.close()
        a.close()


def test_garbage_file_is_reinitialised(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_bytes(b"not a table" * 10)
    before = time.time()
    t = SessionTable(path, slots=SLOTS)
    try:
        assert t.created >= before
        assert path.stat().st_size == SLOTS * SLOT_SIZE
        assert t.read(1).session_id == 0
    finally:
        t.close()


def test_full_size_garbage_file_is_reinitialised(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_bytes(b"\xff" * (SLOTS * SLOT_SIZE))
    t = SessionTable(path, slots=SLOTS)
    try:
        assert t.claim(1, 5, time.time())
        assert t.read(2).session_id == 0 and t.read(2).send_counter == 0
    finally:
        t.close()


# --- many processes --------------------------------------------------------------------------

PROCS = 4


def _reserver(path: str, seed: int, rounds: int, start, out) -> None:
    t = SessionTable(path, slots=SLOTS)
    rng = random.Random(seed)
    start.wait()
    runs = []
    for _ in range(rounds):
        n = rng.randint(1, 9)
        got = t.reserve(3, 77, n, time.time())
        assert got is not None
        runs.append((got[0], n))
        if rng.random() < 0.2:
            ka = t.keepalive_due(3, 77, time.time() + 1000.0, 0.0, 1.0)
            if ka is not None:
                runs.append((ka[0], 1))
    t.close()
    out.put(runs)


def _receiver(path: str, seed: int, counters: list[int], start, out) -> None:
    t = SessionTable(path, slots=SLOTS)
    rng = random.Random(seed)
    start.wait()
    mine = []
    i = 0
    while i < len(counters):
        batch = counters[i : i + rng.randint(1, 16)]
        i += len(batch)
        result = t.commit_rx(3, 77, batch, EP1, time.time())
        assert result is not None
        mine += [c for c, ok in zip(batch, result, strict=True) if ok]
    t.close()
    out.put(mine)


def _run(target, args_per_proc: list[tuple]) -> list:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, out)) for a in args_per_proc]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_send_counters_unique_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    t = SessionTable(path, slots=SLOTS)
    t.claim(3, 77, time.time(), EP1)
    t.commit_rx(3, 77, [0], EP1, time.time())  # confirmed: keepalives may be due too
    try:
        results = _run(_reserver, [(path, seed, 400) for seed in range(PROCS)])
        counters = [first + k for runs in results for first, n in runs for k in range(n)]
        assert len(counters) == len(set(counters)), "a send counter was handed out twice"
        assert sorted(counters) == list(range(len(counters)))  # contiguous from 0
        assert t.read(3).send_counter == len(counters)
        assert all(len(runs) >= 400 for runs in results)
    finally:
        t.close()


def test_replays_refused_across_processes(tmp_path: Path) -> None:
    """Every process commits the same counters (copies through other edges): each is accepted once."""
    path = str(tmp_path / "t")
    t = SessionTable(path, slots=SLOTS)
    t.claim(3, 77, time.time(), EP1)
    try:
        counters = list(range(3000))
        args = []
        for seed in range(PROCS):
            mine = counters[:]
            random.Random(seed).shuffle(mine)  # out of order, but within the window
            args.append((path, seed, mine))
        results = _run(_receiver, args)
        accepted = [c for r in results for c in r]
        assert sorted(accepted) == counters
    finally:
        t.close()
