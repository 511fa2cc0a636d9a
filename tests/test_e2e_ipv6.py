"""End-to-end over IPv6: the outer transport and the tunnel's inner packets.

Addresses: the IPv6 benchmarking range 2001:2::/48 (RFC 5180, the IPv6
counterpart of 198.18.0.0/15), only inside this test's namespaces.
"""

from __future__ import annotations

import pytest

from fabric.testbed.testnet import FabricCluster, Topology, WgClient

pytestmark = pytest.mark.netns

ADDRESS = "198.19.100.1/24,2001:2:0:100::1/64"
PORT = 51820


def test_ipv6_outside_and_inside(topo2: Topology) -> None:
    topo = topo2
    for k in (1, 2):  # IPv6 on both ends of each veth
        topo.run(topo.server_ns, ["ip", "-6", "addr", "add", f"2001:2:0:{k}::1/64", "dev", topo.ifname(f"s{k}"), "nodad"])
        topo.run(topo.ns_of_client(k), ["ip", "-6", "addr", "add", f"2001:2:0:{k}::2/64", "dev", topo.ifname(f"c{k}"), "nodad"])
    fab = FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=2, workers=2)
    fab.start()
    # client 1 reaches the server over IPv6, client 2 over IPv4; both get both inner families
    conf1 = fab.peer_add("v6out", endpoint=f"[2001:2:0:1::1]:{PORT}")
    conf2 = fab.peer_add("v4out", endpoint=f"{topo.server_underlay(2)}:{PORT}")
    assert "2001:2:0:100::" in conf1 and "198.19.100." in conf1
    c1 = WgClient(topo, topo.ns_of_client(1), topo.ifname("w1"), conf1)
    c2 = WgClient(topo, topo.ns_of_client(2), topo.ifname("w2"), conf2)
    for c in (c1, c2):
        c.start()
        assert c.wait_ping("2001:2:0:100::1", timeout=20).ok, topo.log_tails()
        assert c.ping("198.19.100.1", count=3).all_ok
    # the server reaches each client's inner IPv6 address
    for name, c in (("v6out", c1), ("v4out", c2)):
        inner6 = [a.split("/")[0] for a in c.config.addresses if ":" in a]
        assert inner6, c.config.addresses
        assert topo.ping(topo.server_ns, inner6[0], count=3).all_ok, name
    endpoints = {s["peer"]: s["endpoint"] for s in fab.sessions()}
    assert endpoints["v6out"].startswith("[2001:2:0:1::2]:"), endpoints
    assert endpoints["v4out"].startswith("198.18.2.2:"), endpoints
    fab.check_alive()
    fab.stop()
