"""The `fabric` command line as a user runs it: help, argument errors, friendly failures.

Every case runs `python -m fabric ...` in a subprocess. The subprocesses of a group
are started together (a module fixture) so the file stays fast; each case is still
its own test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    (("up", "--endpoint", "host:99999"), "--endpoint"),
    (("broker", "--address", "nope"), "--address"),
    (("peer", "add", "x", "--allowed-ip", "nope"), "--allowed-ip"),
    (("peer", "add", "x", "--endpoint", "nohost"), "--endpoint"),
    (("peer", "add", "x", "--endpoint", ":51820"), "--endpoint"),
    (("peer", "add", "x", "--keepalive", "soon"), "--keepalive"),
    (("peer", "add"), "name"),
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
