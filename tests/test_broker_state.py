"""brokers/broker.py: the Broker's commit and admin logic in-process, without sockets.

Covers the authority checks of a handshake commit (timestamp, flood, receiver
index), the session limit per peer, monotonic persisted session ids (invariants
1 and 5), restarts and corrupt state, admin requests, and fuzzing (invariant 7).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brokers.broker import Broker
from fabric.control.frames import pack_addr
from fabric.control.kvmsg import HUGZ, KVMsg
from fabric.control.records import peer_key, session_key
from fabric.ops.config import ConfigError, PeerConfig
from fabric.ops.paths import StateDir
from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.authority import WgAuthority
from fabric.protocols.wireguard.constants import (
    INITIATION_FLOOD_INTERVAL,
    MAX_SESSIONS_PER_PEER,
    REKEY_TIMEOUT,
    SESSION_KEEP_TIME,
)

ADDRESS = "198.19.100.1/24"
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(path: Path, address: str = ADDRESS) -> Broker:
    return Broker(StateDir.at(path).ensure(), address, 51820, None, [])


def add(b: Broker, name: str, **kw: Any) -> bytes:
    reply = b.admin({"op": "peer_add", "name": name, **kw}, 0.0)
    assert reply["ok"], reply
    return crypto.key_from_base64(reply["public_key"])


def req(pub: bytes, t: float, index: int, **kw: Any) -> dict[str, Any]:
    """A responder commit as a worker sends it: handshake timestamp t (seconds)."""
    return {
        "peer": pub, "timestamp": crypto.tai64n(t), "local_index": index, "remote_index": index + 1000,
        "send_key": os.urandom(32), "recv_key": os.urandom(32), "endpoint": pack_addr("192.0.2.7", 4000),
        **kw,
    }


def ok_commit(b: Broker, pub: bytes, t: float, index: int, now: float | None = None) -> dict[str, Any]:
    reply = b.commit(req(pub, t, index), t if now is None else now)
    assert reply["ok"], reply
    return reply["session"]


def assert_published(b: Broker) -> None:
    """The Clone-pattern view equals the broker's own state."""
    assert {k for k in b.kv if k.startswith(b"peer/")} == {peer_key(p) for p in b.peers}
    assert {k for k in b.kv if k.startswith(b"session/")} == {session_key(s) for s in b.sessions}
    for sid, s in b.sessions.items():
        assert b.kv[session_key(sid)] == s.to_wire()


def wg(b: Broker) -> WgAuthority:
    """The broker's WireGuard rules and their state (timestamps, pending initiations)."""
    a = b.authorities["wireguard"]
    assert isinstance(a, WgAuthority)
    return a


@pytest.fixture
def broker(tmp_path: Path) -> Broker:
    return make(tmp_path)


# --- commits ----------------------------------------------------------------------


def test_fresh_handshake_is_committed(broker: Broker) -> None:
    pub = add(broker, "a")
    r = req(pub, 100.0, 7)
    reply = broker.commit(r, 100.0)
    assert reply["ok"], reply
    s = reply["session"]
    assert s["peer"] == pub and s["protocol"] == "wireguard"
    assert s["data_key"] == 7 and s["params"] == {"remote_index": 1007}
    assert s["keys"] == {"send_key": r["send_key"], "recv_key": r["recv_key"]}
    assert 1 <= s["slot"] < broker.slots
    assert broker.sessions[s["id"]].to_wire() == s
    assert_published(broker)
    assert wg(broker).last_timestamp[pub] == r["timestamp"]


def test_stale_and_equal_timestamps_are_refused(broker: Broker) -> None:
    pub = add(broker, "a")
    ok_commit(broker, pub, 100.0, 1)
    assert broker.commit(req(pub, 100.0, 2), 101.0) == {"ok": False, "reason": "stale_timestamp"}
    assert broker.commit(req(pub, 99.0, 3), 102.0) == {"ok": False, "reason": "stale_timestamp"}
    assert len(broker.sessions) == 1
    ok_commit(broker, pub, 100.001, 4, now=103.0)  # a nanosecond-resolution newer one is fine


def test_initiation_flood_is_refused(broker: Broker) -> None:
    pub = add(broker, "a")
    ok_commit(broker, pub, 100.0, 1, now=100.0)
    early = 100.0 + INITIATION_FLOOD_INTERVAL * 0.9
    assert broker.commit(req(pub, 101.0, 2), early) == {"ok": False, "reason": "flood"}
    # the refused one did not move the clock: a little later it is fine
    ok_commit(broker, pub, 101.0, 2, now=100.0 + INITIATION_FLOOD_INTERVAL * 1.1)
    # flood is per peer
    other = add(broker, "b")
    ok_commit(broker, other, 50.0, 3, now=100.0 + INITIATION_FLOOD_INTERVAL * 1.2)


def test_reused_local_index_is_refused(broker: Broker) -> None:
    a, b = add(broker, "a"), add(broker, "b")
    ok_commit(broker, a, 100.0, 42)
    assert broker.commit(req(a, 101.0, 42), 101.0) == {"ok": False, "reason": "index_in_use"}
    assert broker.commit(req(b, 101.0, 42), 101.0) == {"ok": False, "reason": "index_in_use"}
    for bad in (-1, 2**32, "42", None, 4.0):
        assert broker.commit(req(b, 102.0, 0, local_index=bad), 102.0)["ok"] is False
    assert len(broker.sessions) == 1


def test_unknown_peer_is_refused(broker: Broker) -> None:
    add(broker, "a")
    stranger = crypto.public_key(crypto.generate_private_key())
    assert broker.commit(req(stranger, 100.0, 1), 100.0) == {"ok": False, "reason": "unknown_peer"}
    assert broker.commit({"timestamp": crypto.tai64n(1)}, 100.0)["reason"] == "unknown_peer"
    assert broker.sessions == {}


@pytest.mark.parametrize("field, value", [
    ("timestamp", b"short"), ("timestamp", "x" * 12), ("timestamp", None),
    ("send_key", b"\0" * 31), ("recv_key", b"\0" * 33), ("send_key", None), ("remote_index", "x"),
])
def test_malformed_commit_is_refused_without_side_effects(broker: Broker, field: str, value: Any) -> None:
    pub = add(broker, "a")
    for i in range(MAX_SESSIONS_PER_PEER):
        ok_commit(broker, pub, 100.0 + i, i)
    before = dict(broker.sessions)
    reply = broker.commit(req(pub, 200.0, 99, **{field: value}), 200.0)
    assert reply == {"ok": False, "reason": "bad_request"}
    assert broker.sessions == before  # in particular, no old session was evicted
    assert broker.commit(req(pub, 200.0, 99), 200.0)["ok"]  # the timestamp was not used up


def test_at_most_three_sessions_per_peer(broker: Broker) -> None:
    a, b = add(broker, "a"), add(broker, "b")
    other = ok_commit(broker, b, 1.0, 1000)
    sids = [ok_commit(broker, a, 10.0 + i, i)["id"] for i in range(6)]
    mine = sorted(sid for sid, s in broker.sessions.items() if s.peer == a)
    assert len(mine) == MAX_SESSIONS_PER_PEER
    assert mine == sids[-MAX_SESSIONS_PER_PEER:]  # the newest are kept
    assert other["id"] in broker.sessions  # another peer's session is untouched
    slots = [s.slot for s in broker.sessions.values()]
    assert len(set(slots)) == len(slots)
    assert_published(broker)


def test_session_ids_strictly_increase(broker: Broker) -> None:
    peers = [add(broker, f"p{i}") for i in range(4)]
    ids = []
    for i in range(20):
        ids.append(ok_commit(broker, peers[i % 4], 100.0 + i, i)["id"])
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_pending_and_initiator_commit(broker: Broker) -> None:
    pub = add(broker, "a")
    state = {"hash": b"h" * 32, "chain": b"c" * 32}
    assert broker.commit({"role": "pending", "peer": pub, "local_index": 5, "state": state}, 1.0) == {"ok": True}
    assert broker.kv[b"pending/5"]["state"] == state
    assert broker.commit({"role": "pending", "peer": pub, "local_index": 5, "state": state}, 1.0)["ok"] is False
    assert broker.commit({"role": "pending", "peer": pub, "local_index": 6, "state": 5}, 1.0)["ok"] is False
    r = req(pub, 0, 5, role="initiator")
    s = broker.commit(r, 2.0)["session"]
    assert s["initiator"] is True and s["data_key"] == 5
    assert b"pending/5" not in broker.kv
    assert broker.commit(req(pub, 0, 5, role="initiator"), 3.0) == {"ok": False, "reason": "no_pending_handshake"}


# --- persistence ------------------------------------------------------------------


def test_restart_keeps_peers_sessions_and_ids(tmp_path: Path) -> None:
    b1 = make(tmp_path)
    a, b = add(b1, "a", psk=True), add(b1, "b", keepalive=25)
    sessions = [ok_commit(b1, a, 100.0, 1), ok_commit(b1, b, 100.0, 2), ok_commit(b1, a, 101.0, 3)]
    b2 = make(tmp_path)
    assert wg(b2).public == wg(b1).public
    assert {p: (x.name, x.allowed_ips, x.psk, x.keepalive) for p, x in b2.peers.items()} == \
           {p: (x.name, x.allowed_ips, x.psk, x.keepalive) for p, x in b1.peers.items()}
    assert {sid: r.to_wire() for sid, r in b2.sessions.items()} == {s["id"]: s for s in sessions}
    assert_published(b2)
    # the newest timestamp survives: a replayed initiation stays refused (whitepaper 5.1)
    assert b2.commit(req(a, 101.0, 9), 200.0) == {"ok": False, "reason": "stale_timestamp"}
    assert b2.commit(req(a, 200.0, 1), 200.0) == {"ok": False, "reason": "index_in_use"}
    new = ok_commit(b2, a, 200.0, 10)
    assert new["id"] > max(s["id"] for s in sessions)
    assert new["slot"] not in {s.slot for s in b2.sessions.values() if s.id != new["id"]}


def test_ids_grow_after_state_file_is_lost(tmp_path: Path) -> None:
    b1 = make(tmp_path)
    pub = add(b1, "a")
    old = max(ok_commit(b1, pub, 100.0 + i, i)["id"] for i in range(5))
    time.sleep(0.002)  # a restart takes longer than the id floor's millisecond resolution
    b1.sd.broker_state.unlink()
    b2 = make(tmp_path)
    assert b2.peers == {} and b2.sessions == {}
    pub = add(b2, "a")
    assert ok_commit(b2, pub, 100.0, 0)["id"] > old


@pytest.mark.parametrize("garbage", [b"", b"garbage", b"\x01", msgpack.packb([1, 2]),
                                     msgpack.packb({"version": 99, "peers": [], "sessions": [], "next_sid": 1})])
def test_corrupt_state_is_moved_aside(tmp_path: Path, garbage: bytes) -> None:
    b1 = make(tmp_path)
    pub = add(b1, "a")
    old = max(ok_commit(b1, pub, 100.0 + i, i)["id"] for i in range(3))
    time.sleep(0.002)
    b1.sd.broker_state.write_bytes(garbage)
    b2 = make(tmp_path)
    assert (tmp_path / "broker.corrupt").read_bytes() == garbage
    assert b2.peers == {} and b2.sessions == {}
    assert_published(b2)
    pub = add(b2, "a")
    assert ok_commit(b2, pub, 1.0, 0)["id"] > old
    assert make(tmp_path).peers.keys() == {pub}  # and the new state file is good


def test_partly_corrupt_state_is_consistent(tmp_path: Path) -> None:
    b1 = make(tmp_path)
    pub = add(b1, "a")
    ok_commit(b1, pub, 100.0, 1)
    data = msgpack.unpackb(b1.sd.broker_state.read_bytes(), raw=False, strict_map_key=False)
    data["sessions"].append({"no": "fields"})
    b1.sd.broker_state.write_bytes(msgpack.packb(data, use_bin_type=True))
    b2 = make(tmp_path)
    assert (tmp_path / "broker.corrupt").exists()
    assert_published(b2)


# --- admin ------------------------------------------------------------------------


def test_peer_add_generates_keys_and_next_free_address(broker: Broker) -> None:
    r = broker.admin({"op": "peer_add", "name": "laptop", "psk": True}, 0.0)
    assert r["ok"], r
    private = crypto.key_from_base64(r["private_key"])
    assert crypto.key_to_base64(crypto.public_key(private)) == r["public_key"]
    assert len(crypto.key_from_base64(r["preshared_key"])) == 32
    assert r["allowed_ips"] == ["198.19.100.2/32"]  # .1 is the server's
    assert r["server_public_key"] == crypto.key_to_base64(wg(broker).public)
    assert broker.admin({"op": "peer_add", "name": "phone"}, 0.0)["allowed_ips"] == ["198.19.100.3/32"]
    add(broker, "fixed", allowed_ips=["198.19.100.4/32"])
    assert broker.admin({"op": "peer_add", "name": "next"}, 0.0)["allowed_ips"] == ["198.19.100.5/32"]
    assert broker.admin({"op": "peer_remove", "name": "phone"}, 0.0)["ok"]
    assert broker.admin({"op": "peer_add", "name": "again"}, 0.0)["allowed_ips"] == ["198.19.100.3/32"]
    assert_published(broker)


def test_peer_add_dual_stack(tmp_path: Path) -> None:
    b = make(tmp_path, "198.19.100.1/24,fd00:1::1/64")
    r = b.admin({"op": "peer_add", "name": "a"}, 0.0)
    assert r["allowed_ips"] == ["198.19.100.2/32", "fd00:1::2/128"]


def test_peer_add_with_public_key(broker: Broker) -> None:
    key = crypto.key_to_base64(crypto.public_key(crypto.generate_private_key()))
    r = broker.admin({"op": "peer_add", "name": "a", "public_key": key}, 0.0)
    assert r["ok"] and r["public_key"] == key and r["private_key"] is None
    dup = broker.admin({"op": "peer_add", "name": "b", "public_key": key}, 0.0)
    assert dup["ok"] is False and "'a'" in dup["error"]


def test_peer_add_refusals(broker: Broker) -> None:
    add(broker, "a", allowed_ips=["10.0.0.0/24"])
    cases = [
        ({"name": "a"}, "'a'"),
        ({"name": "b", "allowed_ips": ["10.0.0.0/24"]}, "10.0.0.0/24"),
        ({"name": "b", "allowed_ips": ["10.0.0.9/24"]}, "10.0.0.0/24"),  # same network, other spelling
        ({"name": "b", "allowed_ips": ["10.0.0.300/32"]}, "10.0.0.300/32"),
        ({"name": "b", "allowed_ips": ["nope"]}, "nope"),
        ({"name": "b", "public_key": "not a key"}, "key"),
        ({"name": ""}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "a\nb"}, "name"),
    ]
    for extra, needle in cases:
        r = broker.admin({"op": "peer_add", **extra}, 0.0)
        assert r["ok"] is False, extra
        assert isinstance(r["error"], str) and needle in r["error"], (extra, r)
    assert [p.name for p in broker.peers.values()] == ["a"]


def test_no_free_address_left(tmp_path: Path) -> None:
    b = make(tmp_path, "198.19.100.1/30")  # one host besides the server
    add(b, "a")
    r = b.admin({"op": "peer_add", "name": "b"}, 0.0)
    assert r["ok"] is False and "no free address" in r["error"]


def test_next_free_address_search_gives_up_loudly(tmp_path: Path) -> None:
    b = make(tmp_path, "fd00::1/64")
    add(b, "big", allowed_ips=["fd00::/104"])
    r = b.admin({"op": "peer_add", "name": "next"}, 0.0)
    assert (r["ok"] and r["allowed_ips"]) or (not r["ok"] and "address" in r["error"]), r


def test_peer_remove_deletes_sessions(tmp_path: Path) -> None:
    b = make(tmp_path)
    a, keep = add(b, "a"), add(b, "keep")
    ok_commit(b, a, 1.0, 1)
    ok_commit(b, a, 2.0, 2)
    kept = ok_commit(b, keep, 3.0, 3)
    assert b.admin({"op": "peer_remove", "name": "a"}, 5.0) == {"ok": True, "name": "a"}
    assert set(b.sessions) == {kept["id"]} and a not in b.peers
    assert_published(b)
    r = b.admin({"op": "peer_remove", "name": "a"}, 5.0)
    assert r["ok"] is False and "'a'" in r["error"]
    b2 = make(tmp_path)
    assert set(b2.sessions) == {kept["id"]} and set(b2.peers) == {keep}
    assert b2.commit(req(a, 10.0, 9), 10.0)["reason"] == "unknown_peer"


def test_peer_remove_deletes_pending_handshakes(broker: Broker) -> None:
    pub = add(broker, "a")
    assert broker.commit({"role": "pending", "peer": pub, "local_index": 5, "state": {"k": b"x"}}, 1.0)["ok"]
    assert broker.admin({"op": "peer_remove", "name": "a"}, 2.0)["ok"]
    assert wg(broker).pending == {}
    assert not [k for k in broker.kv if k.startswith(b"pending/")]


def test_config_peers_conflicting_with_runtime_peers(tmp_path: Path) -> None:
    b1 = make(tmp_path)
    add(b1, "a")  # gets 198.19.100.2/32
    other = crypto.public_key(crypto.generate_private_key())
    conflicting = [PeerConfig("a", other, ["198.19.100.2/32"])]
    try:
        b2 = Broker(StateDir.at(tmp_path), ADDRESS, 51820, None, conflicting)
    except ConfigError:
        return  # refusing to start is fine
    names = [p.name for p in b2.peers.values()]
    nets = [n for p in b2.peers.values() for n in p.allowed_ips]
    assert len(set(names)) == len(names) and len(set(nets)) == len(nets)


def test_config_peers_are_merged(tmp_path: Path) -> None:
    b1 = make(tmp_path)
    runtime = add(b1, "runtime")
    ok_commit(b1, runtime, 5.0, 1)
    key = crypto.public_key(crypto.generate_private_key())
    b2 = Broker(StateDir.at(tmp_path), ADDRESS, 51820, None, [PeerConfig("cfg", key, ["10.9.0.0/24"], None, 25)])
    assert {p.name for p in b2.peers.values()} == {"runtime", "cfg"}
    assert b2.peers[key].keepalive == 25 and b2.peers[key].allowed_ips == ["10.9.0.0/24"]
    assert b2.commit(req(runtime, 5.0, 2), 6.0)["reason"] == "stale_timestamp"  # state kept
    assert_published(b2)


def test_read_ops(broker: Broker) -> None:
    pub = add(broker, "a")
    ok_commit(broker, pub, 1.0, 1)
    peers = broker.admin({"op": "peers"}, 2.0)
    assert peers["ok"] and [p["name"] for p in peers["peers"]] == ["a"] and peers["peers"][0]["sessions"] == 1
    sessions = broker.admin({"op": "sessions"}, 2.0)
    assert sessions["ok"] and [s["peer"] for s in sessions["sessions"]] == ["a"]
    assert broker.admin({"op": "status"}, 2.0)["sessions"] == 1
    assert broker.admin({"op": "stats"}, 2.0)["counters"]["handshakes"] == 1
    assert broker.admin({"op": "server"}, 2.0)["public_key"] == crypto.key_to_base64(wg(broker).public)


@pytest.mark.parametrize("request_", [
    {}, {"op": "nope"}, {"op": 5}, {"op": ["peers"]}, {"op": {"a": 1}}, {"op": None}, {"op": b"peers"},
    {"op": "peer_add"}, {"op": "peer_add", "name": 5}, {"op": "peer_add", "name": ["a"]},
    {"op": "peer_add", "name": "a", "allowed_ips": 5}, {"op": "peer_add", "name": "a", "allowed_ips": [5]},
    {"op": "peer_add", "name": "a", "allowed_ips": [None]}, {"op": "peer_add", "name": "a", "allowed_ips": {"x": 1}},
    {"op": "peer_add", "name": "a", "public_key": 5}, {"op": "peer_add", "name": "a", "public_key": ["k"]},
    {"op": "peer_add", "name": "a", "keepalive": "abc"}, {"op": "peer_add", "name": "a", "keepalive": [1]},
    {"op": "peer_add", "name": "a", "keepalive": math.nan},
    {"op": "peer_remove"}, {"op": "peer_remove", "name": ["a"]}, {"op": "peer_remove", "name": {"a": 1}},
])
def test_malformed_admin_requests(broker: Broker, request_: dict[str, Any]) -> None:
    reply = broker.admin(request_, 0.0)
    assert reply["ok"] is False
    assert isinstance(reply["error"], str) and reply["error"]
    assert broker.peers == {}


@pytest.mark.parametrize("keepalive", [math.inf, 1e30, 2**64, -1, 65536])
def test_peer_add_keepalive_out_of_range(broker: Broker, keepalive: Any) -> None:
    reply = broker.admin({"op": "peer_add", "name": "a", "keepalive": keepalive}, 0.0)
    assert reply["ok"] is False and "keepalive" in reply["error"]
    assert broker.peers == {}
    # the broker still works, and persists
    pub = add(broker, "b")
    ok_commit(broker, pub, 1.0, 1)


# --- the commit socket (what a worker can actually send) ---------------------------


class FakeRouter:
    """Stands in for the ROUTER socket in Broker._serve_commit."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.sent: list[list[bytes]] = []

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        return self.parts

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        self.sent.append(parts)


def serve_commit(b: Broker, parts: list[bytes], now: float) -> dict[str, Any] | None:
    b.commits = FakeRouter(parts)  # type: ignore[assignment]
    b._serve_commit(now)
    sent = b.commits.sent  # type: ignore[attr-defined]
    if not sent:
        return None
    assert len(sent) == 1 and sent[0][:2] == [parts[0], b""]
    reply = msgpack.unpackb(sent[0][2], raw=False)
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    return reply


def test_serve_commit_answers_garbage(broker: Broker) -> None:
    pub = add(broker, "a")
    for body in (b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"peer": [1]}), msgpack.packb({"peer": {}})):
        assert serve_commit(broker, [b"id", b"", body], 1.0)["ok"] is False
    assert serve_commit(broker, [b"id", b"x", b""], 1.0) is None  # not a REQ envelope: dropped, counted
    assert broker.counters["bad_commit_frame"] == 1
    reply = serve_commit(broker, [b"id", b"", msgpack.packb(req(pub, 5.0, 1), use_bin_type=True)], 5.0)
    assert reply["ok"] and reply["session"]["data_key"] == 1


@pytest.mark.parametrize("field, value", [("remote_index", math.inf), ("remote_index", 1e30), ("send_key", 2**63)])
def test_serve_commit_survives_out_of_range_numbers(broker: Broker, field: str, value: Any) -> None:
    pub = add(broker, "a")
    body = msgpack.packb(req(pub, 5.0, 1, **{field: value}), use_bin_type=True)
    reply = serve_commit(broker, [b"id", b"", body], 5.0)
    assert reply is not None and reply["ok"] is False
    assert serve_commit(broker, [b"id", b"", msgpack.packb(req(pub, 6.0, 2), use_bin_type=True)], 6.0)["ok"]


def test_commit_unhashable_peer(broker: Broker) -> None:
    assert broker.commit({"peer": [1, 2]}, 1.0)["ok"] is False


class FakeRep:
    """Stands in for the REP socket in Broker._serve_admin."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.sent: list[bytes] = []

    def recv(self, flags: int = 0) -> bytes:
        return self.raw

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(data)


@pytest.mark.parametrize("raw", [b"", b"\xc1", msgpack.packb([1]), msgpack.packb("peers"), b"\x81\x91\x01\x01",
                                 msgpack.packb({"op": "peer_add", "name": "x", "keepalive": 2**64 - 1})])
def test_serve_admin_always_answers(broker: Broker, raw: bytes) -> None:
    broker.adm = FakeRep(raw)  # type: ignore[assignment]
    broker._serve_admin(1.0)
    (sent,) = broker.adm.sent  # type: ignore[attr-defined]
    reply = msgpack.unpackb(sent, raw=False)
    assert reply["ok"] is False and isinstance(reply["error"], str)
    broker.adm = FakeRep(msgpack.packb({"op": "peers"}))  # type: ignore[assignment]
    broker._serve_admin(1.0)
    assert msgpack.unpackb(broker.adm.sent[0], raw=False)["ok"] is True  # type: ignore[attr-defined]


# --- publishing and stats reports (with a real PUB socket) ----------------------------


@pytest.fixture
def pub_broker(tmp_path: Path):
    ctx = zmq.Context()
    b = make(tmp_path)
    b.pub = ctx.socket(zmq.PUB)
    b.pub.setsockopt(zmq.LINGER, 0)
    b.pub.bind(f"inproc://broker-{id(b)}")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"inproc://broker-{id(b)}")
    deadline = time.monotonic() + 5
    while not sub.poll(20):  # heartbeats until the subscription is through
        assert time.monotonic() < deadline, "the SUB never joined"
        b.tick(time.time())
    while sub.poll(0):
        sub.recv_multipart()
    b.test_sub = sub  # type: ignore[attr-defined]
    yield b
    ctx.destroy(0)


def received(b: Broker) -> list[KVMsg]:
    sub = b.test_sub  # type: ignore[attr-defined]
    out = []
    while sub.poll(50):
        out.append(KVMsg.recv(sub))
    return out


def test_updates_are_published_in_sequence(pub_broker: Broker) -> None:
    b = pub_broker
    pub = add(b, "a")
    s = ok_commit(b, pub, 1.0, 1)
    msgs = received(b)
    assert [m.key for m in msgs] == [peer_key(pub), session_key(s["id"])]
    assert [m.seq for m in msgs] == list(range(msgs[0].seq, msgs[0].seq + len(msgs)))
    assert msgs[-1].seq == b.seq and all(m.epoch == b.epoch for m in msgs)
    assert msgs[1].value == s
    assert b.admin({"op": "peer_remove", "name": "a"}, 2.0)["ok"]
    gone = received(b)
    assert {m.key for m in gone} == {peer_key(pub), session_key(s["id"])} and all(m.value is None for m in gone)


def test_edge_reports_announce_edges(pub_broker: Broker) -> None:
    b = pub_broker
    report = {"role": "edge", "id": 3, "pid": 99, "work": "ipc://w", "result": "ipc://r", "counters": {"rx": 5}}
    b.on_report(report, 1.0)
    b.on_report(report, 1.5)  # unchanged: not published again
    b.on_report({"role": "worker", "id": 0, "pid": 98, "counters": {"rx": 2}}, 1.5)
    msgs = received(b)
    assert [(m.key, m.value) for m in msgs] == [(b"edge/3", {"id": 3, "work": "ipc://w", "result": "ipc://r"}),
                                                (b"worker/0", {"id": 0})]
    assert b.admin({"op": "stats"}, 2.0)["counters"] == {"edge.rx": 5, "worker.rx": 2}
    b.tick(100.0)  # both stopped reporting
    assert sorted((m.key, m.value) for m in received(b) if m.key != HUGZ) == [(b"edge/3", None), (b"worker/0", None)]


def test_tick_expires_sessions_and_pending(pub_broker: Broker) -> None:
    b = pub_broker
    pub = add(b, "a")
    old = ok_commit(b, pub, 1.0, 1, now=1000.0)
    new = ok_commit(b, pub, 2.0, 2, now=1000.0 + SESSION_KEEP_TIME / 2)
    assert b.commit({"role": "pending", "peer": pub, "local_index": 7, "state": {}}, 1000.0 + SESSION_KEEP_TIME)["ok"]
    b.tick(1000.0 + SESSION_KEEP_TIME + 1)
    assert set(b.sessions) == {new["id"]} and 7 in wg(b).pending
    b.tick(1000.0 + SESSION_KEEP_TIME + 3 * REKEY_TIMEOUT + 1)
    assert wg(b).pending == {}
    assert_published(b)
    assert not [k for k in b.kv if k.startswith(b"pending/")]
    assert set(make(b.sd.root).sessions) == {new["id"]}  # the expiry was persisted
    assert old["id"] not in b.sessions


@pytest.mark.parametrize("report", [
    {}, {"role": "edge"}, {"role": "edge", "id": 1}, {"role": "boss", "id": 1, "pid": 1},
    {"role": "edge", "id": "x", "pid": 1}, {"role": "edge", "id": None, "pid": 1}, {"role": "edge", "id": 1, "pid": []},
])
def test_bad_reports_are_counted(pub_broker: Broker, report: dict[str, Any]) -> None:
    b = pub_broker
    b.on_report(report, 1.0)
    assert b.counters.get("bad_report") == 1
    assert b.reports.latest == {} and received(b) == []


@pytest.mark.parametrize("report", [
    {"role": "edge", "id": math.inf, "pid": 1}, {"role": "edge", "id": 1, "pid": math.inf},
    {"role": "edge", "id": 1e30, "pid": 1}, {"role": "edge", "id": 2**64, "pid": 1},
])
def test_out_of_range_report_ids(pub_broker: Broker, report: dict[str, Any]) -> None:
    b = pub_broker
    b.on_report(report, 1.0)
    assert b.counters.get("bad_report") == 1


@pytest.mark.parametrize("extra", [
    {"peers": [1]}, {"peers": {b"k": 5}}, {"peers": {b"k": ["x"]}}, {"sessions": [1]},
    {"sessions": {"x": {}}}, {"sessions": {"1": {"packets": "many"}}}, {"sessions": {"1": 5}},
    {"counters": []}, {"counters": {"rx": "lots"}},
])
def test_malformed_report_does_not_break_admin(broker: Broker, extra: dict[str, Any]) -> None:
    add(broker, "a")
    broker.on_report({"role": "edge", "id": 0, "pid": 1, **extra}, 1.0)
    for op in ("peers", "sessions", "stats", "status"):
        assert broker.admin({"op": op}, 2.0)["ok"], op


# --- fuzz -------------------------------------------------------------------------

# Values a msgpack request can carry (so a worker or admin client can send them).
leaves = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.sampled_from([2**63, 2**64 - 1, -1])
    | st.floats() | st.text(max_size=12) | st.binary(max_size=40)
)
values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any] = values) -> st.SearchStrategy[Any]:
    """Usually `valid`, one time in eight `other` (anything at all, by default)."""
    return st.integers(0, 7).flatmap(lambda i: other if i == 0 else valid)


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Broker:
    b = make(tmp_path_factory.mktemp("fuzz"))
    for name in ("a", "b", "c"):
        add(b, name)
    return b


admin_requests = mostly(st.fixed_dictionaries(
    {
        "op": mostly(st.sampled_from(["peer_add", "peer_add", "peer_remove", "peers", "sessions", "status", "stats",
                                      "server"])),
        "name": mostly(st.sampled_from(["a", "b", "c", "d", "e", "x" * 64, "x" * 65, "\n", ""])),
    },
    optional={
        "allowed_ips": mostly(st.lists(st.sampled_from(["198.19.100.9/32", "10.0.0.0/24", "fd00::/64",
                                                        "0.0.0.0/0", "nope"]), max_size=2)),
        "public_key": mostly(st.sampled_from(["", "AAAA", crypto.key_to_base64(bytes(32))])),
        "psk": values,
        "keepalive": mostly(st.integers(0, 65535)),
    },
), st.dictionaries(st.text(max_size=8), values, max_size=4))


@FUZZ
@given(admin_requests)
def test_admin_fuzz_never_raises(fuzz_broker: Broker, request_: dict[str, Any]) -> None:
    b = fuzz_broker
    reply = b.admin(request_, 10.0)
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"]
    msgpack.packb(reply, use_bin_type=True)  # the reply can be sent
    b._persist()  # and the state can still be saved
    assert_published(b)
    names = [p.name for p in b.peers.values()]
    assert len(set(names)) == len(names)


FRESH = "<fresh>"  # replaced by a new timestamp / unused index in the test
_clock = itertools.count(1)
_newest_id = [0]  # session ids never repeat or go down, across all examples

commit_requests = st.fixed_dictionaries(
    {
        "peer": mostly(st.sampled_from([0, 1, 2])),  # index into the broker's peers
        "timestamp": mostly(mostly(st.just(FRESH), st.floats(0, 1e6).map(crypto.tai64n))),
        "local_index": mostly(mostly(st.just(FRESH), st.integers(0, 40) | st.sampled_from([-1, 2**32]))),
        "remote_index": mostly(st.integers(0, 2**32 - 1)),
        "send_key": mostly(st.binary(min_size=32, max_size=32) | st.binary(max_size=33)),
        "recv_key": mostly(st.binary(min_size=32, max_size=32)),
    },
    optional={
        "role": mostly(st.sampled_from(["responder", "initiator", "pending"])),
        "endpoint": mostly(st.just(pack_addr("::1", 1))),
        "state": mostly(st.dictionaries(st.text(max_size=4), st.binary(max_size=8), max_size=2)),
    },
)


@FUZZ
@given(commit_requests, mostly(st.just(FRESH), st.floats(0, 1e6)))
def test_commit_fuzz_never_raises(fuzz_broker: Broker, request_: dict[str, Any], now: Any) -> None:
    b = fuzz_broker
    tick = next(_clock)
    if now == FRESH:
        now = 1e6 + tick
    if request_["timestamp"] == FRESH:
        request_["timestamp"] = crypto.tai64n(1e6 + tick)
    if request_["local_index"] == FRESH:
        request_["local_index"] = 1000 + tick
    pubs = sorted(b.peers)
    if isinstance(request_.get("peer"), int) and not isinstance(request_["peer"], bool) \
            and 0 <= request_["peer"] < len(pubs):
        request_["peer"] = pubs[request_["peer"]]
    request_ = msgpack.unpackb(msgpack.packb(request_, use_bin_type=True), raw=False)  # as received
    before = set(b.sessions)
    reply = b.commit(request_, now)
    assert isinstance(reply["ok"], bool)
    if reply["ok"] and "session" in reply:
        s = reply["session"]
        assert s["id"] > max(before, default=0) and s["id"] > _newest_id[0]
        _newest_id[0] = s["id"]
        assert len(s["keys"]["send_key"]) == len(s["keys"]["recv_key"]) == 32
    elif not reply["ok"]:
        assert set(b.sessions) == before  # a refused commit evicts nothing
    msgpack.packb(reply, use_bin_type=True)
    b._persist()
    assert_published(b)
    for pub in b.peers:
        assert sum(1 for s in b.sessions.values() if s.peer == pub) <= MAX_SESSIONS_PER_PEER
    indexes = [s.data_key for s in b.sessions.values()]
    assert len(set(indexes)) == len(indexes)
