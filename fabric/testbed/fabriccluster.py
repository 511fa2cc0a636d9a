"""fabric's own processes in a test namespace: `fabric up` or a broker, edges and workers
started one by one, with the admin commands to inspect them."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fabric.testbed.netns import Topology
from fabric.testbed.wgtools import WgClient


class FabricError(RuntimeError):
    """A fabric process died or did not become ready."""


# --------------------------------------------------------------------------- fabric


def fabric_argv(*args: str) -> list[str]:
    """The fabric CLI, run with this interpreter (no console script needed).

    ``FABRIC_CLI`` in the environment overrides the command (split like a
    shell would), e.g. ``FABRIC_CLI=/usr/local/bin/fabric`` to test an install.
    """
    override = os.environ.get("FABRIC_CLI")
    prefix = shlex.split(override) if override else [sys.executable, "-m", "fabric"]
    return [*prefix, *args]


def fabric_env() -> dict[str, str]:
    """Environment that lets ``python -m fabric`` import this very package."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not pp else f"{root}{os.pathsep}{pp}"
    return env


class FabricCluster:
    """fabric processes in ``topo.server_ns``: either ``fabric up`` (mode="up")
    or one broker, N edges and M workers started separately (mode="separate").
    Admin and peer commands run in ``admin_ns`` (default: the host namespace).
    ``openvpn_port``: serve OpenVPN too, on that UDP port (``--openvpn-port`` to
    ``fabric up``, or to the broker and every edge)."""

    def __init__(
        self,
        topo: Topology,
        address: str = "198.19.100.1/24",
        listen_port: int = 51820,
        edges: int = 2,
        workers: int = 2,
        mode: str = "separate",
        state_dir: str | Path | None = None,
        tun: str | None = None,
        admin_ns: str | None = None,
        reuseport: bool = True,
        crypto: str | None = None,
        openvpn_port: int | None = None,
        openvpn_options: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("separate", "up"):
            raise ValueError("mode must be 'separate' or 'up'")
        self.topo = topo
        self.address = address
        self.server_ip = address.split("/")[0]
        self.listen_port = listen_port
        self.edges = edges
        self.workers = workers
        self.mode = mode
        self.state_dir = Path(state_dir) if state_dir else topo.workdir / "state"
        self.tun = tun or topo.ifname("t")
        self.admin_ns = admin_ns
        self.reuseport = reuseport
        # where edges run the AEAD (`--crypto`); None: fabric's default
        self.crypto_args = ["--crypto", crypto] if crypto else []
        self.openvpn_port = openvpn_port
        # `--openvpn-port P` for up, the broker and each edge; nothing without OpenVPN
        self.openvpn_args = ["--openvpn-port", str(openvpn_port)] if openvpn_port else []
        # the [openvpn] table's other settings (reneg_sec, wrap, ...): a config file for
        # the broker (or `fabric up`), which reads them from it
        self.openvpn_options = dict(openvpn_options or {})
        self.args: dict[str, tuple[str, ...]] = {}
        # extra command-line flags per role, e.g. {"broker": ["--tcp", "198.18.1.1:52000"]}
        self.extra: dict[str, list[str]] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = fabric_env()

    def kill(self, label: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send `sig` to one fabric process (e.g. "worker1", "edge0", "broker") and reap it."""
        proc = self.procs[label]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=timeout)

    def respawn(self, label: str) -> subprocess.Popen[bytes]:
        """Start a process again with the arguments it had (after kill())."""
        if self.procs[label].poll() is None:
            raise FabricError(f"{label} is still running")
        self._spawn(label, *self.args[label])
        return self.procs[label]

    def add_worker(self, j: int) -> subprocess.Popen[bytes]:
        self._spawn(f"worker{j}", "worker", "--state-dir", str(self.state_dir), "--id", str(j))
        return self.procs[f"worker{j}"]

    def add_edge(self, i: int) -> subprocess.Popen[bytes]:
        self._spawn(
            f"edge{i}", "edge", "--state-dir", str(self.state_dir), "--id", str(i),
            "--listen-port", str(self.listen_port), *self.openvpn_args, "--tun", self.tun,
            "--address", self.address, *([] if self.reuseport else ["--no-reuseport"]), *self.crypto_args,
        )
        return self.procs[f"edge{i}"]

    def stats(self) -> dict[str, int]:
        """`fabric admin stats --json`: every counter, summed over processes."""
        data = json.loads(self.admin("stats", "--json").stdout)
        if not isinstance(data, dict):
            raise FabricError(f"admin stats --json: expected a map, got {type(data).__name__}")
        return data

    def status(self) -> dict[str, Any]:
        data = json.loads(self.admin("status", "--json").stdout)
        if not isinstance(data, dict):
            raise FabricError(f"admin status --json: expected a map, got {type(data).__name__}")
        return data

    def _spawn(self, label: str, *args: str) -> None:
        role = args[0] if args else ""
        if role in self.extra and label not in self.args:
            args = (*args, *self.extra[role])
        self.args[label] = args
        from fabric.ops.paths import StateDir

        # the host-shared session table lives in /dev/shm: remove it with the topology
        table = str(StateDir.at(self.state_dir).session_table)
        if table not in self.topo.cleanup_paths:
            self.topo.cleanup_paths.append(table)
        self.procs[label] = self.topo.popen(
            self.topo.server_ns,
            fabric_argv(*args),
            env=self.env,
            label=label,
            log_path=self.topo.log_dir / f"fabric-{label}.log",
        )

    def _config_args(self) -> list[str]:
        if not self.openvpn_options:
            return []
        path = self.topo.workdir / "fabric.toml"
        lines = ["[openvpn]", f"port = {self.openvpn_port or 1194}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.openvpn_options.items()]
        path.write_text("\n".join(lines) + "\n")
        return ["--config", str(path)]

    def start(self, timeout: float = 30.0) -> FabricCluster:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        sd = str(self.state_dir)
        config = self._config_args()
        if self.mode == "up":
            self._spawn(
                "up",
                "up",
                *config,
                "--state-dir",
                sd,
                "--listen-port",
                str(self.listen_port),
                *self.openvpn_args,
                "--address",
                self.address,
                "--edges",
                str(self.edges),
                "--workers",
                str(self.workers),
                "--tun",
                self.tun,
                *([] if self.reuseport else ["--no-reuseport"]),
                *self.crypto_args,
            )
        else:
            # with OpenVPN the broker learns both ports (they must differ; peer_add answers each)
            ports = ["--listen-port", str(self.listen_port), *self.openvpn_args] if self.openvpn_args else []
            self._spawn("broker", "broker", *config, "--state-dir", sd, "--address", self.address, *ports)
            # edges and workers expect the broker's run/ directory and sockets:
            # start them once the broker answers admin requests
            self.wait_admin(timeout)
            for i in range(self.edges):
                self._spawn(
                    f"edge{i}",
                    "edge",
                    "--state-dir",
                    sd,
                    "--id",
                    str(i),
                    "--listen-port",
                    str(self.listen_port),
                    *self.openvpn_args,
                    "--tun",
                    self.tun,
                    "--address",
                    self.address,
                    *([] if self.reuseport else ["--no-reuseport"]),
                    *self.crypto_args,
                )
            for j in range(self.workers):
                self._spawn(f"worker{j}", "worker", "--state-dir", sd, "--id", str(j))
        self.wait_ready(timeout)
        return self

    def check_alive(self) -> None:
        dead = {k: p.returncode for k, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise FabricError(f"fabric process(es) exited: {dead}\n{self.log_tails()}")

    def wait_admin(self, timeout: float = 30.0) -> None:
        """Until ``fabric admin peers --json`` succeeds; fails early if a process dies."""
        deadline = time.monotonic() + timeout
        last = ""
        for _ in range(int(timeout * 5) + 1):
            self.check_alive()
            cp = self.admin("peers", "--json", check=False)
            if cp.returncode == 0:
                return
            last = (cp.stderr or cp.stdout).strip()[-500:]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        raise FabricError(
            f"fabric admin not answering after {timeout}s: {last}\n{self.log_tails()}"
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the TUN carries the server address, the UDP port is bound and
        the admin socket answers; fails early if a process dies."""
        deadline = time.monotonic() + timeout
        status = "nothing checked"
        for _ in range(int(timeout * 5) + 1):
            self.check_alive()
            addr = self.topo.run(
                self.topo.server_ns, ["ip", "-o", "addr", "show", "dev", self.tun], check=False
            )
            tun_ok = f" {self.server_ip}/" in addr.stdout
            udp = self.topo.udp_listeners(self.topo.server_ns, self.listen_port)
            ovpn = (self.topo.udp_listeners(self.topo.server_ns, self.openvpn_port)
                    if self.openvpn_port else 1)
            admin_ok = (
                tun_ok and udp > 0 and ovpn > 0
                and self.admin("peers", "--json", check=False).returncode == 0
            )
            status = (
                f"tun address={tun_ok} udp sockets on {self.listen_port}={udp}"
                + (f" on {self.openvpn_port} (openvpn)={ovpn}" if self.openvpn_port else "")
                + f" admin={admin_ok}"
            )
            if tun_ok and udp > 0 and ovpn > 0 and admin_ok:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        raise FabricError(f"fabric not ready after {timeout}s: {status}\n{self.log_tails()}")

    def cli(
        self, *args: str, check: bool = True, timeout: float = 20.0
    ) -> subprocess.CompletedProcess[str]:
        cp = self.topo.run(
            self.admin_ns, fabric_argv(*args), check=False, timeout=timeout, env=self.env
        )
        if check and cp.returncode != 0:
            raise FabricError(
                f"fabric {' '.join(args)} -> rc={cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
            )
        return cp

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("admin", *args, "--state-dir", str(self.state_dir), check=check)

    def peer_add(
        self, name: str, endpoint: str | None = None, allowed_ip: str | None = None,
        openvpn: bool = False,
    ) -> str:
        """``fabric peer add`` (``--openvpn`` with `openvpn`); returns the client config
        (wg-quick file or .ovpn profile) it printed."""
        args = ["peer", "add", name, "--state-dir", str(self.state_dir)]
        if openvpn:
            args.append("--openvpn")
        if endpoint:
            args += ["--endpoint", endpoint]
        if allowed_ip:
            args += ["--allowed-ip", allowed_ip]
        return self.cli(*args).stdout

    def add_ovpn_peer(self, name: str, k: int = 1, allowed_ip: str | None = None) -> str:
        """``fabric peer add NAME --openvpn --endpoint HOST:PORT``, HOST the server's
        underlay address facing client k (as for WireGuard clients), PORT the
        OpenVPN port; returns the inline .ovpn profile it printed."""
        if not self.openvpn_port:
            raise FabricError("this FabricCluster serves no OpenVPN: give it openvpn_port=PORT")
        return self.peer_add(name, endpoint=f"{self.topo.server_underlay(k)}:{self.openvpn_port}",
                             allowed_ip=allowed_ip, openvpn=True)

    def peer_remove(self, name: str) -> None:
        self.cli("peer", "remove", name, "--state-dir", str(self.state_dir))

    def sessions(self) -> list[dict[str, Any]]:
        data = json.loads(self.admin("sessions", "--json").stdout)
        if not isinstance(data, list):
            raise FabricError(f"admin sessions --json: expected a list, got {type(data).__name__}")
        return data

    def peers(self) -> list[dict[str, Any]]:
        data = json.loads(self.admin("peers", "--json").stdout)
        if not isinstance(data, list):
            raise FabricError(f"admin peers --json: expected a list, got {type(data).__name__}")
        return data

    def connect_client(
        self, k: int, name: str, ifname: str | None = None, timeout: float = 20.0,
        binary: str = "wireguard-go",
    ) -> WgClient:
        """Add peer ``name``, start a wireguard-go client in client namespace k
        and wait until it pings the server's tunnel address."""
        conf = self.peer_add(name, endpoint=f"{self.topo.server_underlay(k)}:{self.listen_port}")
        client = WgClient(
            self.topo, self.topo.ns_of_client(k), ifname or self.topo.ifname(f"w{k}"), conf,
            binary=binary,
        )
        client.start()
        res = client.wait_ping(self.server_ip, timeout=timeout)
        if not res.ok:
            raise FabricError(
                f"client {name} cannot ping {self.server_ip} after {timeout}s\n{res.output}\n"
                f"{self.topo.log_tails(labels=[f'wireguard-go:{client.ifname}'])}\n{self.log_tails()}"
            )
        return client

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGTERM every fabric process (workers, edges, broker / the supervisor)."""
        rcs: dict[str, int] = {}
        for label in reversed(list(self.procs)):
            rcs[label] = self.topo.stop(self.procs[label], timeout=timeout)
        return rcs

    def log_tails(self, lines: int = 30) -> str:
        return self.topo.log_tails(lines, labels=list(self.procs))
