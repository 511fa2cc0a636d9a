"""Network namespaces for tests and benchmarks: a server namespace and client namespaces
joined by veth pairs, 198.18.0.0/15 only, processes recorded by pid and killed, all of
it removed on the way out even when the caller failed (see fabric/testbed/testnet.py)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

NS_FAMILY = "fab"
# the test bed's names: fabXXXXXX-srv / -c<k> (Topology) and fabXXXXXX-<service> (the
# compose cluster of fabric/testbed/cluster.py)
_NS_RE = re.compile(r"^(fab[0-9a-f]{6})-([a-z0-9][a-z0-9_.-]*)$")
WG_RUN_DIR = Path("/var/run/wireguard")
IFNAMSIZ = 15




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


def processes_mentioning(text: str) -> list[str]:
    """Processes (other than this one) whose command line contains `text`, as
    "pid N: command" (for checks that a run left nothing behind)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"pid {pid}: {cmd[:120]}")
    return found


def cleanup_stale(prefix: str = NS_FAMILY, min_age: float = 0.0) -> list[str]:
    """Remove namespaces left behind by earlier runs.

    Deletes every namespace named ``fabXXXXXX-srv`` / ``fabXXXXXX-c<k>`` (or
    ``fabXXXXXX-<service>``, the compose cluster's) whose
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
