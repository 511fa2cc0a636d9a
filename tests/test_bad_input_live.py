"""Bad input against a running fabric (DESIGN.md invariant 7, issue "bad input").

Malformed datagrams of every kind reach the edges from a test namespace, and
garbage reaches every internal ZeroMQ socket. Each must be a counted drop (or
a clear error reply), no process may die, memory must stay bounded, and an
established wireguard-go client keeps working throughout.

The edges' socket filter (fabric/protocols/wireguard/guard.py) drops malformed datagrams and unknown
receiver indexes in the kernel: with it (the default) those are counted by the
kernel (`udp_socket_drops`) and sampled; without it (FABRIC_NO_SOCKET_FILTER=1)
every datagram reaches the edge's own parser, which counts each by its reason.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from fabric.control import frames
from fabric.ops.paths import StateDir
from fabric.protocols.wireguard.guard import SAMPLE
from fabric.testbed.testnet import FabricCluster, Topology

pytestmark = pytest.mark.netns

SERVER_IP = "198.19.100.1"
PORT = 51820

SENDER = r"""
import json, socket, sys, time
dst, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
items = json.load(open(path))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
for i, h in enumerate(items):
    s.sendto(bytes.fromhex(h), (dst, port))
    if i % 50 == 49:
        time.sleep(0.005)  # pace: the test counts every drop, so none may be lost in queues
"""



def send_datagrams(topo: Topology, fab: FabricCluster, datagrams: list[bytes], k: int = 2) -> None:
    path = topo.workdir / f"dgrams-{time.monotonic_ns()}.json"
    path.write_text(json.dumps([d.hex() for d in datagrams]))
    topo.run(topo.ns_of_client(k),
             [sys.executable, "-c", SENDER, topo.server_underlay(k), str(PORT), str(path)], timeout=60)


def stats(fab: FabricCluster) -> dict[str, int]:
    out: dict[str, int] = json.loads(fab.admin("stats", "--json").stdout)
    # the AEAD runs in an edge or a worker (--crypto): "any.<name>" adds up both
    for name in ("drop_decrypt", "decrypted"):
        out["any." + name] = out.get("edge." + name, 0) + out.get("worker." + name, 0)
    return out


def wait_counts(fab: FabricCluster, expected: dict[str, int], base: dict[str, int],
                timeout: float = 10.0) -> dict[str, int]:
    """Wait until every counter rose by at least its expected amount; return the deltas."""
    deadline = time.monotonic() + timeout
    delta: dict[str, int] = {}
    while time.monotonic() < deadline:
        now = stats(fab)
        delta = {k: now.get(k, 0) - base.get(k, 0) for k in expected}
        if all(delta[k] >= v for k, v in expected.items()):
            time.sleep(1.5)  # one more report period: catch overshoot too
            now = stats(fab)
            return {k: now.get(k, 0) - base.get(k, 0) for k in expected}
        time.sleep(0.3)
    return delta


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fabric_pids(fab: FabricCluster) -> dict[str, int]:
    return {label: p.pid for label, p in fab.procs.items()}


def malformed_cases(index: int, n: int = 20) -> dict[str, list[bytes]]:
    """Datagrams by the drop counter the edge's own parser names them with."""
    return {
        "edge.drop_short": [b"", b"\x01", b"\x04\x00\x00", b"\x04\x00\x00\x00" + bytes(20)] * (n // 4),
        "edge.drop_bad_type": [b"\x09\x00\x00\x00" + bytes(40), b"\x01\x01\x00\x00" + bytes(144)] * (n // 2),
        "edge.drop_bad_size": [b"\x01\x00\x00\x00" + bytes(100), b"\x02\x00\x00\x00" + bytes(200)] * (n // 2),
        "edge.drop_bad_mac1": [b"\x01\x00\x00\x00" + os.urandom(144), b"\x02\x00\x00\x00" + os.urandom(88)] * (n // 2),
        "edge.drop_unexpected_cookie": [b"\x03\x00\x00\x00" + os.urandom(60)] * n,
        "edge.drop_unknown_index": [struct.pack("<IIQ", 4, index ^ 0xFFFF, i) + os.urandom(32) for i in range(n)],
        # a real receiver index with a forged tag: the AEAD (edge or worker) refuses it
        "any.drop_decrypt": [struct.pack("<IIQ", 4, index, 10**9 + i) + os.urandom(48) for i in range(n - 2)]
        + [struct.pack("<IIQ", 4, index, 10**9 + 100 + i) + os.urandom(60000) for i in range(2)],
    }


def test_malformed_datagrams_are_counted_by_the_edge_without_the_filter(topo2: Topology) -> None:
    fab = FabricCluster(topo2, address="198.19.100.1/24", listen_port=PORT, edges=2, workers=2)
    fab.env["FABRIC_NO_SOCKET_FILTER"] = "1"
    fab.start()
    try:
        client = fab.connect_client(1, "alice")
        cases = malformed_cases(fab.sessions()[0]["receiver_index"])
        base = stats(fab)
        for datagrams in cases.values():
            send_datagrams(topo2, fab, datagrams)
        expected = {k: len(v) for k, v in cases.items()}
        delta = wait_counts(fab, expected, base)
        assert delta == expected, f"drop counters {delta} != datagrams sent {expected}"
        assert stats(fab).get("edge.drop_kernel_malformed", 0) == 0
        assert client.ping(SERVER_IP, count=3).all_ok
        fab.check_alive()
    finally:
        fab.stop()


def test_malformed_datagrams_are_counted_with_the_filter(topo2: Topology, fab: FabricCluster) -> None:
    """What the kernel drops is counted by the kernel; the rest by the edge as before."""
    client = fab.connect_client(1, "alice")
    cases = malformed_cases(fab.sessions()[0]["receiver_index"])
    in_kernel = ("edge.drop_short", "edge.drop_bad_type", "edge.drop_bad_size", "edge.drop_unknown_index")
    base = stats(fab)
    for datagrams in cases.values():
        send_datagrams(topo2, fab, datagrams)
    # what passes the filter is counted by the edge, exactly
    expected = {k: len(v) for k, v in cases.items() if k not in in_kernel}
    delta = wait_counts(fab, expected, base)
    assert delta == expected, f"drop counters {delta} != datagrams sent {expected}"
    # the rest: dropped by the kernel, or a sample of that (one in SAMPLE, counted as SAMPLE);
    # an empty datagram's sample stays empty and is the edge's `short`
    sent = sum(len(cases[k]) for k in in_kernel)
    deadline = time.monotonic() + 10
    while True:
        now = stats(fab)
        d = {k: now.get(k, 0) - base.get(k, 0) for k in
             ("edge.udp_socket_drops", "edge.drop_kernel_malformed", "edge.drop_kernel_unknown_index",
              "edge.drop_short", "edge.drop_bad_type", "edge.drop_bad_size", "edge.drop_unknown_index")}
        samples = (d["edge.drop_kernel_malformed"] + d["edge.drop_kernel_unknown_index"]) // SAMPLE
        seen = d["edge.udp_socket_drops"] + samples + d["edge.drop_short"]
        if seen >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert seen == sent, f"{d}: {sent} sent"
    assert d["edge.drop_bad_type"] == d["edge.drop_bad_size"] == d["edge.drop_unknown_index"] == 0, d
    assert client.ping(SERVER_IP, count=3).all_ok


def test_garbage_on_internal_sockets(topo2: Topology, fab: FabricCluster) -> None:
    client = fab.connect_client(1, "alice")
    sd = StateDir.at(fab.state_dir)
    ctx = zmq.Context()
    try:
        base = stats(fab)
        # edge result socket (workers -> edge): malformed frames
        push = ctx.socket(zmq.PUSH)
        push.connect(sd.edge_result(0))
        bad_frames: list[list[bytes]] = [
            [b"x"], [b"", b""], [b"\x0b" + bytes(10), b"body"], [os.urandom(64), os.urandom(64)],
            [b"\x0b\x07" + bytes(60), b""],  # wrong version
            [*frames.Frame(frames.TUN_WRITE, 0, 1, 0, frames.NO_ADDR, [b"abc"], [1, 2], counters=[1]).encode()[:1],
             b"toolong"],
        ]
        for f in bad_frames:
            push.send_multipart(f)
        # a well-formed result for a session that does not exist
        push.send_multipart(frames.Frame(frames.TUN_WRITE, 0, 12345, 0, frames.NO_ADDR, [b"abc"], [1, 2],
                                         counters=[1]).encode())
        # broker stats socket: garbage reports
        stats_push = ctx.socket(zmq.PUSH)
        stats_push.connect(sd.broker_stats)
        for raw in (b"not msgpack \xff", msgpack.packb([1, 2]), msgpack.packb({"role": "nobody", "id": 1, "pid": 1})):
            stats_push.send(raw)
        # broker commit socket: garbage requests get a refusal, never a crash
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 3000)
        req.connect(sd.broker_commit)
        for raw in (b"\xff\xfe", msgpack.packb({"op": "commit", "peer": 5}), msgpack.packb([1])):
            req.send(raw)
            reply = msgpack.unpackb(req.recv())
            assert reply["ok"] is False, reply
        # broker snapshot socket: a wrong request is ignored and counted
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(sd.broker_snapshot)
        dealer.send_multipart([b"GIMME", b""])
        # admin socket: garbage gets an error reply
        adm = ctx.socket(zmq.REQ)
        adm.setsockopt(zmq.RCVTIMEO, 3000)
        adm.connect(sd.admin)
        for raw in (b"\x00garbage", msgpack.packb({"op": "drop_tables"}), msgpack.packb({"op": "peer_add", "name": 7}),
                    msgpack.packb({"op": "peer_add", "name": "x", "allowed_ips": ["nope"]})):
            adm.send(raw)
            reply = msgpack.unpackb(adm.recv())
            assert reply["ok"] is False and reply["error"], reply
        # worker work sockets: pose as an edge the broker announces, feed garbage frames
        fake_work = f"ipc://{sd.run}/fake-work.sock"
        fake_result = f"ipc://{sd.run}/fake-result.sock"
        work = ctx.socket(zmq.PUSH)
        work.bind(fake_work)
        result = ctx.socket(zmq.PULL)
        result.bind(fake_result)
        stats_push.send(msgpack.packb({"role": "edge", "id": 200, "pid": 1, "work": fake_work, "result": fake_result}))
        worker_frames = [
            [b"garbage"], [os.urandom(70), os.urandom(10)],
            frames.Frame(frames.DECRYPT, 200, 999, 0, frames.NO_ADDR, [os.urandom(48)]).encode(),
            frames.Frame(frames.ENCRYPT, 200, 999, 0, frames.NO_ADDR, [b"x"]).encode(),
            frames.Frame(frames.HANDSHAKE, 200, 0, 0, frames.NO_ADDR, [b"\x01\x00\x00\x00" + os.urandom(144)]).encode(),
            frames.Frame(frames.INITIATE, 200, 0, 0, frames.NO_ADDR, [], extra=b"\xc1").encode(),
        ]
        # PUSH round-robins over the connected workers: send the set once per worker
        time.sleep(2.5)  # the workers connect once the broker publishes edge/200
        for _ in range(fab.workers):
            for f in worker_frames:
                work.send_multipart(f)
        expected = {
            "edge.drop_bad_frame": len(bad_frames),
            "edge.drop_unknown_session": 1,
            "bad_report": 3,
            "bad_commit": 1,
            "bad_snapshot_request": 1,
            "bad_admin": 1,
            "worker.drop_bad_frame": 2 * fab.workers,
            "worker.drop_unknown_session": 2 * fab.workers,
            "worker.drop_bad_mac1": fab.workers,
            "worker.drop_unknown_peer": fab.workers,
        }
        delta = wait_counts(fab, expected, base)
        assert delta == expected, f"counters {delta} != expected {expected}"
        assert client.ping(SERVER_IP, count=3).all_ok
    finally:
        ctx.destroy(0)


def test_flood_of_garbage_keeps_memory_bounded(topo2: Topology, fab: FabricCluster) -> None:
    client = fab.connect_client(1, "alice")
    index = fab.sessions()[0]["receiver_index"]

    def burst(seed: int) -> list[bytes]:
        out = []
        for i in range(1500):
            kind = i % 5
            if kind == 0:
                out.append(os.urandom(i % 200))
            elif kind == 1:
                out.append(b"\x01\x00\x00\x00" + os.urandom(144))
            elif kind == 2:
                out.append(struct.pack("<IIQ", 4, index, seed * 10**6 + i) + os.urandom(64))
            elif kind == 3:
                out.append(struct.pack("<IIQ", 4, os.getpid() + i, i) + os.urandom(32))
            else:
                out.append(b"\x03\x00\x00\x00" + os.urandom(60))
        return out

    pids = fabric_pids(fab)
    send_datagrams(topo2, fab, burst(1))  # warm up caches and allocators
    time.sleep(2)
    before = {k: rss_kib(p) for k, p in pids.items()}
    for seed in range(2, 6):
        send_datagrams(topo2, fab, burst(seed))
    time.sleep(2)
    after = {k: rss_kib(p) for k, p in pids.items()}
    growth = {k: after[k] - before[k] for k in pids}
    assert all(g < 8 * 1024 for g in growth.values()), f"RSS growth KiB after 6000 bad datagrams: {growth}"
    fab.check_alive()
    assert client.ping(SERVER_IP, count=3).all_ok


