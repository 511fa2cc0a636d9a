"""UDP GSO in, UDP GRO at the edge, live (fabric/dataplane/udp.py).

Current wireguard-go sends runs of equal-size datagrams with one UDP GSO send; the
edge takes each run with one UDP GRO receive. Debian's wireguard-go does not, so a
client here is fabric's own sans-I/O WireGuard endpoint
(fabric/protocols/wireguard/endpoint.py) on a real UDP socket in a client
namespace, sending ICMP echo requests as one GSO run. All must be answered, the
edges must have taken runs (`gro_receives`), and the same run sent again must be
refused whole as replays (DESIGN.md invariant 2 holds on this path too).
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from fabric.testbed.testnet import FabricCluster

pytestmark = pytest.mark.netns

SERVER_IP = "198.19.100.1"
RUN = 24

CLIENT = r"""
import json, socket, struct, sys, time
from fabric.dataplane.gro import fold
from fabric.protocols.wireguard import crypto
from fabric.protocols.wireguard.endpoint import PacketReceived, WireGuardEndpoint
from fabric.protocols.wireguard.noise import StaticKeys

conf = dict(line.split(" = ", 1) for line in open(sys.argv[1]).read().splitlines() if " = " in line)
server_ip, run = sys.argv[2], int(sys.argv[3])
me = conf["Address"].split("/")[0]
host, port = conf["Endpoint"].rsplit(":", 1)
ep = WireGuardEndpoint(StaticKeys.from_private(crypto.key_from_base64(conf["PrivateKey"])))
ep.add_peer(crypto.key_from_base64(conf["PublicKey"]), allowed_ips=[server_ip + "/32"], endpoint=(host, int(port)))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
sock.settimeout(0.05)

def csum(b):  # the Internet checksum (RFC 1071) of the header or segment
    return ~fold(b) & 0xFFFF

def echo(seq):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + bytes(200)
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                     socket.inet_aton(me), socket.inet_aton(server_ip))
    return ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + icmp

replies = set()
def pump(until):
    while time.monotonic() < until:
        for d, a in ep.datagrams_to_send(time.time()):
            sock.sendto(d, a)
        try:
            data, addr = sock.recvfrom(65535)
            ep.receive_datagram(data, addr, time.time())
        except socket.timeout:
            pass
        ep.handle_timer(time.time())
        while (ev := ep.next_event()) is not None:
            if isinstance(ev, PacketReceived) and len(ev.packet) >= 28 and ev.packet[20] == 0:
                replies.add(struct.unpack_from("!H", ev.packet, 26)[0])
        if replies >= set(range(1, run + 1)) or (not run and 0 in replies):
            return

ep.send_packet(echo(0), time.time())  # the handshake first (whitepaper 5.4.2)
deadline = time.monotonic() + 15
while 0 not in replies and time.monotonic() < deadline:
    pump(min(deadline, time.monotonic() + 0.5))
for seq in range(1, run + 1):
    ep.send_packet(echo(seq), time.time())
sent = ep.datagrams_to_send(time.time())
sizes = {len(d) for d, _ in sent}
assert len(sent) == run and len(sizes) == 1, (len(sent), sizes)
dest = sent[0][1]
gso = [(17, 103, struct.pack("=H", sizes.pop()))]  # SOL_UDP, UDP_SEGMENT
sock.sendmsg([b"".join(d for d, _ in sent)], gso, 0, dest)  # one send, one run
pump(time.monotonic() + 10)
got = sorted(replies)
sock.sendmsg([b"".join(d for d, _ in sent)], gso, 0, dest)  # the same run again: replays
time.sleep(1.0)
print(json.dumps({"handshake": 0 in got, "replies": [s for s in got if s]}))
"""


def test_a_gso_run_from_a_client_is_taken_whole_and_replays_refused(fab: FabricCluster) -> None:
    conf = fab.peer_add("gso", endpoint=f"{fab.topo.server_underlay(1)}:{fab.listen_port}")
    path = fab.topo.workdir / "gso-client.conf"
    path.write_text(conf)
    before = fab.stats()
    out = fab.topo.run(fab.topo.ns_of_client(1), [sys.executable, "-c", CLIENT, str(path), SERVER_IP, str(RUN)],
                       timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["handshake"], out.stdout
    assert result["replies"] == list(range(1, RUN + 1)), result
    time.sleep(1.5)  # the edges report once a second
    after = fab.stats()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("edge.gro_receives", "edge.drop_replay", "edge.tun_out")}
    assert delta["edge.gro_receives"] >= 2, delta  # the run, then its replay (each one receive)
    assert delta["edge.drop_replay"] >= RUN, delta  # every datagram of the replayed run
    assert delta["edge.tun_out"] == RUN + 1, delta  # the first echo and the run, once
