"""Peers across restarts: the config file's and those added at runtime.

Rules (docs/architecture.md, "Peers"): the TOML file is authoritative for the
peers it names (same name or key: the file's version wins; a runtime peer whose
allowed IPs overlap a file peer is dropped; a peer deleted from the file is
forgotten); runtime peers (`fabric peer add`) are persisted in the state
directory and survive restarts.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from brokers.broker import Broker
from fabric.ops.config import PeerConfig
from fabric.ops.paths import StateDir
from fabric.protocols.wireguard import crypto
from fabric.testbed.testnet import FabricCluster, Topology, WgClient, gen_keypair

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
PORT = 51820


# --- the broker's merge rules, in-process ------------------------------------------------

def key() -> bytes:
    return crypto.public_key(crypto.generate_private_key())


def broker(path: Path, peers: list[PeerConfig]) -> Broker:
    return Broker(StateDir.at(path).ensure(), ADDRESS, PORT, None, peers)


def names(b: Broker) -> dict[str, str]:
    return {p["name"]: p["source"] for p in b.admin({"op": "peers"}, 0.0)["peers"]}


def add(b: Broker, name: str, **kw: Any) -> dict[str, Any]:
    return b.admin({"op": "peer_add", "name": name, **kw}, 0.0)


def test_runtime_and_config_peers_survive_a_restart(tmp_path: Path) -> None:
    cfg = [PeerConfig("office", key(), ["198.19.100.10/32"])]
    b = broker(tmp_path, cfg)
    r = add(b, "laptop")
    assert r["ok"], r
    assert names(b) == {"office": "config", "laptop": "runtime"}
    b2 = broker(tmp_path, cfg)
    assert names(b2) == {"office": "config", "laptop": "runtime"}
    laptop = next(p for p in b2.peers.values() if p.name == "laptop")
    assert crypto.key_to_base64(laptop.public) == r["public_key"] and laptop.allowed_ips == r["allowed_ips"]


def test_peer_deleted_from_the_file_is_forgotten_runtime_peers_stay(tmp_path: Path) -> None:
    b = broker(tmp_path, [PeerConfig("office", key(), ["198.19.100.10/32"])])
    assert add(b, "laptop")["ok"]
    assert names(broker(tmp_path, [])) == {"laptop": "runtime"}


def test_file_wins_over_a_runtime_peer_of_the_same_name(tmp_path: Path) -> None:
    b = broker(tmp_path, [])
    assert add(b, "phone")["ok"]
    new = key()
    b2 = broker(tmp_path, [PeerConfig("phone", new, ["198.19.100.20/32"])])
    assert names(b2) == {"phone": "config"}
    assert list(b2.peers) == [new]


def test_runtime_peer_overlapping_a_file_peer_is_dropped(tmp_path: Path) -> None:
    b = broker(tmp_path, [])
    assert add(b, "a", allowed_ips=["198.19.100.30/32"])["ok"]
    assert add(b, "b", allowed_ips=["198.19.100.31/32"])["ok"]
    b2 = broker(tmp_path, [PeerConfig("c", key(), ["198.19.100.28/30"])])  # .28-.31: holds both
    assert names(b2) == {"c": "config"}
    b3 = broker(tmp_path, [PeerConfig("c", key(), ["198.19.100.40/32"])])
    assert names(b3) == {"c": "config"}  # dropped peers do not come back


def test_config_peer_cannot_be_removed_at_runtime(tmp_path: Path) -> None:
    b = broker(tmp_path, [PeerConfig("office", key(), ["198.19.100.10/32"])])
    r = b.admin({"op": "peer_remove", "name": "office"}, 0.0)
    assert not r["ok"] and "config file" in str(r.get("error")), r
    assert "office" in names(b)


def test_runtime_add_refuses_overlapping_allowed_ips(tmp_path: Path) -> None:
    b = broker(tmp_path, [PeerConfig("office", key(), ["198.19.100.8/29"])])
    r = add(b, "laptop", allowed_ips=["198.19.100.9/32"])
    assert not r["ok"] and "office" in str(r.get("error")), r
    assert "laptop" not in names(b)


def test_state_of_an_older_version_without_source_reads_as_runtime(tmp_path: Path) -> None:
    b = broker(tmp_path, [])
    assert add(b, "old")["ok"]
    import msgpack

    path = StateDir.at(tmp_path).broker_state
    data = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    for p in data["peers"]:
        p.pop("source")
    path.write_bytes(msgpack.packb(data, use_bin_type=True))
    assert names(broker(tmp_path, [])) == {"old": "runtime"}


# --- end to end: fabric up --config, restart, a client of the runtime peer ----------------

def one_line_error(cp: Any) -> str:
    assert cp.returncode != 0, cp.stdout
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    return str(lines[0])


@pytest.mark.netns
def test_peers_survive_fabric_up_restart(topo2: Topology) -> None:
    _, office_pub = gen_keypair()
    conf = topo2.workdir / "fabric.toml"
    conf.write_text(textwrap.dedent(f"""
        [server]
        address = "{ADDRESS}"
        listen_port = {PORT}
        edges = 1
        workers = 1

        [[peer]]
        name = "office"
        public_key = "{office_pub}"
        allowed_ips = ["198.19.100.50/32"]
    """))
    state = topo2.workdir / "state"
    tun = topo2.ifname("t")

    def up() -> FabricCluster:
        fab = FabricCluster(topo2, address=ADDRESS, listen_port=PORT, edges=1, workers=1, mode="up",
                            state_dir=state, tun=tun)
        fab.extra["up"] = ["--config", str(conf)]
        return fab.start()

    fab = up()
    try:
        assert [p["name"] for p in fab.peers()] == ["office"]
        client_conf = fab.peer_add("laptop", endpoint=f"{topo2.server_underlay(1)}:{PORT}")
        # bad input at runtime: one line naming the cause
        line = one_line_error(fab.cli("peer", "add", "dup", "--allowed-ip", "198.19.100.50/32",
                                      "--state-dir", str(state), check=False))
        assert "198.19.100.50/32" in line and "office" in line
        line = one_line_error(fab.cli("peer", "remove", "ghost", "--state-dir", str(state), check=False))
        assert "no peer named 'ghost'" in line
        line = one_line_error(fab.cli("peer", "remove", "office", "--state-dir", str(state), check=False))
        assert "config file" in line
    finally:
        fab.stop()
    assert not topo2.link_exists(topo2.server_ns, tun)

    fab = up()
    try:
        peers = {p["name"]: p for p in fab.peers()}
        assert set(peers) == {"office", "laptop"}
        assert (peers["office"]["source"], peers["laptop"]["source"]) == ("config", "runtime")
        private = next(line.split("=", 1)[1].strip() for line in client_conf.splitlines()
                       if line.startswith("PrivateKey"))
        assert peers["laptop"]["public_key"] == crypto.key_to_base64(
            crypto.public_key(crypto.key_from_base64(private)))
        client = WgClient(topo2, topo2.ns_of_client(1), topo2.ifname("w1"), client_conf)
        client.start()
        assert client.wait_ping(SERVER_IP, timeout=20).ok, fab.log_tails()
        sessions = fab.sessions()
        assert [s["peer"] for s in sessions] == ["laptop"], json.dumps(sessions)
    finally:
        fab.stop()
