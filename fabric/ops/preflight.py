"""Checks made before `fabric up` (or an edge, or a broker) creates or starts anything.

Each check raises `PreflightError` with one line naming the cause and the fix, so
a start that cannot succeed fails at once: no TUN device, no child process, no
state directory or file left behind that did not exist before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fabric.dataplane.tun import IFF_MULTI_QUEUE, TUN_DEVICE
from fabric.ops.paths import StateDir

CAP_NET_ADMIN = 12
# where an operator changes each protocol's UDP port (named in a port error)
PORT_FIX = {
    "wireguard": "--listen-port or [server] listen_port",
    "openvpn": "--openvpn-port or [openvpn] port",
}
PROTOCOL_NAMES = {"wireguard": "WireGuard", "openvpn": "OpenVPN"}


class PreflightError(RuntimeError):
    """A start-up problem found before anything was created; the message says what to do."""


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    """The CapEff bit mask of this process (0 if it cannot be read)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_net_admin(what: str = "fabric up") -> None:
    if not effective_capabilities() >> CAP_NET_ADMIN & 1:
        raise PreflightError(
            f"{what} needs root or CAP_NET_ADMIN (to create the TUN device): run it with sudo, "
            "or under systemd with AmbientCapabilities=CAP_NET_ADMIN (see contrib/systemd/fabric.service)"
        )


def check_tun_device(path: str = TUN_DEVICE) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PreflightError(
            f"{path} is missing: load the tun module (modprobe tun), or start the container "
            "with --device /dev/net/tun"
        ) from None
    except OSError as exc:
        raise PreflightError(f"cannot look at {path}: {exc.strerror}; check that /dev is mounted") from None
    if not stat.S_ISCHR(st.st_mode):
        raise PreflightError(f"{path} is not a character device: recreate it with `mknod {path} c 10 200`")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise PreflightError(
            f"cannot open {path}: {exc.strerror}; run as root, or allow the device "
            "(docker: --device /dev/net/tun; systemd: DeviceAllow=/dev/net/tun rw)"
        ) from None
    os.close(fd)


def check_tun_name(name: str, sys_net: str = "/sys/class/net") -> None:
    """An existing interface of that name must be a multiqueue TUN (a leftover of ours is reused)."""
    dev = Path(sys_net) / name
    if not dev.exists():
        return
    flags_path = dev / "tun_flags"
    try:
        flags = int(flags_path.read_text().strip(), 16)
    except (OSError, ValueError):
        raise PreflightError(
            f"interface {name} exists and is not a TUN device: choose another name (--tun or [server] tun)"
        ) from None
    if not flags & IFF_MULTI_QUEUE:
        raise PreflightError(
            f"interface {name} is a single-queue TUN (another VPN?): choose another name "
            f"(--tun or [server] tun), or remove it (ip link delete {name})"
        )


def bind_udp(listen: str, port: int, reuseport: bool, fix: str = PORT_FIX["wireguard"]) -> socket.socket:
    """A UDP socket bound to listen:port (`::` is dual-stack, falling back to IPv4 on a
    host without IPv6). Errors are PreflightError, one line with the fix (`fix`: the
    flag or config key that sets this port). Edges open their socket with it; the
    preflight probe opens one and closes it again."""
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        if family == socket.AF_INET6 and listen == "::":
            return bind_udp("0.0.0.0", port, reuseport, fix)
        raise PreflightError(f"cannot open a UDP socket for {listen}: this host has no IPv6; use --listen 0.0.0.0") from None
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listen, port))
        return sock
    except OSError as exc:
        sock.close()
        if family == socket.AF_INET6 and listen == "::" and exc.errno == errno.EADDRNOTAVAIL:
            return bind_udp("0.0.0.0", port, reuseport, fix)
        if exc.errno == errno.EADDRINUSE:
            raise PreflightError(
                f"UDP port {port} is in use on {listen} by another program (`ss -ulpn sport = :{port}` "
                f"shows which): stop it, or pick another port ({fix})"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise PreflightError(
                f"cannot bind UDP {listen}:{port}: {listen} is not an address of this host; fix --listen"
            ) from None
        if exc.errno == errno.EACCES:
            raise PreflightError(
                f"cannot bind UDP port {port}: permission denied; run as root or use a port above 1023"
            ) from None
        raise PreflightError(f"cannot bind UDP {listen}:{port}: {exc.strerror}; fix --listen or "
                             f"the port ({fix})") from None
    except (socket.gaierror, UnicodeError):
        sock.close()
        raise PreflightError(f"--listen {listen!r} is not an IP address; use e.g. :: or 0.0.0.0") from None


def check_udp_ports(listen: str, ports: Iterable[int], reuseport: bool = False,
                    fix: str = PORT_FIX["wireguard"]) -> None:
    """The ports must be free. With reuseport, sockets of our own SO_REUSEPORT group
    (other edges of this fabric, same user) do not count as in use. `fix`: the flag or
    config key that sets these ports, named in the error."""
    for port in ports:
        if not 1 <= port <= 65535:
            raise PreflightError(
                f"UDP port {port} is out of range (edge i binds port+i with --no-reuseport): "
                f"pick a lower port ({fix}) or fewer --edges"
            )
        bind_udp(listen, port, reuseport, fix).close()


def edge_ports(ports: dict[str, int], edges: int, reuseport: bool) -> dict[str, range]:
    """The UDP ports each protocol's edges bind: its port, or port..port+edges-1 with
    --no-reuseport (edge i binds port+i)."""
    n = 1 if reuseport else max(1, edges)
    return {name: range(p, p + n) for name, p in ports.items()}


def check_protocol_ports(listen: str, ports: dict[str, int], edges: int, reuseport: bool,
                         ours: bool = False) -> None:
    """Each protocol's ports (by name, e.g. {"wireguard": 51820, "openvpn": 1194}) are
    apart from the others' and free; `ours`: sockets of our own SO_REUSEPORT group do
    not count (an edge joining the others)."""
    spans = edge_ports(ports, edges, reuseport)
    names = list(spans)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = spans[a], spans[b]
            if ra.start < rb.stop and rb.start < ra.stop:
                what = (f"UDP port {ra.start} is given to both {PROTOCOL_NAMES.get(a, a)} and "
                        f"{PROTOCOL_NAMES.get(b, b)}" if len(ra) == 1 and ra == rb else
                        f"the UDP ports of {PROTOCOL_NAMES.get(a, a)} ({_span(ra)}) and "
                        f"{PROTOCOL_NAMES.get(b, b)} ({_span(rb)}) overlap (edge i binds port+i with --no-reuseport)")
                raise PreflightError(f"{what}: give each protocol its own ports "
                                     f"({PORT_FIX.get(b, f'--{b}-port')})")
    for name, span in spans.items():
        check_udp_ports(listen, span, reuseport=ours and reuseport,
                        fix=PORT_FIX.get(name, f"--{name}-port or [{name}] port"))


def _span(r: range) -> str:
    return str(r.start) if len(r) == 1 else f"{r.start}-{r[-1]}"


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_state_dir(sd: StateDir) -> None:
    """The state directory (or, if it does not exist yet, the place it will be made) is writable."""
    root = sd.root
    try:
        sd.ipc("broker-commit")
    except ValueError:
        raise PreflightError(
            f"state dir path {root} is too long for the fabric's ipc sockets (107 bytes): use a shorter --state-dir"
        ) from None
    if root.exists() and not root.is_dir():
        raise PreflightError(f"state dir {root} is a file, not a directory: move it away or pick another --state-dir")
    if root.is_dir() and sd.run.exists() and not sd.run.is_dir():
        raise PreflightError(f"{sd.run} is a file, not a directory: remove it (the fabric recreates it)")
    target = root if root.is_dir() else _existing_ancestor(root)
    if not target.is_dir():
        raise PreflightError(f"cannot create state dir {root}: {target} is not a directory; pick another --state-dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fabric-probe-", dir=target)
    except OSError as exc:
        how = "mount it read-write or pick another --state-dir" if exc.errno == errno.EROFS else (
            "run as its owner or root, or pick another --state-dir")
        what = f"state dir {root}" if target == root else f"{target} (to create state dir {root})"
        raise PreflightError(f"cannot write to {what}: {exc.strerror}; {how}") from None
    os.close(fd)
    os.unlink(probe)
    for name in ("server.key", "broker.state"):
        f = root / name
        if f.exists() and not os.access(f, os.R_OK | os.W_OK):
            raise PreflightError(f"cannot read and write {f}: fix its owner (chown) or run as its owner")


def running(sd: StateDir, name: str) -> bool:
    """Is run/<name>.lock held by a live process (see StateDir.lock)?"""
    path = sd.run / f"{name}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # F_GETLK through lockf would need a write fd; test with a shared read lock instead:
        # it conflicts with the holder's exclusive lock and changes nothing on disk
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EACCES, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def check_not_running(sd: StateDir) -> None:
    for name in ("up", "broker"):
        if running(sd, name):
            what = "fabric up" if name == "up" else "a fabric broker"
            raise PreflightError(
                f"{what} is already running on state dir {sd.root}: stop it first "
                f"(systemctl stop fabric, or Ctrl-C), or give this one another --state-dir"
            )


def for_up(sd: StateDir, listen: str, port: int, edges: int, reuseport: bool, tun_name: str,
           openvpn_port: int | None = None) -> None:
    """Everything `fabric up` needs, checked in the order an operator would fix it
    (`openvpn_port`: OpenVPN's port too, when it is served)."""
    check_net_admin("fabric up")
    check_tun_device()
    check_state_dir(sd)
    check_not_running(sd)
    check_tun_name(tun_name)
    check_protocol_ports(listen, _ports(port, openvpn_port), edges, reuseport)


def for_edge(listen: str, port: int, reuseport: bool, tun_name: str, openvpn_port: int | None = None) -> None:
    """One edge: `port` (and `openvpn_port`) are the ports this edge binds itself."""
    check_net_admin("fabric edge")
    check_tun_device()
    check_tun_name(tun_name)
    check_protocol_ports(listen, _ports(port, openvpn_port), 1, True, ours=reuseport)


def _ports(port: int, openvpn_port: int | None) -> dict[str, int]:
    return {"wireguard": port, **({"openvpn": openvpn_port} if openvpn_port else {})}


def for_broker(sd: StateDir) -> None:
    check_state_dir(sd)
