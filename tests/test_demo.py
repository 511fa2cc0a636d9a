"""`fabric demo`, the README's first command: a whole fabric and a wireguard-go client
(or, with --openvpn, Debian's openvpn) in throwaway namespaces. It must succeed, show
real traffic, and leave nothing behind."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.testbed.netns import _list_netns, processes_mentioning
from fabric.testbed.testnet import missing_tools

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"missing tools: {missing_tools()}")


def _prefix(err: str) -> str:
    """The run's namespace prefix, from its first progress line."""
    m = re.search(r"creating namespaces (fab[0-9a-f]+)-srv", err)
    assert m, err
    return m.group(1)


def _left_netns(prefix: str) -> list[str]:
    # only this run's: other runs on this machine come and go meanwhile
    return [ns for ns in _list_netns() if ns.startswith(f"{prefix}-")]


def test_demo_runs_end_to_end_and_cleans_up() -> None:
    cp = subprocess.run([sys.executable, "-m", "fabric", "demo", "--seconds", "1"],
                        capture_output=True, text=True, timeout=180)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    out = cp.stdout
    prefix = _prefix(cp.stderr)
    assert re.search(r"ping -> server\s+5/5", out), out
    assert re.search(r"ping -> client\s+5/5", out), out
    for direction in ("up", "down"):
        m = re.search(rf"iperf3 {direction}\s+([\d.]+) Mbit/s", out)
        assert m and float(m.group(1)) > 0, out
    # `fabric status` inside the demo saw the whole fabric healthy, with the session
    assert re.search(r"^fabric ok: .*1 session", out, re.M), out
    assert "tearing down" in cp.stderr and "done" in cp.stderr.splitlines()[-1]
    assert _left_netns(prefix) == [], "the demo left namespaces behind"


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("openvpn") is None, reason="openvpn not installed (scripts/setup.sh installs it)")
def test_demo_openvpn_runs_a_stock_openvpn_client_and_cleans_up() -> None:
    """`fabric demo --openvpn`: Debian's openvpn with the profile `fabric peer add --openvpn` printed."""
    cp = subprocess.run([sys.executable, "-m", "fabric", "demo", "--openvpn", "--seconds", "1"],
                        capture_output=True, text=True, timeout=180)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    out, err = cp.stdout, cp.stderr
    prefix = _prefix(err)
    # the peer was added as an OpenVPN peer, and openvpn ran its profile
    assert re.search(r"fabric peer add demo --openvpn --endpoint 198\.18\.1\.1:1194$", err, re.M), err
    assert "starting openvpn --config demo.ovpn" in err, err
    # the profile is shown, pointing at the OpenVPN port, its keys left out of the terminal
    assert re.search(r"^\s+remote 198\.18\.1\.1 1194$", out, re.M), out
    assert re.search(r"^\s+<tls-crypt> \.\.\. \d+ lines \.\.\. </tls-crypt>$", out, re.M), out
    assert "PRIVATE KEY" not in out and "Static key" not in out
    assert re.search(r"^\s+client\s+openvpn, 198\.19\.100\.\d+, AES-256-GCM, server UDP 1194$", out, re.M), out
    assert re.search(r"handshake\s+\d+ s ago", out), out
    assert re.search(r"ping -> server\s+5/5", out), out
    assert re.search(r"ping -> client\s+5/5", out), out
    for direction in ("up", "down"):
        m = re.search(rf"iperf3 {direction}\s+([\d.]+) Mbit/s", out)
        assert m and float(m.group(1)) > 0, out
    # `fabric status`: both protocols' ports, and the session as OpenVPN with its cipher
    assert re.search(r"^broker .*wireguard 51820/udp\s+openvpn 1194/udp", out, re.M), out
    assert re.search(r"^\d+\s+demo\s+ovpn/aes256\s+198\.18\.1\.2:\d+", out, re.M), out
    assert re.search(r"^fabric ok: .*1 peer, 1 session$", out, re.M), out
    assert "tearing down" in err and "done" in err.splitlines()[-1]
    assert _left_netns(prefix) == [], "the demo left namespaces behind"
    assert processes_mentioning(prefix) == [], "the demo left processes behind"
    assert list(Path("/tmp").glob(f"{prefix}-*")) == [], "the demo left its work directory behind"
