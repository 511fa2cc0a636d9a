"""End-to-end: stock wireguard-go clients against fabric in network namespaces.

The fabric runs as separate processes (1 broker, 2 edges, 2 workers) in the
server namespace; tunnel network 198.19.100.0/24, server 198.19.100.1, UDP
port 51820. One test runs ``fabric up`` instead. On failure the report carries
the tails of every process log (see conftest.LOG_SOURCES).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from fabric.testbed.testnet import FabricCluster, Topology, iperf3

pytestmark = pytest.mark.netns

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
PORT = 51820
SESSION_KEYS = {
    "peer",
    "protocol",
    "public_key",
    "endpoint",
    "allowed_ips",
    "latest_handshake",
    "rx_bytes",
    "tx_bytes",
    "session_id",
    "packets_per_edge",
    "packets_per_worker",
}



def sessions_of(fab: FabricCluster, name: str) -> list[dict[str, Any]]:
    return [s for s in fab.sessions() if s.get("peer") == name]


def test_handshake_and_ping(fab: FabricCluster) -> None:
    c = fab.connect_client(1, "alice")
    assert c.latest_handshake() > 0
    r = c.ping(SERVER_IP, count=5)
    assert r.all_ok, r.output
    mine = sessions_of(fab, "alice")
    assert mine, fab.sessions()
    s = mine[0]
    assert s["public_key"] == c.public_key()
    assert s["latest_handshake"] > 0
    assert s["endpoint"].split(":")[0] == fab.topo.client_underlay(1)


def test_server_pings_client(fab: FabricCluster) -> None:
    c = fab.connect_client(1, "alice")
    r = fab.topo.ping(fab.topo.server_ns, c.config.tunnel_ip(), count=5)
    assert r.all_ok, r.output


def test_iperf3_both_directions(fab: FabricCluster) -> None:
    c = fab.connect_client(1, "alice")
    up = iperf3(fab.topo, fab.topo.server_ns, c.ns, SERVER_IP, seconds=3)
    before = fab.stats()
    down = iperf3(fab.topo, fab.topo.server_ns, c.ns, SERVER_IP, seconds=3, reverse=True)
    print(f"fabric: client->server {up.mbps:.1f} Mbit/s, server->client {down.mbps:.1f} Mbit/s")
    assert up.mbps > 0 and down.mbps > 0, (up, down)
    # the download's TCP reached the edges as TSO super packets (fabric/dataplane/segment.py),
    # cut into more packets than reads, every one accepted by the client's TCP
    time.sleep(1.5)  # the edges report once a second
    after = fab.stats()
    reads = after.get("edge.tso_reads", 0) - before.get("edge.tso_reads", 0)
    packets = after.get("edge.tun_in", 0) - before.get("edge.tun_in", 0)
    assert reads > 0 and packets > reads, (reads, packets)
    assert after.get("edge.drop_bad_offload", 0) == 0


def test_two_clients(fab: FabricCluster) -> None:
    a = fab.connect_client(1, "alice")
    b = fab.connect_client(2, "bob")
    assert a.config.tunnel_ip() != b.config.tunnel_ip()
    for c in (a, b):
        r = c.ping(SERVER_IP, count=3)
        assert r.all_ok, r.output
        r = fab.topo.ping(fab.topo.server_ns, c.config.tunnel_ip(), count=3)
        assert r.all_ok, r.output
    sessions = fab.sessions()
    assert {"alice", "bob"} <= {s.get("peer") for s in sessions}, sessions
    for s in sessions:
        assert SESSION_KEYS <= set(s), sorted(s)
        assert s["protocol"] == "wireguard", s
    assert {"alice", "bob"} <= {p.get("name") for p in fab.peers()}
    assert {p["protocol"] for p in fab.peers()} == {"wireguard"}


def test_client_restart(fab: FabricCluster) -> None:
    c = fab.connect_client(1, "alice")
    before = max(s["latest_handshake"] for s in sessions_of(fab, "alice"))
    time.sleep(1.1)  # wg reports handshake times in whole seconds
    restarted_at = time.time()
    c.restart()
    r = c.wait_ping(SERVER_IP, timeout=20)
    assert r.ok, r.output
    assert c.ping(SERVER_IP, count=3).all_ok
    assert c.latest_handshake() >= int(restarted_at)
    after = max(s["latest_handshake"] for s in sessions_of(fab, "alice"))
    assert after > before, (before, after)
    r = fab.topo.ping(fab.topo.server_ns, c.config.tunnel_ip(), count=3)
    assert r.all_ok, r.output


def test_peer_remove_at_runtime(fab: FabricCluster) -> None:
    a = fab.connect_client(1, "alice")
    b = fab.connect_client(2, "bob")
    fab.peer_remove("alice")
    assert fab.topo.wait_no_ping(a.ns, SERVER_IP, timeout=20), "alice still pings after removal"
    assert "alice" not in {p.get("name") for p in fab.peers()}
    r = b.ping(SERVER_IP, count=3)
    assert r.all_ok, r.output


def test_fabric_up_smoke(topo2: Topology) -> None:
    topo = topo2
    cluster = FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=2, workers=2, mode="up")
    cluster.start()
    c = cluster.connect_client(1, "alice")
    assert c.ping(SERVER_IP, count=3).all_ok
    assert topo.ping(topo.server_ns, c.config.tunnel_ip(), count=3).all_ok
    cluster.check_alive()

    up = cluster.procs["up"]
    topo.stop(up, timeout=15)  # SIGTERM: the supervisor stops everything
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        topo.link_exists(topo.server_ns, cluster.tun)
        or topo.run(None, ["ip", "netns", "pids", topo.server_ns]).stdout.strip()
    ):
        time.sleep(0.2)
    assert not topo.link_exists(topo.server_ns, cluster.tun), "fabric up left its TUN behind"
    left = topo.run(None, ["ip", "netns", "pids", topo.server_ns]).stdout.split()
    assert not left, f"processes left in the server namespace after fabric up exited: {left}"
