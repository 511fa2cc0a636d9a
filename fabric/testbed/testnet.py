"""Network-namespace test bed: namespaces, wireguard-go peers, ping and iperf3.

Shipped as code (like wireguard-go's ``tun/tuntest``) so that the test suite,
``fabric demo`` and the benchmarks all build the same network:

* one server namespace and K client namespaces, all named ``<prefix>-srv`` and
  ``<prefix>-c<k>`` where ``<prefix>`` is ``fab`` plus 6 random hex digits;
* one veth pair per client, underlay ``198.18.<k>.1/24`` on the server side and
  ``198.18.<k>.2/24`` on client k (k = 1..K);
* every process started through :meth:`Topology.popen` is recorded by pid and
  killed on teardown (SIGTERM, then SIGKILL after a bounded wait), anything
  still left inside the namespaces is killed, and the namespaces are deleted,
  even when the caller failed.

Only 198.18.0.0/15 addresses are used, and only inside namespaces created here.
Needs root, iproute2, wireguard-go, wireguard-tools (``wg``), ping and iperf3.

The test bed is split by what it does; this module is its front door, so tests and
commands import one name from one place:

    netns.py           Topology (namespaces, veth pairs, processes), ping
    wgtools.py         wireguard-go devices, wg-quick configs, keys
    iperf.py           iperf3 runs
    fabriccluster.py   fabric's processes in a namespace, admin commands
    capture.py         tcpdump and pcap parsing (nonce checks)
"""

from __future__ import annotations

from fabric.testbed.capture import Capture, UdpPacket, iter_pcap, read_pcap, transport_nonces
from fabric.testbed.fabriccluster import FabricCluster, FabricError, fabric_argv, fabric_env
from fabric.testbed.iperf import IperfError, IperfResult, iperf3, parse_iperf
from fabric.testbed.netns import (
    NS_FAMILY,
    WG_RUN_DIR,
    PingResult,
    Topology,
    TopologyError,
    cleanup_stale,
    missing_tools,
    new_prefix,
    ns_argv,
    parse_ping,
    tail,
)
from fabric.testbed.wgtools import (
    WgClient,
    WgConfig,
    WgDevice,
    client_config,
    gen_keypair,
    start_wg_server,
)

__all__ = [
    "Capture",
    "IperfError",
    "client_config",
    "NS_FAMILY",
    "UdpPacket",
    "WG_RUN_DIR",
    "iter_pcap",
    "ns_argv",
    "parse_iperf",
    "parse_ping",
    "read_pcap",
    "transport_nonces",
    "FabricCluster",
    "FabricError",
    "IperfResult",
    "PingResult",
    "Topology",
    "TopologyError",
    "WgClient",
    "WgConfig",
    "WgDevice",
    "cleanup_stale",
    "fabric_argv",
    "fabric_env",
    "gen_keypair",
    "iperf3",
    "missing_tools",
    "new_prefix",
    "start_wg_server",
    "tail",
]
