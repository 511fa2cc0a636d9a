"""Self-test of the netns harness, independent of fabric:
wireguard-go client <-> wireguard-go server through fabric.testbed.testnet.Topology."""

from __future__ import annotations

import subprocess
import time

import pytest

from fabric.testbed.testnet import (
    Capture,
    Topology,
    WgClient,
    WgConfig,
    cleanup_stale,
    client_config,
    gen_keypair,
    iperf3,
    new_prefix,
    parse_ping,
    start_wg_server,
    transport_nonces,
)

SERVER_TUN = "198.19.200.1"


def test_wg_config_parse() -> None:
    text = """
[Interface]
PrivateKey = aaaa
Address = 198.19.100.2/32, fd00::2/128
DNS = 198.18.0.53
MTU = 1380

[Peer]
PublicKey = bbbb
Endpoint = 198.18.1.1:51820
AllowedIPs = 198.19.100.0/24
AllowedIPs = 198.19.101.0/24 # comment
PersistentKeepalive = 25
"""
    cfg = WgConfig.parse(text)
    assert cfg.addresses == ["198.19.100.2/32", "fd00::2/128"]
    assert cfg.mtu == 1380
    assert cfg.allowed_ips == ["198.19.100.0/24", "198.19.101.0/24"]
    assert cfg.tunnel_ip() == "198.19.100.2"
    assert "Address" not in cfg.stripped and "DNS" not in cfg.stripped and "MTU" not in cfg.stripped
    assert "PersistentKeepalive = 25" in cfg.stripped


def test_parse_ping() -> None:
    out = (
        "3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n"
        "rtt min/avg/max/mdev = 0.101/0.250/0.399/0.120 ms\n"
    )
    r = parse_ping(out)
    assert (r.transmitted, r.received, r.rtt_avg_ms) == (3, 2, 0.25)
    assert r.ok and not r.all_ok


@pytest.mark.netns
def test_topology_underlay_and_teardown() -> None:
    topo = Topology(clients=2)
    with topo:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert topo.server_ns in names and all(ns in names for ns in topo.client_ns)
        for k in (1, 2):
            assert topo.ping(topo.ns_of_client(k), topo.server_underlay(k), count=1).ok
            assert topo.ping(topo.server_ns, topo.client_underlay(k), count=1).ok
        # clients are isolated from each other
        assert not topo.ping(topo.ns_of_client(1), topo.client_underlay(2), count=1, timeout=0.5).ok
        sleeper = topo.popen(topo.ns_of_client(1), ["sleep", "600"])
        workdir = topo.workdir
    assert sleeper.poll() is not None
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert topo.prefix not in names
    assert not workdir.exists()


@pytest.mark.netns
def test_teardown_on_failure() -> None:
    topo = Topology(clients=1)
    with pytest.raises(RuntimeError, match="boom"), topo:
        proc = topo.popen(topo.server_ns, ["sh", "-c", "trap '' TERM; sleep 600"])
        raise RuntimeError("boom")
    assert proc.poll() is not None  # survived SIGTERM, got SIGKILL
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert topo.prefix not in names


@pytest.mark.netns
def test_cleanup_stale_takes_old_test_bed_namespaces_only() -> None:
    """Left behind by a run killed hard: Topology's names and the compose cluster's
    (fabXXXXXX-<service>) go once they are old enough; young ones and other names stay."""
    prefix = new_prefix()
    ours = [f"{prefix}-srv", f"{prefix}-c1", f"{prefix}-broker", f"{prefix}-net-underlay"]
    other = f"{prefix}x"  # not a test bed name
    made = [*ours, other]
    try:
        for ns in made:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        assert cleanup_stale(prefix, min_age=3600) == []  # all young: a run in progress
        assert sorted(cleanup_stale(prefix, min_age=0)) == sorted(ours)
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert other in names and not set(ours) & set(names)
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.netns
def test_wireguard_go_pair(topo2: Topology) -> None:
    topo = topo2
    s_priv, s_pub = gen_keypair()
    keys = [gen_keypair() for _ in (1, 2)]
    server = start_wg_server(
        topo,
        address=f"{SERVER_TUN}/24",
        listen_port=51820,
        private_key=s_priv,
        peers=[(pub, f"198.19.200.{k + 1}/32") for k, (_, pub) in enumerate(keys, start=1)],
    )
    assert server.public_key() == s_pub
    clients = []
    for k, (priv, _) in enumerate(keys, start=1):
        conf = client_config(
            priv,
            f"198.19.200.{k + 1}/32",
            s_pub,
            f"{topo.server_underlay(k)}:51820",
            "198.19.200.0/24",
        )
        c = WgClient(topo, topo.ns_of_client(k), topo.ifname(f"w{k}"), conf).start()
        clients.append(c)
        assert c.wait_ping(SERVER_TUN, timeout=15).ok, topo.log_tails()
        assert c.latest_handshake() > 0
    # both directions, both clients
    for k, c in enumerate(clients, start=1):
        assert c.ping(SERVER_TUN, count=3).all_ok
        assert topo.ping(topo.server_ns, f"198.19.200.{k + 1}", count=3).all_ok
    assert len(server.latest_handshakes()) == 2
    rx, tx = server.transfer()[keys[0][1]]
    assert rx > 0 and tx > 0

    # restart: new process, same config, fresh handshake
    c1 = clients[0]
    before = c1.latest_handshake()
    old_pid = c1.proc.pid if c1.proc else None
    c1.restart()
    assert c1.proc is not None and c1.proc.pid != old_pid
    assert c1.latest_handshake() == 0.0 or c1.latest_handshake() >= before
    assert c1.wait_ping(SERVER_TUN, timeout=15).ok
    assert c1.wait_handshake(after=0.0, timeout=5) >= before


@pytest.mark.netns
def test_iperf3_both_ways(topo2: Topology) -> None:
    topo = topo2
    s_priv, s_pub = gen_keypair()
    c_priv, c_pub = gen_keypair()
    start_wg_server(
        topo, address=f"{SERVER_TUN}/24", private_key=s_priv, peers=[(c_pub, "198.19.200.2/32")]
    )
    conf = client_config(
        c_priv, "198.19.200.2/24", s_pub, f"{topo.server_underlay(1)}:51820", "198.19.200.0/24"
    )
    c = WgClient(topo, topo.ns_of_client(1), topo.ifname("w1"), conf).start()
    assert c.wait_ping(SERVER_TUN, timeout=15).ok
    up = iperf3(topo, topo.server_ns, c.ns, SERVER_TUN, seconds=2)
    down = iperf3(topo, topo.server_ns, c.ns, SERVER_TUN, seconds=2, reverse=True)
    assert up.mbps > 1 and down.mbps > 1, (up, down)
    assert down.reverse
    print(f"wireguard-go pair: up {up.mbps:.0f} Mbit/s, down {down.mbps:.0f} Mbit/s")


@pytest.mark.netns
def test_capture_reads_wireguard_nonces(topo2: Topology) -> None:
    """Capture + read_pcap see every transport message with its (index, counter)."""
    topo = topo2
    s_priv, s_pub = gen_keypair()
    c_priv, c_pub = gen_keypair()
    start_wg_server(topo, address=f"{SERVER_TUN}/24", private_key=s_priv, peers=[(c_pub, "198.19.200.2/32")])
    conf = client_config(c_priv, "198.19.200.2/32", s_pub, f"{topo.server_underlay(1)}:51820", "198.19.200.0/24")
    client = WgClient(topo, topo.ns_of_client(1), topo.ifname("w1"), conf).start()
    assert client.wait_ping(SERVER_TUN, timeout=15).ok
    with Capture(topo, topo.server_ns, topo.ifname("s1"), "udp port 51820") as cap:
        assert client.ping(SERVER_TUN, count=5).all_ok
        time.sleep(0.5)
    packets = cap.packets()
    nonces = transport_nonces([p for p in packets if p.sport == 51820])
    assert len(nonces) >= 5, packets
    assert len(set(nonces)) == len(nonces)  # wireguard-go never repeats a nonce
    counters = sorted(c for _, c in nonces)
    assert counters == list(range(counters[0], counters[0] + len(counters)))
