"""Invariant 6: keys never travel unprotected.

ipc sockets live in a 0700 directory; every tcp endpoint requires CURVE with a
key from `fabric keys`, checked by a ZAP handler: a worker on another host with
an authorized key serves traffic, one with an unknown key receives nothing, and
the admin socket on tcp answers only authorized callers.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from fabric.ops.paths import StateDir
from fabric.testbed.testnet import FabricCluster, Topology, fabric_argv

pytestmark = pytest.mark.netns

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
PORT = 51820
BROKER_TCP = "198.18.1.1:52000"  # reachable from client namespace 1, the "other host"
EDGE_TCP = "198.18.1.1:52100"
ADMIN_TCP = "tcp://198.18.1.1:52004"

PLAIN_REQ = r"""
import sys, zmq
s = zmq.Context().socket(zmq.REQ); s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1]); s.send(b"\x81\xa2op\xa5peers")
print("answered" if s.poll(2000) else "silent")
"""


def cli(topo: Topology, ns: str | None, fab: FabricCluster, *args: str) -> tuple[int, str]:
    cp = topo.run(ns, fabric_argv(*args), check=False, env=fab.env, timeout=30)
    return cp.returncode, cp.stdout + cp.stderr


def test_curve_remote_worker_and_admin(topo2: Topology) -> None:
    topo = topo2
    # crypto in workers: all data crosses the remote worker
    fab = FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=1, workers=0, crypto="workers")
    sd = StateDir.at(fab.state_dir).ensure()
    rogue_sd = StateDir.at(topo.workdir / "rogue").ensure()
    for args in (("keys", "init"), ("keys", "client", "w9"), ("keys", "client", "ops")):
        rc, out = cli(topo, None, fab, *args, "--state-dir", str(sd.root))
        assert rc == 0, out
    for args in (("keys", "init"), ("keys", "client", "rogue")):
        rc, out = cli(topo, None, fab, *args, "--state-dir", str(rogue_sd.root))
        assert rc == 0, out
    curve = sd.root / "curve"
    server_key = str(curve / "server.key")
    fab.extra = {"broker": ["--tcp", BROKER_TCP], "edge": ["--tcp", EDGE_TCP]}
    fab.start()
    remote_sd = topo.workdir / "remote-host"

    # a worker on "another host" (client namespace 1), over tcp + CURVE: the only worker
    worker = topo.popen(topo.ns_of_client(1), fabric_argv(
        "-v", "worker", "--id", "9", "--state-dir", str(remote_sd), "--broker", f"tcp://{BROKER_TCP}",
        "--key", str(curve / "clients" / "w9.key_secret"), "--server-key", server_key,
    ), env=fab.env, label="remote-worker")
    # a worker with a key the fabric never authorized
    rogue = topo.popen(topo.ns_of_client(1), fabric_argv(
        "-v", "worker", "--id", "10", "--state-dir", str(topo.workdir / "rogue-host"),
        "--broker", f"tcp://{BROKER_TCP}",
        "--key", str(rogue_sd.root / "curve" / "clients" / "rogue.key_secret"), "--server-key", server_key,
    ), env=fab.env, label="rogue-worker")

    client = fab.connect_client(2, "alice", timeout=30)
    assert client.ping(SERVER_IP, count=5).all_ok
    # the worker reports its packets once a second: wait for that report (bounded)
    deadline = time.monotonic() + 5
    while True:
        rows = fab.sessions()
        if (rows and rows[0]["packets_per_worker"].get("9", 0) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows and rows[0]["packets_per_worker"].get("9", 0) > 0, rows
    time.sleep(2)
    assert worker.poll() is None and rogue.poll() is None
    workers = {p["id"] for p in fab.status()["processes"] if p["role"] == "worker"}
    assert workers == {9}, workers  # the rogue never got through to report
    rogue_log = topo.log_path(rogue).read_text()
    assert "snapshot installed" not in rogue_log, rogue_log[-2000:]
    assert "snapshot installed" in topo.log_path(worker).read_text()

    # admin over tcp: authorized key answers; unknown key, no key and plain ZeroMQ get nothing
    ns1 = topo.ns_of_client(1)
    ops = str(curve / "clients" / "ops.key_secret")
    rc, out = cli(topo, ns1, fab, "admin", "peers", "--json", "--admin", ADMIN_TCP, "--key", ops,
                  "--server-key", server_key)
    assert rc == 0 and '"alice"' in out, out
    rc, out = cli(topo, ns1, fab, "admin", "peers", "--admin", ADMIN_TCP,
                  "--key", str(rogue_sd.root / "curve" / "clients" / "rogue.key_secret"), "--server-key", server_key)
    assert rc == 1 and "did not answer" in out, out
    rc, out = cli(topo, ns1, fab, "admin", "peers", "--admin", ADMIN_TCP)
    assert rc == 1 and "--key" in out, out
    cp = topo.run(ns1, [sys.executable, "-c", PLAIN_REQ, ADMIN_TCP], check=False, env=fab.env)
    assert cp.stdout.strip() == "silent", cp.stdout + cp.stderr

    # revoking a key shuts it out within seconds
    rc, out = cli(topo, None, fab, "keys", "revoke", "ops", "--state-dir", str(sd.root))
    assert rc == 0, out
    time.sleep(4)
    rc, out = cli(topo, ns1, fab, "admin", "peers", "--admin", ADMIN_TCP, "--key", ops, "--server-key", server_key)
    assert rc == 1, out
    assert client.ping(SERVER_IP, count=3).all_ok
    fab.check_alive()
    fab.stop()


def test_ipc_sockets_live_in_a_private_directory(topo2: Topology) -> None:
    fab = FabricCluster(topo2, address=ADDRESS, listen_port=PORT, edges=1, workers=1)
    fab.start()
    sd = StateDir.at(fab.state_dir)
    for d in (sd.root, sd.run):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    sockets = list(Path(sd.run).glob("*.sock"))
    assert {"admin.sock", "broker-pub.sock", "edge-0-work.sock"} <= {p.name for p in sockets}
    assert stat.S_IMODE(os.stat(sd.server_key).st_mode) == 0o600
    # another user cannot reach them
    cp = topo2.run(None, ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                          sys.executable, "-c", "import os,sys; print(os.access(sys.argv[1], os.F_OK))",
                          str(sd.run / "admin.sock")], check=False)
    assert cp.stdout.strip() == "False", cp.stdout + cp.stderr
    fab.stop()
