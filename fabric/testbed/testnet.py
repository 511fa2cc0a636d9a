"""Network-namespace test bed: namespaces, wireguard-go peers, ping and iperf3.

Shipped as code (like wireguard-go's ``tun/tuntest``) so that the test suite,
``fabric demo`` and the benchmarks all build the same network:

* one server namespace and K client namespaces, all named ``<prefix>-srv`` and
  ``<prefix>-c<k>`` where ``<prefix>`` is ``fab`` plus 6 random hex digits;
* one veth pair per client, underlay ``198.18.<k>.1/24`` on the server side and
  ``198.18.<k>.2/24`` on client k (k = 1..K);
* every process started through :meth:`Topology.popen` is recorded by pid and
  killed on teardown (SIGTERM, then SIGKILL after a bounded wait), anything
  still left inside the namespaces is killed, and the namespaces are deleted,
  even when the caller failed.

Only 198.18.0.0/15 addresses are used, and only inside namespaces created here.
Needs root, iproute2, wireguard-go, wireguard-tools (``wg``), ping and iperf3.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

NS_FAMILY = "fab"
_NS_RE = re.compile(r"^(fab[0-9a-f]{6})-(srv|c\d+)$")
WG_RUN_DIR = Path("/var/run/wireguard")
IFNAMSIZ = 15

__all__ = [
    "FabricCluster",
    "FabricError",
    "IperfResult",
    "PingResult",
    "Topology",
    "TopologyError",
    "WgClient",
    "WgConfig",
    "WgDevice",
    "cleanup_stale",
    "fabric_argv",
    "fabric_env",
    "gen_keypair",
    "iperf3",
    "missing_tools",
    "new_prefix",
    "start_wg_server",
    "tail",
]


class TopologyError(RuntimeError):
    """A namespace, link or process of the test bed could not be set up."""


class FabricError(RuntimeError):
    """A fabric process died or did not become ready."""


# --------------------------------------------------------------------------- helpers


def new_prefix(family: str = NS_FAMILY) -> str:
    """A fresh unique name prefix: ``fab`` + 6 hex digits."""
    return family + secrets.token_hex(3)


def missing_tools(
    tools: Sequence[str] = ("ip", "wireguard-go", "wg", "ping", "iperf3"),
) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def tail(path: str | Path, lines: int = 40) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"<{e}>"
    text = data[-64 * 1024 :].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """argv run inside namespace ``ns`` (None: the current namespace)."""
    args = [str(a) for a in argv]
    return args if ns is None else ["ip", "netns", "exec", ns, *args]


def _run(
    argv: Sequence[str], check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and cp.returncode != 0:
        raise TopologyError(
            f"{' '.join(argv)} -> rc={cp.returncode}\n{cp.stdout.strip()}\n{cp.stderr.strip()}".strip()
        )
    return cp


def _list_netns() -> list[str]:
    cp = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    cp = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def _kill_netns_pids(ns: str) -> None:
    for pid in _netns_pids(ns):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _remove_wg_sockets(prefix: str) -> None:
    with contextlib.suppress(OSError):
        for sock in WG_RUN_DIR.glob(f"{prefix}*.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()


def cleanup_stale(prefix: str = NS_FAMILY, min_age: float = 0.0) -> list[str]:
    """Remove namespaces left behind by earlier runs.

    Deletes every namespace named ``fabXXXXXX-srv`` / ``fabXXXXXX-c<k>`` whose
    name starts with ``prefix`` and that is at least ``min_age`` seconds old
    (use a generous ``min_age`` with the bare family prefix so that a run in
    progress elsewhere is left alone). Processes inside them are killed and
    stale wireguard-go sockets removed. Returns the deleted names.
    """
    removed: list[str] = []
    now = time.time()
    for ns in _list_netns():
        m = _NS_RE.match(ns)
        if not m or not ns.startswith(prefix):
            continue
        try:
            age = now - os.stat(f"/run/netns/{ns}").st_mtime
        except OSError:
            age = float("inf")
        if age < min_age:
            continue
        _kill_netns_pids(ns)
        _run(["ip", "netns", "del", ns], check=False)
        _remove_wg_sockets(m.group(1))
        removed.append(ns)
    return removed


# --------------------------------------------------------------------------- ping


@dataclass
class PingResult:
    transmitted: int
    received: int
    rtt_avg_ms: float | None
    output: str

    @property
    def ok(self) -> bool:
        return self.received > 0

    @property
    def all_ok(self) -> bool:
        return self.transmitted > 0 and self.received == self.transmitted


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms")


def parse_ping(output: str) -> PingResult:
    m = _PING_COUNTS.search(output)
    tx, rx = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    r = _PING_RTT.search(output)
    return PingResult(tx, rx, float(r.group(1)) if r else None, output)


# --------------------------------------------------------------------------- topology


@dataclass
class _Proc:
    proc: subprocess.Popen[bytes]
    label: str
    log_path: Path
    log_file: IO[bytes] | None


class Topology:
    """Server namespace + ``clients`` client namespaces joined by veth pairs."""

    def __init__(
        self,
        clients: int = 1,
        prefix: str | None = None,
        workdir: str | Path | None = None,
        keep_workdir: bool = False,
        kill_grace: float = 5.0,
    ) -> None:
        if not 1 <= clients <= 250:
            raise ValueError("clients must be in 1..250")
        self.prefix = prefix or new_prefix()
        self.clients = clients
        self.server_ns = f"{self.prefix}-srv"
        self.client_ns = [f"{self.prefix}-c{k}" for k in range(1, clients + 1)]
        self.kill_grace = kill_grace
        self.keep_workdir = keep_workdir or workdir is not None
        self._workdir_arg = workdir
        self.workdir = Path()
        self.log_dir = Path()
        self._procs: list[_Proc] = []
        self._created: list[str] = []
        self._closed = False
        self.cleanup_paths: list[str] = []  # files removed on close (e.g. /dev/shm tables)

    # addresses ------------------------------------------------------------
    def server_underlay(self, k: int = 1) -> str:
        """Server-side underlay address facing client k (198.18.k.1)."""
        self._check_k(k)
        return f"198.18.{k}.1"

    def client_underlay(self, k: int = 1) -> str:
        self._check_k(k)
        return f"198.18.{k}.2"

    def ns_of_client(self, k: int = 1) -> str:
        self._check_k(k)
        return self.client_ns[k - 1]

    def ifname(self, tag: str) -> str:
        """An interface name unique to this topology (wireguard-go's UAPI
        sockets in /var/run/wireguard are shared by all namespaces)."""
        name = f"{self.prefix}{tag}"
        if len(name) > IFNAMSIZ:
            raise ValueError(f"interface name too long: {name}")
        return name

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.clients:
            raise ValueError(f"client index {k} not in 1..{self.clients}")

    # lifecycle ------------------------------------------------------------
    def __enter__(self) -> Topology:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        if os.geteuid() != 0:
            raise TopologyError("network namespaces need root")
        if self._workdir_arg is not None:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        for ns in [self.server_ns, *self.client_ns]:
            if ns in _list_netns():
                raise TopologyError(f"namespace {ns} already exists")
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for k, cns in enumerate(self.client_ns, start=1):
            s_if, c_if = self.ifname(f"s{k}"), self.ifname(f"c{k}")
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    s_if,
                    "netns",
                    self.server_ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    c_if,
                    "netns",
                    cns,
                ]
            )
            _run(
                [
                    "ip",
                    "-n",
                    self.server_ns,
                    "addr",
                    "add",
                    f"{self.server_underlay(k)}/24",
                    "dev",
                    s_if,
                ]
            )
            _run(["ip", "-n", cns, "addr", "add", f"{self.client_underlay(k)}/24", "dev", c_if])
            _run(["ip", "-n", self.server_ns, "link", "set", s_if, "up"])
            _run(["ip", "-n", cns, "link", "set", c_if, "up"])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_all()
        finally:
            for ns in self._created:
                _kill_netns_pids(ns)
            for ns in self._created:
                _run(["ip", "netns", "del", ns], check=False)
            _remove_wg_sockets(self.prefix)
            for extra in self.cleanup_paths:
                Path(extra).unlink(missing_ok=True)
            if not self.keep_workdir and self.workdir != Path():
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_all(self) -> None:
        live = [p for p in reversed(self._procs) if p.proc.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in live:
            if p.proc.poll() is None:
                # the leader is alive, so its pid is still our process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.proc.wait(timeout=5)
        for p in self._procs:
            if p.log_file is not None and not p.log_file.closed:
                p.log_file.close()

    # processes ------------------------------------------------------------
    def run(
        self,
        ns: str | None,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv to completion inside ``ns`` (None: current namespace)."""
        full = ns_argv(ns, argv)
        cp = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=env,
        )
        if check and cp.returncode != 0:
            raise TopologyError(
                f"[{ns or 'host'}] {' '.join(map(str, argv))} -> rc={cp.returncode}\n"
                f"stdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}"
            )
        return cp

    def popen(
        self,
        ns: str | None,
        argv: Sequence[str],
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        label: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv in the background inside ``ns``; stdout+stderr go to log_path.

        The pid is recorded and the process killed on teardown.
        """
        if self._closed:
            raise TopologyError("topology is closed")
        label = label or Path(str(argv[0])).name
        if log_path is None:
            log_path = self.log_dir / f"{len(self._procs):02d}-{label}.log"
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")  # closed in stop()/close()
        try:
            proc = subprocess.Popen(
                ns_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        self._procs.append(_Proc(proc, label, log_path, log_file))
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], timeout: float = 5.0, sig: int = signal.SIGTERM
    ) -> int:
        """Signal one recorded process and wait (bounded); SIGKILL if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for p in self._procs:
            if p.proc is proc and p.log_file is not None:
                p.log_file.close()
        return proc.returncode

    def log_path(self, proc: subprocess.Popen[bytes]) -> Path:
        for p in self._procs:
            if p.proc is proc:
                return p.log_path
        raise KeyError(proc.pid)

    def log_tails(self, lines: int = 30, labels: Sequence[str] | None = None) -> str:
        out = []
        for p in self._procs:
            if labels is not None and p.label not in labels:
                continue
            rc = p.proc.poll()
            state = "running" if rc is None else f"exited rc={rc}"
            out.append(
                f"----- {p.label} (pid {p.proc.pid}, {state}) {p.log_path}\n{tail(p.log_path, lines)}"
            )
        return "\n".join(out)

    # network helpers ---------------------------------------------------------
    def ping(
        self, ns: str | None, dst: str, count: int = 3, timeout: float = 2.0, interval: float = 0.2
    ) -> PingResult:
        """``ping -c count -W timeout`` from ``ns``; never raises on loss."""
        argv = [
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-W",
            f"{timeout:g}",
            "-i",
            f"{interval:g}",
            dst,
        ]
        try:
            cp = self.run(ns, argv, check=False, timeout=count * (interval + timeout) + 10)
        except subprocess.TimeoutExpired as e:
            return PingResult(count, 0, None, f"timeout: {e}")
        return parse_ping(cp.stdout + cp.stderr)

    def wait_ping(self, ns: str | None, dst: str, timeout: float = 20.0) -> PingResult:
        """Ping once a second until one reply arrives or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        last = PingResult(0, 0, None, "not tried")
        for _ in range(int(timeout) + 2):
            last = self.ping(ns, dst, count=1, timeout=1.0)
            if last.ok or time.monotonic() >= deadline:
                return last
            time.sleep(0.1)
        return last

    def wait_no_ping(
        self, ns: str | None, dst: str, timeout: float = 20.0, confirm: int = 3
    ) -> bool:
        """True once ``confirm`` consecutive pings failed within ``timeout``."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout) + 2):
            if not self.ping(ns, dst, count=confirm, timeout=1.0, interval=0.3).ok:
                return True
            if time.monotonic() >= deadline:
                return False
        return False

    def wait_udp_listen(self, ns: str, port: int, timeout: float = 10.0) -> int:
        """Wait until a UDP socket is bound to ``port`` in ``ns``; returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.udp_listeners(ns, port)
            if n or time.monotonic() >= deadline:
                return n
            time.sleep(0.1)

    def udp_listeners(self, ns: str, port: int) -> int:
        cp = self.run(ns, ["ss", "-Hlun"], check=False)
        return sum(1 for line in cp.stdout.splitlines() if _local_port(line) == port)

    def tcp_listening(self, ns: str, addr: str, port: int) -> bool:
        cp = self.run(ns, ["ss", "-Hltn"], check=False)
        want = f"{addr}:{port}"
        return any(
            len(f) > 3 and f[3] == want for f in (line.split() for line in cp.stdout.splitlines())
        )

    def link_exists(self, ns: str, ifname: str) -> bool:
        return self.run(ns, ["ip", "link", "show", "dev", ifname], check=False).returncode == 0


def _local_port(ss_line: str) -> int | None:
    f = ss_line.split()
    if len(f) < 4:
        return None
    port = f[3].rsplit(":", 1)[-1]
    return int(port) if port.isdigit() else None


# --------------------------------------------------------------------------- wireguard


def gen_keypair() -> tuple[str, str]:
    """(private, public) as base64, like ``wg genkey`` / ``wg pubkey``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    k = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    priv = k.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = k.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


_WG_QUICK_ONLY = {
    "address",
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
}


@dataclass
class WgConfig:
    """A wg-quick style config split into what ``wg setconf`` takes and the rest."""

    text: str
    addresses: list[str] = field(default_factory=list)
    mtu: int | None = None
    stripped: str = ""
    peers: list[dict[str, str]] = field(default_factory=list)
    interface: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> WgConfig:
        cfg = cls(text=text)
        out: list[str] = []
        section = ""
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                section = line.strip("[]").strip().lower()
                if section == "peer":
                    cfg.peers.append({})
                out.append(line)
                continue
            if "=" not in line:
                raise ValueError(f"bad config line: {raw!r}")
            key, value = (s.strip() for s in line.split("=", 1))
            lk = key.lower()
            if section == "interface":
                if lk == "address":
                    cfg.addresses += [a.strip() for a in value.split(",") if a.strip()]
                    continue
                if lk == "mtu":
                    cfg.mtu = int(value)
                    continue
                if lk in _WG_QUICK_ONLY:
                    continue
                cfg.interface[lk] = value
            elif section == "peer":
                d = cfg.peers[-1]
                d[lk] = f"{d[lk]}, {value}" if lk in d else value
            out.append(f"{key} = {value}")
        cfg.stripped = "\n".join(out) + "\n"
        return cfg

    @property
    def allowed_ips(self) -> list[str]:
        ips: list[str] = []
        for p in self.peers:
            ips += [a.strip() for a in p.get("allowedips", "").split(",") if a.strip()]
        return ips

    def tunnel_ip(self) -> str:
        """The first interface address without its prefix length."""
        if not self.addresses:
            raise ValueError("config has no Address")
        return self.addresses[0].split("/")[0]


class WgDevice:
    """A ``wireguard-go -f`` process in a namespace, configured from wg-quick text."""

    def __init__(
        self,
        topo: Topology,
        ns: str,
        ifname: str,
        config: str | WgConfig,
        start_timeout: float = 10.0,
        binary: str = "wireguard-go",
    ) -> None:
        self.topo = topo
        self.binary = binary  # Debian's wireguard-go, or another build (bench --client)
        self.ns = ns
        self.ifname = ifname
        self.config = config if isinstance(config, WgConfig) else WgConfig.parse(config)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    # lifecycle ------------------------------------------------------------
    def start(self) -> WgDevice:
        if self.proc is not None and self.proc.poll() is None:
            raise TopologyError(f"{self.ifname} already running")
        sock = WG_RUN_DIR / f"{self.ifname}.sock"
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
        self._starts += 1
        self.proc = self.topo.popen(
            self.ns,
            [self.binary, "-f", self.ifname],
            log_path=self.topo.log_dir / f"wg-{self.ifname}-{self._starts}.log",
            env=env,
            label=f"wireguard-go:{self.ifname}",
        )
        deadline = time.monotonic() + self.start_timeout
        while not (sock.exists() and self.topo.link_exists(self.ns, self.ifname)):
            if self.proc.poll() is not None:
                raise TopologyError(
                    f"wireguard-go {self.ifname} exited rc={self.proc.returncode}\n"
                    f"{tail(self.topo.log_path(self.proc))}"
                )
            if time.monotonic() >= deadline:
                raise TopologyError(
                    f"wireguard-go {self.ifname}: no UAPI socket after {self.start_timeout}s"
                )
            time.sleep(0.05)
        self._configure()
        return self

    def _configure(self) -> None:
        conf_path = self.topo.workdir / f"{self.ifname}.conf"
        fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config.stripped)
        run = self.topo.run
        run(self.ns, ["wg", "setconf", self.ifname, str(conf_path)])
        for addr in self.config.addresses:
            fam = "-6" if ":" in addr else "-4"
            run(self.ns, ["ip", fam, "addr", "add", addr, "dev", self.ifname])
        if self.config.mtu:
            run(self.ns, ["ip", "link", "set", "mtu", str(self.config.mtu), "dev", self.ifname])
        run(self.ns, ["ip", "link", "set", self.ifname, "up"])
        for cidr in self.config.allowed_ips:
            net = ipaddress.ip_network(cidr, strict=False)
            fam = "-6" if net.version == 6 else "-4"
            # v6 routes are best effort: a namespace may have IPv6 disabled
            run(
                self.ns,
                ["ip", fam, "route", "replace", str(net), "dev", self.ifname],
                check=net.version == 4,
            )

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        self.topo.stop(self.proc, timeout=timeout)
        # wireguard-go removes its TUN and socket on exit; wait for both (bounded)
        deadline = time.monotonic() + 5.0
        while self.topo.link_exists(self.ns, self.ifname) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            (WG_RUN_DIR / f"{self.ifname}.sock").unlink()

    def restart(self) -> WgDevice:
        """New wireguard-go process with the same config: a fresh handshake."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # queries ------------------------------------------------------------
    def public_key(self) -> str:
        return self.topo.run(self.ns, ["wg", "show", self.ifname, "public-key"]).stdout.strip()

    def latest_handshakes(self) -> dict[str, float]:
        cp = self.topo.run(self.ns, ["wg", "show", self.ifname, "latest-handshakes"])
        out: dict[str, float] = {}
        for line in cp.stdout.splitlines():
            f = line.split()
            if len(f) == 2:
                out[f[0]] = float(f[1])
        return out

    def latest_handshake(self) -> float:
        """Most recent handshake with any peer (epoch seconds, 0 if none)."""
        return max(self.latest_handshakes().values(), default=0.0)

    def transfer(self) -> dict[str, tuple[int, int]]:
        """public key -> (rx_bytes, tx_bytes)."""
        cp = self.topo.run(self.ns, ["wg", "show", self.ifname, "transfer"])
        out: dict[str, tuple[int, int]] = {}
        for line in cp.stdout.splitlines():
            f = line.split()
            if len(f) == 3:
                out[f[0]] = (int(f[1]), int(f[2]))
        return out

    def wait_handshake(self, after: float = 0.0, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout * 10) + 1):
            hs = self.latest_handshake()
            if hs > after:
                return hs
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise TimeoutError(f"{self.ifname}: no handshake newer than {after} within {timeout}s")

    def ping(self, dst: str, count: int = 3, timeout: float = 2.0) -> PingResult:
        return self.topo.ping(self.ns, dst, count=count, timeout=timeout)

    def wait_ping(self, dst: str, timeout: float = 20.0) -> PingResult:
        return self.topo.wait_ping(self.ns, dst, timeout=timeout)


class WgClient(WgDevice):
    """A stock wireguard-go client, e.g. from the text ``fabric peer add`` prints."""


def start_wg_server(
    topo: Topology,
    address: str = "198.19.200.1/24",
    listen_port: int = 51820,
    peers: Sequence[tuple[str, str]] = (),
    private_key: str | None = None,
    ifname: str | None = None,
    binary: str = "wireguard-go",
) -> WgDevice:
    """wireguard-go as the server in ``topo.server_ns`` (the anchor, and the
    harness's own peer). ``peers`` are (public key, allowed-ips) pairs."""
    if private_key is None:
        private_key, _ = gen_keypair()
    lines = [
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"ListenPort = {listen_port}",
        f"Address = {address}",
    ]
    for pub, allowed in peers:
        lines += ["", "[Peer]", f"PublicKey = {pub}", f"AllowedIPs = {allowed}"]
    return WgDevice(topo, topo.server_ns, ifname or topo.ifname("wgs"), "\n".join(lines),
                    binary=binary).start()


def client_config(
    private_key: str,
    address: str,
    server_public_key: str,
    endpoint: str,
    allowed_ips: str,
    keepalive: int = 25,
) -> str:
    return (
        f"[Interface]\nPrivateKey = {private_key}\nAddress = {address}\n\n"
        f"[Peer]\nPublicKey = {server_public_key}\nEndpoint = {endpoint}\n"
        f"AllowedIPs = {allowed_ips}\nPersistentKeepalive = {keepalive}\n"
    )


# --------------------------------------------------------------------------- iperf3


class IperfError(RuntimeError):
    pass


@dataclass
class IperfResult:
    sent_mbps: float
    received_mbps: float
    retransmits: int | None
    reverse: bool
    raw: dict[str, Any]

    @property
    def mbps(self) -> float:
        """Goodput measured at the receiver."""
        return self.received_mbps


def parse_iperf(data: str, reverse: bool = False) -> IperfResult:
    try:
        j = json.loads(data)
    except ValueError as e:
        raise IperfError(f"iperf3 printed no JSON: {data[-500:]!r}") from e
    if j.get("error"):
        raise IperfError(f"iperf3: {j['error']}")
    end = j.get("end", {})
    sent, recv = end.get("sum_sent", {}), end.get("sum_received", {})
    if not sent and "sum" in end:  # UDP
        sent = recv = end["sum"]
    return IperfResult(
        sent_mbps=float(sent.get("bits_per_second", 0.0)) / 1e6,
        received_mbps=float(recv.get("bits_per_second", 0.0)) / 1e6,
        retransmits=sent.get("retransmits"),
        reverse=reverse,
        raw=j,
    )


def iperf3(
    topo: Topology,
    server_ns: str,
    client_ns: str,
    addr: str,
    seconds: float = 3.0,
    reverse: bool = False,
    port: int = 5201,
    parallel: int = 1,
    extra: Sequence[str] = (),
) -> IperfResult:
    """One bounded iperf3 TCP run: server (``-s -1 -B addr``) in server_ns,
    client (``-J``) in client_ns. ``reverse`` sends server -> client (``-R``)."""
    srv = topo.popen(
        server_ns, ["iperf3", "-s", "-1", "-B", addr, "-p", str(port)], label="iperf3-server"
    )
    try:
        deadline = time.monotonic() + 5.0
        while not topo.tcp_listening(server_ns, addr, port):
            if srv.poll() is not None or time.monotonic() >= deadline:
                raise IperfError(
                    f"iperf3 server did not listen on {addr}:{port}\n{tail(topo.log_path(srv))}"
                )
            time.sleep(0.05)
        argv = [
            "iperf3",
            "-c",
            addr,
            "-p",
            str(port),
            "-t",
            f"{seconds:g}",
            "-P",
            str(parallel),
            "-J",
            "--connect-timeout",
            "5000",
            *extra,
        ]
        if reverse:
            argv.append("-R")
        cp = topo.run(client_ns, argv, check=False, timeout=seconds + 30)
        return parse_iperf(cp.stdout or cp.stderr, reverse=reverse)
    finally:
        topo.stop(srv, timeout=3.0)


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
    Admin and peer commands run in ``admin_ns`` (default: the host namespace)."""

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
            "--listen-port", str(self.listen_port), "--tun", self.tun, "--address", self.address,
            *([] if self.reuseport else ["--no-reuseport"]), *self.crypto_args,
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

    def start(self, timeout: float = 30.0) -> FabricCluster:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        sd = str(self.state_dir)
        if self.mode == "up":
            self._spawn(
                "up",
                "up",
                "--state-dir",
                sd,
                "--listen-port",
                str(self.listen_port),
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
            self._spawn("broker", "broker", "--state-dir", sd, "--address", self.address)
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
            admin_ok = (
                tun_ok and udp > 0 and self.admin("peers", "--json", check=False).returncode == 0
            )
            status = (
                f"tun address={tun_ok} udp sockets on {self.listen_port}={udp} admin={admin_ok}"
            )
            if tun_ok and udp > 0 and admin_ok:
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
        self, name: str, endpoint: str | None = None, allowed_ip: str | None = None
    ) -> str:
        """``fabric peer add``; returns the client config it printed."""
        args = ["peer", "add", name, "--state-dir", str(self.state_dir)]
        if endpoint:
            args += ["--endpoint", endpoint]
        if allowed_ip:
            args += ["--allowed-ip", allowed_ip]
        return self.cli(*args).stdout

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


# --------------------------------------------------------------------------- captures


class Capture:
    """tcpdump of UDP on one interface of a namespace, for checks after the fact.

    Only the first `snaplen` bytes of each frame are kept: enough for the
    WireGuard header (type, receiver index, counter).
    """

    def __init__(self, topo: Topology, ns: str, iface: str, bpf: str = "udp", snaplen: int = 128) -> None:
        self.topo = topo
        self.path = topo.workdir / f"capture-{iface}-{time.monotonic_ns()}.pcap"
        self.argv = ["tcpdump", "-i", iface, "-n", "-U", "-B", "16384", "-s", str(snaplen),
                     "-w", str(self.path), bpf]
        self.ns = ns
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        self.proc = self.topo.popen(self.ns, self.argv, label="tcpdump")
        log = self.topo.log_path(self.proc)
        for _ in range(100):  # tcpdump says "listening on ..." once it captures
            if "listening on" in log.read_text(errors="replace") or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if self.proc.poll() is not None:
            raise TopologyError(f"tcpdump failed: {tail(log)}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.topo.stop(self.proc, sig=signal.SIGINT)

    def packets(self) -> list[UdpPacket]:
        return read_pcap(self.path)


@dataclass(frozen=True)
class UdpPacket:
    src: str
    sport: int
    dst: str
    dport: int
    length: int  # UDP payload length on the wire
    head: bytes  # the captured start of the payload


def read_pcap(path: str | Path) -> list[UdpPacket]:
    """UDP packets of a classic pcap file (Ethernet or Linux cooked link types)."""
    return list(iter_pcap(path))


def iter_pcap(path: str | Path) -> Iterator[UdpPacket]:
    """UDP packets of a classic pcap file, read as a stream (captures can be large)."""
    import ipaddress as _ip
    import struct as _st

    names: dict[bytes, str] = {}

    def name(raw: bytes) -> str:
        text = names.get(raw)
        if text is None:
            text = names[raw] = str(_ip.ip_address(raw))
        return text

    with open(path, "rb") as f:
        ghdr = f.read(24)
        if len(ghdr) < 24:
            return
        magic = ghdr[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            end = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            end = ">"
        else:
            raise ValueError(f"{path}: not a pcap file")
        (linktype,) = _st.unpack_from(end + "I", ghdr, 20)
        link_len = {1: 14, 113: 16, 276: 20}.get(linktype)
        if link_len is None:
            raise ValueError(f"{path}: unsupported link type {linktype}")
        rec = _st.Struct(end + "IIII")
        while True:  # ends with the file
            h = f.read(16)
            if len(h) < 16:
                return
            incl = rec.unpack(h)[2]
            frame = f.read(incl)
            if len(frame) < incl:
                return
            if linktype == 276:
                ethertype = _st.unpack_from(">H", frame, 0)[0] if len(frame) >= 2 else 0
            else:
                ethertype = _st.unpack_from(">H", frame, link_len - 2)[0] if len(frame) >= link_len else 0
            ip = frame[link_len:]
            if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 17:
                ihl = (ip[0] & 15) * 4
                src, dst = ip[12:16], ip[16:20]
            elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 17:
                ihl = 40
                src, dst = ip[8:24], ip[24:40]
            else:
                continue
            udp = ip[ihl:]
            if len(udp) < 8:
                continue
            sport, dport, ulen = _st.unpack_from(">HHH", udp, 0)
            yield UdpPacket(name(src), sport, name(dst), dport, ulen - 8, bytes(udp[8:]))


def transport_nonces(packets: Sequence[UdpPacket]) -> list[tuple[int, int]]:
    """(receiver index, counter) of every WireGuard transport message captured."""
    import struct as _st

    out = []
    for p in packets:
        if len(p.head) >= 16 and p.head[:4] == b"\x04\x00\x00\x00":
            _, receiver, counter = _st.unpack_from("<IIQ", p.head, 0)
            out.append((receiver, counter))
    return out
