"""compose.yaml: the parser and its errors, docker-compose's own check, and the
same topology run as processes in network namespaces (``fabric cluster up``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fabric.testbed import cluster
from fabric.testbed.cluster import ComposeError, load, parse
from fabric.testbed.netns import processes_mentioning
from fabric.testbed.testnet import fabric_argv, fabric_env, new_prefix

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
TEXT = COMPOSE.read_text()


def broken(old: str, new: str, text: str = TEXT) -> str:
    assert old in text, f"the test's anchor {old!r} is gone from compose.yaml"
    return text.replace(old, new, 1)


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ComposeError) as exc:
        parse(text, Path("compose.yaml"), env)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- the good file


def test_repo_file_topology() -> None:
    p = load(COMPOSE)
    assert {s.role for s in p.services.values()} == {"broker", "edge", "worker", "other"}
    # edges share one namespace (edge0's); workers are expanded; every other service has its own
    groups = p.groups()
    assert groups["edge0"] == ["edge0", "edge1"]
    assert groups["worker-1"] == ["worker-1"] and groups["worker-2"] == ["worker-2"]
    assert set(groups) == {"broker", "edge0", "worker-1", "worker-2", "peer-add", "client", "peer-add-ovpn",
                           "ovpn-client"}
    order = p.order
    assert order.index("broker") < order.index("edge0") < order.index("edge1")
    assert order.index("peer-add") < order.index("client")
    assert order.index("peer-add-ovpn") < order.index("ovpn-client")
    assert p.services["client"].depends_on["peer-add"] == "service_completed_successfully"
    assert p.services["ovpn-client"].depends_on["peer-add-ovpn"] == "service_completed_successfully"
    # one state dir on one named volume for every fabric process
    fabric_services = [s for s in p.services.values() if s.role != "other"]
    assert {(s.mount_of(s.state_dir()).source, s.state_dir()) for s in fabric_services} == {  # type: ignore[union-attr]
        ("state", "/var/lib/fabric")}
    # addresses only from 198.18.0.0/15
    for net in p.networks.values():
        assert net.subnet.subnet_of(cluster.ALLOWED_NET)
    assert "8 services, 9 processes in 8 network namespaces" in p.summary()
    # metrics on: the broker on its own underlay address, the edges on their shared one, a port each
    metrics = {s.name: cluster._arg(s.command, "--metrics") for s in p.services.values()}
    assert metrics["broker"] == "198.18.10.4:9580" and p.services["broker"].networks == {"underlay": "198.18.10.4"}
    assert (metrics["edge0"], metrics["edge1"]) == ("198.18.10.2:9581", "198.18.10.2:9582")
    assert p.services["edge0"].networks == {"underlay": "198.18.10.2"}
    assert cluster.client_network(p) == "underlay"


def test_repo_file_serves_openvpn() -> None:
    """Broker and edges serve OpenVPN on 1194 beside WireGuard; an OpenVPN peer's profile goes to a
    stock openvpn client on the underlay that pings the server."""
    p = load(COMPOSE)
    svcs = p.services
    for name in ("broker", "edge0", "edge1"):
        assert cluster._arg(svcs[name].command, "--openvpn-port") == "1194", name
        assert cluster._arg(svcs[name].command, "--listen-port") == "51820", name
    assert "1194:1194/udp" in svcs["edge0"].ports and "51820:51820/udp" in svcs["edge0"].ports
    add = svcs["peer-add-ovpn"]
    assert add.network_mode == "none" and add.depends_on == {"broker": "service_healthy"}
    script = add.command[-1]
    assert "fabric peer add demo-ovpn --openvpn --endpoint 198.18.10.2:1194 -o" in script, script
    # the profile it writes is what the client reads, through the shared volume
    assert add.environment["CLIENT_CONF"] == svcs["ovpn-client"].environment["CLIENT_CONF"] == "/client/demo-ovpn.ovpn"
    assert add.mount_of("/client").source == svcs["ovpn-client"].mount_of("/client").source == "client"  # type: ignore[union-attr]
    client = svcs["ovpn-client"]
    assert client.networks == {"underlay": "198.18.10.5"}
    assert client.labels[cluster.CHECK_LABEL] == "198.19.100.1"
    assert 'openvpn --config "$CLIENT_CONF" &' in client.command[-1] and "$$" not in client.command[-1]
    # which services run which client (the tools `fabric cluster up` asks for, the TUN checks)
    assert [s.name for s in svcs.values() if cluster.runs(s, "openvpn")] == ["ovpn-client"]
    assert [s.name for s in svcs.values() if cluster.runs(s, "wireguard-go")] == ["client"]


def test_interpolation_like_compose() -> None:
    env = {"A": "x", "EMPTY": ""}
    assert cluster.interpolate("$$HOME ${A} $A ${B:-d} ${EMPTY:-e} ${EMPTY-f}", env, "w") == "$HOME x x d e "
    # the client's script reaches the shell with single dollars
    p = load(COMPOSE)
    script = p.services["client"].command[-1]
    assert '"$CLIENT_CONF"' in script and "$$" not in script


def test_required_variable() -> None:
    msg = error_of(broken("fabric worker --id auto", "fabric worker --id ${WID:?set WID}"), env={})
    assert msg == "compose.yaml: services.worker.command: variable WID is required: set WID"


# --------------------------------------------------------------------------- broken files


def test_broken_yaml() -> None:
    msg = error_of(broken("  broker:\n", "  broker:\n   bad: [\n"))
    assert re.fullmatch(r"compose\.yaml: not valid YAML at line \d+, column \d+: .+; fix the indentation or quoting there", msg), msg


def test_no_services() -> None:
    assert error_of("volumes: {}\n") == (
        "compose.yaml: no services: mapping; a compose file lists its containers under services:")


def test_missing_broker_service() -> None:
    text = broken("      fabric broker --address", "      fabric admin peers --address")
    assert error_of(text) == ("compose.yaml: missing service: none runs `fabric broker`; add one with "
                              "command: fabric broker --address 198.19.100.1/24")


def test_unknown_network_mode_target() -> None:
    msg = error_of(broken('network_mode: "service:edge0"', 'network_mode: "service:edge9"'))
    assert msg.startswith("compose.yaml: services.edge1.network_mode: service 'edge9' is not defined; use one of: broker, edge0")


def test_missing_command() -> None:
    msg = error_of(broken("    command: fabric worker --id auto\n", ""))
    assert msg == ("compose.yaml: services.worker: missing command; give the process to run, "
                   "e.g. command: fabric worker --id auto")


def test_unknown_dependency() -> None:
    msg = error_of(broken("      peer-add:\n        condition: service_completed_successfully",
                          "      peer-adder:\n        condition: service_completed_successfully"))
    assert msg.startswith("compose.yaml: services.client.depends_on: service 'peer-adder' is not defined")


def test_unknown_condition() -> None:
    msg = error_of(broken("condition: service_completed_successfully", "condition: done"))
    assert msg.startswith("compose.yaml: services.client.depends_on.peer-add.condition: 'done' is unknown")


def test_edges_must_share_ipc() -> None:
    msg = error_of(broken('    ipc: "service:edge0"\n', ""))
    assert msg == ('compose.yaml: services.edge1.ipc: edges share the session table in /dev/shm; '
                   'set ipc: "service:edge0"')


def test_edges_must_share_netns() -> None:
    text = broken('    network_mode: "service:edge0"\n', "    networks: [underlay]\n")
    msg = error_of(text)
    assert msg == ('compose.yaml: services.edge1.network_mode: the edges share one UDP port and TUN, '
                   'so one network namespace; set network_mode: "service:edge0"')


def test_subnet_outside_benchmark_range() -> None:
    msg = error_of(broken("subnet: 198.18.10.0/24", "subnet: 10.9.0.0/24"))
    assert msg == ("compose.yaml: networks.underlay.ipam.config[0].subnet: 10.9.0.0/24 is outside "
                   "198.18.0.0/15; use a subnet inside it, e.g. 198.18.10.0/24")


def test_address_outside_subnet() -> None:
    msg = error_of(broken("ipv4_address: 198.18.10.3", "ipv4_address: 198.18.11.3"))
    assert msg.startswith("compose.yaml: services.client.networks.underlay.ipv4_address: 198.18.11.3 is not a host address")


def test_state_dir_not_on_volume() -> None:
    text = broken("    command: fabric worker --id auto\n",
                  "    command: fabric worker --id auto --state-dir /srv/fabric\n")
    assert error_of(text) == (
        "compose.yaml: services.worker.volumes: the state directory /srv/fabric is not on a named volume; "
        "add `- state:/srv/fabric` (broker, edges and workers share ipc sockets there)")


def test_replicas_need_auto_ids() -> None:
    msg = error_of(broken("fabric worker --id auto", "fabric worker --id 0"))
    assert msg == "compose.yaml: services.worker.command: 2 replicas need distinct worker ids; use --id auto"


def test_edge_needs_tun_device() -> None:
    text = broken("x-edge: &edge\n  <<: *fabric\n  cap_add: [NET_ADMIN]\n  devices: [/dev/net/tun]\n",
                  "x-edge: &edge\n  <<: *fabric\n  cap_add: [NET_ADMIN]\n")
    assert error_of(text) == ("compose.yaml: services.edge0.devices: edge0 opens /dev/net/tun; "
                              "add devices: [/dev/net/tun]")


def test_openvpn_client_needs_tun() -> None:
    anchor = "    cap_add: [NET_ADMIN]\n    devices: [/dev/net/tun]\n    environment:\n      CLIENT_CONF: /client/demo-ovpn.ovpn\n"
    text = broken(anchor, "    environment:\n      CLIENT_CONF: /client/demo-ovpn.ovpn\n")
    assert error_of(text) == ("compose.yaml: services.ovpn-client.cap_add: ovpn-client creates a TUN device; "
                              "add cap_add: [NET_ADMIN]")


def test_undeclared_volume() -> None:
    msg = error_of(broken("      - client:/client:ro", "      - clients:/client:ro"))
    assert msg == ("compose.yaml: services.client.volumes[0]: volume 'clients' is not declared; "
                   "add it under the top-level volumes:")


def test_dependency_cycle() -> None:
    text = broken("    healthcheck:\n", "    depends_on: [client]\n    healthcheck:\n")
    msg = error_of(text)
    assert msg.startswith("compose.yaml: services.") and "a cycle (" in msg and "remove one of these dependencies" in msg


def test_default_network_refused() -> None:
    text = broken("    command: fabric worker --id auto\n    network_mode: none\n",
                  "    command: fabric worker --id auto\n")
    msg = error_of(text)
    assert msg.startswith("compose.yaml: services.worker: joins Docker's default network")


def test_worker_auto_id_skips_taken_ids(tmp_path: Path) -> None:
    # replicas run one command, `fabric worker --id auto`: each must get its own id
    from fabric.ops.paths import StateDir
    from workers.worker import _free_id

    sd = StateDir.at(tmp_path / "state").ensure()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fabric.ops.paths import StateDir; "
         "sd = StateDir.at(sys.argv[1]); sd.lock('worker-0'); sd.lock('worker-1'); print('held', flush=True); "
         "time.sleep(60)", str(sd.root)], stdout=subprocess.PIPE, text=True, env=fabric_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        wid, fd = _free_id(sd)
        os.close(fd)
        assert wid == 2
    finally:
        holder.kill()
        holder.wait()
    wid, fd = _free_id(sd)
    os.close(fd)
    assert wid == 0


# --------------------------------------------------------------------------- --check, the verdict (no namespaces)


def _checked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sessions: dict[str, float | None],
             status_rc: int = 0, exited: dict[str, int] | None = None) -> tuple[bool, str]:
    """Cluster.check with the namespaces' answers faked: pings pass, each endpoint reports `sessions`;
    the instances in `exited` ran a real process that ended with that code."""
    from fabric.testbed.testnet import PingResult, TopologyError

    c = cluster.Cluster(load(COMPOSE), prefix="fabunit")
    for inst, code in (exited or {}).items():
        proc = subprocess.Popen(["sh", "-c", f"exit {code}"])
        proc.wait(timeout=10)
        c.instances[inst] = cluster._Instance(inst, c.project.services[inst], proc)
    monkeypatch.setattr(c, "_last_line", lambda inst: f"{inst.name}: no tunnel after 60 s")
    c.topo.ns_of = {inst: c.topo.ns_name(g) for g, members in c.project.groups().items() for inst in members}
    c.topo.volume_dirs = {v: Path("/nonexistent") / v for v in c.project.volumes}
    ok = PingResult(5, 5, 0.5, "")
    monkeypatch.setattr(c.topo, "wait_ping", lambda ns, addr, timeout: ok)
    monkeypatch.setattr(c.topo, "ping", lambda ns, addr, count: ok)
    by_addr = {"198.18.10.4:9580": "broker", "198.18.10.2:9581": "edge0", "198.18.10.2:9582": "edge1"}
    seen: list[tuple[str, str]] = []

    def scrape(ns: str, address: str) -> dict[str, float]:
        seen.append((ns, address))
        n = sessions[by_addr[address]]
        if n is None:
            raise TopologyError(f"http://{address}/metrics in {ns}: Connection refused")
        return {"fabric_sessions": n, "fabric_peers": 1.0}

    monkeypatch.setattr(c, "scrape", scrape)
    monkeypatch.setattr(c.topo, "run", lambda ns, argv, **kw: subprocess.CompletedProcess(
        argv, status_rc, "fabric ok: ..." if status_rc == 0 else "fabric degraded: no worker is up", ""))
    result = c.check(timeout=1, metrics_wait=0)
    assert seen == [("fabunit-broker", "198.18.10.4:9580"), ("fabunit-edge0", "198.18.10.2:9581"),
                    ("fabunit-edge0", "198.18.10.2:9582")]
    return result, capsys.readouterr().out


def test_check_passes_when_every_endpoint_holds_the_session(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ok, out = _checked(monkeypatch, capsys, {"broker": 1, "edge0": 1, "edge1": 2})
    assert ok, out
    assert "check: metrics edge1 http://198.18.10.2:9582/metrics (in fabunit-edge0): fabric_sessions 2\n" in out
    assert "FAILED" not in out


def test_check_fails_when_an_edge_lacks_the_session(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ok, out = _checked(monkeypatch, capsys, {"broker": 1, "edge0": 1, "edge1": 0})
    assert not ok
    assert "metrics edge1 http://198.18.10.2:9582/metrics (in fabunit-edge0): fabric_sessions 0  FAILED" in out


def test_check_fails_when_an_endpoint_does_not_answer(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    ok, out = _checked(monkeypatch, capsys, {"broker": None, "edge0": 1, "edge1": 1})
    assert not ok
    assert "metrics broker http://198.18.10.4:9580/metrics (in fabunit-broker): http://198.18.10.4:9580/metrics in fabunit-broker: Connection refused  FAILED" in out


def test_check_fails_when_a_client_script_gave_up(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ok, out = _checked(monkeypatch, capsys, {"broker": 2, "edge0": 2, "edge1": 2},
                       exited={"peer-add-ovpn": 0, "ovpn-client": 1})
    assert not ok
    assert "check: ovpn-client exited (1): ovpn-client: no tunnel after 60 s  FAILED" in out
    assert "peer-add-ovpn exited" not in out  # a one-shot that completed is fine


def test_check_fails_when_fabric_status_is_degraded(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ok, out = _checked(monkeypatch, capsys, {"broker": 1, "edge0": 1, "edge1": 1}, status_rc=1)
    assert not ok
    assert "fabric degraded: no worker is up" in out and "check: fabric status exited 1  FAILED" in out


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fabric_argv(*args), capture_output=True, text=True, env=fabric_env(),
                          timeout=timeout, cwd=ROOT)


def test_cli_check_good_file() -> None:
    cp = _cli("cluster", "check", str(COMPOSE))
    assert cp.returncode == 0, cp.stderr
    assert "compose.yaml: ok: 8 services" in cp.stdout


def test_cli_check_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(broken('network_mode: "service:edge0"', 'network_mode: "service:nope"'))
    cp = _cli("cluster", "check", str(bad))
    assert cp.returncode == 1
    assert cp.stderr.strip().startswith(
        "fabric: error: compose.yaml: services.edge1.network_mode: service 'nope' is not defined")
    assert len(cp.stderr.strip().splitlines()) == 1 and "Traceback" not in cp.stderr


def test_cli_missing_file(tmp_path: Path) -> None:
    cp = _cli("cluster", "up", str(tmp_path / "nope.yaml"))
    assert cp.returncode == 1
    assert cp.stderr.strip() == (f"fabric: error: {tmp_path / 'nope.yaml'}: no such file; "
                                 "give the path of compose.yaml (the repository has one)")


def test_cli_client_ns_bad_name() -> None:
    cp = _cli("cluster", "up", str(COMPOSE), "--client-ns", "Laptop_1")
    assert cp.returncode == 1 and "Traceback" not in cp.stderr
    assert cp.stderr.strip() == ("fabric: error: --client-ns 'Laptop_1': use 1 to 12 lowercase letters and digits, "
                                 "e.g. laptop (it also names the client's interface)")


@pytest.mark.skipif(os.geteuid() != 0, reason="fabric cluster up refuses to start without root first")
def test_cli_client_ns_taken_by_service() -> None:
    prefix = new_prefix()
    cp = _cli("cluster", "up", str(COMPOSE), "--client-ns", "client", "--prefix", prefix)
    assert cp.returncode == 1 and "Traceback" not in cp.stderr
    assert cp.stderr.strip() == ("fabric: error: --client-ns client: a service of compose.yaml has that namespace; "
                                 "pick another name")
    assert _leftovers(prefix) == []


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose not installed (apt-get install docker-compose; scripts/setup.sh does it)")
def test_docker_compose_accepts_file() -> None:
    cp = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                        timeout=60, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose not installed (apt-get install docker-compose; scripts/setup.sh does it)")
def test_docker_compose_rejects_broken_file(tmp_path: Path) -> None:
    # the CI step can fail: docker-compose does check what we give it
    bad = tmp_path / "compose.yaml"
    bad.write_text(broken('network_mode: "service:edge0"', 'network_mode: "service:nope"'))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    cp = subprocess.run(["docker-compose", "-f", str(bad), "config", "-q"], capture_output=True, text=True,
                        timeout=60, cwd=tmp_path)
    assert cp.returncode != 0


# --------------------------------------------------------------------------- end to end


def _leftovers(prefix: str) -> list[str]:
    left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if ns.startswith(prefix)]
    left += processes_mentioning(prefix)
    left += [str(p) for p in Path("/tmp").glob(f"{prefix}-*")]
    return left


@pytest.mark.netns
def test_cluster_up_check_pings_through_wireguard_go_and_openvpn() -> None:
    prefix = new_prefix()
    cp = _cli("cluster", "up", str(COMPOSE), "--check", "--prefix", prefix, "--keep-logs", timeout=240)
    out = cp.stdout
    m = re.search(r"^logs kept in (/tmp/" + prefix + r"-\S+)$", out, re.M)
    workdir = Path(m.group(1)) if m else None
    try:
        assert cp.returncode == 0, f"{out}\n{cp.stderr}"
        for step in ("creating 8 network namespaces", "creating network underlay 198.18.10.0/24",
                     "starting broker", "waiting for broker to be healthy", "starting edge0", "starting edge1",
                     "starting worker (2 x fabric worker --id auto)", "waiting for peer-add to complete",
                     "starting client", "waiting for peer-add-ovpn to complete", "starting ovpn-client",
                     "tearing down", "stopped"):
            assert step in out, f"missing progress line {step!r}:\n{out}"
        for client in ("client", "ovpn-client"):
            m = re.search(rf"check: {client} -> 198\.19\.100\.1: (\d+)/(\d+) replies", out)
            assert m and int(m.group(1)) == int(m.group(2)) > 0, out
        # the fabric saw both demo peers' sessions, through the edges and both workers
        assert re.search(r"^\d+\s+demo\s+wg\s+198\.18\.10\.3:\d+", out, re.M), out
        assert re.search(r"^\d+\s+demo-ovpn\s+ovpn/aes256\s+198\.18\.10\.5:\d+", out, re.M), out
        assert re.search(r"^broker .*wireguard 51820/udp\s+openvpn 1194/udp", out, re.M), out
        assert len(re.findall(r"^worker\s+\d+\s+\d+\s+up", out, re.M)) == 2, out
        assert len(re.findall(r"^edge\s+\d+\s+\d+\s+up", out, re.M)) == 2, out
        assert re.search(r"^fabric ok: broker up .*, 2 edges, 2 workers up, 2 peers, 2 sessions$", out, re.M), out
        # every metrics endpoint of the file, scraped from inside its namespace, holds both sessions
        for inst, ns, addr in (("broker", "broker", "198.18.10.4:9580"), ("edge0", "edge0", "198.18.10.2:9581"),
                               ("edge1", "edge0", "198.18.10.2:9582")):
            m = re.search(rf"check: metrics {inst} http://{re.escape(addr)}/metrics \(in {prefix}-{ns}\): "
                          r"fabric_sessions (\d+)$", out, re.M)
            assert m and int(m.group(1)) >= 2, out
        assert "FAILED" not in out
        # the OpenVPN client's own script: openvpn ran the profile peer-add-ovpn wrote, then it pinged
        assert workdir is not None, out
        log = (workdir / "logs" / "ovpn-client.log").read_text(errors="replace")
        assert "Initialization Sequence Completed" in log and "cipher 'AES-256-GCM'" in log, log
        assert "ovpn-client: tunnel up, pinging 198.19.100.1 through it" in log, log
        assert re.search(r"bytes from 198\.19\.100\.1", log), log
        profile = (workdir / "volumes" / "client" / "demo-ovpn.ovpn").read_text()
        assert "remote 198.18.10.2 1194" in profile and "<tls-crypt>" in profile, profile
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    assert _leftovers(prefix) == []


@pytest.mark.netns
def test_cluster_up_failure_leaves_nothing(tmp_path: Path) -> None:
    prefix = new_prefix()
    bad = tmp_path / "compose.yaml"
    bad.write_text(broken("--endpoint 198.18.10.2:51820 -o", "--endpoint nowhere -o"))
    cp = _cli("cluster", "up", str(bad), "--check", "--prefix", prefix, timeout=240)
    assert cp.returncode == 1, cp.stdout
    errors = [ln for ln in cp.stderr.splitlines() if ln.startswith("fabric: error:")]
    assert len(errors) == 1 and "service peer-add exited with 2 (needed by client)" in errors[0], cp.stderr
    assert "Traceback" not in cp.stderr
    assert "tearing down" in cp.stdout
    assert _leftovers(prefix) == []


@pytest.mark.netns
def test_cluster_up_stops_on_sigterm() -> None:
    prefix = new_prefix()
    proc = subprocess.Popen(fabric_argv("cluster", "up", str(COMPOSE), "--prefix", prefix), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=fabric_env(), cwd=ROOT)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "cluster up:" in line:
                break
        assert any("cluster up: 9 processes in 8 namespaces" in ln for ln in lines), "".join(lines)
        assert any(ns.startswith(f"{prefix}-edge0") for ns in
                   subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert _leftovers(prefix) == []


def _hint(hints: list[str], needle: str) -> list[str]:
    """The printed command containing `needle`, as argv without sudo and the trailing comment."""
    found = [h for h in hints if needle in h]
    assert len(found) == 1, f"no single next-step line with {needle!r}:\n" + "\n".join(hints)
    argv = shlex.split(found[0].split("  #", 1)[0])
    assert argv[0] == "sudo", found[0]
    argv = argv[1:]
    if "/" in argv[0] and not os.path.isabs(argv[0]):
        argv[0] = str(ROOT / argv[0])  # relative to where `fabric cluster up` ran
    if argv[:4] == ["ip", "netns", "exec", argv[3]] and argv[4] == "curl" and shutil.which("curl") is None:
        argv = [*argv[:4], sys.executable, "-c", cluster._SCRAPE, argv[-1].removeprefix("http://").split("/")[0]]
    return argv


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


@pytest.mark.netns
def test_readme_path_second_client(tmp_path: Path) -> None:
    """What README's Compose cluster section tells a newcomer, with the commands `fabric cluster up` prints:
    a second peer, a wireguard-go client of one's own (wg-quick) in a namespace on the underlay, the
    fabric's view of it (fabric status, metrics), then SIGTERM leaves nothing behind."""
    prefix = new_prefix()
    name = "c" + prefix[3:]  # the peer, its namespace and its interface: unique to this run
    proc = subprocess.Popen(fabric_argv("cluster", "up", str(COMPOSE), "--prefix", prefix, "--client-ns", name),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fabric_env(), cwd=ROOT)
    lines: list[str] = []
    wg_pids: list[int] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "] ready; " in line:
                break
        out = "".join(lines)
        assert "] ready; " in out, f"{out}\n{proc.stderr.read() if proc.poll() is not None else ''}"  # type: ignore[union-attr]
        assert f"creating namespace {prefix}-{name} for a client of your own" in out
        hints = [ln.rstrip() for ln in lines if ln.startswith("  sudo ")]

        # fabric peer add NAME ... -o NAME.conf
        cp = subprocess.run(_hint(hints, f" peer add {name} "), capture_output=True, text=True,
                            env=fabric_env(), cwd=tmp_path, timeout=60)
        assert cp.returncode == 0 and cp.stdout.strip() == f"wrote {name}.conf", cp.stderr
        conf = (tmp_path / f"{name}.conf").read_text()
        assert "Endpoint = 198.18.10.2:51820" in conf and "AllowedIPs = 198.19.100.0/24" in conf, conf

        # wg-quick up ./NAME.conf in the client namespace: wireguard-go (this kernel has no WireGuard module)
        cp = subprocess.run(_hint(hints, f"wg-quick up ./{name}.conf"), capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
        assert cp.returncode == 0, cp.stderr
        pids = subprocess.run(["ip", "netns", "pids", f"{prefix}-{name}"], capture_output=True, text=True).stdout
        comms = {int(p): Path(f"/proc/{p}/comm").read_text().strip() for p in pids.split()}
        wg_pids = [p for p, c in comms.items() if c == "wireguard-go"]
        if not Path("/sys/module/wireguard").exists():
            assert len(wg_pids) == 1, comms

        # it pings the server through the tunnel (the first ping may wait for the handshake)
        ping = _hint(hints, f"{prefix}-{name} ping ")
        for _ in range(10):
            if subprocess.run([*ping[:4], "ping", "-c", "1", "-W", "2", ping[-1]], capture_output=True).returncode == 0:
                break
        cp = subprocess.run(ping, capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0 and re.search(r"\b[1-3] received", cp.stdout), cp.stdout

        def fabric_view() -> None:
            # fabric status --json: every process up, both peers' sessions, the new one from the client namespace
            cp = subprocess.run([*_hint(hints, " status --state-dir "), "--json"], capture_output=True, text=True,
                                env=fabric_env(), timeout=60)
            assert cp.returncode == 0, cp.stdout + cp.stderr
            view = json.loads(cp.stdout)
            assert view["health"] == "ok" and view["session_count"] >= 3, view
            by_peer = {s["peer"]: s for s in view["sessions"]}
            assert set(by_peer) == {"demo", "demo-ovpn", name}, by_peer
            # the compose file's clients have .3 and .5; this namespace gets the next free address
            assert by_peer[name]["endpoint"].startswith("198.18.10.6:"), by_peer[name]
            assert sorted((r["role"], r["health"]) for r in view["processes"]) == [
                ("edge", "up"), ("edge", "up"), ("worker", "up"), ("worker", "up")], view["processes"]
            assert {r["metrics"] for r in view["processes"] if r["role"] == "edge"} == {
                "198.18.10.2:9581", "198.18.10.2:9582"}

            # the metrics endpoints, as printed: the edge holds all three sessions, the broker knows the new peer
            cp = subprocess.run(_hint(hints, "# edge0"), capture_output=True, text=True, timeout=60)
            assert cp.returncode == 0, cp.stderr
            edge = _samples(cp.stdout)
            assert [v for n, _l, v in edge if n == "fabric_sessions"][0] >= 3, cp.stdout
            cp = subprocess.run(_hint(hints, "# broker"), capture_output=True, text=True, timeout=60)
            assert cp.returncode == 0, cp.stderr
            broker = _samples(cp.stdout)
            assert [v for n, _l, v in broker if n == "fabric_sessions"][0] >= 3
            assert [v for n, lab, v in broker if n == "fabric_peer_latest_handshake_seconds" and lab["peer"] == name][0] > 0
            rx = [v for n, lab, v in broker if n == "fabric_peer_packets_total" and lab["peer"] == name
                  and lab["direction"] == "rx"]
            assert rx and rx[0] > 0, [s for s in broker if s[0].startswith("fabric_peer")]

        # edges and workers report to the broker about once a second: allow a few reports
        deadline = time.monotonic() + 20
        while True:
            try:
                fabric_view()
                break
            except AssertionError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1)

        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in rest and "Traceback" not in err
    assert _leftovers(prefix) == []
    # the client the user started went with its namespace, and so did its UAPI socket
    assert [p for p in wg_pids if Path(f"/proc/{p}").exists()] == []
    assert not Path(f"/var/run/wireguard/{name}.sock").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
