"""A stock OpenVPN 2.6 client (Debian's `openvpn`) in a test namespace.

It runs the profile `fabric peer add NAME --openvpn` printed, unchanged, with
`--verb 3` and its log in the test bed's log directory; the helpers here wait
(bounded) for what its log says.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from fabric.testbed.netns import Topology, TopologyError, tail

INIT_DONE = "Initialization Sequence Completed"


class OvpnClient:
    """`openvpn --config PROFILE` in namespace `ns` (profile text as the fabric printed it)."""

    def __init__(self, topo: Topology, ns: str, profile: str, name: str = "ovpn",
                 extra: tuple[str, ...] = ()) -> None:
        self.topo, self.ns, self.name = topo, ns, name
        self.profile_path = topo.workdir / f"{name}.ovpn"
        fd = os.open(self.profile_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(profile)
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self, timeout: float = 30.0) -> OvpnClient:
        """Start it and wait until the tunnel is up (its log says INIT_DONE)."""
        self._starts += 1
        self.proc = self.topo.popen(
            self.ns, ["openvpn", "--config", str(self.profile_path), "--verb", "3", *self.extra],
            log_path=self.topo.log_dir / f"openvpn-{self.name}-{self._starts}.log", label=f"openvpn:{self.name}")
        self.wait_log(INIT_DONE, timeout)
        return self

    @property
    def log(self) -> str:
        if self.proc is None:
            return ""
        return Path(self.topo.log_path(self.proc)).read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        """Until `text` appears `count` times in the log; TopologyError (with the log's
        tail) if the client exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.log.count(text) >= count:
                return
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited rc={self.proc.returncode}" if self.proc.poll() is not None else "still running"
                raise TopologyError(f"openvpn {self.name}: no {text!r} after {timeout:g}s ({state})\n"
                                    f"{tail(self.topo.log_path(self.proc), 40)}")
            time.sleep(0.1)

    def tunnel_ip(self) -> str:
        """The IPv4 address the server pushed (`ifconfig A M` in the log)."""
        m = re.search(r"ifconfig (\d+\.\d+\.\d+\.\d+) \d+\.\d+\.\d+\.\d+", self.log)
        if not m:
            raise TopologyError(f"openvpn {self.name}: no pushed ifconfig in the log")
        return m.group(1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None:
            self.topo.stop(self.proc, timeout=timeout)
