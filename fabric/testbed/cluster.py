"""``fabric cluster up|check compose.yaml``: the compose cluster as processes in network namespaces.

Docker is not everywhere (not on the test machines), so the same compose file
also runs here: the parts of it we rely on are parsed and validated, and every
container becomes a process running the service's own ``command``:

* one network namespace per network-namespace group: a service with
  ``network_mode: "service:X"`` joins X's namespace (the edges share one, hence
  one UDP port and one TUN); ``network_mode: none`` gives an empty namespace;
* a compose network becomes a bridge in a namespace of its own, with a veth
  (``eth0``, ``eth1``...) into every namespace attached to it and the
  ``ipv4_address`` from the file (others get the next free address); its subnet
  must lie in 198.18.0.0/15 so nothing here can reach other networks;
* named volumes become directories under a temporary work directory; command
  arguments, environment values and healthchecks that name a path inside a
  volume (``/var/lib/fabric/...``) are mapped to that directory;
* ``deploy.replicas`` are expanded (``worker-1``, ``worker-2``...);
  ``depends_on`` with ``service_started``, ``service_healthy`` (the service's
  ``healthcheck`` run in its namespace) and ``service_completed_successfully``
  orders the start; ``restart`` policies restart what dies;
* like a container, each process gets a private ``/run/wireguard`` (wireguard-go
  sockets) in its own mount namespace; ``ports`` are only published by Docker.

What cannot be emulated on one host (the host's /dev/shm is shared by all, as
the edges' ``ipc: "service:edge0"`` shares it in Docker) is checked rather
than ignored, so the compose file stays correct for Docker too.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fabric.ops.config import ConfigError
from fabric.ops.log import Log
from fabric.ops.paths import DEFAULT_STATE_DIR, StateDir
from fabric.testbed.testnet import (
    Topology,
    TopologyError,
    fabric_argv,
    fabric_env,
    missing_tools,
    new_prefix,
)

log = Log("cluster")

ALLOWED_NET = ipaddress.IPv4Network("198.18.0.0/15")
FABRIC_ROLES = ("broker", "edge", "worker")
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
CHECK_LABEL = "fabric.check-ping"
# GET /metrics, run inside a namespace (the address may exist there only).
_SCRAPE = ("import sys, urllib.request; "
           "sys.stdout.write(urllib.request.urlopen('http://' + sys.argv[1] + '/metrics', timeout=5).read().decode())")
# A process gets its own /run/wireguard, as in a container (wireguard-go's UAPI sockets).
_PRIVATE_RUN = ('mkdir -p /run/wireguard && mount -t tmpfs -o mode=0700 fabric-run /run/wireguard '
                '&& exec "$@"')


class ComposeError(ConfigError):
    """The compose file cannot be used; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------- model


@dataclass
class Mount:
    source: str  # named volume, or an absolute host path for a bind mount
    target: str
    named: bool
    read_only: bool = False


@dataclass
class Healthcheck:
    argv: list[str]
    interval: float = 30.0
    retries: int = 3
    start_period: float = 0.0


@dataclass
class Service:
    name: str
    command: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    network_mode: str | None = None
    networks: dict[str, str | None] = field(default_factory=dict)  # network -> ipv4_address
    depends_on: dict[str, str] = field(default_factory=dict)  # service -> condition
    replicas: int = 1
    healthcheck: Healthcheck | None = None
    restart: str = "no"
    cap_add: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    privileged: bool = False
    ipc: str | None = None
    ports: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str:
        """broker, edge or worker for `fabric ROLE ...` commands, else other."""
        if len(self.command) >= 2 and Path(self.command[0]).name == "fabric" and self.command[1] in FABRIC_ROLES:
            return self.command[1]
        return "other"

    def instances(self) -> list[str]:
        if self.replicas == 1:
            return [self.name]
        return [f"{self.name}-{k}" for k in range(1, self.replicas + 1)]

    def state_dir(self) -> str:
        """The state directory a fabric process of this service uses (in the container)."""
        for i, a in enumerate(self.command):
            if a == "--state-dir" and i + 1 < len(self.command):
                return self.command[i + 1]
            if a.startswith("--state-dir="):
                return a.split("=", 1)[1]
        return self.environment.get("FABRIC_STATE_DIR", DEFAULT_STATE_DIR)

    def mount_of(self, path: str) -> Mount | None:
        best = None
        for m in self.mounts:
            if (path == m.target or path.startswith(m.target.rstrip("/") + "/")) and (
                    best is None or len(m.target) > len(best.target)):
                best = m
        return best


@dataclass
class Network:
    name: str
    subnet: ipaddress.IPv4Network


@dataclass
class Project:
    path: Path
    services: dict[str, Service]
    networks: dict[str, Network]
    volumes: list[str]
    order: list[str]  # services in start order (dependencies first)

    def netns_owner(self, name: str) -> str:
        """The service whose network namespace `name` runs in."""
        seen = []
        while True:
            mode = self.services[name].network_mode or ""
            if not mode.startswith("service:"):
                return name
            seen.append(name)
            name = mode.split(":", 1)[1]

    def groups(self) -> dict[str, list[str]]:
        """Namespace name suffix -> the instances that run in it."""
        out: dict[str, list[str]] = {}
        for name in self.order:
            owner = self.netns_owner(name)
            svc = self.services[name]
            if owner == name:
                for inst in svc.instances():
                    out.setdefault(inst, []).append(inst)
            else:
                out.setdefault(owner, []).extend(svc.instances())
        return out

    def summary(self) -> str:
        n_proc = sum(s.replicas for s in self.services.values())
        groups = self.groups()
        parts = []
        for ns, members in groups.items():
            parts.append(ns if members == [ns] else f"{'+'.join(members)} share {ns}")
        nets = ", ".join(f"{n.name} {n.subnet}" for n in self.networks.values()) or "none"
        return (f"{self.path.name}: ok: {len(self.services)} services, {n_proc} processes in "
                f"{len(groups)} network namespaces ({'; '.join(parts)}); networks: {nets}")


# --------------------------------------------------------------------------- parsing


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str], where: str) -> str:
    """Compose's variable substitution: $$ is a literal $, ${VAR}, ${VAR:-default}, $VAR."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4)
        value = env.get(name)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return arg or ""
        elif op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise ComposeError(f"{where}: variable {name} is required: {arg or 'set it'}")
        return value or ""

    return _VAR.sub(sub, text)


def _interp_all(node: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(node, str):
        if re.search(r"\$\{[^}]*$", node) or re.search(r"\$\{(?![A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\})", node):
            raise ComposeError(f"{where}: bad variable substitution in {node!r}; write $$ for a literal $")
        return interpolate(node, env, where)
    if isinstance(node, list):
        return [_interp_all(v, env, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _interp_all(v, env, f"{where} {k}" if where.endswith(":") else f"{where}.{k}")
                for k, v in node.items()}
    return node


def _duration(text: Any, where: str) -> float:
    if isinstance(text, int | float):
        return float(text)
    total, rest = 0.0, str(text).strip()
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    for num, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", rest):
        total += float(num) * units[unit]
    if not rest or re.sub(r"([\d.]+)(ms|us|h|m|s)", "", rest):
        raise ComposeError(f"{where}: {text!r} is not a duration; write e.g. 2s, 500ms or 1m30s")
    return total


def _str_list(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str | int | float) for x in v):
        raise ComposeError(f"{where}: expected a list of strings")
    return [str(x) for x in v]


def _command(v: Any, where: str) -> list[str]:
    if isinstance(v, str):
        try:
            argv = shlex.split(v)
        except ValueError as exc:
            raise ComposeError(f"{where}: cannot split {v!r}: {exc}; fix the quoting") from None
    elif isinstance(v, list) and all(isinstance(x, str | int | float) for x in v):
        argv = [str(x) for x in v]
    else:
        raise ComposeError(f"{where}: give a string or a list of strings")
    if not argv:
        raise ComposeError(f"{where}: empty command; give the program to run, e.g. fabric worker --id auto")
    return argv


def _mapping(v: Any, where: str, fix: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ComposeError(f"{where}: expected a mapping; {fix}")
    return v


def _environment(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if isinstance(v, list):
        out = {}
        for item in v:
            k, sep, val = str(item).partition("=")
            if sep:
                out[k] = val
            elif k in os.environ:
                out[k] = os.environ[k]
        return out
    if isinstance(v, dict):
        return {str(k): "" if val is None else str(val).lower() if isinstance(val, bool) else str(val)
                for k, val in v.items()}
    raise ComposeError(f"{where}: expected a mapping (KEY: value) or a list (KEY=value)")


def _mounts(v: Any, where: str, base: Path, declared: list[str]) -> list[Mount]:
    out = []
    for i, item in enumerate(_list_of(v, where)):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                raise ComposeError(f"{w}: {item!r} is an anonymous volume; name it, e.g. state:{item}")
            source, target = parts[0], parts[1]
            mode = parts[2] if len(parts) > 2 else "rw"
            ro = "ro" in mode.split(",")
        elif isinstance(item, dict):
            source, target = str(item.get("source", "")), str(item.get("target", ""))
            ro = bool(item.get("read_only", False))
            if item.get("type", "volume") not in ("volume", "bind"):
                raise ComposeError(f"{w}.type: only volume and bind mounts are supported")
        else:
            raise ComposeError(f"{w}: expected SOURCE:TARGET[:ro]")
        if not target.startswith("/"):
            raise ComposeError(f"{w}: target {target!r} must be an absolute path in the container")
        named = not (source.startswith((".", "/", "~")))
        if named:
            if source not in declared:
                raise ComposeError(f"{w}: volume {source!r} is not declared; add it under the top-level volumes:")
        else:
            source = str((base / os.path.expanduser(source)).resolve())
        out.append(Mount(source, target.rstrip("/") or "/", named, ro))
    return out


def _list_of(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ComposeError(f"{where}: expected a list")
    return v


def _healthcheck(v: Any, where: str) -> Healthcheck | None:
    if v is None:
        return None
    hc = _mapping(v, where, "give test: [CMD, ...] and interval")
    if hc.get("disable"):
        return None
    test = hc.get("test")
    if isinstance(test, str):
        argv = ["sh", "-c", test]
    elif isinstance(test, list) and test and all(isinstance(x, str) for x in test):
        if test[0] == "NONE":
            return None
        if test[0] == "CMD" and len(test) > 1:
            argv = list(test[1:])
        elif test[0] == "CMD-SHELL" and len(test) == 2:
            argv = ["sh", "-c", test[1]]
        else:
            raise ComposeError(f"{where}.test: start with CMD (then the argv) or CMD-SHELL (then one string)")
    else:
        raise ComposeError(f"{where}.test: missing; give e.g. [CMD, fabric, admin, peers]")
    retries = hc.get("retries", 3)
    if not isinstance(retries, int) or retries < 1:
        raise ComposeError(f"{where}.retries: {retries!r} is not a positive number")
    return Healthcheck(argv, _duration(hc.get("interval", "30s"), f"{where}.interval"), retries,
                       _duration(hc.get("start_period", "0s"), f"{where}.start_period"))


def _networks(v: Any, where: str) -> dict[str, str | None]:
    if v is None:
        return {}
    if isinstance(v, list):
        return {str(n): None for n in v}
    out: dict[str, str | None] = {}
    for name, spec in _mapping(v, where, "list the networks by name").items():
        spec = _mapping(spec, f"{where}.{name}", "give ipv4_address: ADDRESS")
        addr = spec.get("ipv4_address")
        out[str(name)] = None if addr is None else str(addr)
    return out


def load(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Project:
    """Parse and validate a compose file; ComposeError names what is wrong and the fix."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ComposeError(f"{p}: no such file; give the path of compose.yaml (the repository has one)") from None
    except OSError as exc:
        raise ComposeError(f"{p}: cannot read it: {exc.strerror}") from None
    return parse(text, p, env)


def parse(text: str, path: Path = Path("compose.yaml"), env: dict[str, str] | None = None) -> Project:
    import yaml

    name = path.name
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ComposeError(f"{name}: not valid YAML at {where}: {problem}; fix the indentation or quoting there") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict) or not doc["services"]:
        raise ComposeError(f"{name}: no services: mapping; a compose file lists its containers under services:")
    doc = _interp_all(doc, dict(os.environ if env is None else env), f"{name}:")
    volumes = [str(v) for v in _mapping(doc.get("volumes"), f"{name}: volumes", "list volume names").keys()]
    networks: dict[str, Network] = {}
    for net, spec in _mapping(doc.get("networks"), f"{name}: networks", "list network names").items():
        w = f"{name}: networks.{net}"
        spec = _mapping(spec, w, "give ipam: config: [subnet: 198.18.x.0/24]")
        configs = _list_of(_mapping(spec.get("ipam"), f"{w}.ipam", "give config: [subnet: ...]").get("config"),
                           f"{w}.ipam.config")
        subnet = configs[0].get("subnet") if configs and isinstance(configs[0], dict) else None
        if subnet is None:
            raise ComposeError(f"{w}.ipam.config: no subnet; give one inside 198.18.0.0/15, e.g. subnet: 198.18.10.0/24")
        try:
            sn = ipaddress.ip_network(str(subnet))
        except ValueError:
            raise ComposeError(f"{w}.ipam.config[0].subnet: {subnet!r} is not a network, e.g. 198.18.10.0/24") from None
        if not isinstance(sn, ipaddress.IPv4Network) or not sn.subnet_of(ALLOWED_NET):
            raise ComposeError(f"{w}.ipam.config[0].subnet: {sn} is outside 198.18.0.0/15; use a subnet inside it, e.g. 198.18.10.0/24")
        networks[str(net)] = Network(str(net), sn)

    services: dict[str, Service] = {}
    for sname, spec in doc["services"].items():
        sname = str(sname)
        w = f"{name}: services.{sname}"
        spec = _mapping(spec, w, "give at least command:")
        if "command" not in spec:
            raise ComposeError(f"{w}: missing command; give the process to run, e.g. command: fabric worker --id auto")
        argv = _command(spec["command"], f"{w}.command")
        if spec.get("entrypoint") is not None:
            argv = _command(spec["entrypoint"], f"{w}.entrypoint") + argv
        replicas = _mapping(spec.get("deploy"), f"{w}.deploy", "give replicas: N").get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 64:
            raise ComposeError(f"{w}.deploy.replicas: {replicas!r} is not a count; use 1 to 64")
        deps_raw = spec.get("depends_on")
        deps: dict[str, str] = {}
        if isinstance(deps_raw, list):
            deps = {str(d): "service_started" for d in deps_raw}
        elif deps_raw is not None:
            for d, cond in _mapping(deps_raw, f"{w}.depends_on", "list service names").items():
                c = _mapping(cond, f"{w}.depends_on.{d}", "give condition: service_started").get(
                    "condition", "service_started")
                if c not in CONDITIONS:
                    raise ComposeError(f"{w}.depends_on.{d}.condition: {c!r} is unknown; use one of {', '.join(CONDITIONS)}")
                deps[str(d)] = str(c)
        labels_raw = spec.get("labels")
        labels = _environment(labels_raw, f"{w}.labels") if labels_raw is not None else {}
        svc = Service(
            name=sname, command=argv,
            environment=_environment(spec.get("environment"), f"{w}.environment"),
            mounts=_mounts(spec.get("volumes"), f"{w}.volumes", path.parent, volumes),
            network_mode=None if spec.get("network_mode") is None else str(spec["network_mode"]),
            networks=_networks(spec.get("networks"), f"{w}.networks"),
            depends_on=deps, replicas=replicas,
            healthcheck=_healthcheck(spec.get("healthcheck"), f"{w}.healthcheck"),
            restart=str(spec.get("restart", "no")),
            cap_add=_str_list(spec.get("cap_add"), f"{w}.cap_add"),
            devices=[d.split(":")[0] for d in _str_list(spec.get("devices"), f"{w}.devices")],
            privileged=bool(spec.get("privileged", False)),
            ipc=None if spec.get("ipc") is None else str(spec["ipc"]),
            ports=_str_list(spec.get("ports"), f"{w}.ports"),
            labels=labels,
        )
        services[sname] = svc
    project = Project(path, services, networks, volumes, [])
    _validate(project)
    project.order = _start_order(project)
    return project


def _validate(project: Project) -> None:
    name = project.path.name
    svcs = project.services
    known = ", ".join(svcs)
    for s in svcs.values():
        w = f"{name}: services.{s.name}"
        for d in s.depends_on:
            if d not in svcs:
                raise ComposeError(f"{w}.depends_on: service {d!r} is not defined; use one of: {known}")
        mode = s.network_mode
        if mode is not None:
            if mode.startswith("service:"):
                target = mode.split(":", 1)[1]
                if target not in svcs:
                    raise ComposeError(f"{w}.network_mode: service {target!r} is not defined; use one of: {known}")
                if target == s.name:
                    raise ComposeError(f"{w}.network_mode: a service cannot share its own namespace; name another service")
                if svcs[target].replicas != 1:
                    raise ComposeError(f"{w}.network_mode: {target} has {svcs[target].replicas} replicas; share the namespace of a service with one")
                if s.ports:
                    raise ComposeError(f"{w}.ports: a service sharing {target}'s network cannot publish ports; move them to {target}")
                if s.networks:
                    raise ComposeError(f"{w}.networks: a service sharing {target}'s network joins its networks; remove networks:")
            elif mode in ("host", "bridge") or mode.startswith("container:"):
                raise ComposeError(f"{w}.network_mode: {mode!r} is not supported here; use none, service:NAME or networks:")
            elif mode != "none":
                raise ComposeError(f"{w}.network_mode: {mode!r} is unknown; use none, \"service:NAME\" or networks:")
        elif not s.networks:
            raise ComposeError(f"{w}: joins Docker's default network, whose subnet Docker picks; "
                               "give it networks: [NAME] with a subnet in 198.18.0.0/15, or network_mode: none")
        for net, addr in s.networks.items():
            if net not in project.networks:
                raise ComposeError(f"{w}.networks: network {net!r} is not declared; add it under the top-level networks: with a subnet")
            if addr is not None:
                try:
                    ip = ipaddress.ip_address(addr)
                except ValueError:
                    raise ComposeError(f"{w}.networks.{net}.ipv4_address: {addr!r} is not an IPv4 address") from None
                subnet = project.networks[net].subnet
                if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address, next(subnet.hosts())):
                    raise ComposeError(f"{w}.networks.{net}.ipv4_address: {ip} is not a host address of {subnet} "
                                       f"(.1 is the gateway); pick one from {subnet}")
        if s.ipc and s.ipc.startswith("service:") and s.ipc.split(":", 1)[1] not in svcs:
            raise ComposeError(f"{w}.ipc: service {s.ipc.split(':', 1)[1]!r} is not defined; use one of: {known}")
        needs_tun = s.role == "edge" or runs(s, "wireguard-go") or runs(s, "openvpn")
        if needs_tun and not s.privileged:
            if "NET_ADMIN" not in s.cap_add:
                raise ComposeError(f"{w}.cap_add: {s.name} creates a TUN device; add cap_add: [NET_ADMIN]")
            if "/dev/net/tun" not in s.devices:
                raise ComposeError(f"{w}.devices: {s.name} opens /dev/net/tun; add devices: [/dev/net/tun]")
    # network_mode cycles
    for s in svcs.values():
        seen = {s.name}
        cur = s
        while cur.network_mode and cur.network_mode.startswith("service:"):
            nxt = cur.network_mode.split(":", 1)[1]
            if nxt in seen:
                raise ComposeError(f"{name}: services.{s.name}.network_mode: services share namespaces in a circle "
                                   f"({' -> '.join([*seen, nxt])}); let one of them own it")
            seen.add(nxt)
            cur = svcs[nxt]
    # addresses unique per network
    for net in project.networks:
        used: dict[str, str] = {}
        for s in svcs.values():
            addr = s.networks.get(net)
            if addr is not None:
                if addr in used:
                    raise ComposeError(f"{name}: services.{s.name}.networks.{net}.ipv4_address: {addr} is "
                                       f"{used[addr]}'s already; give each service its own")
                if s.replicas > 1:
                    raise ComposeError(f"{name}: services.{s.name}.networks.{net}.ipv4_address: {s.replicas} replicas "
                                       "cannot share one address; drop ipv4_address or the replicas")
                used[addr] = s.name
    # the fabric itself: one broker, edges, workers, one state dir on one volume
    by_role: dict[str, list[Service]] = {r: [] for r in FABRIC_ROLES}
    for s in svcs.values():
        if s.role in by_role:
            by_role[s.role].append(s)
    for role, example in (("broker", "fabric broker --address 198.19.100.1/24"),
                          ("edge", "fabric edge --id 0 --address 198.19.100.1/24"),
                          ("worker", "fabric worker --id auto")):
        if not by_role[role]:
            raise ComposeError(f"{name}: missing service: none runs `fabric {role}`; add one with command: {example}")
    brokers = by_role["broker"]
    if len(brokers) > 1 or brokers[0].replicas > 1:
        raise ComposeError(f"{name}: services.{brokers[-1].name}: a fabric has one broker; remove the others and their replicas")
    state: tuple[str, str] | None = None
    first = ""
    for s in [*brokers, *by_role["edge"], *by_role["worker"]]:
        sd = s.state_dir()
        m = s.mount_of(sd)
        if m is None or not m.named:
            raise ComposeError(f"{name}: services.{s.name}.volumes: the state directory {sd} is not on a named volume; "
                               f"add `- state:{sd}` (broker, edges and workers share ipc sockets there)")
        if m.read_only:
            raise ComposeError(f"{name}: services.{s.name}.volumes: the state directory {sd} is read-only; drop :ro")
        if state is None:
            state, first = (m.source, sd), s.name
        elif state != (m.source, sd):
            raise ComposeError(f"{name}: services.{s.name}: state directory {m.source}:{sd} differs from {first}'s "
                               f"{state[0]}:{state[1]}; every fabric process must use the same one")
        if s.role == "worker" and s.replicas > 1 and "auto" not in s.command:
            raise ComposeError(f"{name}: services.{s.name}.command: {s.replicas} replicas need distinct worker ids; use --id auto")
    edges = by_role["edge"]
    owners = {project.netns_owner(e.name) for e in edges}
    if len(owners) > 1:
        raise ComposeError(f"{name}: services.{edges[-1].name}.network_mode: the edges share one UDP port and TUN, "
                           f"so one network namespace; set network_mode: \"service:{edges[0].name}\"")
    owner = owners.pop()
    ids: dict[str | None, str] = {}
    for e in edges:
        eid = _arg(e.command, "--id")
        if e.replicas > 1:
            raise ComposeError(f"{name}: services.{e.name}.deploy.replicas: edge ids must be unique; give each edge its own service and --id")
        if eid in ids:
            raise ComposeError(f"{name}: services.{e.name}.command: --id {eid} is {ids[eid]}'s already; give each edge its own id")
        ids[eid] = e.name
        # in Docker the session table in /dev/shm is per IPC namespace
        if e.name == owner:
            if len(edges) > 1 and e.ipc != "shareable":
                raise ComposeError(f"{name}: services.{e.name}.ipc: the other edges share its /dev/shm (session table); set ipc: shareable")
        elif e.ipc != f"service:{owner}":
            raise ComposeError(f"{name}: services.{e.name}.ipc: edges share the session table in /dev/shm; set ipc: \"service:{owner}\"")


def runs(svc: Service, program: str) -> bool:
    """Whether the service's command runs `program`: as its argv[0], or as a command of the
    shell script it runs (`openvpn --config ...`, not `fabric broker --openvpn-port ...`)."""
    if svc.command and Path(svc.command[0]).name == program:
        return True
    word = re.compile(rf"(?:^|[\s;&|(`]){re.escape(program)}(?=[\s;&|)`]|$)", re.M)
    return any(word.search(a) for a in svc.command[1:])


def _arg(argv: list[str], opt: str) -> str | None:
    for i, a in enumerate(argv):
        if a == opt and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(opt + "="):
            return a.split("=", 1)[1]
    return None


def _start_order(project: Project) -> list[str]:
    svcs = project.services
    deps: dict[str, set[str]] = {}
    for s in svcs.values():
        d = set(s.depends_on)
        for ref in (s.network_mode, s.ipc):
            if ref and ref.startswith("service:"):
                d.add(ref.split(":", 1)[1])
        deps[s.name] = d
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ComposeError(f"{project.path.name}: services.{n}.depends_on: a cycle ({' -> '.join([*path, n])}); "
                               "remove one of these dependencies")
        state[n] = 1
        for d in sorted(deps[n]):
            visit(d, [*path, n])
        state[n] = 2
        order.append(n)

    for n in svcs:
        visit(n, [])
    return order


def client_network(project: Project) -> str | None:
    """The network clients reach the fabric on: the edges' first one (else the first declared)."""
    edges = [s for s in project.services.values() if s.role == "edge"]
    if edges:
        owner = project.services[project.netns_owner(edges[0].name)]
        if owner.networks:
            return next(iter(owner.networks))
    return next(iter(project.networks), None)


# --------------------------------------------------------------------------- running


def _short(argv: list[str], width: int = 72) -> str:
    text = " ".join(argv[:-1] + [argv[-1].strip().splitlines()[0] if argv[-1].strip() else ""])
    return text if len(text) <= width and "\n" not in argv[-1].strip() else text[: width - 3] + "..."


def _fabric_command() -> str:
    """How the user runs this fabric: the console script next to this interpreter (relative
    to the working directory when inside it, e.g. .venv/bin/fabric), else python -m fabric."""
    override = os.environ.get("FABRIC_CLI")
    if override:
        return override
    exe = Path(sys.executable).parent / "fabric"
    if not exe.exists():
        return f"{shlex.quote(sys.executable)} -m fabric"
    try:
        rel = str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)
    return rel if "/" in rel else f"./{rel}"


class _Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", flush=True)


class ClusterTopology(Topology):
    """Namespaces for a compose project: one per group, one bridge namespace per network."""

    def __init__(self, project: Project, prefix: str | None = None, keep_workdir: bool = False,
                 client_ns: list[str] | None = None) -> None:
        super().__init__(clients=1, prefix=prefix, keep_workdir=keep_workdir)
        self.project = project
        self.ns_of: dict[str, str] = {}  # instance -> namespace
        self.addresses: dict[tuple[str, str], str] = {}  # (group, network) -> address
        self.volume_dirs: dict[str, Path] = {}
        # empty namespaces on the edges' network, for clients of the user's own (--client-ns)
        self.client_groups = list(client_ns or [])
        self.client_net = client_network(project)
        for name in self.client_groups:
            if name in project.groups() or name.startswith("net-"):
                raise TopologyError(f"--client-ns {name}: a service of {project.path.name} has that namespace; "
                                    "pick another name")

    def ns_name(self, group: str) -> str:
        return f"{self.prefix}-{group}"

    def setup(self, step: _Progress | None = None) -> None:  # type: ignore[override]
        if os.geteuid() != 0:
            raise TopologyError("network namespaces need root: run it with sudo")
        import tempfile

        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir()
        for v in self.project.volumes:
            d = self.workdir / "volumes" / v
            d.mkdir(parents=True, mode=0o700)
            self.volume_dirs[v] = d
        groups = self.project.groups()
        say = step or (lambda _m: None)
        say(f"creating {len(groups)} network namespaces {self.prefix}-{{{','.join(groups)}}}...")
        for group, members in groups.items():
            ns = self.ns_name(group)
            self._add_ns(ns)
            for inst in members:
                self.ns_of[inst] = ns
        for name in self.client_groups:
            say(f"creating namespace {self.ns_name(name)} for a client of your own...")
            self._add_ns(self.ns_name(name))
        for k, net in enumerate(self.project.networks.values()):
            bns = self.ns_name(f"net-{net.name}")
            say(f"creating network {net.name} {net.subnet} (bridge in {bns})...")
            self._add_ns(bns)
            gw = next(net.subnet.hosts())
            self.run(bns, ["ip", "link", "add", "br0", "type", "bridge"])
            self.run(bns, ["ip", "addr", "add", f"{gw}/{net.subnet.prefixlen}", "dev", "br0"])
            self.run(bns, ["ip", "link", "set", "br0", "up"])
            attached = [g for g in groups if net.name in self._service_of(g).networks]
            static = {self._service_of(g).networks[net.name] for g in attached}
            free = (str(h) for h in net.subnet.hosts() if h != gw and str(h) not in static)
            if net.name == self.client_net:
                attached += self.client_groups
            for j, g in enumerate(attached):
                addr = (None if g in self.client_groups else self._service_of(g).networks[net.name]) or next(free)
                self.addresses[(g, net.name)] = addr
                gns = self.ns_name(g)
                eth = f"eth{k}"
                self.run(None, ["ip", "link", "add", eth, "netns", gns, "type", "veth", "peer", "name", f"v{j}",
                                "netns", bns])
                self.run(bns, ["ip", "link", "set", f"v{j}", "master", "br0", "up"])
                self.run(gns, ["ip", "addr", "add", f"{addr}/{net.subnet.prefixlen}", "dev", eth])
                self.run(gns, ["ip", "link", "set", eth, "up"])

    def close(self) -> None:
        """Also ends what the user started in the client namespaces (wg-quick's wireguard-go)."""
        if self._closed:
            return
        from fabric.testbed.testnet import WG_RUN_DIR

        ifnames: list[str] = []
        for name in self.client_groups:
            ns = self.ns_name(name)
            if ns not in self._created:
                continue
            cp = self.run(ns, ["ip", "-o", "link", "show"], check=False)
            ifnames += [m for m in re.findall(r"^\d+: ([^:@]+)", cp.stdout, re.M) if m != "lo" and not m.startswith("eth")]
            cp = self.run(None, ["ip", "netns", "pids", ns], check=False)
            pids = [int(x) for x in cp.stdout.split() if x.isdigit()]
            for pid in pids:  # politely first: wireguard-go removes its UAPI socket on SIGTERM
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 3.0
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
                time.sleep(0.05)
        super().close()  # SIGKILLs whatever is left in every namespace, then deletes them
        for ifname in ifnames:
            with contextlib.suppress(OSError):
                (WG_RUN_DIR / f"{ifname}.sock").unlink()

    def _service_of(self, instance: str) -> Service:
        svcs = self.project.services
        if instance in svcs:
            return svcs[instance]
        return svcs[instance.rsplit("-", 1)[0]]

    def _add_ns(self, ns: str) -> None:
        cp = self.run(None, ["ip", "netns", "add", ns], check=False)
        if cp.returncode != 0:
            raise TopologyError(f"cannot create namespace {ns}: {cp.stderr.strip()}")
        self._created.append(ns)
        self.run(ns, ["ip", "link", "set", "lo", "up"])

    # paths -----------------------------------------------------------------
    def map_path(self, svc: Service, value: str) -> str:
        """A container path inside one of svc's volumes -> the directory here."""
        m = svc.mount_of(value)
        if m is None or not value.startswith("/"):
            return value
        base = str(self.volume_dirs[m.source]) if m.named else m.source
        return base + value[len(m.target):]

    def map_arg(self, svc: Service, arg: str) -> str:
        if arg.startswith("--") and "=" in arg:
            opt, val = arg.split("=", 1)
            return f"{opt}={self.map_path(svc, val)}"
        return self.map_path(svc, arg)

    def argv_of(self, svc: Service, argv: list[str]) -> list[str]:
        out = [self.map_arg(svc, a) for a in argv]
        if Path(out[0]).name == "fabric":
            out = fabric_argv(*out[1:])
        return ["sh", "-c", _PRIVATE_RUN, "sh", *out]

    def env_of(self, svc: Service) -> dict[str, str]:
        env = fabric_env()
        env.pop("FABRIC_STATE_DIR", None)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
        env.update({k: self.map_path(svc, v) for k, v in svc.environment.items()})
        return env

    def state_dir_of(self, svc: Service) -> Path:
        return Path(self.map_path(svc, svc.state_dir()))


@dataclass
class _Instance:
    name: str
    service: Service
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0


class Cluster:
    """A compose project running as processes in namespaces."""

    def __init__(self, project: Project, prefix: str | None = None, keep_logs: bool = False,
                 step: _Progress | None = None, client_ns: list[str] | None = None) -> None:
        self.project = project
        self.topo = ClusterTopology(project, prefix=prefix, keep_workdir=keep_logs, client_ns=client_ns)
        self.step = step or _Progress()
        self.instances: dict[str, _Instance] = {}
        self._ready: set[tuple[str, str]] = set()  # (service, condition) met
        self.broker = next(s for s in project.services.values() if s.role == "broker")

    def up(self, timeout: float = 60.0) -> None:
        self.topo.setup(self.step)
        sd = self.topo.state_dir_of(self.broker)
        self.topo.cleanup_paths.append(str(StateDir.at(sd).session_table))
        for name in self.project.order:
            svc = self.project.services[name]
            for dep, cond in svc.depends_on.items():
                self._wait_for(self.project.services[dep], cond, timeout, waiter=name)
            ns = self.topo.ns_of[svc.instances()[0]]
            n = f"{svc.replicas} x " if svc.replicas > 1 else ""
            self.step(f"starting {name} ({n}{_short(svc.command)}) in {ns}...")
            for inst in svc.instances():
                self.instances[inst] = _Instance(inst, svc)
                self._start(self.instances[inst])
        # a process that dies at once fails the start, not later
        time.sleep(0.5)
        for started in self.instances.values():
            self._check_started(started)

    def _start(self, inst: _Instance) -> None:
        svc = inst.service
        inst.proc = self.topo.popen(self.topo.ns_of[inst.name], self.topo.argv_of(svc, svc.command),
                                    env=self.topo.env_of(svc), label=inst.name,
                                    log_path=self.topo.log_dir / f"{inst.name}.log")

    def _check_started(self, inst: _Instance) -> None:
        if inst.proc is not None and inst.proc.poll() not in (None, 0):
            raise TopologyError(f"service {inst.name} exited at start (rc={inst.proc.returncode}): "
                                f"{self._last_line(inst)}")

    def _last_line(self, inst: _Instance) -> str:
        if inst.proc is None:
            return ""
        from fabric.testbed.testnet import tail

        lines = [ln for ln in tail(self.topo.log_path(inst.proc), 20).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def _wait_for(self, dep: Service, cond: str, timeout: float, waiter: str) -> None:
        if (dep.name, cond) not in self._ready:
            self._wait_once(dep, cond, timeout, waiter)
            self._ready.add((dep.name, cond))

    def _wait_once(self, dep: Service, cond: str, timeout: float, waiter: str) -> None:
        insts = [self.instances[i] for i in dep.instances()]
        if cond == "service_started":
            return
        if cond == "service_completed_successfully":
            self.step(f"waiting for {dep.name} to complete (for {waiter})...")
            deadline = time.monotonic() + timeout
            for inst in insts:
                assert inst.proc is not None
                try:
                    rc = inst.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise TopologyError(f"service {dep.name} did not complete within {timeout:g}s "
                                        f"(needed by {waiter}): {self._last_line(inst)}") from None
                if rc != 0:
                    raise TopologyError(f"service {dep.name} exited with {rc} (needed by {waiter}): "
                                        f"{self._last_line(inst)}")
            return
        hc = dep.healthcheck
        if hc is None:
            raise TopologyError(f"{self.project.path.name}: services.{waiter}.depends_on.{dep.name}: "
                                f"service_healthy needs a healthcheck on {dep.name}; add one or use service_started")
        self.step(f"waiting for {dep.name} to be healthy ({shlex.join(hc.argv)})...")
        limit = max(timeout, hc.start_period + hc.interval * hc.retries)
        deadline = time.monotonic() + limit
        poll = min(hc.interval, 1.0)
        for inst in insts:
            while True:
                assert inst.proc is not None
                if inst.proc.poll() is not None:
                    raise TopologyError(f"service {inst.name} exited (rc={inst.proc.returncode}) before it was "
                                        f"healthy: {self._last_line(inst)}")
                cp = self.topo.run(self.topo.ns_of[inst.name], self.topo.argv_of(dep, hc.argv), check=False,
                                   timeout=30, env=self.topo.env_of(dep))
                if cp.returncode == 0:
                    break
                if time.monotonic() >= deadline:
                    out = (cp.stderr or cp.stdout).strip().splitlines()
                    raise TopologyError(f"service {inst.name} not healthy after {limit:g}s: "
                                        f"{out[-1] if out else 'healthcheck failed'}")
                time.sleep(poll)

    def supervise(self, stop: list[bool], duration: float | None = None) -> None:
        end = None if duration is None else time.monotonic() + duration
        while not stop[0] and (end is None or time.monotonic() < end):
            now = time.monotonic()
            for inst in self.instances.values():
                p = inst.proc
                if p is None or p.poll() is None:
                    continue
                policy = inst.service.restart
                wants = policy in ("always", "unless-stopped") or (policy.startswith("on-failure") and p.returncode)
                if not wants:
                    if inst.next_start == 0.0:
                        inst.next_start = -1.0  # reported once
                        self.step(f"{inst.name} exited ({p.returncode})")
                    continue
                if inst.next_start <= 0.0:
                    inst.next_start = now + 1.0
                    self.step(f"{inst.name} exited ({p.returncode}): {self._last_line(inst)}; restarting")
                elif now >= inst.next_start:
                    inst.next_start = 0.0
                    inst.restarts += 1
                    self._start(inst)
            time.sleep(0.2)

    # what the user reaches ---------------------------------------------------
    def metrics_endpoints(self) -> list[tuple[str, str, str]]:
        """(instance, its namespace, HOST:PORT to scrape from inside it) for every `--metrics` of the file."""
        from fabric.ops.metrics import format_address, parse_address

        out = []
        for name in self.project.order:
            svc = self.project.services[name]
            addr = _arg(svc.command, "--metrics") if svc.role != "other" else None
            if not addr:
                continue
            host, port = parse_address(addr, f"services.{name}.command --metrics")
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"
            for inst in svc.instances():
                out.append((inst, self.topo.ns_of[inst], format_address(host, port)))
        return out

    def scrape(self, ns: str, address: str) -> dict[str, float]:
        """GET /metrics from inside `ns`; {sample name: value summed over its label sets}."""
        from prometheus_client.parser import text_string_to_metric_families

        cp = self.topo.run(ns, [sys.executable, "-c", _SCRAPE, address], check=False, timeout=20)
        if cp.returncode != 0:
            lines = cp.stderr.strip().splitlines()
            raise TopologyError(f"http://{address}/metrics in {ns}: {lines[-1] if lines else 'no answer'}")
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(cp.stdout):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0.0) + float(s.value)
        return out

    def server_tunnel_ip(self) -> str | None:
        addr = _arg(self.broker.command, "--address")
        return addr.split("/")[0] if addr else None

    def client_endpoint(self) -> str | None:
        """The edges' UDP endpoint on the client network, as a client dials it."""
        edges = [s for s in self.project.services.values() if s.role == "edge"]
        net = self.topo.client_net
        if not edges or net is None:
            return None
        addr = self.topo.addresses.get((self.project.netns_owner(edges[0].name), net))
        port = _arg(edges[0].command, "--listen-port") or "51820"
        return f"{addr}:{port}" if addr else None

    def next_steps(self) -> list[str]:
        """The commands a newcomer runs next against this very run (paths and namespaces filled in)."""
        fab = f"sudo {_fabric_command()}"
        sd = shlex.quote(str(self.topo.state_dir_of(self.broker)))
        steps: list[tuple[str, str]] = [(f"{fab} status --state-dir {sd}", "processes, health, load, sessions")]
        endpoint = self.client_endpoint()
        server_ip = self.server_tunnel_ip()
        for name in self.topo.client_groups:
            ns = self.topo.ns_name(name)
            where = self.topo.addresses.get((name, self.topo.client_net or ""), "")
            steps.append((f"{fab} peer add {name} --state-dir {sd}"
                          + (f" --endpoint {endpoint}" if endpoint else "") + f" -o {name}.conf", "a new peer"))
            steps.append((f"sudo ip netns exec {ns} wg-quick up ./{name}.conf",
                          f"its client, in {ns} ({where})"))
            if server_ip:
                steps.append((f"sudo ip netns exec {ns} ping -c 3 {server_ip}", "through the tunnel"))
        if not self.topo.client_groups:
            steps.append(("", "--client-ns NAME adds a namespace on the underlay for a client of your own"))
        for inst, ns, addr in self.metrics_endpoints():
            steps.append((f"sudo ip netns exec {ns} curl -s http://{addr}/metrics", inst))
        steps.append(("sudo ip netns exec NAMESPACE sh", "a shell beside a service: "
                      + ", ".join(self.topo.ns_name(g) for g in self.project.groups())))
        return [f"  {cmd}   # {why}" if cmd else f"  # {why}" for cmd, why in steps]

    def check(self, timeout: float = 30.0, metrics_wait: float = 10.0) -> bool:
        """Ping each label's address from its service's namespace; scrape every metrics endpoint
        for the sessions that made; fail for a process that exited with an error; show `fabric status`."""
        targets = [(s, s.labels[CHECK_LABEL]) for s in self.project.services.values() if CHECK_LABEL in s.labels]
        if not targets:
            raise TopologyError(f"--check: no service has the label {CHECK_LABEL}=ADDRESS; add it to the client")
        ok = True
        for svc, addr in targets:
            ns = self.topo.ns_of[svc.instances()[0]]
            self.step(f"check: ping {addr} from {svc.name} ({ns}) through the tunnel...")
            first = self.topo.wait_ping(ns, addr, timeout=timeout)
            res = self.topo.ping(ns, addr, count=5) if first.ok else first
            good = res.all_ok if first.ok else False
            ok = ok and good
            self.step(f"check: {svc.name} -> {addr}: {res.received}/{res.transmitted} replies"
                      + (f", avg RTT {res.rtt_avg_ms:.3f} ms" if res.rtt_avg_ms is not None else "")
                      + ("" if good else "  FAILED"))
        for inst, ns, addr in self.metrics_endpoints():
            # the session the ping made: the broker committed it, every edge and worker holds it
            deadline = time.monotonic() + metrics_wait
            while True:
                try:
                    sessions: float | None = self.scrape(ns, addr).get("fabric_sessions")
                    err = "" if sessions is not None else "no fabric_sessions sample"
                except TopologyError as exc:
                    sessions, err = None, str(exc)
                if (sessions or 0) >= 1 or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            good = sessions is not None and sessions >= 1
            ok = ok and good
            self.step(f"check: metrics {inst} http://{addr}/metrics (in {ns}): "
                      + (f"fabric_sessions {sessions:g}" if sessions is not None else err)
                      + ("" if good else "  FAILED: expected at least 1 session"))
        for started in self.instances.values():
            # a client whose own script gave up (e.g. no tunnel) fails the check, even though
            # the pings above, run beside it, may have worked
            rc = started.proc.poll() if started.proc is not None else None
            if rc not in (None, 0):
                ok = False
                self.step(f"check: {started.name} exited ({rc}): {self._last_line(started)}  FAILED")
        sd = str(self.topo.state_dir_of(self.broker))
        self.step("fabric status")
        cp = self.topo.run(None, fabric_argv("status", "--state-dir", sd), check=False,
                           env=self.topo.env_of(self.broker))
        print((cp.stdout + cp.stderr).rstrip(), flush=True)
        if cp.returncode != 0:
            self.step(f"check: fabric status exited {cp.returncode}  FAILED")
        return ok and cp.returncode == 0

    def failures(self) -> str:
        return self.topo.log_tails(15)

    def close(self) -> None:
        self.topo.close()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cluster_action", metavar="ACTION")
    sub.required = True
    up = sub.add_parser("up", help="run the compose file's services as processes in network namespaces")
    up.add_argument("file", nargs="?", default="compose.yaml", help="compose file (default compose.yaml)")
    up.add_argument("--check", action="store_true",
                    help=f"bring it up, ping from services labelled {CHECK_LABEL}, print the result, tear down")
    up.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C/SIGTERM)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each start condition (default 60)")
    up.add_argument("--prefix", help="namespace name prefix (default fab + 6 random hex digits)")
    up.add_argument("--keep-logs", action="store_true", help="keep the work directory with every process log")
    up.add_argument("--client-ns", action="append", default=[], metavar="NAME",
                    help="also create namespace PREFIX-NAME on the edges' network, empty, for a client of your "
                         "own (e.g. wg-quick up NAME.conf there); repeatable; removed with the cluster")
    ck = sub.add_parser("check", help="validate a compose file for the fabric and show its topology")
    ck.add_argument("file", nargs="?", default="compose.yaml", help="compose file (default compose.yaml)")


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    project = load(args.file)
    if args.cluster_action == "check":
        print(project.summary())
        return 0
    if os.geteuid() != 0:
        raise RuntimeError("fabric cluster up needs root (network namespaces, TUN devices): run it with sudo")
    if not os.path.exists("/dev/net/tun"):
        raise RuntimeError("/dev/net/tun is missing: load the tun module (modprobe tun)")
    svcs = project.services.values()
    tools = ["ip", "ping"] + (["wireguard-go", "wg"] if any(runs(s, "wireguard-go") for s in svcs) else []) + (
        ["openvpn"] if any(runs(s, "openvpn") for s in svcs) else [])
    missing = missing_tools(tools)
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run scripts/setup.sh (apt-get install wireguard-go "
                           "wireguard-tools openvpn iproute2 iputils-ping)")
    if args.prefix and not re.fullmatch(r"[a-z][a-z0-9]{1,9}", args.prefix):
        raise ConfigError(f"--prefix {args.prefix!r}: use 2 to 10 lowercase letters and digits, e.g. {new_prefix()}")
    for name in args.client_ns:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):
            raise ConfigError(f"--client-ns {name!r}: use 1 to 12 lowercase letters and digits, e.g. laptop "
                              "(it also names the client's interface)")
    if args.client_ns and client_network(project) is None:
        raise ConfigError(f"--client-ns: {project.path.name} declares no network to attach a client to; add one")
    step = _Progress()
    try:
        cluster = Cluster(project, prefix=args.prefix, keep_logs=args.keep_logs, step=step,
                          client_ns=list(dict.fromkeys(args.client_ns)))
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    stop = [False]
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    rc = 0
    try:
        cluster.up(timeout=args.timeout)
        n = len(cluster.instances)
        if args.check:
            rc = 0 if cluster.check() else 1
            step("check " + ("passed" if rc == 0 else "FAILED"))
        else:
            try:  # from here on, Ctrl-C or SIGTERM is the way to stop it
                step(f"cluster up: {n} processes in {len(project.groups())} namespaces; "
                     f"logs in {cluster.topo.log_dir}")
                print("next, in another terminal:", flush=True)
                print("\n".join(cluster.next_steps()), flush=True)
                step(f"ready; Ctrl-C (or kill -TERM {os.getpid()}) stops it and removes everything")
                cluster.supervise(stop, args.duration)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the way to stop it
                step("stopping...")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        rc = 130
    except (TopologyError, subprocess.TimeoutExpired) as exc:
        if args.keep_logs or log._log.isEnabledFor(20):
            print(cluster.failures(), file=sys.stderr)
        print(f"fabric: error: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            step(f"tearing down ({len(cluster.instances)} processes, {len(cluster.topo._created)} namespaces)...")
            cluster.close()
            if args.keep_logs and cluster.topo.workdir != Path():
                print(f"logs kept in {cluster.topo.workdir}", flush=True)
            step("stopped")
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, old_term)
    return rc
