"""fabric/ops/config.py: a valid file loads; every bad input is a ConfigError naming the key."""

from __future__ import annotations

import base64
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.ops import config
from fabric.ops.config import ConfigError, load, parse

KEY_A = "1+R0WJuwlF1U6GAHIq7oJMEMWXIGya5QA6EMnUvSAws="
KEY_B = "gJL1zTb8H5Aj7QPnFXOZZ6CuYnAd3iAtf8RU58vMfxs="
KEY_C = "e74dD5wgsmZuP9d3mOme6POW2uW4kJ9eskyCVMO+rE8="

VALID = f"""
[server]
listen_port = 51999
address = "198.18.100.1/24"
tun = "fab9"
edges = 3
workers = 5
state_dir = "/tmp/fabric-x"
endpoint = "vpn.example.org:51999"

[[peer]]
name = "laptop"
public_key = "{KEY_A}"
allowed_ips = ["198.18.100.2/32", "fd00::2/128"]
preshared_key = "{KEY_C}"
persistent_keepalive = 25

[[peer]]
name = "phone"
public_key = "{KEY_B}"
allowed_ips = "198.18.100.3/32"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fabric.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_valid_file_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, VALID))
    s = cfg.server
    assert (s.listen_port, s.tun, s.edges, s.workers) == (51999, "fab9", 3, 5)
    assert s.addresses == ["198.18.100.1/24"]
    assert (s.state_dir, s.endpoint) == ("/tmp/fabric-x", "vpn.example.org:51999")
    assert [p.name for p in cfg.peers] == ["laptop", "phone"]
    laptop, phone = cfg.peers
    assert laptop.public_key == base64.b64decode(KEY_A)
    assert laptop.preshared_key == base64.b64decode(KEY_C)
    assert laptop.allowed_ips == ["198.18.100.2/32", "fd00::2/128"]
    assert laptop.persistent_keepalive == 25
    assert phone.allowed_ips == ["198.18.100.3/32"]  # a single string is one network
    assert phone.preshared_key is None and phone.persistent_keepalive == 0


def test_defaults() -> None:
    cfg = load(None)
    assert cfg.server.listen_port == config.DEFAULT_PORT
    assert cfg.server.addresses == [config.DEFAULT_ADDRESS]
    assert cfg.peers == []
    assert parse({}).server.tun == config.DEFAULT_TUN
    assert parse({}).server.rx_usecs == config.DEFAULT_USECS > 0  # receive moderation on
    assert parse({"server": {"rx_usecs": 0}}).server.rx_usecs == 0
    assert "rx-usecs 0 (off)" in config.format_summary("f.toml", parse({"server": {"rx_usecs": 0}}))


def test_networks_are_normalised() -> None:
    cfg = parse({"peer": [{"name": "a", "public_key": KEY_A, "allowed_ips": ["10.1.2.3/24", "FD00:0::1/64"]}]})
    assert cfg.peers[0].allowed_ips == ["10.1.2.0/24", "fd00::/64"]


def test_dual_stack_address() -> None:
    cfg = parse({"server": {"address": ["198.18.100.1/24", "fd00::1/64"]}})
    assert cfg.server.addresses == ["198.18.100.1/24", "fd00::1/64"]
    assert parse({"server": {"address": "198.18.100.1/24, fd00::1/64"}}).server.addresses == cfg.server.addresses


def peer(name: str = "a", key: str = KEY_A, **kw: Any) -> dict[str, Any]:
    return {"name": name, "public_key": key, **kw}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown section", {"servers": {}}, "servers"),
    ("server not a table", {"server": 5}, "server"),
    ("unknown server key", {"server": {"listenport": 1}}, "server.listenport"),
    ("port too big", {"server": {"listen_port": 70000}}, "server.listen_port"),
    ("port zero", {"server": {"listen_port": 0}}, "server.listen_port"),
    ("port string", {"server": {"listen_port": "51820"}}, "server.listen_port"),
    ("port bool", {"server": {"listen_port": True}}, "server.listen_port"),
    ("bad address", {"server": {"address": "1.2.3"}}, "server.address"),
    ("address not an ip", {"server": {"address": "vpn.example.org/24"}}, "server.address"),
    ("address without prefix", {"server": {"address": "198.18.100.1"}}, "server.address"),
    ("address /32", {"server": {"address": "198.18.100.1/32"}}, "server.address"),
    ("address /128", {"server": {"address": "fd00::1/128"}}, "server.address"),
    ("two v4 addresses", {"server": {"address": ["10.0.0.1/24", "10.1.0.1/24"]}}, "server.address"),
    ("empty address", {"server": {"address": ""}}, "server.address"),
    ("tun too long", {"server": {"tun": "x" * 16}}, "server.tun"),
    ("tun empty", {"server": {"tun": ""}}, "server.tun"),
    ("edges zero", {"server": {"edges": 0}}, "server.edges"),
    ("workers too many", {"server": {"workers": 257}}, "server.workers"),
    ("rx_usecs negative", {"server": {"rx_usecs": -1}}, "server.rx_usecs"),
    ("rx_usecs too big", {"server": {"rx_usecs": 10_001}}, "server.rx_usecs"),
    ("rx_usecs string", {"server": {"rx_usecs": "100us"}}, "server.rx_usecs"),
    ("peer not a list", {"peer": {"name": "a"}}, "peer"),
    ("peer not a table", {"peer": ["a"]}, "peer[0]"),
    ("unknown peer key", {"peer": [peer(allowedips=[])]}, "peer[0].allowedips"),
    ("peer without name", {"peer": [{"public_key": KEY_A}]}, "peer[0].name"),
    ("peer name not a string", {"peer": [peer(name=5)]}, "peer[0].name"),  # type: ignore[arg-type]
    ("missing public key", {"peer": [{"name": "a"}]}, "peer[0].public_key"),
    ("bad key", {"peer": [peer(key="not a key")]}, "peer[0].public_key"),
    ("short key", {"peer": [peer(key=base64.b64encode(b"x" * 31).decode())]}, "peer[0].public_key"),
    ("bad psk", {"peer": [peer(preshared_key="AAAA")]}, "peer[0].preshared_key"),
    ("bad allowed ip", {"peer": [peer(allowed_ips=["10.0.0.300/32"])]}, "peer[0].allowed_ips"),
    ("allowed ips not a list", {"peer": [peer(allowed_ips=5)]}, "peer[0].allowed_ips"),
    ("keepalive negative", {"peer": [peer(persistent_keepalive=-1)]}, "peer[0].persistent_keepalive"),
    ("keepalive too big", {"peer": [peer(persistent_keepalive=65536)]}, "peer[0].persistent_keepalive"),
    ("duplicate name", {"peer": [peer("a", KEY_A), peer("a", KEY_B)]}, "peer[1].name"),
    ("duplicate public key", {"peer": [peer("a", KEY_A), peer("b", KEY_A)]}, "peer[1].public_key"),
]


@pytest.mark.parametrize("data, key", [(d, k) for _, d, k in BAD], ids=[i for i, _, _ in BAD])
def test_bad_input_names_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(data)
    assert key in str(exc.value)


@pytest.mark.parametrize(
    "a, b",
    [
        ("10.0.0.0/24", "10.0.0.0/24"),
        ("10.0.0.1/24", "10.0.0.0/24"),  # the same network written differently
        ("fd00::/64", "fd00:0:0:0::1/64"),
    ],
)
def test_overlapping_allowed_ips_of_two_peers(a: str, b: str) -> None:
    data = {"peer": [peer("alice", KEY_A, allowed_ips=[a]), peer("bob", KEY_B, allowed_ips=["10.9.9.9/32", b])]}
    with pytest.raises(ConfigError) as exc:
        parse(data)
    msg = str(exc.value)
    assert "allowed" in msg.lower() and "alice" in msg and "bob" in msg


def test_same_network_twice_in_one_peer_is_fine() -> None:
    cfg = parse({"peer": [peer(allowed_ips=["10.0.0.0/24", "10.0.0.0/24"])]})
    assert cfg.peers[0].allowed_ips == ["10.0.0.0/24", "10.0.0.0/24"]


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten_port = 70000\n')
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert path in str(exc.value) and "server.listen_port" in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=re.escape(path)) as exc:
        load(path)
    assert "does not exist" in str(exc.value)


@pytest.mark.parametrize("text", ["[server\n", "listen_port = \n", "[[peer]]\nname = 'a'\nname = 'b'\n", "x = 1 2\n"])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(path)) as exc:
        load(path)
    assert "TOML" in str(exc.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "fabric.toml"
    path.write_bytes(b'[server]\ntun = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load(str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load(str(tmp_path))


# --- fuzz ----------------------------------------------------------------------------

toml_leaves = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([KEY_A, KEY_B, KEY_C, "10.0.0.1/24", "fd00::1/64", "10.0.0.2/32", "0.0.0.0/0",
                       "198.18.100.1", "fab0", "x" * 16, "1.2.3.4/33", "", " ", ",", "10.0.0.1/24,fd00::1/64"])
)
toml_values = st.recursive(
    toml_leaves,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=2),
    max_leaves=5,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a valid value, one time in eight anything at all (so parsing gets deep)."""
    return st.integers(0, 7).flatmap(lambda i: toml_values if i == 0 else valid)


networks = st.lists(
    st.sampled_from(["10.0.0.2/32", "10.0.0.0/24", "10.0.0.7/24", "fd00::2/128", "fd00::/64", "0.0.0.0/0"]),
    max_size=3,
)


def table(required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
          ) -> st.SearchStrategy[dict[str, Any]]:
    """A table with mostly the known keys (so the fuzz gets past the key checks)."""
    extra = st.integers(0, 7).flatmap(
        lambda i: st.dictionaries(st.text(max_size=8), toml_values, min_size=1, max_size=1) if i == 0 else st.just({})
    )
    missing = st.integers(0, 7).flatmap(
        lambda i: st.sampled_from(sorted(required)) if i == 0 and required else st.just("")
    )
    return st.tuples(st.fixed_dictionaries(required, optional=optional), extra, missing).map(
        lambda t: {k: v for k, v in {**t[0], **t[1]}.items() if k != t[2]}
    )


servers = table({}, {
    "listen_port": mostly(st.integers(1, 65535)),
    "address": mostly(st.sampled_from(["10.0.0.1/24", "fd00::1/64", ["10.0.0.1/24", "fd00::1/64"],
                                       "10.0.0.1/24,fd00::1/64", "10.0.0.1"])),
    "tun": mostly(st.text(min_size=1, max_size=15)),
    "edges": mostly(st.integers(1, 256)),
    "workers": mostly(st.integers(1, 256)),
    "rx_usecs": mostly(st.integers(0, 10_000)),
    "state_dir": toml_values,
    "endpoint": toml_values,
})
peers = table({
    "name": mostly(st.sampled_from(["a", "b", "c", "d"])),
    "public_key": mostly(st.sampled_from([KEY_A, KEY_B, KEY_C])),
}, {
    "allowed_ips": mostly(networks | st.sampled_from(["10.0.0.3/32", "fd00::3/128"])),
    "preshared_key": mostly(st.sampled_from([KEY_A, KEY_C])),
    "persistent_keepalive": mostly(st.integers(0, 65535)),
})
documents = st.fixed_dictionaries(
    {}, optional={"server": mostly(servers), "peer": mostly(st.lists(peers, max_size=4))}
) | st.dictionaries(st.text(max_size=8), toml_values, max_size=2)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_parse_fuzz_only_config_errors(data: dict[str, Any]) -> None:
    try:
        cfg = parse(data)
    except ConfigError as exc:
        assert str(exc)
        return
    assert 1 <= cfg.server.listen_port <= 65535
    assert 1 <= len(cfg.server.tun) <= 15
    assert len({p.name for p in cfg.peers}) == len(cfg.peers)
    assert len({p.public_key for p in cfg.peers}) == len(cfg.peers)
    assert all(len(p.public_key) == 32 for p in cfg.peers)
    assert all(0 <= p.persistent_keepalive <= 65535 for p in cfg.peers)
    owner: dict[str, str] = {}
    for p in cfg.peers:
        for n in p.allowed_ips:
            assert owner.setdefault(n, p.name) == p.name


# --- [openvpn] ----------------------------------------------------------------------------

def test_openvpn_is_off_without_its_table() -> None:
    s = parse({}).server
    assert s.openvpn is None
    assert s.ports() == {"wireguard": config.DEFAULT_PORT}


def test_empty_openvpn_table_serves_openvpn_with_the_defaults() -> None:
    s = parse({"openvpn": {}}).server
    assert s.openvpn == {"port": 1194, "data_ciphers": ["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"],
                         "wrap": "tls-crypt", "reneg_sec": 3600, "ping": 10, "ping_restart": 60, "push": []}
    assert s.ports() == {"wireguard": 51820, "openvpn": 1194}
    assert s.openvpn == config.openvpn_defaults()


OPENVPN_FILE = """
[server]
listen_port = 51999

[openvpn]
port = 1195
data_ciphers = ["chacha20-poly1305", "AES-256-GCM"]
wrap = "tls-auth"
reneg_sec = 0
ping = 5
ping_restart = 30
push = ["route 198.18.60.0 255.255.255.0", "dhcp-option DNS 198.18.0.53"]
"""


def test_openvpn_table_from_a_file(tmp_path: Path) -> None:
    s = load(write(tmp_path, OPENVPN_FILE)).server
    assert s.openvpn == {
        "port": 1195, "data_ciphers": ["CHACHA20-POLY1305", "AES-256-GCM"],  # spelled as OpenVPN does
        "wrap": "tls-auth", "reneg_sec": 0, "ping": 5, "ping_restart": 30,
        "push": ["route 198.18.60.0 255.255.255.0", "dhcp-option DNS 198.18.0.53"],
    }
    assert s.ports() == {"wireguard": 51999, "openvpn": 1195}


@pytest.mark.parametrize("table, key", [
    ({"data_ciphers": "AES-128-GCM:AES-256-GCM"}, ["AES-128-GCM", "AES-256-GCM"]),  # OpenVPN's own spelling
    ({"push": "route 198.18.61.0 255.255.255.0"}, None),  # one option as a string
    ({"wrap": "none"}, None),
    ({"ping": 1, "ping_restart": 2}, None),
])
def test_openvpn_values_that_are_fine(table: dict[str, Any], key: Any) -> None:
    o = parse({"openvpn": table}).server.openvpn
    assert o is not None
    if key is not None:
        assert o["data_ciphers"] == key
    if isinstance(table.get("push"), str):
        assert o["push"] == [table["push"]]


BAD_OPENVPN: list[tuple[str, Any, str, str]] = [
    ("not a table", 5, "openvpn", "table"),
    ("unknown key", {"colour": "blue"}, "openvpn.colour", "known keys"),
    ("port zero", {"port": 0}, "openvpn.port", "1 to 65535"),
    ("port too big", {"port": 65536}, "openvpn.port", "1 to 65535"),
    ("port string", {"port": "1194"}, "openvpn.port", "not a port"),
    ("port bool", {"port": True}, "openvpn.port", "not a port"),
    ("unknown cipher", {"data_ciphers": ["AES-256-CBC"]}, "openvpn.data_ciphers", "AES-256-GCM"),
    ("no cipher", {"data_ciphers": []}, "openvpn.data_ciphers", "no cipher"),
    ("cipher twice", {"data_ciphers": ["AES-256-GCM", "aes-256-gcm"]}, "openvpn.data_ciphers", "twice"),
    ("ciphers not a list", {"data_ciphers": 5}, "openvpn.data_ciphers", "list"),
    ("cipher not a string", {"data_ciphers": [5]}, "openvpn.data_ciphers", "list"),
    ("bad wrap", {"wrap": "tls-crypt-v2"}, "openvpn.wrap", '"tls-crypt", "tls-auth", "none"'),
    ("wrap not a string", {"wrap": 1}, "openvpn.wrap", "tls-crypt"),
    ("reneg negative", {"reneg_sec": -1}, "openvpn.reneg_sec", "0 to"),
    ("reneg float", {"reneg_sec": 1.5}, "openvpn.reneg_sec", "whole number"),
    ("reneg over a day", {"reneg_sec": 86401}, "openvpn.reneg_sec", "0 to 86400"),
    ("ping_restart over a day", {"ping_restart": 86401}, "openvpn.ping_restart", "1 to 86400"),
    ("ping zero", {"ping": 0}, "openvpn.ping", "1 to"),
    ("ping_restart not above ping", {"ping": 10, "ping_restart": 10}, "openvpn.ping_restart", "more than ping"),
    ("ping above the default restart", {"ping": 120}, "openvpn.ping_restart", "more than ping (120)"),
    ("ping_restart zero", {"ping_restart": 0}, "openvpn.ping_restart", "1 to"),
    ("push with a comma", {"push": ["route 198.18.60.0 255.255.255.0,route-gateway 1.2.3.4"]},
     "openvpn.push[0]", "comma"),
    ("push with a newline", {"push": ["dhcp-option DNS 198.18.0.53", "route 1.2.3.0\nroute 4.5.6.0"]},
     "openvpn.push[1]", "line break"),
    ("push with a carriage return", {"push": ["route 1.2.3.0 255.255.255.0\r"]}, "openvpn.push[0]", "line break"),
    ("push empty option", {"push": [""]}, "openvpn.push[0]", "non-empty"),
    ("push not a string", {"push": [5]}, "openvpn.push[0]", "string"),
    ("push not a list", {"push": 5}, "openvpn.push", "list"),
]


@pytest.mark.parametrize("table, where, hint", [(t, w, h) for _, t, w, h in BAD_OPENVPN],
                         ids=[i for i, _, _, _ in BAD_OPENVPN])
def test_bad_openvpn_table_names_the_key(table: Any, where: str, hint: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse({"openvpn": table})
    assert where in str(exc.value) and hint in str(exc.value), str(exc.value)


@pytest.mark.parametrize("data", [
    {"server": {"listen_port": 1194}, "openvpn": {}},  # the default OpenVPN port given to WireGuard
    {"openvpn": {"port": 51820}},  # the default WireGuard port given to OpenVPN
    {"server": {"listen_port": 4000}, "openvpn": {"port": 4000}},
])
def test_one_port_for_both_protocols_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(data)
    msg = str(exc.value)
    assert "openvpn.port" in msg and "server.listen_port" in msg and "own UDP port" in msg, msg


def test_served_without_openvpn_is_wireguard_alone() -> None:
    s = parse({"server": {"listen_port": 51999}}).server
    assert config.served(s) == ({"wireguard": 51999}, {})
    assert config.served(s, listen_port=4000) == ({"wireguard": 4000}, {})


def test_served_openvpn_port_flag_turns_openvpn_on_with_defaults() -> None:
    ports, options = config.served(parse({}).server, openvpn_port=1300)
    assert ports == {"wireguard": 51820, "openvpn": 1300}
    defaults = config.openvpn_defaults()
    del defaults["port"]
    assert options == {"openvpn": defaults}  # the table minus its port


def test_served_openvpn_port_flag_moves_the_files_table(tmp_path: Path) -> None:
    s = load(write(tmp_path, OPENVPN_FILE)).server
    ports, options = config.served(s, openvpn_port=1300)
    assert ports == {"wireguard": 51999, "openvpn": 1300}
    assert options["openvpn"]["wrap"] == "tls-auth" and "port" not in options["openvpn"]
    assert s.openvpn is not None and s.openvpn["port"] == 1195  # the parsed config is left alone
    options["openvpn"]["push"].append("x")
    assert "x" not in s.openvpn["push"]
    assert config.served(s)[0] == {"wireguard": 51999, "openvpn": 1195}


@pytest.mark.parametrize("listen_port, openvpn_port, data, names", [
    (None, 51820, {}, ["--openvpn-port", "--listen-port"]),
    (1194, None, {"openvpn": {}}, ["--listen-port", "[openvpn] port"]),
    (4000, 4000, {}, ["--listen-port", "--openvpn-port"]),
    (None, 4000, {"server": {"listen_port": 4000}}, ["[server] listen_port", "--openvpn-port"]),
])
def test_served_one_port_for_both_names_where_each_came_from(listen_port: int | None, openvpn_port: int | None,
                                                             data: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        config.served(parse(data).server, listen_port, openvpn_port)
    msg = str(exc.value)
    assert "its own port" in msg and all(n in msg for n in names), msg


def test_require_protocols(monkeypatch: pytest.MonkeyPatch) -> None:
    import fabric.protocols

    config.require_protocols(["wireguard"])
    real = fabric.protocols.registry
    monkeypatch.setattr(fabric.protocols, "registry", lambda: {k: v for k, v in real().items() if k != "openvpn"})
    with pytest.raises(ConfigError) as exc:
        config.require_protocols(["wireguard", "openvpn"])
    assert "cannot serve openvpn" in str(exc.value) and "--openvpn-port" in str(exc.value)
    monkeypatch.setattr(fabric.protocols, "registry", lambda: {**real(), "openvpn": object()})
    config.require_protocols(["wireguard", "openvpn"])


openvpn_tables = table({}, {
    "port": mostly(st.sampled_from([1194, 51820, 4000])),
    "data_ciphers": mostly(st.lists(st.sampled_from(["AES-256-GCM", "aes-128-gcm", "CHACHA20-POLY1305"]),
                                    max_size=3)),
    "wrap": mostly(st.sampled_from(["tls-crypt", "tls-auth", "none"])),
    "reneg_sec": mostly(st.integers(0, 100000)),
    "ping": mostly(st.integers(1, 100)),
    "ping_restart": mostly(st.integers(1, 200)),
    "push": mostly(st.lists(st.sampled_from(["route 10.0.0.0 255.0.0.0", "a,b", "x\ny", ""]), max_size=2)),
})


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={"server": mostly(servers), "openvpn": mostly(openvpn_tables)}))
def test_parse_fuzz_openvpn_only_config_errors(data: dict[str, Any]) -> None:
    try:
        cfg = parse(data)
    except ConfigError as exc:
        assert str(exc)
        return
    o = cfg.server.openvpn
    if "openvpn" not in data:
        assert o is None and set(cfg.server.ports()) == {"wireguard"}
        return
    assert o is not None and set(o) == set(config.openvpn_defaults())
    ports = cfg.server.ports()
    assert ports["openvpn"] == o["port"] != ports["wireguard"]
    assert o["data_ciphers"] and set(o["data_ciphers"]) <= set(config.OPENVPN_CIPHERS)
    assert len(set(o["data_ciphers"])) == len(o["data_ciphers"])
    assert o["wrap"] in config.OPENVPN_WRAPS and o["reneg_sec"] >= 0 and o["ping_restart"] > o["ping"] >= 1
    assert all(opt and "," not in opt and "\n" not in opt for opt in o["push"])
