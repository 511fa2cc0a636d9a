"""`fabric config check FILE`, the checks it adds to fabric/ops/config.py, and the
files in contrib/ (the example config and the systemd unit)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fabric import cli
from fabric.ops.config import ConfigError, check_overlaps, load, parse
from fabric.testbed.testnet import fabric_argv, fabric_env

KEY_A = "1+R0WJuwlF1U6GAHIq7oJMEMWXIGya5QA6EMnUvSAws="
KEY_B = "gJL1zTb8H5Aj7QPnFXOZZ6CuYnAd3iAtf8RU58vMfxs="
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "contrib" / "fabric.toml"
UNIT = ROOT / "contrib" / "systemd" / "fabric.service"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fabric_argv("config", "check", *args), capture_output=True, text=True,
                          env=fabric_env(), timeout=60)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fabric.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def peer(name: str, key: str, *ips: str) -> dict[str, Any]:
    return {"name": name, "public_key": key, "allowed_ips": list(ips)}


# --- checks in fabric/ops/config.py -------------------------------------------------------

@pytest.mark.parametrize("data, where, guess", [
    ({"server": {"listenport": 1}}, "server.listenport", "listen_port"),
    ({"server": {"listen-port": 1}}, "server.listen-port", "listen_port"),
    ({"server": {"adress": "198.18.100.1/24"}}, "server.adress", "address"),
    ({"server": {"worker": 2}}, "server.worker", "workers"),
    ({"peer": [{"name": "a", "public_key": KEY_A, "allowed_ip": []}]}, "peer[0].allowed_ip", "allowed_ips"),
    ({"peer": [{"name": "a", "publickey": KEY_A}]}, "peer[0].publickey", "public_key"),
    ({"peers": []}, "peers", "[[peer]]"),
    ({"sever": {}}, "sever", "[server]"),
    ({"openvpm": {}}, "openvpm", "[openvpn]"),
    ({"open_vpn": {}}, "open_vpn", "[openvpn]"),
    ({"openvpn": {"prot": 1194}}, "openvpn.prot", "port"),
    ({"openvpn": {"data_cipher": ["AES-256-GCM"]}}, "openvpn.data_cipher", "data_ciphers"),
    ({"openvpn": {"ping-restart": 60}}, "openvpn.ping-restart", "ping_restart"),
    ({"openvpn": {"reneg": 60}}, "openvpn.reneg", "reneg_sec"),
])
def test_typo_names_the_key_and_the_nearest_one(data: dict[str, Any], where: str, guess: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(data)
    msg = str(exc.value)
    assert where in msg and "did you mean" in msg and guess in msg, msg


def test_unrelated_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        parse({"server": {"colour": "blue"}})
    assert "server.colour" in str(exc.value) and "listen_port" in str(exc.value)
    assert "did you mean" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse({"openvpn": {"colour": "blue"}})
    assert "openvpn.colour" in str(exc.value) and "data_ciphers" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse({"colour": {}})
    assert "[server], [openvpn] and [[peer]]" in str(exc.value)


@pytest.mark.parametrize("a, b", [
    ("198.18.100.16/28", "198.18.100.18/32"),  # one inside the other
    ("198.18.100.18/32", "198.18.100.16/28"),  # the other way round
    ("fd00::100/120", "fd00::102/128"),
])
def test_overlapping_networks_of_two_peers(a: str, b: str) -> None:
    data = {"server": {"address": ["198.18.100.1/24", "fd00::1/64"]},
            "peer": [peer("alice", KEY_A, a), peer("bob", KEY_B, b)]}
    with pytest.raises(ConfigError) as exc:
        parse(data)
    msg = str(exc.value)
    assert "alice" in msg and "bob" in msg and a in msg and b in msg, msg


def test_disjoint_networks_and_other_families_do_not_clash() -> None:
    check_overlaps([("a", ["198.18.100.2/32", "fd00::2/128"]), ("b", ["198.18.100.3/32", "fd00::3/128"])])
    check_overlaps([("a", ["0.0.0.0/0"]), ("b", ["::/0"])])  # IPv4 and IPv6 never overlap
    with pytest.raises(ConfigError):
        check_overlaps([("a", ["0.0.0.0/0"]), ("b", ["198.18.100.3/32"])])


def test_peer_network_holding_the_server_address_is_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        parse({"server": {"address": "198.18.100.1/24"}, "peer": [peer("a", KEY_A, "198.18.100.0/24")]})
    msg = str(exc.value)
    assert "peer[0].allowed_ips" in msg and "198.18.100.1" in msg and "198.18.100.2/32" in msg, msg


def test_peer_network_outside_the_tunnel_is_a_warning() -> None:
    cfg = parse({"server": {"address": "198.18.100.1/24", "tun": "fab7"},
                 "peer": [peer("site", KEY_A, "198.18.100.2/32", "198.19.7.0/24")]})
    assert len(cfg.warnings) == 1
    assert "peer[0].allowed_ips" in cfg.warnings[0] and "198.19.7.0/24" in cfg.warnings[0]
    assert "ip route add 198.19.7.0/24 dev fab7" in cfg.warnings[0]
    assert parse({"peer": [peer("a", KEY_A, "198.18.100.2/32")]}).warnings == []


@pytest.mark.parametrize("data, where", [
    ({"server": {"endpoint": "vpn.example.org"}}, "server.endpoint"),
    ({"server": {"endpoint": "vpn.example.org:0"}}, "server.endpoint"),
    ({"server": {"endpoint": "2001:db8::1:51820"}}, "server.endpoint"),
    ({"server": {"endpoint": 51820}}, "server.endpoint"),
    ({"server": {"state_dir": ""}}, "server.state_dir"),
    ({"server": {"state_dir": 5}}, "server.state_dir"),
    ({"server": {"tun": "fab/0"}}, "server.tun"),
    ({"server": {"tun": "fab 0"}}, "server.tun"),
    ({"peer": [{"name": "x" * 65, "public_key": KEY_A}]}, "peer[0].name"),
    ({"peer": [{"name": "a\nb", "public_key": KEY_A}]}, "peer[0].name"),
])
def test_more_bad_values_name_the_key(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(data)
    assert where in str(exc.value)


def test_bracketed_ipv6_endpoint_is_fine() -> None:
    assert parse({"server": {"endpoint": "[2001:db8::1]:51820"}}).server.endpoint == "[2001:db8::1]:51820"


def test_duplicate_key_names_the_other_peer() -> None:
    with pytest.raises(ConfigError) as exc:
        parse({"peer": [peer("alice", KEY_A), peer("bob", KEY_A)]})
    assert "peer[1].public_key" in str(exc.value) and "'alice'" in str(exc.value)


# --- the command ------------------------------------------------------------------------

GOOD = f"""
[server]
listen_port = 51999
address = ["198.18.100.1/24", "fd00:fab::1/64"]
edges = 3
workers = 4

[[peer]]
name = "laptop"
public_key = "{KEY_A}"
allowed_ips = ["198.18.100.2/32", "fd00:fab::2/128"]

[[peer]]
name = "phone"
public_key = "{KEY_B}"
allowed_ips = ["198.18.100.3/32"]
persistent_keepalive = 25
"""


def test_check_prints_a_summary(tmp_path: Path) -> None:
    cp = check(write(tmp_path, GOOD))
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert ": ok" in out.splitlines()[0]
    assert "51999/udp" in out and "198.18.100.1/24, fd00:fab::1/64" in out
    assert "3 edges, 4 workers" in out
    assert "laptop" in out and "phone" in out and "keepalive 25s" in out
    assert cp.stderr == ""


def test_check_json(tmp_path: Path) -> None:
    cp = check(write(tmp_path, GOOD), "--json")
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["ok"] is True and data["listen_port"] == 51999 and (data["edges"], data["workers"]) == (3, 4)
    assert [p["name"] for p in data["peers"]] == ["laptop", "phone"]
    assert data["peers"][1]["persistent_keepalive"] == 25 and data["warnings"] == []


BROKEN = [
    ("not toml", "[server\nlisten_port = 1\n", "not valid TOML"),
    ("typo", "[server]\nlisten_prot = 51820\n", "server.listen_prot: unknown key; did you mean 'listen_port'"),
    ("port range", "[server]\nlisten_port = 99999\n", "server.listen_port"),
    ("edges range", "[server]\nedges = 0\n", "server.edges"),
    ("workers range", "[server]\nworkers = 1000\n", "server.workers"),
    ("bad key", '[[peer]]\nname = "a"\npublic_key = "abc"\n', "peer[0].public_key"),
    ("duplicate name", f'[[peer]]\nname = "a"\npublic_key = "{KEY_A}"\n[[peer]]\nname = "a"\npublic_key = "{KEY_B}"\n',
     "peer[1].name"),
    ("duplicate ip", f'[[peer]]\nname = "a"\npublic_key = "{KEY_A}"\nallowed_ips = ["198.18.100.2/32"]\n'
     f'[[peer]]\nname = "b"\npublic_key = "{KEY_B}"\nallowed_ips = ["198.18.100.2/32"]\n', "198.18.100.2/32"),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_check_broken_file_one_line_exit_1(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    cp = check(path)
    assert cp.returncode == 1
    assert cp.stdout == ""
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("fabric: error: ") and path in lines[0] and expected in lines[0], lines[0]
    js = check(path, "--json")
    assert js.returncode == 1
    data = json.loads(js.stdout)
    assert data["ok"] is False and expected in data["error"]


OPENVPN = GOOD + """
[openvpn]
port = 1195
wrap = "tls-auth"
push = ["route 198.18.60.0 255.255.255.0"]
"""


@pytest.fixture
def with_openvpn(monkeypatch: pytest.MonkeyPatch) -> None:
    """fabric.protocols.registry() with OpenVPN in it, whether or not this build has it yet."""
    import fabric.protocols

    real = fabric.protocols.registry
    monkeypatch.setattr(fabric.protocols, "registry", lambda: {"openvpn": object(), **real()})


def test_check_shows_the_openvpn_port(tmp_path: Path, with_openvpn: None, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, OPENVPN)
    assert cli.main(["config", "check", path]) == 0
    out = capsys.readouterr().out
    assert "51999/udp" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("openvpn"))
    assert "1195/udp" in line and "tls-auth" in line and "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305" in line
    assert "push 1 option" in line
    assert cli.main(["config", "check", write(tmp_path, GOOD)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert not any("openvpn" in x for x in lines)  # nothing about OpenVPN when it is off


def test_check_json_shows_the_openvpn_table(tmp_path: Path, with_openvpn: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "check", write(tmp_path, OPENVPN), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["ports"] == {"wireguard": 51999, "openvpn": 1195}
    assert data["openvpn"]["port"] == 1195 and data["openvpn"]["wrap"] == "tls-auth"
    assert data["openvpn"]["push"] == ["route 198.18.60.0 255.255.255.0"]
    assert cli.main(["config", "check", write(tmp_path, GOOD), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ports"] == {"wireguard": 51999} and data["openvpn"] is None


def test_check_openvpn_on_a_fabric_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import fabric.protocols

    real = fabric.protocols.registry
    monkeypatch.setattr(fabric.protocols, "registry", lambda: {k: v for k, v in real().items() if k != "openvpn"})
    path = write(tmp_path, OPENVPN)
    assert cli.main(["config", "check", path]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "cannot serve openvpn" in err[0] and "[openvpn]" in err[0], err
    assert cli.main(["config", "check", path, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and "cannot serve openvpn" in data["error"]


def test_check_openvpn_as_a_command(tmp_path: Path) -> None:
    """The real command: the summary with OpenVPN's port where this fabric speaks it,
    else one line saying it does not."""
    from fabric.protocols import registry

    cp = check(write(tmp_path, OPENVPN))
    if "openvpn" in registry():
        assert cp.returncode == 0, cp.stderr
        assert "1195/udp" in cp.stdout
    else:
        assert cp.returncode == 1 and "cannot serve openvpn" in cp.stderr and "Traceback" not in cp.stderr


BROKEN_OPENVPN = [
    ("same port", "[server]\nlisten_port = 1194\n[openvpn]\n", "openvpn.port: 1194 is server.listen_port"),
    ("push comma", '[openvpn]\npush = ["route 198.18.60.0 255.255.255.0,foo"]\n', "openvpn.push[0]"),
    ("bad wrap", '[openvpn]\nwrap = "tls-crypt-v2"\n', "openvpn.wrap"),
    ("typo", "[openvpn]\nping_restrat = 60\n", "did you mean 'ping_restart'"),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in BROKEN_OPENVPN],
                         ids=[i for i, _, _ in BROKEN_OPENVPN])
def test_check_broken_openvpn_table(tmp_path: Path, text: str, expected: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, text)
    assert cli.main(["config", "check", path]) == 1
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert cap.out == "" and len(lines) == 1 and path in lines[0] and expected in lines[0], lines


def test_check_missing_file(tmp_path: Path) -> None:
    cp = check(str(tmp_path / "nope.toml"))
    assert cp.returncode == 1 and "does not exist" in cp.stderr and "Traceback" not in cp.stderr


def test_check_shows_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, f'[[peer]]\nname = "site"\npublic_key = "{KEY_A}"\nallowed_ips = ["198.19.9.0/24"]\n')
    cp = check(path)
    assert cp.returncode == 0
    assert any(line.startswith("warning: peer[0].allowed_ips") for line in cp.stdout.splitlines()), cp.stdout


# --- contrib/ -----------------------------------------------------------------------------

def test_example_config_passes_check() -> None:
    cfg = load(str(EXAMPLE))
    assert cfg.warnings == []
    assert cfg.server.state_dir == "/var/lib/fabric" and cfg.peers
    cp = check(str(EXAMPLE))
    assert cp.returncode == 0, cp.stderr


def unit_commands(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStart", "ExecStartPre"):
            out[key] = shlex.split(value.lstrip("-@+!:"))
    return out


def test_unit_commands_parse_with_our_cli() -> None:
    text = UNIT.read_text()
    assert "Type=simple" in text and "Restart=on-failure" in text
    assert "DeviceAllow=/dev/net/tun rw" in text and "CAP_NET_ADMIN" in text
    cmds = unit_commands(text)
    start = cmds["ExecStart"]
    assert start[0] == "/usr/local/bin/fabric"
    args = cli.build_parser().parse_args(start[1:])
    assert args.command == "up" and args.config == "/etc/fabric/fabric.toml"
    pre = cli.build_parser().parse_args(cmds["ExecStartPre"][1:])
    assert (pre.command, pre.config_action, pre.file) == ("config", "check", "/etc/fabric/fabric.toml")


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that the binaries exist: point them at a stub
    stub = tmp_path / "fabric"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "fabric.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/fabric", str(stub)))
    cp = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "fabric.service" not in cp.stderr, cp.stderr  # no warnings about our unit
