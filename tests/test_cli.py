"""The `fabric` command line as a user runs it: help, argument errors, friendly failures.

Every case runs `python -m fabric ...` in a subprocess. The subprocesses of a group
are started together (a module fixture) so the file stays fast; each case is still
its own test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from fabric.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
Args = tuple[str, ...]


def fabric(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "fabric", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


def run_all(cases: Sequence[Args]) -> dict[Args, subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        return dict(zip(cases, pool.map(lambda a: fabric(*a), cases), strict=True))


def subcommands(parser: argparse.ArgumentParser, prefix: Args = ()) -> list[Args]:
    """Every command path of the parser, e.g. ('peer', 'add')."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out += subcommands(sub, (*prefix, name))
    return out


COMMANDS: list[Args] = [(), *subcommands(build_parser())]


def test_the_command_list_is_complete() -> None:
    for expected in [("up",), ("broker",), ("edge",), ("worker",), ("admin", "peers"), ("admin", "sessions"),
                     ("admin", "status"), ("admin", "stats"), ("peer", "add"), ("peer", "remove")]:
        assert expected in COMMANDS


# --- help ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helps() -> dict[Args, subprocess.CompletedProcess[str]]:
    return run_all([(*c, "--help") for c in COMMANDS] + [("--version",)])


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fabric")
def test_help(helps: dict[Args, subprocess.CompletedProcess[str]], command: Args) -> None:
    r = helps[(*command, "--help")]
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: fabric" + "".join(" " + c for c in command))
    assert r.stderr == ""


def test_version(helps: dict[Args, subprocess.CompletedProcess[str]]) -> None:
    r = helps[("--version",)]
    assert r.returncode == 0 and r.stdout.startswith("fabric ")


# --- bad arguments ------------------------------------------------------------------------

BAD_ARGS: list[tuple[Args, str]] = [
    (("edge", "--id", "x"), "--id"),
    (("edge", "--id", "256"), "--id"),
    (("edge",), "--id"),
    (("worker", "--id", "-1"), "--id"),
    (("up", "--listen-port", "70000"), "--listen-port"),
    (("up", "--listen-port", "port"), "--listen-port"),
    (("up", "--address", "1.2.3"), "--address"),
    (("up", "--address", "10.0.0.1"), "--address"),  # needs the network's prefix
    (("up", "--address", "10.0.0.1/24,10.1.0.1/24"), "--address"),  # two IPv4 networks
    (("up", "--edges", "0"), "--edges"),
    (("up", "--rx-usecs", "-1"), "--rx-usecs"),
    (("up", "--rx-usecs", "10001"), "--rx-usecs"),
    (("edge", "--id", "0", "--rx-usecs", "fast"), "--rx-usecs"),
    (("up", "--endpoint", "host:99999"), "--endpoint"),
    (("broker", "--address", "nope"), "--address"),
    (("peer", "add", "x", "--allowed-ip", "nope"), "--allowed-ip"),
    (("peer", "add", "x", "--endpoint", "nohost"), "--endpoint"),
    (("peer", "add", "x", "--endpoint", ":51820"), "--endpoint"),
    (("peer", "add", "x", "--keepalive", "soon"), "--keepalive"),
    (("peer", "add"), "name"),
    (("up", "--openvpn-port", "0"), "--openvpn-port"),
    (("up", "--openvpn-port", "65536"), "--openvpn-port"),
    (("up", "--openvpn-port", "udp"), "--openvpn-port"),
    (("broker", "--openvpn-port", "-1"), "--openvpn-port"),
    (("edge", "--id", "0", "--openvpn-port", "70000"), "--openvpn-port"),
    (("peer", "add", "x", "--openvpn", "--public-key", "1+R0WJuwlF1U6GAHIq7oJMEMWXIGya5QA6EMnUvSAws="),
     "--public-key"),
    (("peer", "add", "x", "--openvpn", "--preshared-key"), "--preshared-key"),
    (("peer", "add", "x", "--openvpn", "--qr"), "--qr"),
    (("peer", "add", "x", "--protocol", "openvpn", "--public-key", "abc"), "--public-key"),
    (("peer", "add", "x", "--openvpn", "--protocol", "wireguard"), "--openvpn"),
    (("peer", "add", "x", "--protocol", "ipsec"), "--protocol"),
    (("admin",), "WHAT"),
    (("admin", "nope"), "nope"),
    ((), "COMMAND"),
]


@pytest.fixture(scope="module")
def bad_args() -> dict[Args, subprocess.CompletedProcess[str]]:
    return run_all([a for a, _ in BAD_ARGS])


@pytest.mark.parametrize("args, argument", BAD_ARGS, ids=[" ".join(a) or "fabric" for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2(bad_args: dict[Args, subprocess.CompletedProcess[str]], args: Args,
                              argument: str) -> None:
    r = bad_args[args]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "usage: fabric" in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert "error:" in error and argument in error, error
    assert "Traceback" not in r.stderr


# --- no fabric running ----------------------------------------------------------------------

NO_FABRIC: list[Args] = [("admin", "peers"), ("admin", "status"), ("peer", "remove", "x"), ("peer", "add", "x")]


@pytest.fixture(scope="module")
def empty_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("empty-state")


@pytest.fixture(scope="module")
def no_fabric(empty_state_dir: Path) -> dict[Args, subprocess.CompletedProcess[str]]:
    return run_all([(*c, "--state-dir", str(empty_state_dir)) for c in NO_FABRIC])


@pytest.mark.parametrize("command", NO_FABRIC, ids=" ".join)
def test_no_fabric_running(no_fabric: dict[Args, subprocess.CompletedProcess[str]], empty_state_dir: Path,
                           command: Args) -> None:
    r = no_fabric[(*command, "--state-dir", str(empty_state_dir))]
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("fabric: error:")
    assert "fabric up" in r.stderr and str(empty_state_dir) in r.stderr
    assert r.stdout == ""
    assert list(empty_state_dir.iterdir()) == []  # nothing created


def test_no_fabric_running_env_state_dir(tmp_path: Path) -> None:
    r = fabric("admin", "sessions", env={"FABRIC_STATE_DIR": str(tmp_path / "missing")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "fabric up" in r.stderr and str(tmp_path / "missing") in r.stderr


# --- bad config files -------------------------------------------------------------------------

CONFIGS: dict[str, tuple[str | None, str]] = {
    "missing": (None, "does not exist"),
    "not-toml": ("[server\n", "TOML"),
    "bad-port": ("[server]\nlisten_port = 0\n", "server.listen_port"),
    "peer-not-array": ("[peer]\nname = 'x'\n", "peer"),
}
CONFIG_COMMANDS: list[Args] = [("up",), ("broker",), ("worker", "--id", "0"), ("edge", "--id", "0")]


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Args, subprocess.CompletedProcess[str]]]:
    d = tmp_path_factory.mktemp("configs")
    cases = []
    for name, (content, _) in CONFIGS.items():
        if content is not None:
            (d / f"{name}.toml").write_text(content)
        for c in CONFIG_COMMANDS:
            cases.append((*c, "--config", str(d / f"{name}.toml"), "--state-dir", str(d / "state")))
    return d, run_all(cases)


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_bad_config_file(bad_configs: tuple[Path, dict[Args, subprocess.CompletedProcess[str]]], command: Args,
                         config: str) -> None:
    """A bad --config stops every command before it starts anything, with exit 1 and no traceback."""
    d, results = bad_configs
    path = d / f"{config}.toml"
    r = results[(*command, "--config", str(path), "--state-dir", str(d / "state"))]
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("fabric: error:") and str(path) in r.stderr and CONFIGS[config][1] in r.stderr
    assert not (d / "state").exists()


# --- OpenVPN: flags and how they reach the processes (in-process, nothing started) ------------

@pytest.mark.parametrize("command", [("up",), ("broker",), ("edge", "--id", "0")], ids=lambda c: c[0])
def test_openvpn_port_parses(command: Args) -> None:
    parser = build_parser()
    assert parser.parse_args([*command]).openvpn_port is None
    for port in ("1", "1194", "65535"):
        assert parser.parse_args([*command, "--openvpn-port", port]).openvpn_port == int(port)


def test_peer_add_protocol_flags() -> None:
    from fabric.cli import peer_protocol

    parser = build_parser()
    assert peer_protocol(parser.parse_args(["peer", "add", "x"])) == "wireguard"
    assert peer_protocol(parser.parse_args(["peer", "add", "x", "--openvpn"])) == "openvpn"
    assert peer_protocol(parser.parse_args(["peer", "add", "x", "--protocol", "openvpn"])) == "openvpn"
    assert peer_protocol(parser.parse_args(["peer", "add", "x", "--openvpn", "--protocol", "openvpn"])) == "openvpn"
    assert peer_protocol(parser.parse_args(["peer", "add", "x", "--protocol", "wireguard", "--qr",
                                            "--preshared-key"])) == "wireguard"


def test_peer_add_help_names_both_profiles(helps: dict[Args, subprocess.CompletedProcess[str]]) -> None:
    text = " ".join(helps[("peer", "add", "--help")].stdout.split())
    assert "wg-quick file, or .ovpn profile with --openvpn" in text
    assert "--protocol {wireguard,openvpn}" in text
    assert "--openvpn-port" in helps[("up", "--help")].stdout


def record(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    unset: Any = object()

    def fake(*args: Any, ports: Any = unset, **kwargs: Any) -> int:  # takes ports, as edge.run must
        calls.append((args, kwargs if ports is unset else {**kwargs, "ports": ports}))
        return 0

    monkeypatch.setattr(module, name, fake)
    return calls


OPENVPN_TOML = """
[server]
listen_port = 51999

[openvpn]
port = 1195
wrap = "tls-auth"
push = ["route 198.18.60.0 255.255.255.0"]
"""


def test_broker_gets_ports_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from brokers import broker
    from fabric import cli

    calls = record(monkeypatch, broker, "run")
    sd = str(tmp_path / "state")
    assert cli.main(["broker", "--state-dir", sd]) == 0
    assert cli.main(["broker", "--state-dir", sd, "--openvpn-port", "1300"]) == 0
    conf = tmp_path / "f.toml"
    conf.write_text(OPENVPN_TOML)
    assert cli.main(["broker", "--state-dir", sd, "--config", str(conf)]) == 0
    assert cli.main(["broker", "--state-dir", sd, "--config", str(conf), "--openvpn-port", "1400"]) == 0
    (plain_args, plain), (_, flag), (_, table), (_, both) = calls
    assert plain_args[2] == 51820 and plain["ports"] is None and plain["options"] is None  # WireGuard alone
    assert flag["ports"] == {"wireguard": 51820, "openvpn": 1300}
    assert flag["options"]["openvpn"]["wrap"] == "tls-crypt" and "port" not in flag["options"]["openvpn"]
    assert table["ports"] == {"wireguard": 51999, "openvpn": 1195}
    assert table["options"] == {"openvpn": {
        "data_ciphers": ["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"], "wrap": "tls-auth",
        "reneg_sec": 3600, "ping": 10, "ping_restart": 60, "push": ["route 198.18.60.0 255.255.255.0"]}}
    assert both["ports"] == {"wireguard": 51999, "openvpn": 1400} and both["options"] == table["options"]


def test_edge_gets_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric import cli
    from fabric.dataplane import edge
    from fabric.ops import preflight

    checks = record(monkeypatch, preflight, "for_edge")
    calls = record(monkeypatch, edge, "run")
    sd = str(tmp_path / "state")
    assert cli.main(["edge", "--id", "2", "--state-dir", sd, "--listen-port", "4000"]) == 0
    assert cli.main(["edge", "--id", "2", "--state-dir", sd, "--listen-port", "4000", "--openvpn-port", "5000"]) == 0
    assert cli.main(["edge", "--id", "2", "--state-dir", sd, "--listen-port", "4000", "--openvpn-port", "5000",
                     "--no-reuseport"]) == 0
    (plain_args, plain), (flag_args, flag), _ = calls
    assert plain_args[3] == 4000 and "ports" not in plain  # WireGuard alone: as before
    assert flag_args[3] == 4000 and flag["ports"] == {"wireguard": 4000, "openvpn": 5000}
    # preflight checks the ports this edge binds: edge 2 binds port+2 without SO_REUSEPORT
    assert [c[0][1] for c in checks] == [4000, 4000, 4002] and [c[0][4] for c in checks] == [None, 5000, 5002]


def test_edge_gets_rx_usecs_from_flag_then_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric import cli
    from fabric.dataplane import edge
    from fabric.dataplane.moderation import DEFAULT_USECS
    from fabric.ops import preflight

    record(monkeypatch, preflight, "for_edge")
    calls = record(monkeypatch, edge, "run")
    conf = tmp_path / "f.toml"
    conf.write_text("[server]\nrx_usecs = 250\n")
    sd = ["--id", "0", "--state-dir", str(tmp_path / "state")]
    assert cli.main(["edge", *sd]) == 0
    assert cli.main(["edge", *sd, "--config", str(conf)]) == 0
    assert cli.main(["edge", *sd, "--config", str(conf), "--rx-usecs", "0"]) == 0
    assert [kw["rx_usecs"] for _, kw in calls] == [DEFAULT_USECS, 250, 0]


def test_edge_and_broker_refuse_openvpn_this_fabric_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import fabric.protocols
    from brokers import broker
    from fabric import cli

    real = fabric.protocols.registry
    monkeypatch.setattr(fabric.protocols, "registry", lambda: {k: v for k, v in real().items() if k != "openvpn"})
    calls = record(monkeypatch, broker, "run")
    assert cli.main(["broker", "--state-dir", str(tmp_path / "s"), "--openvpn-port", "1194"]) == 1
    assert cli.main(["edge", "--id", "0", "--state-dir", str(tmp_path / "s"), "--openvpn-port", "1194"]) == 1
    assert calls == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("cannot serve openvpn" in e and "--openvpn-port" in e for e in err), err
    assert not (tmp_path / "s").exists()


def test_same_port_for_both_protocols_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from brokers import broker
    from fabric import cli

    calls = record(monkeypatch, broker, "run")
    assert cli.main(["broker", "--state-dir", str(tmp_path / "s"), "--listen-port", "4000",
                     "--openvpn-port", "4000"]) == 1
    err = capsys.readouterr().err
    assert calls == [] and "UDP port 4000" in err and "--listen-port" in err and "--openvpn-port" in err


def test_up_passes_openvpn_port_to_broker_and_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric import cli
    from fabric.ops import preflight, up

    children: list[up.Child] = []

    class Child(up.Child):
        def __init__(self, name: str, argv: list[str]) -> None:
            super().__init__(name, argv)
            children.append(self)

    class Stop(Exception):
        pass

    def no_tun(*_: Any) -> None:
        raise Stop

    checks = record(monkeypatch, preflight, "for_up")
    monkeypatch.setattr(up, "Child", Child)
    monkeypatch.setattr(up, "stop_on_signals", lambda: [False])
    monkeypatch.setattr(up.tun, "create", no_tun)
    monkeypatch.setattr(up.tun, "delete", lambda *_: None)
    conf = tmp_path / "f.toml"
    conf.write_text(OPENVPN_TOML)
    args = ["up", "--state-dir", str(tmp_path / "state"), "--edges", "2", "--workers", "1", "--tun", "fabt0"]
    with pytest.raises(Stop):
        cli.main([*args, "--config", str(conf)])
    with pytest.raises(Stop):
        cli.main([*args, "--openvpn-port", "1300"])
    with pytest.raises(Stop):
        cli.main(args)
    assert [c[1].get("openvpn_port") for c in checks] == [1195, 1300, None]
    parser = build_parser()
    for run, (want, config) in enumerate([(1195, str(conf)), (1300, None), (None, None)]):
        mine = children[run * 4:(run + 1) * 4]
        assert [c.name for c in mine] == ["broker", "edge-0", "edge-1", "worker-0"]
        for c in mine:
            parsed = parser.parse_args(c.argv[c.argv.index("fabric") + 1:])
            assert getattr(parsed, "openvpn_port", None) == (want if c.name != "worker-0" else None), c.argv
        broker = parser.parse_args(mine[0].argv[mine[0].argv.index("fabric") + 1:])
        assert broker.config == config  # the broker reads the rest of [openvpn] from the file
        for c in mine[1:3]:  # receive moderation: the default reaches every edge
            assert parser.parse_args(c.argv[c.argv.index("fabric") + 1:]).rx_usecs == 100, c.argv


def test_up_refuses_openvpn_this_fabric_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import fabric.protocols
    from fabric import cli

    real = fabric.protocols.registry
    monkeypatch.setattr(fabric.protocols, "registry", lambda: {k: v for k, v in real().items() if k != "openvpn"})
    assert cli.main(["up", "--state-dir", str(tmp_path / "state"), "--openvpn-port", "1194"]) == 1
    assert "cannot serve openvpn" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


PEER_REPLY = {"ok": True, "name": "office", "public_key": "k", "allowed_ips": ["198.18.100.2/32"],
              "listen_port": 1194, "endpoint": None, "networks": ["198.18.100.0/24"]}


@pytest.mark.parametrize("argv, reply, protocol, endpoint", [
    (["--openvpn"], {"endpoint": "vpn.example.org:51820"}, "openvpn", "vpn.example.org:1194"),
    (["--protocol", "openvpn"], {"endpoint": "[2001:db8::1]:51820"}, "openvpn", "[2001:db8::1]:1194"),
    (["--openvpn", "--endpoint", "198.18.1.1:1999"], {"endpoint": "vpn.example.org:51820"}, "openvpn",
     "198.18.1.1:1999"),
    (["--openvpn"], {}, "openvpn", "DEFAULT:1194"),
    ([], {"endpoint": "vpn.example.org:51820", "listen_port": 51820}, "wireguard", "vpn.example.org:51820"),
    ([], {"listen_port": 51820}, "wireguard", "DEFAULT:51820"),
])
def test_peer_add_request_and_endpoint(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                       argv: list[str], reply: dict[str, Any], protocol: str, endpoint: str) -> None:
    from fabric import cli
    from fabric.ops import admin

    sent: list[dict[str, Any]] = []

    def request(ep: str, req: dict[str, Any], **_: Any) -> dict[str, Any]:
        sent.append(req)
        return {**PEER_REPLY, **reply, "protocol": req["protocol"]}

    monkeypatch.setattr(cli, "_admin_target", lambda args: ("ipc:///nowhere", None))
    monkeypatch.setattr(admin, "request", request)
    monkeypatch.setattr(admin, "default_endpoint", lambda port: f"DEFAULT:{port}")
    monkeypatch.setattr(admin, "client_config", lambda r, ep: f"profile {r['protocol']} {ep}\n")
    assert cli.main(["peer", "add", "office", *argv]) == 0
    assert capsys.readouterr().out == f"profile {protocol} {endpoint}\n"
    assert sent[0]["op"] == "peer_add" and sent[0]["protocol"] == protocol
    assert cli.main(["peer", "add", "office", *argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["protocol"] == protocol and data["client_endpoint"] == endpoint
    assert data["config"] == f"profile {protocol} {endpoint}\n"


def test_status_shows_the_openvpn_port() -> None:
    from fabric.ops import render

    st = {"broker": {"pid": 100, "seq": 1, "epoch": 7, "started": 1000.0}, "processes": [], "peers": 0,
          "sessions": 0}
    both = {"listen_port": 51820, "ports": {"wireguard": 51820, "openvpn": 1194}}
    view = render.status_view(st, [], 1100.0, server=both)
    assert view["broker"]["ports"] == {"wireguard": 51820, "openvpn": 1194}
    first = render.to_text(render.status_tables(view, 1100.0)).splitlines()[0]
    assert first.startswith("broker  pid 100") and "wireguard 51820/udp  openvpn 1194/udp" in first
    # WireGuard alone, or a broker from before "ports": the line as it always was
    for server in ({"listen_port": 51820, "ports": {"wireguard": 51820}}, {"listen_port": 51820}, None):
        view = render.status_view(st, [], 1100.0, server=server)
        assert "udp" not in render.to_text(render.status_tables(view, 1100.0)).splitlines()[0]
    assert render.served_ports({"listen_port": 51820}) == {"wireguard": 51820}


def test_the_test_bed_passes_openvpn_port_like_the_cli(tmp_path: Path) -> None:
    """FabricCluster(openvpn_port=...) gives every process --openvpn-port, in both modes,
    and add_ovpn_peer runs `fabric peer add NAME --openvpn --endpoint HOST:PORT`."""
    from types import SimpleNamespace

    from fabric.testbed.fabriccluster import FabricCluster, FabricError

    class Recorder(FabricCluster):
        def _spawn(self, label: str, *args: str) -> None:
            self.args[label] = args
            self.procs[label] = cast(Any, None)

        def wait_admin(self, timeout: float = 30.0) -> None:
            pass

        def wait_ready(self, timeout: float = 30.0) -> None:
            pass

        def cli(self, *args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
            self.args["cli"] = args
            return subprocess.CompletedProcess(list(args), 0, "client profile\n", "")

    topo: Any = SimpleNamespace(workdir=tmp_path, ifname=lambda s: f"fab{s}",
                                server_underlay=lambda k=1: f"198.18.{k}.1")
    parser = build_parser()
    for mode in ("separate", "up"):
        fab = Recorder(topo, mode=mode, edges=2, workers=1, openvpn_port=1194, state_dir=tmp_path / mode)
        fab.start()
        fab.add_edge(5)
        for label, args in fab.args.items():
            want = None if label.startswith("worker") else 1194
            assert getattr(parser.parse_args(list(args)), "openvpn_port", None) == want, (label, args)
        assert fab.add_ovpn_peer("office", k=2) == "client profile\n"
        parsed = parser.parse_args(list(fab.args["cli"]))
        assert (parsed.name, parsed.openvpn, parsed.endpoint) == ("office", True, "198.18.2.1:1194")
    plain = Recorder(topo, mode="up", state_dir=tmp_path / "plain")
    plain.start()
    assert "--openvpn-port" not in plain.args["up"]
    with pytest.raises(FabricError, match="openvpn_port"):
        plain.add_ovpn_peer("office")
