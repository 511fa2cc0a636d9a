"""`fabric demo`, the README's first command: a whole fabric and a wireguard-go client
in throwaway namespaces. It must succeed, show real traffic, and leave nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fabric.testbed.netns import _list_netns
from fabric.testbed.testnet import missing_tools

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"missing tools: {missing_tools()}")


def test_demo_runs_end_to_end_and_cleans_up() -> None:
    before = set(_list_netns())
    cp = subprocess.run([sys.executable, "-m", "fabric", "demo", "--seconds", "1"],
                        capture_output=True, text=True, timeout=180)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    out = cp.stdout
    assert re.search(r"ping -> server\s+5/5", out), out
    assert re.search(r"ping -> client\s+5/5", out), out
    for direction in ("up", "down"):
        m = re.search(rf"iperf3 {direction}\s+([\d.]+) Mbit/s", out)
        assert m and float(m.group(1)) > 0, out
    # `fabric status` inside the demo saw the whole fabric healthy, with the session
    assert re.search(r"^fabric ok: .*1 session", out, re.M), out
    assert "tearing down" in cp.stderr and "done" in cp.stderr.splitlines()[-1]
    assert set(_list_netns()) <= before, "the demo left namespaces behind"
