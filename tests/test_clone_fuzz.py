"""CloneClient (fabric/control/clone.py) against a scripted broker over real ZeroMQ inproc
sockets, and fuzzing of fabric.control.frames.decode with mangled frames.

The test plays the broker: an XPUB (a PUB that also tells us when the
subscription has arrived, so no update is lost to the slow-joiner race unless a
test drops it on purpose) and a ROUTER that answers ICANHAZ? with the
publisher's state and KTHXBAI, exactly like brokers/broker.py.
"""

from __future__ import annotations

import itertools
import logging
import random
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fabric.control import frames
from fabric.control.clone import CloneClient
from fabric.control.kvmsg import HUGZ, ICANHAZ, KTHXBAI, KVMsg

_names = itertools.count()


class FakeBroker:
    """Publisher state + PUB/ROUTER sockets the test drives step by step."""

    def __init__(self, ctx: zmq.Context, epoch: int = 1) -> None:
        n = next(_names)
        self.pub_ep = f"inproc://clone-fuzz-pub-{n}"
        self.snap_ep = f"inproc://clone-fuzz-snap-{n}"
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind(self.pub_ep)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.snap_ep)
        self.state: dict[bytes, dict[str, Any]] = {}
        self.seq = 0
        self.epoch = epoch
        self.snapshots_served = 0

    # state changes: each returns the update the broker would publish
    def set(self, key: bytes, value: dict[str, Any]) -> KVMsg:
        self.seq += 1
        self.state[key] = value
        return KVMsg(key, self.seq, self.epoch, value)

    def delete(self, key: bytes) -> KVMsg:
        self.seq += 1
        self.state.pop(key, None)
        return KVMsg(key, self.seq, self.epoch, None)

    def hugz(self) -> KVMsg:
        return KVMsg(HUGZ, self.seq, self.epoch)

    def restart(self, epoch: int, state: dict[bytes, dict[str, Any]], seq: int) -> None:
        """A new broker run: new epoch, its own state and sequence."""
        self.epoch, self.state, self.seq = epoch, dict(state), seq

    def publish(self, msg: KVMsg) -> None:
        msg.send(self.pub)

    def publish_raw(self, parts: list[bytes]) -> None:
        self.pub.send_multipart(parts)

    def wait_subscriber(self, timeout: float = 2.0) -> None:
        if not self.pub.poll(int(timeout * 1000)):
            raise AssertionError("subscription did not arrive")
        assert self.pub.recv() == b"\x01"  # subscribe to everything

    def serve_snapshots(self, bad: list[list[bytes]] | None = None) -> int:
        """Answer every snapshot request waiting on the ROUTER (no blocking)."""
        served = 0
        for _ in range(100):
            try:
                parts = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            assert len(parts) >= 2 and parts[1] == ICANHAZ, parts
            ident = parts[0]
            for raw in bad or []:
                self.router.send_multipart([ident, *raw])
            for key, value in self.state.items():
                KVMsg(key, self.seq, self.epoch, value).send(self.router, ident)
            KVMsg(KTHXBAI, self.seq, self.epoch).send(self.router, ident)
            served += 1
            self.snapshots_served += 1
        return served

    def close(self) -> None:
        self.pub.close(0)
        self.router.close(0)


class Subscriber:
    """A CloneClient plus a record of its callbacks."""

    def __init__(self, ctx: zmq.Context, broker: FakeBroker) -> None:
        self.sets: list[tuple[bytes, dict[str, Any]]] = []
        self.deletes: list[bytes] = []
        self.mirror: dict[bytes, dict[str, Any]] = {}  # what the callbacks built
        self.client = CloneClient(ctx, broker.pub_ep, broker.snap_ep, self._on_set, self._on_delete)
        self.broker = broker
        self.now = 1000.0
        broker.wait_subscriber()

    def _on_set(self, key: bytes, value: dict[str, Any]) -> None:
        self.sets.append((key, value))
        self.mirror[key] = value

    def _on_delete(self, key: bytes) -> None:
        self.deletes.append(key)
        assert key in self.mirror, f"on_delete({key!r}) for a key never set"
        del self.mirror[key]

    def pump(self, quiet: float = 0.03, limit: float = 3.0) -> None:
        """Serve snapshots and let the client read until nothing moved for `quiet` s."""
        deadline = time.monotonic() + limit
        idle_since = time.monotonic()
        poller_timeout = max(1, int(quiet * 1000 / 3))
        for _ in range(100000):
            moved = self.broker.serve_snapshots() > 0
            poller = zmq.Poller()
            for s in self.client.sockets():
                poller.register(s, zmq.POLLIN)
            for sock, _ in poller.poll(poller_timeout):
                self.client.handle(sock, self.now)
                moved = True
            now = time.monotonic()
            if moved:
                idle_since = now
            elif now - idle_since >= quiet:
                return
            if now >= deadline:
                raise AssertionError("client did not settle")

    def sync(self) -> None:
        self.client.request_snapshot(self.now)
        self.pump()
        assert self.client.synced

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    try:
        yield c
    finally:
        c.term()


@pytest.fixture
def pair(ctx: zmq.Context) -> Iterator[tuple[FakeBroker, Subscriber]]:
    b = FakeBroker(ctx)
    s = Subscriber(ctx, b)
    try:
        yield b, s
    finally:
        s.close()
        b.close()


def _assert_converged(b: FakeBroker, s: Subscriber) -> None:
    assert s.client.synced
    assert s.client.state == b.state
    assert s.mirror == b.state  # the consumer's view agrees too
    assert (s.client.seq, s.client.epoch) == (b.seq, b.epoch)


# --------------------------------------------------------------------------- clone


def test_snapshot_then_updates(pair: tuple[FakeBroker, Subscriber]) -> None:
    b, s = pair
    b.set(b"session/1", {"a": 1})
    b.set(b"session/2", {"a": 2})
    s.sync()
    _assert_converged(b, s)
    assert sorted(k for k, _ in s.sets) == [b"session/1", b"session/2"]
    assert s.client.snapshots == 1
    b.publish(b.set(b"session/3", {"a": 3}))
    b.publish(b.delete(b"session/1"))
    b.publish(b.set(b"session/2", {"a": 22}))
    b.publish(b.hugz())
    s.pump()
    _assert_converged(b, s)
    assert s.deletes == [b"session/1"]
    assert s.client.snapshots == 1  # no gap, no re-snapshot
    assert s.client.bad_messages == 0


def test_updates_during_snapshot_are_buffered(pair: tuple[FakeBroker, Subscriber]) -> None:
    b, s = pair
    b.set(b"k1", {"v": 1})
    s.client.request_snapshot(s.now)
    # published before the snapshot is served: the snapshot already contains m1,
    # m2 comes after it and must be applied from the buffer
    b.publish(b.set(b"k2", {"v": 2}))
    s.pump(quiet=0.01)  # the client reads m1 into its buffer...
    b.publish(b.set(b"k3", {"v": 3}))
    s.pump()
    _assert_converged(b, s)


def test_duplicated_updates_are_ignored(pair: tuple[FakeBroker, Subscriber]) -> None:
    b, s = pair
    s.sync()
    m = b.set(b"k", {"v": 1})
    b.publish(m)
    b.publish(m)
    s.pump()
    assert s.sets == [(b"k", {"v": 1})]
    # an old sequence number with different content changes nothing either
    b.publish(KVMsg(b"k", m.seq, m.epoch, {"v": "forged"}))
    b.publish(KVMsg(b"other", m.seq - 1, m.epoch, {"v": 0}))
    s.pump()
    _assert_converged(b, s)
    assert s.sets == [(b"k", {"v": 1})] and s.client.snapshots == 1


def test_gap_triggers_resnapshot(pair: tuple[FakeBroker, Subscriber]) -> None:
    b, s = pair
    b.set(b"a", {"v": 0})
    s.sync()
    m1 = b.set(b"a", {"v": 1})
    m2 = b.set(b"b", {"v": 2})
    m3 = b.delete(b"a")
    b.publish(m2)  # m1 lost, m2 is a gap
    b.publish(m3)
    s.pump()
    _assert_converged(b, s)
    assert s.client.snapshots == 2 and b.snapshots_served == 2
    b.publish(m1)  # the lost update arrives late: old, ignored
    s.pump()
    _assert_converged(b, s)
    assert s.client.snapshots == 2


def test_gap_right_after_a_snapshot_is_quiet_mid_stream_warns(
    pair: tuple[FakeBroker, Subscriber], caplog: pytest.LogCaptureFixture
) -> None:
    b, s = pair
    s.sync()
    b.set(b"a", {"v": 1})  # published while the SUB was "still joining": lost
    b.publish(b.set(b"a", {"v": 2}))
    with caplog.at_level(logging.INFO, logger="fabric"):
        s.pump()
    gaps = [r for r in caplog.records if "sequence gap" in r.getMessage()]
    assert [r.levelno for r in gaps] == [logging.INFO]  # the slow joiner: repaired, not news
    _assert_converged(b, s)
    caplog.clear()
    b.publish(b.set(b"a", {"v": 3}))  # one update applied: the stream is running
    s.pump()
    b.set(b"a", {"v": 4})  # lost mid-stream
    b.publish(b.set(b"a", {"v": 5}))
    with caplog.at_level(logging.INFO, logger="fabric"):
        s.pump()
    gaps = [r for r in caplog.records if "sequence gap" in r.getMessage()]
    assert [r.levelno for r in gaps] == [logging.WARNING]
    _assert_converged(b, s)


def test_heartbeat_ahead_right_after_a_snapshot_is_quiet_mid_stream_warns(
    pair: tuple[FakeBroker, Subscriber], caplog: pytest.LogCaptureFixture
) -> None:
    """The slow joiner seen through a heartbeat instead of the next update (what `fabric
    up` printed once at start-up): repaired quietly; mid-stream it is a warning."""
    b, s = pair

    def lost_then_heartbeat(value: int) -> list[int]:
        """An update the SUB never sees, then a heartbeat: the levels of "missed updates"
        logged so far."""
        b.set(b"a", {"v": value})
        b.publish(b.hugz())
        with caplog.at_level(logging.INFO, logger="fabric"):
            s.pump()
        return [r.levelno for r in caplog.records if "missed updates" in r.getMessage()]

    s.sync()
    # published while the SUB was "still joining": lost
    assert lost_then_heartbeat(1) == [logging.INFO]
    _assert_converged(b, s)
    caplog.clear()
    b.publish(b.set(b"a", {"v": 2}))  # one update applied: the stream is running
    s.pump()
    assert lost_then_heartbeat(3) == [logging.WARNING]  # lost mid-stream
    _assert_converged(b, s)


def test_reordered_updates_converge(pair: tuple[FakeBroker, Subscriber]) -> None:
    b, s = pair
    s.sync()
    msgs = [b.set(f"k{i % 3}".encode(), {"v": i}) for i in range(6)] + [b.delete(b"k1")]
    for m in [msgs[0], msgs[2], msgs[1], *msgs[3:]]:
        b.publish(m)
    s.pump()
    _assert_converged(b, s)
    assert s.client.snapshots >= 2


def test_heartbeat_ahead_triggers_resnapshot(pair: tuple[FakeBroker, Subscriber]) -> None:
    b, s = pair
    s.sync()
    b.set(b"x", {"v": 1})  # never published (lost at the PUB's high-water mark)
    b.publish(b.hugz())
    s.pump()
    _assert_converged(b, s)
    assert s.client.snapshots == 2


def test_new_epoch_resnapshots_and_deletes_missing_keys(
    pair: tuple[FakeBroker, Subscriber],
) -> None:
    b, s = pair
    b.set(b"keep", {"v": 1})
    b.set(b"gone", {"v": 2})
    b.set(b"changed", {"v": 3})
    s.sync()
    # the broker restarts with less state and a sequence number *below* ours
    b.restart(epoch=2, state={b"keep": {"v": 1}, b"changed": {"v": 33}}, seq=1)
    b.publish(b.hugz())
    s.pump()
    _assert_converged(b, s)
    assert s.deletes == [b"gone"]
    assert (b"changed", {"v": 33}) in s.sets
    assert s.sets.count((b"keep", {"v": 1})) == 1  # unchanged keys are not re-announced
    # updates of the new epoch apply normally afterwards
    b.publish(b.set(b"new", {"v": 4}))
    s.pump()
    _assert_converged(b, s)


def test_update_of_new_epoch_also_triggers_resnapshot(
    pair: tuple[FakeBroker, Subscriber],
) -> None:
    b, s = pair
    b.set(b"a", {"v": 1})
    s.sync()
    b.restart(epoch=7, state={}, seq=0)
    b.publish(b.set(b"b", {"v": 2}))
    s.pump()
    _assert_converged(b, s)
    assert s.deletes == [b"a"]


def test_poller_helpers_follow_the_snapshot_socket(pair: tuple[FakeBroker, Subscriber]) -> None:
    """register()/handle_ready(), as the edge and worker loops use them, across
    snapshot sockets that come and go."""
    b, s = pair
    c = s.client
    if not hasattr(c, "register"):
        pytest.skip("CloneClient has no register()/handle_ready()")
    poller = zmq.Poller()

    def loop(quiet: float = 0.03) -> None:
        idle_since = time.monotonic()
        for _ in range(10000):
            moved = b.serve_snapshots() > 0
            c.register(poller)
            ready = dict(poller.poll(5))
            if ready:
                c.handle_ready(ready, s.now)
                moved = True
            if moved:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= quiet:
                return
        raise AssertionError("client did not settle")

    b.set(b"a", {"v": 1})
    c.request_snapshot(s.now)
    loop()
    _assert_converged(b, s)
    for round_ in range(3):  # gaps: each round re-snapshots on a new DEALER
        b.set(b"lost", {"v": round_})
        b.publish(b.set(b"a", {"v": 10 + round_}))
        loop()
        _assert_converged(b, s)
    assert c.snapshots == 4
    assert {sock for sock, _ in poller.sockets} == set(c.sockets())


U64 = struct.Struct(">Q")
MALFORMED: list[tuple[str, list[bytes]]] = [
    ("no parts but one", [b"k"]),
    ("three parts", [b"k", U64.pack(99), U64.pack(1)]),
    ("five parts", [b"k", U64.pack(99), U64.pack(1), msgpack.packb({"v": 1}), b"x"]),
    ("empty key", [b"", U64.pack(99), U64.pack(1), msgpack.packb({"v": 1})]),
    ("key too long", [b"k" * 257, U64.pack(99), U64.pack(1), msgpack.packb({"v": 1})]),
    ("seq of 7 bytes", [b"k", U64.pack(99)[1:], U64.pack(1), msgpack.packb({"v": 1})]),
    ("seq of 9 bytes", [b"k", b"\x00" + U64.pack(99), U64.pack(1), msgpack.packb({"v": 1})]),
    ("epoch of 4 bytes", [b"k", U64.pack(99), b"\x00\x00\x00\x02", msgpack.packb({"v": 1})]),
    ("epoch empty", [b"k", U64.pack(99), b"", msgpack.packb({"v": 1})]),
    ("not msgpack", [b"k", U64.pack(99), U64.pack(1), b"\xc1"]),
    ("truncated msgpack", [b"k", U64.pack(99), U64.pack(1), msgpack.packb({"v": 1})[:-1]]),
    ("msgpack with trailing data", [b"k", U64.pack(99), U64.pack(1), msgpack.packb({"v": 1}) + b"\x01"]),
    ("value is a list", [b"k", U64.pack(99), U64.pack(1), msgpack.packb([1, 2])]),
    ("value is an int", [b"k", U64.pack(99), U64.pack(1), msgpack.packb(5)]),
    ("value is a string", [b"k", U64.pack(99), U64.pack(1), msgpack.packb("x")]),
    ("value is nil", [b"k", U64.pack(99), U64.pack(1), msgpack.packb(None)]),
    ("heartbeat with a bad seq", [HUGZ, b"\x01", U64.pack(1), b""]),
    ("heartbeat of a new epoch, seq too short", [HUGZ, U64.pack(99), U64.pack(2)[2:], b""]),
]


@pytest.mark.parametrize("parts", [p for _, p in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_update_is_counted_and_changes_nothing(
    pair: tuple[FakeBroker, Subscriber], parts: list[bytes]
) -> None:
    b, s = pair
    b.set(b"k", {"v": 0})
    s.sync()
    before = (dict(s.client.state), s.client.seq, s.client.epoch, s.client.snapshots)
    calls = (len(s.sets), len(s.deletes))
    b.publish_raw(parts)
    s.pump()
    assert s.client.bad_messages == 1
    assert (dict(s.client.state), s.client.seq, s.client.epoch, s.client.snapshots) == before
    assert (len(s.sets), len(s.deletes)) == calls
    assert s.client.synced
    # and the client keeps working
    b.publish(b.set(b"k2", {"v": 2}))
    s.pump()
    _assert_converged(b, s)


def test_malformed_messages_in_a_snapshot_are_counted(
    pair: tuple[FakeBroker, Subscriber],
) -> None:
    b, s = pair
    b.set(b"k", {"v": 1})
    s.client.request_snapshot(s.now)
    # the scripted ROUTER sends garbage before the real snapshot
    b.serve_snapshots(bad=[p for _, p in MALFORMED])
    s.pump()
    _assert_converged(b, s)
    assert s.client.bad_messages == len(MALFORMED)
    assert s.sets == [(b"k", {"v": 1})]


small_int = st.integers(-(2**63), 2**63 - 1)
part_st = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([HUGZ, KTHXBAI, b"session/1"]),
    st.integers(0, 2**64 - 1).map(U64.pack),
    st.builds(lambda v: msgpack.packb(v), st.one_of(
        st.dictionaries(st.text(max_size=3), small_int, max_size=2),
        st.lists(small_int, max_size=2), small_int, st.none(), st.text(max_size=3),
    )),
)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(part_st, min_size=1, max_size=6))
def test_random_parts_are_either_valid_or_counted(
    ctx: zmq.Context, parts: list[bytes]
) -> None:
    b = FakeBroker(ctx)
    s = Subscriber(ctx, b)
    try:
        b.set(b"k", {"v": 0})
        s.sync()
        before = (dict(s.client.state), s.client.seq, s.client.epoch)
        try:
            m = KVMsg.from_parts(parts)
            valid = True
        except ValueError:
            valid = False
        if valid and m.key != HUGZ and (m.epoch, m.seq) == (b.epoch, b.seq + 1):
            # a well-formed next update: the publisher's model takes it too
            b.seq += 1
            if m.value is None:
                b.state.pop(m.key, None)
            else:
                b.state[m.key] = m.value
        b.publish_raw(parts)
        s.pump(quiet=0.005)
        if not valid:
            assert s.client.bad_messages == 1
            assert (dict(s.client.state), s.client.seq, s.client.epoch) == before
        else:
            assert s.client.bad_messages == 0
        # whatever it was, a heartbeat brings the client back to the publisher's state
        b.publish(b.hugz())
        s.pump(quiet=0.005)
        _assert_converged(b, s)
    finally:
        s.close()
        b.close()


# --------------------------------------------------------------------------- convergence (hypothesis)

KEYS = [f"session/{i}".encode() for i in range(5)]
op_st = st.tuples(
    st.sampled_from(["set", "set", "delete"]),
    st.sampled_from(KEYS),
    st.integers(min_value=0, max_value=3),
)
fate_st = st.sampled_from(["deliver", "deliver", "deliver", "drop", "duplicate", "delay"])


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    initial=st.lists(op_st, max_size=5),
    ops=st.lists(st.tuples(op_st, fate_st), max_size=40),
    pumps=st.sets(st.integers(min_value=0, max_value=40), max_size=12),
    restart_at=st.one_of(st.none(), st.integers(min_value=0, max_value=40)),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_random_updates_with_loss_duplication_reordering_converge(
    ctx: zmq.Context,
    initial: list[tuple[str, bytes, int]],
    ops: list[tuple[tuple[str, bytes, int], str]],
    pumps: set[int],
    restart_at: int | None,
    seed: int,
) -> None:
    t0 = time.monotonic()
    rng = random.Random(seed)
    b = FakeBroker(ctx)
    s = Subscriber(ctx, b)
    try:
        for op in initial:
            _apply(b, op)
        s.client.request_snapshot(s.now)
        s.pump(quiet=0.005)
        assert s.client.synced
        delayed: list[KVMsg] = []
        for i, (op, fate) in enumerate(ops):
            if i in pumps:  # the client reads now and then, in between updates
                s.pump(quiet=0.002)
            if i == restart_at:
                # new broker run with the state it persisted (as the real one) and
                # a sequence number starting over
                b.restart(epoch=b.epoch + 1, state=b.state, seq=rng.randrange(0, 3))
            m = _apply(b, op)
            if fate == "deliver":
                b.publish(m)
            elif fate == "duplicate":
                b.publish(m)
                b.publish(m)
            elif fate == "delay":
                delayed.append(m)
            if delayed and rng.random() < 0.3:
                b.publish(delayed.pop(rng.randrange(len(delayed))))
        for m in delayed:
            b.publish(m)
        s.pump(quiet=0.005)
        b.publish(b.hugz())  # final heartbeat: a client behind re-snapshots
        s.pump(quiet=0.01)
        _assert_converged(b, s)
        assert s.client.bad_messages == 0
        event(f"snapshots: {min(s.client.snapshots, 4)}{'+' if s.client.snapshots >= 4 else ''}")
    finally:
        s.close()
        b.close()
    assert time.monotonic() - t0 < 10.0


def _apply(b: FakeBroker, op: tuple[str, bytes, int]) -> KVMsg:
    kind, key, v = op
    return b.set(key, {"v": v}) if kind == "set" else b.delete(key)


# --------------------------------------------------------------------------- frames

addr_st = st.one_of(
    st.just(frames.NO_ADDR),
    st.builds(frames.pack_addr, st.sampled_from(["198.18.1.2", "2001:db8::1"]),
              st.integers(0, 65535)),
)


@st.composite
def frame_st(draw: st.DrawFn) -> frames.Frame:
    kind = draw(st.sampled_from(sorted(frames.KINDS)))
    packets = draw(st.lists(st.binary(max_size=64), max_size=6))
    aux_per = frames.AUX_PER.get(kind, 0)
    aux = draw(st.lists(st.integers(0, 2**64 - 1), min_size=len(packets) * aux_per,
                        max_size=len(packets) * aux_per))
    extra = draw(st.one_of(st.none(), st.binary(max_size=32)))
    counters: list[int] = []
    if kind == frames.TUN_WRITE:  # (datagrams >= 1, bytes) per packet, a counter per datagram
        aux = [x for _ in packets for x in (draw(st.integers(1, 3)), draw(st.integers(0, 2**64 - 1)))]
        counters = draw(st.lists(st.integers(0, 2**64 - 1), min_size=sum(aux[0::2]),
                                 max_size=sum(aux[0::2])))
        extra = None
    return frames.Frame(
        kind=kind,
        edge=draw(st.integers(0, 0xFFFF)),
        session_id=draw(st.integers(0, 2**32 - 1)),
        counter0=draw(st.integers(0, 2**64 - 1)),
        addr=draw(addr_st),
        packets=packets,
        aux=aux,
        extra=extra,
        counters=counters,
    )


def _same(a: frames.Frame, b: frames.Frame) -> bool:
    return (
        (a.kind, a.edge, a.session_id, a.counter0, bytes(a.addr), a.extra)
        == (b.kind, b.edge, b.session_id, b.counter0, bytes(b.addr), b.extra)
        and [bytes(p) for p in a.packets] == [bytes(p) for p in b.packets]
        and list(a.aux) == list(b.aux)
        and list(a.counters) == list(b.counters)
    )


_PAD = (3, 6, 7)  # the "x" bytes of frames.HEADER: ignored when decoding


def _unpadded(head: bytes) -> bytes:
    b = bytearray(head)
    for i in _PAD:
        if i < len(b):
            b[i] = 0
    return bytes(b)


def _decode_or_frame_error(parts: list[bytes]) -> frames.Frame | None:
    try:
        f = frames.decode(parts)
    except frames.FrameError:
        return None
    assert isinstance(f, frames.Frame)
    # whatever decodes is a consistent frame: it encodes back to the same parts
    again = f.encode()
    assert _unpadded(again[0]) == _unpadded(bytes(parts[0])) and again[1] == bytes(parts[1])
    if f.kind == frames.TUN_WRITE:  # part 2 carries the counters
        assert again[2] == bytes(parts[2])
    else:
        assert f.extra == (bytes(parts[2]) if len(parts) == 3 else None)
    return f


@settings(max_examples=300, deadline=None)
@given(frame_st())
def test_frames_roundtrip(f: frames.Frame) -> None:
    got = frames.decode(f.encode())
    assert _same(f, got)


@settings(max_examples=300, deadline=None)
@given(frame_st(), st.data())
def test_frames_truncated_parts(f: frames.Frame, data: st.DataObject) -> None:
    parts = f.encode()
    i = data.draw(st.integers(0, len(parts) - 1))
    cut = data.draw(st.integers(0, max(0, len(parts[i]) - 1)))
    mangled = list(parts)
    mangled[i] = parts[i][:cut]
    got = _decode_or_frame_error(mangled)
    if got is not None:
        # only a cut in the opaque extra part, or of an empty body, can still decode
        assert i == 2 or (i == 1 and not parts[1])


@settings(max_examples=300, deadline=None)
@given(frame_st(), st.data())
def test_frames_dropped_duplicated_reordered_parts(f: frames.Frame, data: st.DataObject) -> None:
    parts = f.encode()
    how = data.draw(st.sampled_from(["drop", "duplicate", "permute", "append", "repeat-all"]))
    if how == "drop":
        mangled = list(parts)
        del mangled[data.draw(st.integers(0, len(parts) - 1))]
    elif how == "duplicate":
        i = data.draw(st.integers(0, len(parts) - 1))
        j = data.draw(st.integers(0, len(parts)))
        mangled = list(parts)
        mangled.insert(j, parts[i])
    elif how == "permute":
        mangled = data.draw(st.permutations(parts))
    elif how == "append":
        mangled = [*parts, data.draw(st.binary(max_size=40))]
    else:
        mangled = parts * 2
    _decode_or_frame_error(mangled)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=5))
def test_frames_random_parts(parts: list[bytes]) -> None:
    _decode_or_frame_error(parts)


@settings(max_examples=300, deadline=None)
@given(frame_st(), st.data())
def test_frames_header_fields_mutated(f: frames.Frame, data: st.DataObject) -> None:
    parts = f.encode()
    head = bytearray(parts[0])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(head) - 1))
        head[pos] = data.draw(st.integers(0, 255))
    _decode_or_frame_error([bytes(head), *parts[1:]])


def test_frames_memoryview_parts_decode() -> None:
    f = frames.Frame(frames.TUN_WRITE, packets=[b"ab", b"c"], aux=[1, 2, 3, 4], counters=[5, 6, 7, 8])
    parts = [memoryview(p) for p in f.encode()]
    assert _same(frames.decode(parts), f)
