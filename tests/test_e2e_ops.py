"""End-to-end: what an operator relies on besides the data path.

`fabric up` restarts a dead child; the --no-reuseport fallback (edge i on
port+i) serves clients on every port; the config `fabric peer add` prints is
accepted by wg-quick.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from fabric.testbed.testnet import FabricCluster, Topology, WgClient

pytestmark = pytest.mark.netns

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
PORT = 51820


def status(fab: FabricCluster) -> dict:
    out: dict = json.loads(fab.admin("status", "--json").stdout)
    return out


def live_pid(fab: FabricCluster, role: str, rid: int) -> int | None:
    rows = [p for p in status(fab)["processes"] if p["role"] == role and p["id"] == rid and p["alive"]]
    return max(rows, key=lambda p: -p["age"])["pid"] if rows else None


def test_up_restarts_a_killed_worker_and_edge(topo2: Topology) -> None:
    fab = FabricCluster(topo2, address=ADDRESS, listen_port=PORT, edges=2, workers=2, mode="up")
    fab.start()
    try:
        client = fab.connect_client(1, "alice")
        for role in ("worker", "edge"):
            old = live_pid(fab, role, 0)
            assert old is not None, status(fab)
            os.kill(old, signal.SIGKILL)
            new = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                new = live_pid(fab, role, 0)
                if new not in (None, old):
                    break
                time.sleep(0.5)
            assert new not in (None, old), f"{role} 0 was not restarted: {status(fab)['processes']}"
            assert client.wait_ping(SERVER_IP, timeout=15).ok
        fab.check_alive()  # the supervisor itself never died
    finally:
        fab.stop()


def test_no_reuseport_fallback_binds_port_plus_id(topo2: Topology) -> None:
    fab = FabricCluster(topo2, address=ADDRESS, listen_port=PORT, edges=2, workers=1, reuseport=False)
    fab.start()
    try:
        assert topo2.wait_udp_listen(topo2.server_ns, PORT) == 1
        assert topo2.wait_udp_listen(topo2.server_ns, PORT + 1) == 1
        # one client through each edge's own port
        for k, port in ((1, PORT), (2, PORT + 1)):
            conf = fab.peer_add(f"c{k}", endpoint=f"{topo2.server_underlay(k)}:{port}")
            client = WgClient(topo2, topo2.ns_of_client(k), topo2.ifname(f"w{k}"), conf)
            client.start()
            assert client.wait_ping(SERVER_IP, timeout=20).ok, f"client via port {port}"
        ports = {s["peer"]: s["endpoint"] for s in fab.sessions()}
        assert set(ports) == {"c1", "c2"}, ports
        stats = json.loads(fab.admin("stats", "--json").stdout)
        assert stats.get("edge.drop_no_worker", 0) == 0
    finally:
        fab.stop()


def test_printed_config_is_accepted_by_wg_quick(topo2: Topology) -> None:
    fab = FabricCluster(topo2, address=ADDRESS, listen_port=PORT, edges=1, workers=1)
    fab.start()
    try:
        conf = fab.peer_add("phone", endpoint=f"{topo2.server_underlay(1)}:{PORT}")
        path = topo2.workdir / "fabq0.conf"
        path.write_text(conf)
        path.chmod(0o600)
        cp = topo2.run(None, ["wg-quick", "strip", str(path)], check=False)
        assert cp.returncode == 0, cp.stderr
        assert "PrivateKey" in cp.stdout and "PublicKey" in cp.stdout and "Endpoint" in cp.stdout
        assert "Address" not in cp.stdout  # wg-quick keeps Address for itself
        assert "Address = 198.19.100." in conf and "AllowedIPs = 198.19.100.0/24" in conf
    finally:
        fab.stop()
