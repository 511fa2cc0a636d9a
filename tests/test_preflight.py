"""Start-up preflight (fabric/ops/preflight.py): `fabric up` that cannot succeed fails
before it creates or starts anything, with one line naming the cause and the fix.

Unit tests of each check, then `fabric up` in a test namespace for every case:
not root, no /dev/net/tun, UDP port in use, broken TOML, state dir not writable,
another fabric on the same state dir. Each asserts exit code, one line on stderr,
no TUN device, no process left, and the state directory as it was.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.ops import preflight
from fabric.ops.paths import StateDir
from fabric.ops.preflight import PreflightError
from fabric.testbed.netns import _netns_pids
from fabric.testbed.testnet import FabricCluster, Topology, fabric_argv, fabric_env

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
PORT = 51820


# --- unit ---------------------------------------------------------------------------------

def test_capabilities_from_proc_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert preflight.effective_capabilities(str(status)) == 1 << preflight.CAP_NET_ADMIN
    status.write_text("Name:\tx\n")
    assert preflight.effective_capabilities(str(status)) == 0
    assert preflight.effective_capabilities(str(tmp_path / "missing")) == 0


def test_tun_device_missing_or_not_a_device(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="modprobe tun"):
        preflight.check_tun_device(str(tmp_path / "tun"))
    (tmp_path / "tun").write_text("")
    with pytest.raises(PreflightError, match="not a character device"):
        preflight.check_tun_device(str(tmp_path / "tun"))


def test_tun_name_taken_by_something_else(tmp_path: Path) -> None:
    preflight.check_tun_name("fab0", str(tmp_path))  # absent: fine
    (tmp_path / "eth9").mkdir()
    with pytest.raises(PreflightError, match="eth9 exists and is not a TUN"):
        preflight.check_tun_name("eth9", str(tmp_path))
    (tmp_path / "tun1").mkdir()
    (tmp_path / "tun1" / "tun_flags").write_text("0x1001\n")
    with pytest.raises(PreflightError, match="single-queue"):
        preflight.check_tun_name("tun1", str(tmp_path))
    (tmp_path / "tun1" / "tun_flags").write_text("0x1101\n")
    preflight.check_tun_name("tun1", str(tmp_path))  # a multiqueue TUN (our leftover) is reused


@pytest.fixture
def udp_blocker() -> Iterator[tuple[socket.socket, int]]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s, s.getsockname()[1]
    finally:
        s.close()


def test_udp_port_in_use(udp_blocker: tuple[socket.socket, int]) -> None:
    _, port = udp_blocker
    with pytest.raises(PreflightError) as exc:
        preflight.check_udp_ports("127.0.0.1", [port])
    assert f"UDP port {port} is in use" in str(exc.value) and "--listen-port" in str(exc.value)
    with pytest.raises(PreflightError):
        preflight.check_udp_ports("127.0.0.1", [port], reuseport=True)  # not our SO_REUSEPORT group


def test_udp_port_shared_with_our_reuseport_group() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    try:
        preflight.check_udp_ports("127.0.0.1", [port], reuseport=True)  # another edge of ours
        with pytest.raises(PreflightError):
            preflight.check_udp_ports("127.0.0.1", [port], reuseport=False)
    finally:
        s.close()
    preflight.check_udp_ports("127.0.0.1", [port])  # free again


def test_udp_port_range_with_no_reuseport() -> None:
    with pytest.raises(PreflightError, match="out of range"):
        preflight.check_udp_ports("127.0.0.1", range(65535, 65537))


def test_openvpn_port_in_use_names_its_flag(udp_blocker: tuple[socket.socket, int]) -> None:
    _, port = udp_blocker
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free:
        free.bind(("127.0.0.1", 0))
        wg = free.getsockname()[1]
    with pytest.raises(PreflightError) as exc:
        preflight.check_protocol_ports("127.0.0.1", {"wireguard": wg, "openvpn": port}, 2, True)
    msg = str(exc.value)
    assert f"UDP port {port} is in use" in msg and "--openvpn-port or [openvpn] port" in msg, msg
    assert "--listen-port" not in msg
    with pytest.raises(PreflightError) as exc:  # the WireGuard port still names its own flag
        preflight.check_protocol_ports("127.0.0.1", {"wireguard": port, "openvpn": wg}, 2, True)
    assert "--listen-port or [server] listen_port" in str(exc.value)
    with pytest.raises(PreflightError, match="--openvpn-port"):  # an edge of its own checks it too
        preflight.check_protocol_ports("127.0.0.1", {"wireguard": wg, "openvpn": port}, 1, True, ours=True)


def test_openvpn_port_range_out_of_range_names_its_flag() -> None:
    with pytest.raises(PreflightError) as exc:
        preflight.check_protocol_ports("127.0.0.1", {"wireguard": 51820, "openvpn": 65535}, 2, False)
    assert "out of range" in str(exc.value) and "--openvpn-port" in str(exc.value)


def test_protocol_ports_must_be_apart() -> None:
    with pytest.raises(PreflightError) as exc:
        preflight.check_protocol_ports("127.0.0.1", {"wireguard": 4000, "openvpn": 4000}, 2, True)
    assert "UDP port 4000 is given to both WireGuard and OpenVPN" in str(exc.value)
    assert "--openvpn-port" in str(exc.value)
    # edge i binds port+i with --no-reuseport: 4000-4002 and 4002-4004 overlap
    with pytest.raises(PreflightError) as exc:
        preflight.check_protocol_ports("127.0.0.1", {"wireguard": 4000, "openvpn": 4002}, 3, False)
    msg = str(exc.value)
    assert "WireGuard (4000-4002)" in msg and "OpenVPN (4002-4004)" in msg and "--no-reuseport" in msg, msg
    assert preflight.edge_ports({"wireguard": 4000, "openvpn": 4002}, 3, True) == {
        "wireguard": range(4000, 4001), "openvpn": range(4002, 4003)}
    assert preflight.edge_ports({"wireguard": 4000, "openvpn": 4003}, 3, False) == {
        "wireguard": range(4000, 4003), "openvpn": range(4003, 4006)}


def test_listen_address_not_on_this_host() -> None:
    with pytest.raises(PreflightError, match="not an address of this host"):
        preflight.check_udp_ports("198.18.254.254", [PORT])


def test_state_dir_checks(tmp_path: Path) -> None:
    preflight.check_state_dir(StateDir.at(tmp_path / "new" / "state"))  # creatable
    assert not (tmp_path / "new").exists()  # and not created by the check
    assert sorted(os.listdir(tmp_path)) == []
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(PreflightError, match="is a file"):
        preflight.check_state_dir(StateDir.at(f))
    with pytest.raises(PreflightError, match="is not a directory"):
        preflight.check_state_dir(StateDir.at(f / "state"))
    with pytest.raises(PreflightError, match="too long"):
        preflight.check_state_dir(StateDir.at(tmp_path / ("x" * 120)))


def test_running_fabric_detected_by_its_lock(tmp_path: Path) -> None:
    sd = StateDir.at(tmp_path).ensure()
    preflight.check_not_running(sd)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from fabric.ops.paths import StateDir; StateDir.at(sys.argv[1]).lock('up'); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=fabric_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(PreflightError, match="already running"):
            preflight.check_not_running(sd)
    finally:
        holder.kill()
        holder.wait()
    preflight.check_not_running(sd)  # a stale lock file of a dead process does not count


# --- fabric up in a namespace ---------------------------------------------------------------

def snapshot(path: Path) -> list[tuple[str, float]] | None:
    if not path.exists():
        return None
    return sorted((str(p), p.stat().st_mtime) for p in [path, *path.rglob("*")])


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(clients=1) as t:
        yield t


def up_fails(topo: Topology, state: Path, *extra: str, wrap: list[str] | None = None,
             keep_pids: tuple[int, ...] = (), tun: str | None = None, state_unchanged: bool = True) -> str:
    """Run `fabric up` expecting a preflight failure; check nothing was left behind."""
    tun = tun or topo.ifname("t")
    before = snapshot(state)
    argv = [*(wrap or []), *fabric_argv("up", "--state-dir", str(state), "--listen-port", str(PORT),
                                        "--address", ADDRESS, "--edges", "2", "--workers", "1",
                                        "--tun", tun, *extra)]
    t0 = time.monotonic()
    cp = topo.run(topo.server_ns, argv, check=False, timeout=60, env=fabric_env())
    assert cp.returncode != 0, cp.stderr
    assert time.monotonic() - t0 < 30
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert lines[0].startswith("fabric: error: "), lines[0]
    assert cp.stdout == ""
    assert not topo.link_exists(topo.server_ns, tun), "a TUN device was left behind"
    assert set(_netns_pids(topo.server_ns)) <= set(keep_pids), "a process was left behind"
    if state_unchanged:
        assert snapshot(state) == before, "the state directory changed"
        assert not StateDir.at(state).session_table.exists()
    return lines[0]


@pytest.mark.netns
def test_up_as_nobody(topo: Topology) -> None:
    line = up_fails(topo, topo.workdir / "state",
                    wrap=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert "needs root or CAP_NET_ADMIN" in line and "sudo" in line


@pytest.mark.netns
def test_up_without_dev_net_tun(topo: Topology) -> None:
    hide = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none /dev/net && exec "$@"', "sh"]
    line = up_fails(topo, topo.workdir / "state", wrap=hide)
    assert "/dev/net/tun is missing" in line and "modprobe tun" in line


@pytest.mark.netns
def test_up_with_the_udp_port_in_use(topo: Topology) -> None:
    blocker = topo.popen(topo.server_ns, [
        sys.executable, "-c",
        f"import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('0.0.0.0', {PORT})); time.sleep(120)"], label="blocker")
    deadline = time.monotonic() + 10
    while topo.udp_listeners(topo.server_ns, PORT) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert topo.udp_listeners(topo.server_ns, PORT) == 1
    line = up_fails(topo, topo.workdir / "state", keep_pids=(blocker.pid,))
    assert f"UDP port {PORT} is in use" in line and "--listen-port" in line
    assert blocker.poll() is None
    # a single edge started by hand checks the same before joining the port late
    state = topo.workdir / "state"
    cp = topo.run(topo.server_ns, fabric_argv("edge", "--state-dir", str(state), "--id", "0",
                                              "--listen-port", str(PORT), "--tun", topo.ifname("t")),
                  check=False, timeout=60, env=fabric_env())
    assert cp.returncode != 0 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert f"UDP port {PORT} is in use" in cp.stderr and not state.exists()
    # with --no-reuseport edge 1 needs PORT+1 too
    line = up_fails(topo, topo.workdir / "state", "--listen-port", str(PORT - 1), "--no-reuseport",
                    keep_pids=(blocker.pid,))
    assert f"UDP port {PORT} is in use" in line


@pytest.mark.netns
def test_up_with_a_broken_toml(topo: Topology) -> None:
    bad = topo.workdir / "bad.toml"
    bad.write_text("[server]\nlisten_prot = 51820\n")
    line = up_fails(topo, topo.workdir / "state", "--config", str(bad))
    assert str(bad) in line and "server.listen_prot" in line and "did you mean 'listen_port'" in line
    bad.write_text("[server\n")
    assert "not valid TOML" in up_fails(topo, topo.workdir / "state", "--config", str(bad))


@pytest.mark.netns
def test_up_with_a_read_only_state_dir(topo: Topology) -> None:
    ro = topo.workdir / "ro"
    ro.mkdir()
    mount_ro = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs -o ro none {ro} && exec "$@"', "sh"]
    line = up_fails(topo, ro / "state", wrap=mount_ro)
    assert "cannot write to" in line and "Read-only file system" in line and "--state-dir" in line
    f = topo.workdir / "afile"
    f.write_text("x")
    assert "is a file" in up_fails(topo, f)


@pytest.mark.netns
def test_second_up_on_the_same_state_dir(topo: Topology) -> None:
    fab = FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=1, workers=1, mode="up")
    fab.start()
    try:
        pids = tuple(_netns_pids(topo.server_ns))
        table = StateDir.at(fab.state_dir).session_table
        assert table.exists()
        # (the running broker itself writes to the state dir, so no snapshot comparison)
        line = up_fails(topo, fab.state_dir, "--listen-port", str(PORT + 10), tun=topo.ifname("u"),
                        keep_pids=pids, state_unchanged=False)
        assert "already running on state dir" in line and str(fab.state_dir) in line
        # the first fabric is untouched
        fab.check_alive()
        assert topo.link_exists(topo.server_ns, fab.tun) and table.exists()
        assert fab.peers() == []
    finally:
        fab.stop()


# --- what fabric up says once it starts: progress, then quiet unless -v --------------------

BANNER = ("fabric up: ", "  public key ", "  add a client: ", "  sessions:     ")


def up_log(fab: FabricCluster) -> list[str]:
    return (fab.topo.log_dir / "fabric-up.log").read_text().splitlines()


@pytest.mark.netns
def test_up_shows_progress_then_stays_quiet(topo: Topology) -> None:
    fab = FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=2, workers=2, mode="up")
    fab.start()
    try:
        client = fab.connect_client(1, "alice")
        assert client.ping(SERVER_IP, count=10, timeout=2.0).ok
        fab.admin("peers")
        time.sleep(2)
        fab.check_alive()
        lines = up_log(fab)
    finally:
        fab.stop()
    progress = [line for line in lines if line.startswith("fabric up: ")]
    assert any("creating TUN" in line for line in progress), lines
    assert any("starting 2 edges and 2 workers" in line for line in progress), lines
    assert any("4/4 edges and workers running" in line for line in progress), lines
    assert any(f"listening on UDP port {PORT}" in line for line in progress), lines
    others = [line for line in lines if not line.startswith(BANNER)]
    assert others == [], f"fabric up at default verbosity printed more than its banner: {others}"


@pytest.mark.netns
def test_up_passes_verbose_to_every_process(topo: Topology) -> None:
    fab = FabricCluster(topo, address=ADDRESS, listen_port=PORT, edges=1, workers=1, mode="up")
    fab.extra["up"] = ["-v"]
    fab.start()
    try:
        fab.connect_client(1, "alice")
        lines = up_log(fab)
    finally:
        fab.stop()
    loggers = {line.split()[2] for line in lines if len(line.split()) > 3 and line.split()[1] == "info"}
    assert {"fabric.broker", "fabric.edge", "fabric.worker"} <= loggers, lines
    assert all(" debug " not in line for line in lines)  # -v is info, -vv debug
    structured = [line for line in lines if not line.startswith(BANNER)]
    assert all(line.split()[1] in ("info", "warning", "error") for line in structured), structured
