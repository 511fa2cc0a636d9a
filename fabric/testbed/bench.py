"""``fabric bench``: fabric against its anchors, measured in one run.

Measures ``--rounds`` rounds (default 3); in each, every system in turn (the order
rotated from round to round) gets throwaway network namespaces
(``fabric.testnet``: a server namespace and one client namespace joined by a veth
pair, underlay 198.18.1.0/24), is measured and torn down again. Each test reports
its median round: neighbours on a shared VM move single runs by 10-30% within
minutes, and systems measured once, one after the other, would each get a
different spell of it. (Systems are not left up while others are measured: with
five idle systems beside it, a fabric download fell from 395-445 to 328 Mbit/s
in one comparison here, their timers and wakeups competing.) The systems:

* ``wg``: a wireguard-go client to a wireguard-go server (tunnel 198.19.200.0/24);
* ``ovpn``: an OpenVPN 2.6 client to an OpenVPN server (userspace, one process,
  UDP, AES-256-GCM, ``--disable-dco``; certificates made with openssl in a
  temporary directory; tunnel 198.19.150.0/24);
* ``wg25``: the same pair with the current wireguard-go release (0.0.20250522,
  with UDP GSO/GRO and TUN offloads), a static build given with ``--wg25 PATH``;
* ``fabric``: a wireguard-go client (``--client wg25|wg22``: the current release,
  or Debian's 0.0.20220316) to ``fabric up`` (``--edges``/``--workers``; tunnel
  198.19.100.0/24). Every run's JSON names the client it used;
* ``fabric-ovpn``: ``fabric up --openvpn-port 1194`` and the client of ``ovpn``
  (Debian's openvpn 2.6, ``--data-ciphers AES-256-GCM --disable-dco``) with the
  inline profile of ``fabric peer add NAME --openvpn``, unchanged.

WireGuard rows are compared with ``wg``, OpenVPN rows with ``ovpn`` (the xREF
columns; REF names the anchor). The stock OpenVPN client is single-threaded and
shares the two cores with the server, so it caps every OpenVPN server's
throughput: there the server's CPU seconds per GB is the figure to compare.

For every system: the idle ping RTT (average of ``--pings`` echo requests),
then iperf3 TCP with 1 and 4 streams in both directions (client -> server,
and ``-R``), and small-packet UDP (``-u -l 64 -b 200M``) both ways, reporting
the packets per second that arrived and the loss. ``--tests clients4`` (OpenVPN
systems only, not in the default set) adds four clients, each in a namespace of its
own with one TCP stream, at once, both ways: their sum. Around every iperf3 run the
CPU time (utime + stime from /proc/<pid>/stat) of the server's processes is
read: the wireguard-go server, the openvpn server, and for the fabric every
process of ``fabric up`` summed per role (edge, worker, broker, and ``up``, the supervisor).
That gives server CPU seconds per GB of payload that arrived. HOST% is how busy
the VM's CPUs were during the run, STEAL% how much of their time the hypervisor
gave to other guests (a slow spell of the host shows there).

Flood tests (``--tests flood`` or ``floods`` for all six kinds; not in the default
set) measure an iperf3 TCP upload while one attacker process in a second client
namespace sends ``--flood-rate`` datagrams a second of one kind from 64 ports
(``fabric.flood``): once at a closed port of the server (the ceiling: what the
stream keeps when the server does nothing for the flood) and once at the server's
port; the share of the ceiling is the figure. During the second, a new client in
a third namespace starts and must ping the server within 15 s (whitepaper 5.4.7:
a cookie reply, then mac2). WireGuard floods: not run against the OpenVPN systems
(a note says so).

``--scaling`` adds fabric runs with 1 edge / 1 worker and 2 / 2, and the fabric
pinned to one core and to two (``taskset -c`` on ``fabric up``, inherited by
its children; the clients are not pinned).

Prints progress, then a table with ratios to the anchors (Mbit/s and
CPU-s/GB), and writes ``{"runs": [...]}`` with ``--json FILE``. Only namespaces
created by the run and 198.18.0.0/15 are used; every process is killed and the
namespaces are removed on the way out, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from fabric.dataplane.placement import CRYPTO_MODES
from fabric.testbed.ovpnclient import OvpnClient
from fabric.testbed.testnet import (
    FabricCluster,
    IperfError,
    Topology,
    TopologyError,
    WgClient,
    WgConfig,
    client_config,
    fabric_env,
    gen_keypair,
    iperf3,
    missing_tools,
    parse_iperf,
    start_wg_server,
    tail,
)

SYSTEMS = ("wg", "wg25", "ovpn", "fabric", "fabric-ovpn")
DEFAULT_SYSTEMS = ("wg", "ovpn", "fabric")  # wg25 needs a binary Debian does not ship
_ALIASES = {
    "wg": "wg", "wireguard": "wg", "wireguard-go": "wg", "wg22": "wg",
    "wg25": "wg25",
    "ovpn": "ovpn", "openvpn": "ovpn",
    "fabric": "fabric",
    "fabric-ovpn": "fabric-ovpn", "fabric-openvpn": "fabric-ovpn",
}
LABELS = {"wg": "wireguard-go 0.0.20220316 (Debian)", "wg25": "wireguard-go 0.0.20250522",
          "ovpn": "OpenVPN 2.6 (one process, UDP, --disable-dco)", "fabric": "fabric up",
          "fabric-ovpn": "fabric up --openvpn-port"}
WG25_NAME = "wireguard-go-0.0.20250522"
CLIENTS = {"wg22": "Debian's wireguard-go 0.0.20220316", "wg25": "wireguard-go 0.0.20250522"}
# the OpenVPN systems' client: the same for the anchor and the fabric
OVPN_CLIENT = "openvpn"
OVPN_CLIENT_LABEL = "Debian's openvpn 2.6 (AES-256-GCM, --disable-dco)"
# each protocol's systems, and the anchor its rows are compared with (the xREF columns)
OPENVPN_KINDS = ("ovpn", "fabric-ovpn")
FABRIC_KINDS = ("fabric", "fabric-ovpn")
ANCHORS = {"wireguard": "wg", "openvpn": "ovpn"}

WG_ADDRESS = "198.19.200.1/24"
WG_CLIENT = "198.19.200.2"
OVPN_NET = "198.19.150.0"
OVPN_SERVER = "198.19.150.1"
OVPN_PORT = 1194
OVPN_CIPHER = "AES-256-GCM"
FABRIC_ADDRESS = "198.19.100.1/24"
LISTEN_PORT = 51820
IPERF_PORT = 5201
UDP_LEN = 64
UDP_RATE = "200M"
SETTLE = 0.5  # seconds between two iperf3 runs (queues drain)
CLOSED_PORT = 51999  # nothing listens there: the flood's ceiling
FLOOD_RATE = 120000.0
FLOOD_LEAD = 1.5  # seconds of flood before the stream starts
NEWCOMER_TIMEOUT = 15.0  # a new client must ping within this while the flood runs

# tools every system needs, and each system's own (with the package to install)
COMMON_TOOLS = {"ip": "iproute2", "ss": "iproute2", "ping": "iputils-ping", "iperf3": "iperf3"}
SYSTEM_TOOLS = {
    "wg": {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"},
    "wg25": {"wg": "wireguard-tools"},
    "ovpn": {"openvpn": "openvpn", "openssl": "openssl"},
    "fabric": {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"},
    "fabric-ovpn": {"openvpn": "openvpn"},
}


@dataclass(frozen=True)
class TestSpec:
    name: str
    parallel: int = 1
    reverse: bool = False
    udp: bool = False
    flood: str | None = None  # a fabric.flood kind: the stream under that flood
    clients: int = 1  # >1: that many clients, one stream each, at once (their sum reported)

    def iperf_extra(self) -> list[str]:
        return ["-u", "-l", str(UDP_LEN), "-b", UDP_RATE] if self.udp else []

    def describe(self) -> str:
        way = "server -> client (-R)" if self.reverse else "client -> server"
        if self.flood:
            return (f"TCP 1 stream, {way}, under a flood of {self.flood} datagrams (one process, "
                    "64 ports), against the same flood at a closed port; a new client meanwhile")
        if self.udp:
            return f"UDP {UDP_LEN} B at {UDP_RATE}, {way}"
        if self.clients > 1:
            return (f"TCP, {self.clients} clients (each its own namespace and tunnel) with one stream "
                    f"each at once, {way}; the sum")
        return f"TCP {self.parallel} stream{'s' if self.parallel > 1 else ''}, {way}"


TESTS: tuple[TestSpec, ...] = (
    TestSpec("tcp1-up", 1, False),
    TestSpec("tcp4-up", 4, False),
    TestSpec("tcp1-down", 1, True),
    TestSpec("tcp4-down", 4, True),
    TestSpec("udp64-up", 1, False, udp=True),
    TestSpec("udp64-down", 1, True, udp=True),
)
FLOOD_TESTS: tuple[TestSpec, ...] = (
    TestSpec("flood", flood="initiation"),  # valid mac1: the costly one
    TestSpec("flood-bad-mac1", flood="bad-mac1"),
    TestSpec("flood-unknown-index", flood="unknown-index"),
    TestSpec("flood-random", flood="random"),
    TestSpec("flood-short", flood="short"),
    TestSpec("flood-oversized", flood="oversized"),
)
# OpenVPN's client is one single-threaded process: several of them are what shows
# whether the server spreads (OpenVPN systems only; not in the default set)
MULTI_CLIENT_TESTS: tuple[TestSpec, ...] = (
    TestSpec("clients4-up", 1, False, clients=4),
    TestSpec("clients4-down", 1, True, clients=4),
)
ALL_TESTS = TESTS + MULTI_CLIENT_TESTS + FLOOD_TESTS


@dataclass(frozen=True)
class SystemSpec:
    """One thing to measure: a system and, for the fabric, its shape."""

    name: str  # the "system" of the JSON runs: wg, wg25, ovpn, fabric, fabric-1e1w, fabric-1cpu ...
    kind: str  # wg | wg25 | ovpn | fabric | fabric-ovpn
    edges: int = 0
    workers: int = 0
    cpus: str | None = None  # taskset -c list for fabric up
    crypto: str | None = None  # fabric up --crypto (None: its default, auto)
    client: str = "wg22"  # the wireguard-go the client runs (wg | fabric): CLIENTS; OVPN_CLIENT
    binary: str = "wireguard-go"  # that client's executable (and wg25's server)
    source: str | None = None  # fabric: run this checkout's code instead of this one's (--baseline)

    @property
    def vpn(self) -> str:
        """The protocol its client speaks: "openvpn" or "wireguard"."""
        return "openvpn" if self.kind in OPENVPN_KINDS else "wireguard"

    @property
    def anchor(self) -> str:
        """The system its rows are compared with (ANCHORS)."""
        return ANCHORS[self.vpn]

    def client_label(self) -> str:
        return OVPN_CLIENT_LABEL if self.client == OVPN_CLIENT else CLIENTS.get(self.client, self.client)

    def describe(self) -> str:
        if self.kind == "ovpn":
            return f"{LABELS[self.kind]}, client {self.client_label()}"
        if self.kind not in FABRIC_KINDS:
            return LABELS[self.kind]
        pin = f", pinned to CPU {self.cpus}" if self.cpus is not None else ""
        where = f", crypto in {self.crypto}" if self.crypto else ""
        code = f", the code in {self.source}" if self.source else ""
        return (f"{LABELS[self.kind]} ({self.edges} edges, {self.workers} workers{where}{pin}{code}), "
                f"client {self.client_label()}")


def skip_reason(spec: SystemSpec, test: TestSpec) -> str | None:
    """Why `test` is not run for `spec`, or None if it is."""
    if test.flood and spec.vpn == "openvpn":
        return "the flood tests forge WireGuard messages: WireGuard systems only"
    if test.clients > 1 and spec.vpn != "openvpn":
        return (f"the {test.clients}-client tests start OpenVPN clients: OpenVPN systems only "
                f"({', '.join(OPENVPN_KINDS)})")
    return None


def clients_needed(spec: SystemSpec, tests: Sequence[TestSpec]) -> int:
    """Client namespaces a system needs for `tests`: flood tests an attacker in 2
    and a newcomer in 3; multi-client tests one per client."""
    n = 1
    for t in tests:
        if skip_reason(spec, t):
            continue
        n = max(n, 3 if t.flood else t.clients)
    return n


def skip_notes(specs: Sequence[SystemSpec], tests: Sequence[TestSpec]) -> list[str]:
    """One line per test some of the systems leave out, and why."""
    notes = []
    for t in tests:
        left = [sp.name for sp in specs if skip_reason(sp, t)]
        if left:
            reason = next(r for sp in specs if (r := skip_reason(sp, t)))
            notes.append(f"{t.name}: not run for {', '.join(left)} ({reason})")
    return notes


# --------------------------------------------------------------------------- arguments


def _parse_list(text: str, names: dict[str, str], what: str, choices: Sequence[str], example: str) -> set[str]:
    """The canonical names (`names` maps every accepted spelling to one) of a
    comma-separated list; argparse errors that name the choices."""
    want: set[str] = set()
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        if p not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {part.strip()!r}; choose from {', '.join(choices)}")
        want.add(names[p])
    if not want:
        raise argparse.ArgumentTypeError(f"no {what} given; e.g. {example}")
    return want


def parse_systems(text: str) -> list[str]:
    """``wg,ovpn,fabric`` (aliases wireguard-go, openvpn) -> canonical names, in
    the canonical order, without duplicates."""
    want = _parse_list(text, _ALIASES, "system", SYSTEMS, "--systems wg,ovpn,fabric")
    return [s for s in SYSTEMS if s in want]


def parse_tests(text: str) -> list[TestSpec]:
    """``tcp1-up,tcp1-down`` -> those of ALL_TESTS, in their order, without duplicates;
    ``floods`` stands for every flood test, ``clients4`` for both 4-client tests."""
    names = [t.name for t in ALL_TESTS]
    spell = {n: n for n in names}
    spell["floods"] = "floods"
    spell["clients4"] = "clients4"
    want = _parse_list(text, spell, "test", [*names, "floods", "clients4"], "--tests tcp1-up,tcp1-down")
    if "floods" in want:
        want |= {t.name for t in FLOOD_TESTS}
    if "clients4" in want:
        want |= {t.name for t in MULTI_CLIENT_TESTS}
    return [t for t in ALL_TESTS if t.name in want]


def parse_client(text: str) -> str:
    c = text.strip().lower()
    if c not in CLIENTS:
        raise argparse.ArgumentTypeError(f"unknown client {text!r}; choose from {', '.join(CLIENTS)}")
    return c


def find_wg25(given: str | None) -> tuple[str | None, str]:
    """The wireguard-go 0.0.20250522 executable: ``--wg25``, $FABRIC_WG25, or
    wireguard-go-0.0.20250522 on PATH; (path or None, where it looked)."""
    looked = []
    for where, cand in (("--wg25", given), ("$FABRIC_WG25", os.environ.get("FABRIC_WG25"))):
        if cand:
            looked.append(f"{where} {cand}")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return str(Path(cand).resolve()), ""
    found = shutil.which(WG25_NAME)
    if found:
        return found, ""
    looked.append(f"{WG25_NAME} on PATH")
    return None, ", ".join(looked)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError(f"{v:g} is out of range; use (0, 3600]")
    return v


def _baseline(path: str | None) -> str | None:
    """--baseline DIR: a checkout with a fabric/ package in it (absolute path)."""
    if not path:
        return None
    root = Path(path).resolve()
    if not (root / "fabric" / "__main__.py").is_file():
        raise SystemExit(f"fabric bench: --baseline {path}: no fabric/ package there "
                         "(give a checkout, e.g. `git worktree add /tmp/base <commit>`)")
    return str(root)


def _positive_rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{v:g} is out of range; use (0, 1000000]")
    return v


def _small_count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= v <= 64:
        raise argparse.ArgumentTypeError(f"{v} is out of range; use 1 to 64")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=_positive_float, default=8.0,
                        help="duration of each iperf3 run (default 8)")
    parser.add_argument("--systems", type=parse_systems, default=list(DEFAULT_SYSTEMS),
                        help="comma-separated systems to measure: " + ",".join(SYSTEMS)
                             + " (default wg,ovpn,fabric; fabric-ovpn is fabric serving the "
                             "OpenVPN client of ovpn)")
    parser.add_argument("--tests", type=parse_tests, default=list(TESTS),
                        help="comma-separated tests to run: " + ",".join(t.name for t in ALL_TESTS)
                             + ", floods for every flood test (WireGuard systems), clients4 for both "
                             "4-client tests (OpenVPN systems) (default: " + ",".join(t.name for t in TESTS)
                             + ")")
    parser.add_argument("--client", type=parse_client, default=None,
                        help="the fabric's client: wg25 (wireguard-go 0.0.20250522, the default when "
                             "found) or wg22 (Debian's wireguard-go 0.0.20220316)")
    parser.add_argument("--wg25", metavar="PATH", default=None,
                        help=f"the {WG25_NAME} executable (default: $FABRIC_WG25, or {WG25_NAME} on PATH)")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="also measure the fabric of another checkout (e.g. a git worktree of an "
                             "earlier commit) as system fabric-base (and fabric-ovpn-base), in the same rounds")
    parser.add_argument("--flood-rate", type=_positive_rate, default=FLOOD_RATE,
                        help=f"datagrams per second of the flood tests (default {FLOOD_RATE:.0f})")
    parser.add_argument("--crypto", choices=CRYPTO_MODES, default=None,
                        help="fabric up --crypto for the 'fabric' system (default: fabric's own, auto)")
    parser.add_argument("--edges", type=_small_count, default=2,
                        help="fabric edge processes (default 2)")
    parser.add_argument("--workers", type=_small_count, default=2,
                        help="fabric worker processes (default 2)")
    parser.add_argument("--scaling", action="store_true",
                        help="also run the fabric with 1 edge/1 worker and 2/2, and pinned "
                             "(taskset) to one core and to two")
    parser.add_argument("--rounds", type=_small_count, default=3,
                        help="measure every test this many times, the systems taking turns, and "
                             "report the median round (default 3; this VM's neighbours make "
                             "single runs vary by 10-30%%)")
    parser.add_argument("--pings", type=_small_count, default=20,
                        help="echo requests for the idle RTT (default 20)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directories with all process logs")


def plan(systems: Sequence[str], edges: int, workers: int, scaling: bool,
         ncpu: int, crypto: str | None = None, client: str = "wg22", wg25: str | None = None,
         baseline: str | None = None) -> tuple[list[SystemSpec], list[str]]:
    """What to run, in order, and notes on what was left out. `client` is the
    fabric's client (CLIENTS), `wg25` the path of wireguard-go 0.0.20250522,
    `baseline` another checkout of fabric measured beside this one (fabric-base)."""
    specs: list[SystemSpec] = []
    notes: list[str] = []
    for s in systems:
        if s == "fabric":
            specs.append(SystemSpec("fabric", "fabric", edges, workers, crypto=crypto))
            if baseline:
                specs.append(SystemSpec("fabric-base", "fabric", edges, workers, crypto=crypto, source=baseline))
        elif s == "fabric-ovpn":
            specs.append(SystemSpec(s, s, edges, workers, crypto=crypto, client=OVPN_CLIENT, binary="openvpn"))
            if baseline:
                specs.append(SystemSpec("fabric-ovpn-base", s, edges, workers, crypto=crypto, client=OVPN_CLIENT,
                                        binary="openvpn", source=baseline))
        elif s == "ovpn":
            specs.append(SystemSpec(s, s, client=OVPN_CLIENT, binary="openvpn"))
        elif s == "wg25":
            specs.append(SystemSpec(s, s, client="wg25", binary=wg25 or WG25_NAME))
        else:
            specs.append(SystemSpec(s, s))
    if scaling and "fabric" in systems:
        for e, w in ((1, 1), (2, 2)):
            if (e, w) == (edges, workers):
                notes.append(f"scaling: {e} edge(s)/{w} worker(s) is the 'fabric' run")
            else:
                specs.append(SystemSpec(f"fabric-{e}e{w}w", "fabric", e, w))
        # the classic split: edges move packets, workers run every AEAD (the
        # component split of CPU-s/GB, and what the hand-off to workers costs)
        if crypto != "workers":
            specs.append(SystemSpec("fabric-workers", "fabric", edges, workers, crypto="workers"))
        specs.append(SystemSpec("fabric-1cpu", "fabric", edges, workers, cpus="0"))
        if ncpu >= 2:
            specs.append(SystemSpec("fabric-2cpu", "fabric", edges, workers, cpus="0,1"))
        else:
            notes.append("scaling: one CPU only, no two-core run")
    elif scaling:
        notes.append("--scaling needs the fabric in --systems")
    if baseline and "fabric" not in systems and "fabric-ovpn" not in systems:
        notes.append("--baseline needs the fabric (or fabric-ovpn) in --systems")
    binary = (wg25 or WG25_NAME) if client == "wg25" else "wireguard-go"
    specs = [replace(sp, client=client, binary=binary) if sp.kind == "fabric" else sp for sp in specs]
    return specs, notes


# --------------------------------------------------------------------------- /proc


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_proc_stat(text: str) -> tuple[int, float]:
    """(ppid, utime + stime in seconds) from the text of /proc/<pid>/stat.
    The command name is in parentheses and may hold spaces or ')'."""
    rest = text[text.rindex(")") + 1 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_stat(pid: int) -> tuple[int, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_proc_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in data.split(b"\0") if a]


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = proc_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    out: list[int] = []
    todo = [root]
    seen: set[int] = set()
    while todo and len(out) < 10_000:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


FABRIC_ROLES = {"broker": "broker", "edge": "edge", "worker": "worker", "up": "up"}
COMPONENT_ORDER = ("edge", "worker", "broker", "up")  # "up": the fabric up supervisor


def _component_key(name: str) -> tuple[int, str]:
    return (COMPONENT_ORDER.index(name) if name in COMPONENT_ORDER else len(COMPONENT_ORDER), name)


def fabric_role(argv: Sequence[str]) -> str | None:
    """The role of a fabric process from its command line (``python -m fabric
    [-v] edge ...``, ``fabric worker ...``); None if it is not a fabric process."""
    for i, tok in enumerate(argv):
        is_module = tok == "fabric" and i > 0 and argv[i - 1] == "-m"
        is_script = i <= 1 and os.path.basename(tok) == "fabric"
        if not (is_module or is_script):
            continue
        for sub in argv[i + 1 :]:
            if sub.startswith("-"):
                continue
            return FABRIC_ROLES.get(sub, "other")
        return "other"
    return None


def cpu_allowed(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


Sample = dict[int, tuple[str, float]]  # pid -> (component, cpu seconds)


def sample(pids: dict[int, str]) -> Sample:
    out: Sample = {}
    for pid, comp in pids.items():
        st = proc_stat(pid)
        if st is not None:
            out[pid] = (comp, st[1])
    return out


def cpu_delta(before: Sample, after: Sample) -> tuple[dict[str, float], list[int]]:
    """CPU seconds per component between two samples, and the pids that vanished
    (their time since ``before`` is lost). A process that appeared counts whole."""
    comp: dict[str, float] = {}
    for pid, (c, t1) in after.items():
        t0 = before[pid][1] if pid in before else 0.0
        comp[c] = comp.get(c, 0.0) + max(0.0, t1 - t0)
    for _pid, (c, _t) in before.items():
        comp.setdefault(c, 0.0)
    gone = sorted(set(before) - set(after))
    return comp, gone


def parse_host_stat(line: str) -> tuple[float, float, float]:
    """(busy, total, steal) jiffies from the "cpu" line of /proc/stat (user nice
    system idle iowait irq softirq steal ...; busy leaves out idle and iowait)."""
    vals = [float(x) for x in line.split()[1:9]]
    vals += [0.0] * (8 - len(vals))
    total = sum(vals)
    return total - vals[3] - vals[4], total, vals[7]


def host_cpu() -> tuple[float, float, float]:
    """(busy, total, steal) jiffies of all CPUs now."""
    try:
        with open("/proc/stat") as f:
            return parse_host_stat(f.readline())
    except (OSError, ValueError):
        return 0.0, 0.0, 0.0


def parse_udp_rcvbuf_errors(text: str) -> int | None:
    """UDP datagrams dropped for a full socket receive buffer, IPv4 + IPv6, from the
    text of /proc/net/snmp and /proc/net/snmp6: the RcvbufErrors field of the
    "Udp:" lines of the first (a header line, then a value line) plus
    Udp6RcvbufErrors of the second. None if neither is there."""
    total: int | None = None
    lines = [ln.split() for ln in text.splitlines()]
    for head, vals in zip(lines, lines[1:], strict=False):  # each line with the next
        if head[:1] == ["Udp:"] and vals[:1] == ["Udp:"] and "RcvbufErrors" in head:
            i = head.index("RcvbufErrors")
            if i < len(vals) and vals[i].isdigit():
                total = int(vals[i])
            break
    for f in lines:
        if len(f) == 2 and f[0] == "Udp6RcvbufErrors" and f[1].isdigit():
            total = (total or 0) + int(f[1])
    return total


def udp_rcvbuf_errors(topo: Topology, ns: str) -> int | None:
    """`parse_udp_rcvbuf_errors` of namespace `ns` (the counters are per namespace)."""
    try:
        cp = topo.run(ns, ["cat", "/proc/net/snmp", "/proc/net/snmp6"], check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_udp_rcvbuf_errors(cp.stdout)


# --------------------------------------------------------------------------- iperf3 results


def summarize_iperf(raw: dict[str, Any], udp: bool) -> dict[str, Any]:
    """The fields of one run from iperf3's JSON: goodput at the receiver, bytes
    that arrived, and retransmits (TCP) or packets per second and loss (UDP)."""
    end = raw.get("end") or {}
    recv = end.get("sum_received") or end.get("sum") or {}
    sent = end.get("sum_sent") or end.get("sum") or {}
    seconds = float(recv.get("seconds") or sent.get("seconds") or 0.0)
    out: dict[str, Any] = {
        "mbit_s": float(recv.get("bits_per_second", 0.0)) / 1e6,
        "sent_mbit_s": float(sent.get("bits_per_second", 0.0)) / 1e6,
        "bytes": int(recv.get("bytes", 0)),
        "duration_s": seconds,
    }
    if udp:
        packets = int(recv.get("packets", 0))
        lost = int(recv.get("lost_packets", 0))
        got = max(0, packets - lost)
        out["pps"] = got / seconds if seconds else 0.0
        out["sent_pps"] = int(sent.get("packets", packets)) / seconds if seconds else 0.0
        out["packets_received"] = got
        out["packets_lost"] = lost
        out["loss_pct"] = float(recv.get("lost_percent", 100.0 * lost / packets if packets else 0.0))
        out["retransmits"] = None
    else:
        out["pps"] = None
        out["retransmits"] = sent.get("retransmits")
    return out


def per_gb(cpu_s: float, nbytes: int) -> float | None:
    return cpu_s / (nbytes / 1e9) if nbytes > 0 else None


def add_ratios(runs: list[dict[str, Any]], base: str = "wg") -> None:
    """Set ``mbit_ratio_wg`` and ``cpu_ratio_wg`` (to `base`) on every run, and
    ``mbit_ratio`` and ``cpu_ratio`` to the anchor of its protocol (``anchor``: wg
    for WireGuard rows, ovpn for OpenVPN rows, by the run's ``vpn``), each against
    that system's run of the same test (None where either side is missing or zero)."""
    ok = [r for r in runs if not r.get("error")]
    wanted = {base, *ANCHORS.values()}
    ref = {(r["system"], r["test"]): r for r in ok if r.get("system") in wanted}
    for r in runs:
        if r.get("flood"):
            continue  # compared by their share of the ceiling instead
        anchor = ANCHORS.get(r.get("vpn") or "wireguard", base)
        r["anchor"] = anchor
        for suffix, name in (("_wg", base), ("", anchor)):
            b = ref.get((name, r["test"]))
            r["mbit_ratio" + suffix] = _ratio(r.get("mbit_s"), b.get("mbit_s") if b else None)
            r["cpu_ratio" + suffix] = _ratio(
                r.get("server_cpu_s_per_gb"), b.get("server_cpu_s_per_gb") if b else None
            )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run; xREF: the ratio to the anchor of its protocol (REF: wg or ovpn)."""
    head = ["SYSTEM", "TEST", "CLIENT", "MBIT/S", "xREF", "PPS", "LOSS%", "RETR", "CPU-S/GB", "xREF",
            "REF", "HOST%", "STEAL%", "CPU-S/GB BY COMPONENT"]
    rows = []
    for r in runs:
        client = str(r.get("client") or "-")
        if r.get("error"):
            rows.append([r["system"], r["test"], client, "failed", "", "", "", "", "", "", "", "", "",
                         str(r["error"]).splitlines()[0][:60]])
            continue
        comps = r.get("cpu_s_per_gb_by_component") or {}
        by = " ".join(f"{k} {v:.1f}" for k, v in comps.items() if v is not None) if len(comps) > 1 else ""
        anchor = r.get("anchor")
        ref = "-" if anchor is None or anchor == r["system"] else anchor
        rows.append([
            r["system"], r["test"], client, _f(r.get("mbit_s"), ".1f"), _f(r.get("mbit_ratio"), ".2f"),
            _f(r.get("pps"), ".0f"), _f(r.get("loss_pct"), ".1f"),
            "-" if r.get("retransmits") is None else str(r["retransmits"]),
            _f(r.get("server_cpu_s_per_gb"), ".1f"), _f(r.get("cpu_ratio"), ".2f"), ref,
            _f(r.get("host_cpu_busy_pct"), ".0f"), _f(r.get("host_steal_pct"), ".1f"), by,
        ])
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) if rows else len(head[i])
              for i in range(len(head))]
    right = {3, 4, 5, 6, 7, 8, 9, 11, 12}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    return "\n".join([line(head), *(line(row) for row in rows)])


def format_flood_table(runs: Sequence[dict[str, Any]]) -> str:
    """Flood tests: the stream against its ceiling, and the newcomer."""
    head = ["SYSTEM", "TEST", "CLIENT", "CEILING", "FLOODED", "SHARE%", "ROUNDS%", "NEW CLIENT",
            "FLOOD/S", "SERVER CPU-S"]
    rows = []
    for r in runs:
        rounds = " ".join(_f(None if v is None else 100 * v, ".0f") for v in r.get("share_of_ceiling_rounds") or [])
        new = r.get("newcomer_s")
        share = r.get("share_of_ceiling")
        rows.append([
            r["system"], r["test"], r.get("client", "-"), _f(r.get("ceiling_mbit_s"), ".0f"),
            _f(r.get("mbit_s"), ".0f"), _f(None if share is None else 100 * share, ".0f"), rounds,
            "no" if new is None else f"{new:.1f} s", f"{r.get('flood_pps') or 0:,}",
            _f(r.get("server_cpu_s"), ".1f"),
        ])
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) if rows else len(head[i])
              for i in range(len(head))]
    right = {3, 4, 5, 7, 8, 9}
    return "\n".join("  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                               for i, c in enumerate(cells)).rstrip() for cells in [head, *rows])


def format_rtt(systems: dict[str, dict[str, Any]]) -> str:
    """Each system's idle RTT, and its ratio to its protocol's anchor (``anchor`` in its
    info; wg when not given)."""
    lines = ["idle ping RTT (client -> server through the tunnel):"]
    for name, info in systems.items():
        rtt = info.get("rtt_ms")
        anchor = info.get("anchor") or "wg"
        ratio = _ratio(rtt, systems.get(anchor, {}).get("rtt_ms"))
        extra = f"  x{ratio:.2f} {anchor}" if ratio is not None and name != anchor else ""
        loss = info.get("ping_loss")
        lost = f"  ({loss} lost)" if loss else ""
        lines.append(f"  {name:<14} {_f(rtt, '.3f')} ms{extra}{lost}")
    return "\n".join(lines)


def to_json(runs: list[dict[str, Any]], systems: dict[str, dict[str, Any]], meta: dict[str, Any]
            ) -> dict[str, Any]:
    return {"runs": runs, "systems": systems, **meta}


# --------------------------------------------------------------------------- systems


@dataclass
class Target:
    """A system up and running: where to send load, whose CPU to count."""

    server_ip: str
    client_ns: str
    pids: Callable[[], dict[int, str]]  # pid -> component, read before and after every run
    check: Callable[[], None] = lambda: None  # raises if a server process died
    info: dict[str, Any] = field(default_factory=dict)
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    # flood tests: a second client in client namespace 3, not started, and the server's
    # WireGuard public key (base64) that forged initiations carry a valid mac1 for
    newcomer: WgClient | None = None
    server_public: str | None = None
    # multi-client tests: every client's namespace, each with its tunnel up (client_ns first)
    client_nss: list[str] = field(default_factory=list)

    def clients(self, n: int) -> list[str]:
        """The namespaces of the first n clients (TopologyError if fewer are up)."""
        have = self.client_nss or [self.client_ns]
        if len(have) < n:
            raise TopologyError(f"{n} clients wanted, {len(have)} up")
        return have[:n]


def _alive(proc: subprocess.Popen[bytes], what: str, topo: Topology) -> Callable[[], None]:
    def check() -> None:
        if proc.poll() is not None:
            raise TopologyError(f"{what} exited rc={proc.returncode}\n{tail(topo.log_path(proc))}")
    return check


def start_wg(topo: Topology, spec: SystemSpec) -> Target:
    """A wireguard-go pair (spec.binary on both ends: Debian's, or wg25's build)."""
    cpriv, cpub = gen_keypair()
    spriv, spub = gen_keypair()
    npriv, npub = gen_keypair()  # the newcomer of the flood tests
    newcomer_ip = "198.19.200.3"
    server = start_wg_server(topo, address=WG_ADDRESS, listen_port=LISTEN_PORT,
                             peers=[(cpub, f"{WG_CLIENT}/32"), (npub, f"{newcomer_ip}/32")],
                             private_key=spriv, ifname=topo.ifname("wgs"), binary=spec.binary)
    conf = client_config(cpriv, f"{WG_CLIENT}/24", spub,
                         f"{topo.server_underlay(1)}:{LISTEN_PORT}", "198.19.200.0/24")
    client = WgClient(topo, topo.ns_of_client(1), topo.ifname("w1"), conf, binary=spec.binary).start()
    server_ip = WG_ADDRESS.split("/")[0]
    first = client.wait_ping(server_ip, timeout=20)
    if not first.ok:
        raise TopologyError(f"no reply from {server_ip} through wireguard-go\n{first.output}")
    assert server.proc is not None
    pid = server.proc.pid
    newcomer = None
    if topo.clients >= 3:
        nconf = client_config(npriv, f"{newcomer_ip}/24", spub,
                              f"{topo.server_underlay(3)}:{LISTEN_PORT}", "198.19.200.0/24")
        newcomer = WgClient(topo, topo.ns_of_client(3), topo.ifname("w3"), nconf, binary=spec.binary)
    return Target(server_ip, client.ns, lambda: {pid: "wireguard-go"},
                  _alive(server.proc, "wireguard-go server", topo),
                  info={"server_pids": {"wireguard-go": [pid]}, "client": spec.client},
                  newcomer=newcomer, server_public=spub)


def _openssl(topo: Topology, *args: str) -> None:
    topo.run(None, ["openssl", *args], timeout=60)


def make_ovpn_pki(topo: Topology, d: Path) -> None:
    """A CA, a server and a client certificate (EC P-256), as anchor_ovpn.sh does."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    p = str(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(topo, "req", "-x509", *ec, "-keyout", f"{p}/ca.key", "-out", f"{p}/ca.crt",
             "-subj", "/CN=fabric-bench-ca", "-days", "2")
    for name, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = d / f"{name}.ext"
        ext.write_text(f"extendedKeyUsage={eku}\n")
        _openssl(topo, "req", *ec, "-keyout", f"{p}/{name}.key", "-out", f"{p}/{name}.csr",
                 "-subj", f"/CN={name}")
        _openssl(topo, "x509", "-req", "-in", f"{p}/{name}.csr", "-CA", f"{p}/ca.crt",
                 "-CAkey", f"{p}/ca.key", "-CAcreateserial", "-out", f"{p}/{name}.crt",
                 "-days", "2", "-extfile", str(ext))


# the OpenVPN client's data channel, the same for the anchor and the fabric
OVPN_CLIENT_ARGS = ("--data-ciphers", OVPN_CIPHER, "--disable-dco")


def _confirmed_cipher(logs: Callable[[], str]) -> str:
    """OVPN_CIPHER once a client's log names it as its data channel cipher (openvpn's
    log reaches the file a little after the tunnel is up), else "unconfirmed"."""
    for _ in range(20):
        if f"Data Channel: cipher '{OVPN_CIPHER}'" in logs():
            return OVPN_CIPHER
        time.sleep(0.1)
    return "unconfirmed"


def start_ovpn(topo: Topology, spec: SystemSpec) -> Target:
    """An OpenVPN 2.6 server and topo.clients clients (one certificate: with several
    clients the server runs with --duplicate-cn)."""
    d = topo.workdir / "ovpn"
    make_ovpn_pki(topo, d)
    p = str(d)
    common = ["--dev-type", "tun", "--proto", "udp", "--ca", f"{p}/ca.crt",
              "--data-ciphers", OVPN_CIPHER, "--disable-dco", "--verb", "3"]
    many = ["--duplicate-cn"] if topo.clients > 1 else []
    # clients on several underlays: bound to any address (each client's subnet is on a
    # link of its own, so a reply's route picks the address the client sent to; no
    # --multihome, which would cost the data path a cmsg per packet)
    local = [] if topo.clients > 1 else ["--local", topo.server_underlay(1)]
    server = topo.popen(topo.server_ns, [
        "openvpn", "--dev", topo.ifname("os"), *common, "--port", str(OVPN_PORT),
        *local, "--server", OVPN_NET, "255.255.255.0",
        "--topology", "subnet", "--cert", f"{p}/server.crt", "--key", f"{p}/server.key",
        "--dh", "none", *many,
    ], label="openvpn-server")
    check = _alive(server, "openvpn server", topo)
    if not topo.wait_udp_listen(topo.server_ns, OVPN_PORT, timeout=15):
        check()
        raise TopologyError(f"openvpn server not listening\n{tail(topo.log_path(server))}")
    clients: list[subprocess.Popen[bytes]] = []
    for k in range(1, topo.clients + 1):
        ns = topo.ns_of_client(k)
        label = "openvpn-client" if k == 1 else f"openvpn-client{k}"
        clients.append(topo.popen(ns, [
            "openvpn", "--client", "--dev", topo.ifname("oc" if k == 1 else f"oc{k}"), *common,
            "--remote", topo.server_underlay(k), str(OVPN_PORT), "--nobind",
            "--cert", f"{p}/client.crt", "--key", f"{p}/client.key",
        ], label=label))
        first = topo.wait_ping(ns, OVPN_SERVER, timeout=30)
        if not first.ok:
            check()
            raise TopologyError(
                f"no reply from {OVPN_SERVER} through openvpn (client {k})\n{first.output}\n"
                f"{topo.log_tails(20, labels=['openvpn-server', label])}"
            )
    cipher = _confirmed_cipher(lambda: "".join(topo.log_path(pr).read_text(errors="replace")
                                               for pr in (server, clients[0])))
    pid = server.pid
    return Target(OVPN_SERVER, topo.ns_of_client(1), lambda: {pid: "openvpn"}, check,
                  info={"server_pids": {"openvpn": [pid]}, "cipher": cipher, "client": spec.client_label()},
                  client_nss=[topo.ns_of_client(k) for k in range(1, topo.clients + 1)])


class BenchCluster(FabricCluster):
    """``fabric up``, optionally under ``taskset -c CPUS`` (the children inherit
    the affinity; admin commands are not pinned)."""

    cpus: str | None = None

    def _spawn(self, label: str, *args: str) -> None:
        if self.cpus is None:
            super()._spawn(label, *args)
            return
        old = os.environ.get("FABRIC_CLI")
        prefix = shlex.split(old) if old else [sys.executable, "-m", "fabric"]
        os.environ["FABRIC_CLI"] = shlex.join(["taskset", "-c", self.cpus, *prefix])
        try:
            super()._spawn(label, *args)
        finally:
            if old is None:
                os.environ.pop("FABRIC_CLI", None)
            else:
                os.environ["FABRIC_CLI"] = old


def fabric_pids(root: int, status: dict[str, Any] | None = None) -> dict[int, str]:
    """Every process of ``fabric up`` (the tree below ``root``) by role, plus the
    pids that ``fabric admin status --json`` names."""
    out: dict[int, str] = {}
    for pid in descendants(root):
        role = fabric_role(proc_cmdline(pid))
        if role is not None:
            out[pid] = role
    if status:
        b = status.get("broker") or {}
        if isinstance(b.get("pid"), int):
            out.setdefault(b["pid"], "broker")
        for p in status.get("processes") or []:
            if isinstance(p.get("pid"), int) and p.get("role") in FABRIC_ROLES:
                if p.get("alive", True):
                    out.setdefault(p["pid"], FABRIC_ROLES[p["role"]])
    return out


def _ovpn_clients(topo: Topology, cluster: FabricCluster) -> tuple[list[OvpnClient], str]:
    """One stock openvpn client per client namespace, each with the profile of a peer
    of its own (``fabric peer add bench<k> --openvpn``) and OVPN_CLIENT_ARGS; up and
    pinging the server. The clients and the cipher the first one's log confirms."""
    clients = []
    for k in range(1, topo.clients + 1):
        profile = cluster.add_ovpn_peer(f"bench{k}", k=k)
        c = OvpnClient(topo, topo.ns_of_client(k), profile, name=f"bench{k}", extra=OVPN_CLIENT_ARGS)
        c.start()
        first = topo.wait_ping(c.ns, cluster.server_ip, timeout=20)
        if not first.ok:
            raise TopologyError(f"no reply from {cluster.server_ip} through openvpn (client {k})\n"
                                f"{first.output}\n{c.log[-3000:]}\n{cluster.log_tails()}")
        clients.append(c)
    return clients, _confirmed_cipher(lambda: clients[0].log)


def start_fabric(topo: Topology, spec: SystemSpec) -> Target:
    """``fabric up`` with a wireguard-go client (fabric), or serving OpenVPN too with
    stock openvpn clients (fabric-ovpn)."""
    ovpn = spec.kind == "fabric-ovpn"
    cluster = BenchCluster(topo, address=FABRIC_ADDRESS, listen_port=LISTEN_PORT,
                           edges=spec.edges, workers=spec.workers, mode="up",
                           tun=topo.ifname("t"), crypto=spec.crypto,
                           openvpn_port=OVPN_PORT if ovpn else None)
    cluster.cpus = spec.cpus
    if spec.source:
        # the other checkout's code for every process and command of this system; -P keeps
        # the working directory (this checkout) off sys.path
        cluster.env["PYTHONPATH"] = spec.source
        cluster.env["PYTHONSAFEPATH"] = "1"
    cluster.start()
    cipher = None
    if ovpn:
        clients, cipher = _ovpn_clients(topo, cluster)
        client_nss = [c.ns for c in clients]
    else:
        client_nss = [cluster.connect_client(1, "bench", binary=spec.binary).ns]
    root = cluster.procs["up"].pid
    try:
        status: dict[str, Any] | None = cluster.status()
    except Exception:  # the tree alone is enough
        status = None
    # the status names the pids that reported within the last seconds: merge once,
    # and keep only those still below fabric up (a pid must not be reused by another)
    pids = fabric_pids(root, status)
    tree = set(descendants(root))
    pids = {p: r for p, r in pids.items() if p in tree}
    roles_seen = set(pids.values())
    for role in ("broker", "edge", "worker"):
        if role not in roles_seen:
            raise TopologyError(f"no {role} process found below fabric up (pid {root}): {pids}")

    def current() -> dict[int, str]:
        now = fabric_pids(root)
        return now or pids

    def check() -> None:
        cluster.check_alive()

    by_role: dict[str, list[int]] = {}
    for p, r in sorted(current().items()):
        by_role.setdefault(r, []).append(p)
    info: dict[str, Any] = {"server_pids": by_role, "edges": spec.edges, "workers": spec.workers,
                            "cpus": spec.cpus, "crypto": spec.crypto or "auto", "client": spec.client}
    if cipher is not None:
        info.update({"cipher": cipher, "client": spec.client_label()})
    if spec.cpus is not None:
        info["cpus_allowed"] = {str(p): cpu_allowed(p) for p in current()}
    def stop() -> None:
        cluster.stop()

    newcomer, server_public = None, None
    if topo.clients >= 3 and not ovpn:
        conf = cluster.peer_add("newcomer", endpoint=f"{topo.server_underlay(3)}:{LISTEN_PORT}")
        newcomer = WgClient(topo, topo.ns_of_client(3), topo.ifname("w3"), conf, binary=spec.binary)
        server_public = WgConfig.parse(conf).peers[0]["publickey"]
    return Target(cluster.server_ip, client_nss[0], current, check, info=info, cleanup=[stop],
                  newcomer=newcomer, server_public=server_public, client_nss=client_nss)


STARTERS: dict[str, Callable[[Topology, SystemSpec], Target]] = {
    "wg": start_wg, "wg25": start_wg, "ovpn": start_ovpn, "fabric": start_fabric,
    "fabric-ovpn": start_fabric,
}


# --------------------------------------------------------------------------- measuring


def iperf_many(topo: Topology, client_nss: Sequence[str], addr: str, test: TestSpec,
               seconds: float) -> list[dict[str, Any]]:
    """One iperf3 run from each client namespace at once, to its own server (ports
    IPERF_PORT, +1, ...) on `addr`; every client's JSON. The servers all listen before
    the first client starts. IperfError if any run fails."""
    servers = []
    try:
        for i in range(len(client_nss)):
            servers.append(topo.popen(topo.server_ns, ["iperf3", "-s", "-1", "-B", addr, "-p", str(IPERF_PORT + i)],
                                      label=f"iperf3-server{i}"))
        deadline = time.monotonic() + 5.0
        for i, srv in enumerate(servers):
            while not topo.tcp_listening(topo.server_ns, addr, IPERF_PORT + i):
                if srv.poll() is not None or time.monotonic() >= deadline:
                    raise IperfError(f"iperf3 server {i} did not listen on {addr}:{IPERF_PORT + i}\n"
                                     f"{tail(topo.log_path(srv))}")
                time.sleep(0.05)
        outs: list[subprocess.CompletedProcess[str] | BaseException | None] = [None] * len(client_nss)

        def one(i: int, ns: str) -> None:
            argv = ["iperf3", "-c", addr, "-p", str(IPERF_PORT + i), "-t", f"{seconds:g}", "-P",
                    str(test.parallel), "-J", "--connect-timeout", "5000", *test.iperf_extra(),
                    *(["-R"] if test.reverse else [])]
            try:
                outs[i] = topo.run(ns, argv, check=False, timeout=seconds + 30)
            except BaseException as e:  # reported below, in the caller's thread
                outs[i] = e

        threads = [threading.Thread(target=one, args=(i, ns), daemon=True) for i, ns in enumerate(client_nss)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=seconds + 40)
        raws = []
        for i, out in enumerate(outs):
            if out is None:
                raise IperfError(f"iperf3 client {i + 1} did not finish")
            if isinstance(out, BaseException):
                raise out
            try:
                raws.append(parse_iperf(out.stdout or out.stderr, reverse=test.reverse).raw)
            except IperfError as e:
                raise IperfError(f"client {i + 1}: {e}") from None
        return raws
    finally:
        for srv in servers:
            topo.stop(srv, timeout=3.0)


def combine_summaries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The `summarize_iperf` of several clients' runs at once as one: throughput, bytes,
    packets and retransmits summed (retransmits None if any is), the longest duration,
    loss over all packets, and each client's Mbit/s (``per_client_mbit_s``)."""
    if len(parts) == 1:
        return dict(parts[0])
    out: dict[str, Any] = {
        "mbit_s": sum(p["mbit_s"] for p in parts),
        "sent_mbit_s": sum(p.get("sent_mbit_s", 0.0) for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "duration_s": max(p.get("duration_s", 0.0) for p in parts),
        "per_client_mbit_s": [p["mbit_s"] for p in parts],
    }
    retr = [p.get("retransmits") for p in parts]
    out["retransmits"] = None if any(r is None for r in retr) else sum(r for r in retr if r is not None)
    if any(p.get("pps") is not None for p in parts):  # UDP
        out["pps"] = sum(p.get("pps") or 0.0 for p in parts)
        out["sent_pps"] = sum(p.get("sent_pps") or 0.0 for p in parts)
        got = sum(p.get("packets_received") or 0 for p in parts)
        lost = sum(p.get("packets_lost") or 0 for p in parts)
        out["packets_received"], out["packets_lost"] = got, lost
        out["loss_pct"] = 100.0 * lost / (got + lost) if got + lost else 0.0
    else:
        out["pps"] = None
    return out


def measure(topo: Topology, target: Target, spec: SystemSpec, test: TestSpec,
            seconds: float, retry: bool = True) -> dict[str, Any]:
    pids0 = target.pids()
    namespaces = {"server": topo.server_ns, "client": target.client_ns}
    drops0 = {side: udp_rcvbuf_errors(topo, ns) for side, ns in namespaces.items()}
    before = sample(pids0)
    h0 = host_cpu()
    run: dict[str, Any] = {"system": spec.name, "test": test.name, "vpn": spec.vpn}
    try:
        if test.clients > 1:
            raws = iperf_many(topo, target.clients(test.clients), target.server_ip, test, seconds)
        else:
            raws = [iperf3(topo, topo.server_ns, target.client_ns, target.server_ip, seconds=seconds,
                           reverse=test.reverse, port=IPERF_PORT, parallel=test.parallel,
                           extra=test.iperf_extra()).raw]
    except (IperfError, subprocess.TimeoutExpired) as e:
        if not retry:
            run.update({"mbit_s": 0.0, "pps": None, "server_cpu_s_per_gb": None, "error": str(e)})
            return run
        # iperf3 itself sometimes fails to set up a run under a flood (seen with UDP -R):
        # try once more, and keep the first error in the result
        time.sleep(1.0)
        target.check()
        again = measure(topo, target, spec, test, seconds, retry=False)
        again["first_attempt_error"] = str(e).strip().splitlines()[0] if str(e).strip() else "?"
        return again
    h1 = host_cpu()
    after = sample({**pids0, **target.pids()})
    drops1 = {side: udp_rcvbuf_errors(topo, ns) for side, ns in namespaces.items()}
    drops = {}
    for side in namespaces:
        a, b = drops0[side], drops1[side]
        if a is not None and b is not None:
            drops[side] = b - a
    comp, gone = cpu_delta(before, after)
    summary = combine_summaries([summarize_iperf(raw, test.udp) for raw in raws])
    cpu = sum(comp.values())
    run.update(summary)
    run.update({
        "server_cpu_s": cpu,
        "server_cpu_s_per_gb": per_gb(cpu, summary["bytes"]),
        "cpu_by_component": {k: comp[k] for k in sorted(comp, key=_component_key)},
        "cpu_s_per_gb_by_component": {k: per_gb(comp[k], summary["bytes"])
                                      for k in sorted(comp, key=_component_key)},
        "host_cpu_busy_pct": 100.0 * (h1[0] - h0[0]) / (h1[1] - h0[1]) if h1[1] > h0[1] else None,
        # time the hypervisor gave this VM's CPUs to others: a slow spell shows here
        "host_steal_pct": 100.0 * (h1[2] - h0[2]) / (h1[1] - h0[1]) if h1[1] > h0[1] else None,
        # datagrams a full receive buffer dropped in each namespace (the tunnel's and,
        # for UDP tests, iperf3's): where TCP's losses happen, and work wasted upstream
        "udp_rcvbuf_drops": drops,
        "streams": test.parallel * test.clients,
        "clients": test.clients,
        "direction": "down" if test.reverse else "up",
        "protocol": "udp" if test.udp else "tcp",
    })
    if test.udp:
        pkts = summary.get("packets_received") or 0
        run["server_cpu_us_per_packet"] = 1e6 * cpu / pkts if pkts else None
    if gone:
        run["pids_gone"] = gone
    return run


def _flood_once(topo: Topology, target: Target, port: int, kind: str, seconds: float, rate: float,
                newcomer: WgClient | None) -> dict[str, Any]:
    """One stream under one flood at `port`: the stream's Mbit/s, the server's CPU, the
    flood's own summary and, with a newcomer, how long it took to ping the server."""
    argv = [sys.executable, "-m", "fabric.testbed.flood", topo.server_underlay(2), str(port), "--kind", kind,
            "--rate", f"{rate:g}", "--seconds", f"{FLOOD_LEAD + seconds + 3:g}"]
    if target.server_public:
        argv += ["--server-key", target.server_public]
    proc = topo.popen(topo.ns_of_client(2), argv, env=fabric_env(), label=f"flood-{kind}")
    out: dict[str, Any] = {}
    joined: dict[str, float | None] = {}

    def join() -> None:
        assert newcomer is not None
        time.sleep(1.0)
        t0 = time.monotonic()
        try:
            newcomer.start()
            ok = newcomer.wait_ping(target.server_ip, timeout=NEWCOMER_TIMEOUT).ok
        except TopologyError:
            ok = False
        joined["after_s"] = time.monotonic() - t0 if ok else None

    try:
        time.sleep(FLOOD_LEAD)
        pids0 = target.pids()
        before = sample(pids0)
        th = threading.Thread(target=join, daemon=True) if newcomer is not None else None
        if th is not None:
            th.start()
        try:
            res = iperf3(topo, topo.server_ns, target.client_ns, target.server_ip, seconds=seconds,
                         port=IPERF_PORT)
            out["mbit_s"] = res.mbps
            out["retransmits"] = res.retransmits
        except (IperfError, subprocess.TimeoutExpired) as e:
            # under a flood the stream may not even connect: that is a result, 0 Mbit/s
            out["mbit_s"] = 0.0
            out["iperf_error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        after = sample({**pids0, **target.pids()})
        comp, _ = cpu_delta(before, after)
        out["server_cpu_s"] = sum(comp.values())
        if th is not None:
            th.join(timeout=NEWCOMER_TIMEOUT + 15)
            out["newcomer_s"] = joined.get("after_s")
        proc.wait(timeout=FLOOD_LEAD + seconds + 30)
        lines = topo.log_path(proc).read_text(errors="replace").strip().splitlines()
        try:
            out["flood"] = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise TopologyError(f"the flood printed no summary:\n{tail(topo.log_path(proc))}") from None
    finally:
        topo.stop(proc)
        if newcomer is not None and newcomer.running:
            newcomer.stop()
    return out


def measure_flood(topo: Topology, target: Target, spec: SystemSpec, test: TestSpec,
                  seconds: float, rate: float) -> dict[str, Any]:
    """The stream under `test.flood` at the closed port (the ceiling) and at the
    server's port; the share of the ceiling, and the newcomer's time to a ping."""
    assert test.flood is not None
    ceiling = _flood_once(topo, target, CLOSED_PORT, test.flood, seconds, rate, None)
    time.sleep(SETTLE)
    target.check()
    flooded = _flood_once(topo, target, LISTEN_PORT, test.flood, seconds, rate, target.newcomer)
    share = flooded["mbit_s"] / ceiling["mbit_s"] if ceiling["mbit_s"] > 0 else None
    return {
        "system": spec.name, "test": test.name, "flood": test.flood, "client": spec.client,
        "mbit_s": flooded["mbit_s"], "ceiling_mbit_s": ceiling["mbit_s"], "share_of_ceiling": share,
        "newcomer_s": flooded.get("newcomer_s"), "newcomer_timeout_s": NEWCOMER_TIMEOUT,
        "flood_pps": flooded["flood"].get("rate"), "ceiling_flood_pps": ceiling["flood"].get("rate"),
        "server_cpu_s": flooded["server_cpu_s"], "ceiling_server_cpu_s": ceiling["server_cpu_s"],
        "retransmits": flooded.get("retransmits"),
        **({"iperf_error": flooded["iperf_error"]} if "iperf_error" in flooded else {}),
        "direction": "up", "protocol": "tcp", "streams": 1,
    }


def _describe_run(r: dict[str, Any]) -> str:
    if r.get("flood"):
        share = r.get("share_of_ceiling")
        new = r.get("newcomer_s")
        return (f"{r['mbit_s']:.1f} Mbit/s under the flood ({r.get('flood_pps') or 0:,} /s), ceiling "
                f"{r['ceiling_mbit_s']:.1f}: {_f(None if share is None else 100 * share, '.0f')}% of it; "
                f"new client {'connected after ' + format(new, '.1f') + ' s' if new is not None else 'NOT connected'}"
                + (f"; stream: {r['iperf_error']}" if r.get("iperf_error") else ""))
    if r.get("error"):
        return f"failed: {str(r['error']).splitlines()[0]}"
    parts = [f"{r['mbit_s']:.1f} Mbit/s"]
    if r.get("first_attempt_error"):
        parts.insert(0, f"(2nd attempt; 1st: {r['first_attempt_error']})")
    if r.get("pps") is not None:
        parts.append(f"{r['pps']:.0f} pps received, loss {r.get('loss_pct', 0):.1f}%")
    if r.get("retransmits") is not None:
        parts.append(f"{r['retransmits']} retransmits")
    drops = {k: v for k, v in (r.get("udp_rcvbuf_drops") or {}).items() if v}
    if drops:
        parts.append("receive-buffer drops " + ", ".join(f"{k} {v}" for k, v in drops.items()))
    cpg = r.get("server_cpu_s_per_gb")
    if cpg is not None:
        parts.append(f"server {cpg:.1f} CPU-s/GB")
    comps = r.get("cpu_by_component") or {}
    if len(comps) > 1:
        parts.append("(" + ", ".join(f"{k} {v:.2f} s" for k, v in comps.items()) + ")")
    return ", ".join(parts)


class _Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ctrl-C / SIGTERM wait until the teardown is done (an interrupt must not
    leave namespaces behind), then raise KeyboardInterrupt."""
    got: list[int] = []

    def later(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    old_int = signal.getsignal(signal.SIGINT)
    old_term = signal.getsignal(signal.SIGTERM)
    for sig, old in ((signal.SIGINT, old_int), (signal.SIGTERM, old_term)):
        if old is not signal.SIG_IGN:  # what was ignored stays ignored
            signal.signal(sig, later)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if got:
        raise KeyboardInterrupt(f"signal {got[0]}")


@dataclass
class Bench:
    """One system set up in its own namespaces."""

    spec: SystemSpec
    topo: Topology
    target: Target | None = None


def setup_system(spec: SystemSpec, args: argparse.Namespace, step: _Progress,
                 systems: dict[str, dict[str, Any]]) -> Bench:
    """Namespaces and processes of one system; raises (after logging the process
    tails) if it does not come up. The caller tears it down with `teardown`."""
    # flood tests: an attacker in client namespace 2, a newcomer in 3; multi-client
    # tests: one namespace per client
    clients = clients_needed(spec, args.tests)
    topo = Topology(clients=clients, keep_workdir=bool(args.keep_logs))
    b = Bench(spec, topo)
    info: dict[str, Any] = {"label": spec.describe(), "vpn": spec.vpn, "anchor": spec.anchor}
    systems[spec.name] = info
    step(f"{spec.name}: namespaces {topo.server_ns}, {topo.client_ns[0]}; "
         f"starting {spec.describe()}...")
    try:
        topo.setup()
        info["logs"] = str(topo.workdir) if args.keep_logs else None
        b.target = STARTERS[spec.kind](topo, spec)
        info.update(b.target.info)
    except Exception:
        _print_tails(topo)
        teardown(b, step)
        raise
    return b


def _print_tails(topo: Topology) -> None:
    """The last lines of every process log of a system that failed (to stderr)."""
    if topo.workdir.name:
        print(f"process logs (tails):\n{topo.log_tails(15)}", file=sys.stderr, flush=True)


def teardown(b: Bench, step: _Progress) -> None:
    with _shielded():
        step(f"{b.spec.name}: tearing down...")
        try:
            for fn in b.target.cleanup if b.target else []:
                with contextlib.suppress(Exception):
                    fn()
        finally:
            b.topo.close()


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    """`items` starting at position k (mod len): round k measures the systems in a
    different order, so none is always first after a pause or last in a busy spell."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def median_run(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (flood tests: the median share of the
    ceiling; the lower middle for an even count), whole, so its fields stay
    consistent, plus every round's figures (``*_rounds``) to show the spread."""
    ok = [r for r in samples if not r.get("error")]
    if not ok:
        return dict(samples[-1])
    key = "share_of_ceiling" if ok[0].get("flood") else "mbit_s"
    ranked = sorted(ok, key=lambda r: r.get(key) or 0.0)
    out = dict(ranked[(len(ranked) - 1) // 2])
    out["rounds"] = len(samples)
    out["failed_rounds"] = len(samples) - len(ok)
    out["mbit_s_rounds"] = [r.get("mbit_s") for r in samples]
    out["server_cpu_s_per_gb_rounds"] = [r.get("server_cpu_s_per_gb") for r in samples]
    if out.get("flood"):
        for k in ("share_of_ceiling", "ceiling_mbit_s", "newcomer_s"):
            out[f"{k}_rounds"] = [r.get(k) for r in samples]
    if out.get("pps") is not None:
        out["pps_rounds"] = [r.get("pps") for r in samples]
    return out


def median(values: Sequence[float]) -> float | None:
    v = sorted(values)
    if not v:
        return None
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def measure_round(spec: SystemSpec, k: int, args: argparse.Namespace, step: _Progress,
                  samples: dict[tuple[str, str], list[dict[str, Any]]],
                  systems: dict[str, dict[str, Any]], pings: dict[str, list[float]]) -> None:
    """Round k of one system: set it up in fresh namespaces, the idle RTT, every test,
    tear it down (a system waiting for its turn would be idle, but not free: its
    timers and wakeups would run beside the one being measured)."""
    tag = f"round {k + 1}/{args.rounds}: " if args.rounds > 1 else ""
    b = setup_system(spec, args, step, systems)
    try:
        assert b.target is not None
        ping = b.topo.ping(b.target.client_ns, b.target.server_ip, count=args.pings, timeout=2.0,
                           interval=0.1)
        if ping.rtt_avg_ms is not None:
            pings.setdefault(spec.name, []).append(ping.rtt_avg_ms)
        info = systems[spec.name]
        info["ping_loss"] = info.get("ping_loss", 0) + ping.transmitted - ping.received
        step(f"{tag}{spec.name}: idle RTT {_f(ping.rtt_avg_ms, '.3f')} ms "
             f"({ping.received}/{ping.transmitted} replies)")
        for test in args.tests:
            if skip_reason(spec, test):
                continue  # said once, in the notes (skip_notes)
            b.target.check()
            time.sleep(SETTLE)
            if test.flood:
                r = measure_flood(b.topo, b.target, spec, test, args.seconds, args.flood_rate)
            else:
                r = measure(b.topo, b.target, spec, test, args.seconds)
                r["client"] = spec.client
            if spec.kind in FABRIC_KINDS:
                r.update({"edges": spec.edges, "workers": spec.workers, "cpus": spec.cpus,
                          "crypto": spec.crypto or "auto"})
            samples.setdefault((spec.name, test.name), []).append(r)
            step(f"{tag}{spec.name}: {test.name:<10} {_describe_run(r)}")
        b.target.check()
    except Exception:
        _print_tails(b.topo)
        raise
    finally:
        teardown(b, step)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _version(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=10,
                            stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (cp.stdout or cp.stderr).strip().splitlines()
    return out[0] if out else None


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("fabric bench needs root (network namespaces, TUN devices): try sudo", file=sys.stderr)
        return 2
    missing = missing_tools(tuple(COMMON_TOOLS))
    if missing:
        pkgs = sorted({COMMON_TOOLS[t] for t in missing})
        print(f"fabric bench: missing {', '.join(missing)}; apt-get install {' '.join(pkgs)}",
              file=sys.stderr)
        return 2
    step = _Progress()
    skipped: list[dict[str, str]] = []
    systems_wanted: list[str] = []
    wg25, looked = find_wg25(args.wg25)
    client = args.client
    if client is None:
        client = "wg25" if wg25 else "wg22"
        if "fabric" in args.systems and not wg25:
            step(f"the fabric's client: Debian's wireguard-go (wireguard-go 0.0.20250522 not found; "
                 f"looked at {looked}; give it with --wg25 PATH)")
    elif client == "wg25" and not wg25:
        print(f"fabric bench: --client wg25: wireguard-go 0.0.20250522 not found (looked at {looked}); "
              "give its path with --wg25 PATH", file=sys.stderr)
        return 2
    for s in args.systems:
        if s == "wg25" and not wg25:
            msg = f"wireguard-go 0.0.20250522 not found (looked at {looked}); give it with --wg25 PATH"
            step(f"skipping wg25: {msg}")
            skipped.append({"system": s, "reason": msg})
            continue
        tools = dict(SYSTEM_TOOLS[s])
        if s == "fabric" and client == "wg25":
            tools.pop("wireguard-go")
        miss = missing_tools(tuple(tools))
        if miss:
            pkgs = sorted({tools[t] for t in miss})
            msg = f"{', '.join(miss)} not installed (apt-get install {' '.join(pkgs)})"
            step(f"skipping {s}: {msg}")
            skipped.append({"system": s, "reason": msg})
        else:
            systems_wanted.append(s)
    specs, notes = plan(systems_wanted, args.edges, args.workers, args.scaling,
                        os.cpu_count() or 1, args.crypto, client=client, wg25=wg25,
                        baseline=_baseline(args.baseline))
    if args.scaling and shutil.which("taskset") is None:
        for sp in [sp for sp in specs if sp.cpus is not None]:
            specs.remove(sp)
            skipped.append({"system": sp.name,
                            "reason": "taskset not installed (apt-get install util-linux)"})
        notes.append("taskset missing: no pinned runs")
    notes += skip_notes(specs, args.tests)
    for n in notes:
        step(n)
    runs: list[dict[str, Any]] = []
    systems: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, str]] = []
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    pings: dict[str, list[float]] = {}
    failed: set[str] = set()
    rc = 0
    old = signal.signal(signal.SIGTERM, _sigterm)
    step(f"{len(specs)} configuration(s) x {args.rounds} round(s) x {len(args.tests)} iperf3 runs of "
         f"{args.seconds:g} s; each round sets up every system in turn (rotated order), "
         "measures it and tears it down: " + ", ".join(sp.name for sp in specs))
    try:
        for k in range(args.rounds):
            for spec in rotated(specs, k):
                if spec.name in failed:
                    continue
                try:
                    measure_round(spec, k, args, step, samples, systems, pings)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    msg = str(e).strip() or type(e).__name__
                    step(f"{spec.name}: FAILED: {msg.splitlines()[0]}")
                    errors.append({"system": spec.name, "error": msg[-2000:]})
                    systems[spec.name]["error"] = msg.splitlines()[0]
                    failed.add(spec.name)
                    rc = 1
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what was measured", file=sys.stderr, flush=True)
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, old)
    for name, got_pings in pings.items():
        systems[name]["rtt_ms"] = median(got_pings)
        systems[name]["rtt_ms_rounds"] = got_pings
    for spec in specs:
        for test in args.tests:
            got = samples.get((spec.name, test.name))
            if got:
                r = median_run(got)
                r["rtt_ms"] = systems[spec.name].get("rtt_ms")
                runs.append(r)
    if any(r.get("error") for r in runs) and rc == 0:
        rc = 1
    if not specs and rc == 0:
        rc = 2  # nothing could be measured
    add_ratios(runs)
    print()
    print(f"fabric bench: iperf3 {args.seconds:g} s per run; "
          + (f"median of {args.rounds} rounds (the round with the median Mbit/s); " if args.rounds > 1 else "")
          + "CPU = server processes' utime+stime per GB that arrived; "
          "xREF = ratio to the anchor REF of the row's protocol, same test (wg: Debian's "
          "wireguard-go for WireGuard rows, ovpn: OpenVPN 2.6 for OpenVPN rows)")
    plain = [r for r in runs if not r.get("flood")]
    floods = [r for r in runs if r.get("flood")]
    if plain:
        print(format_table(plain))
        print()
    if floods:
        print(f"under floods: iperf3 TCP upload, {args.seconds:g} s; CEILING = Mbit/s with the flood "
              "at a closed port, FLOODED = at the server's port, SHARE = FLOODED/CEILING (median "
              f"round); NEW CLIENT = time to its first ping (limit {NEWCOMER_TIMEOUT:g} s)")
        print(format_flood_table(floods))
        print()
    print(format_rtt(systems), flush=True)
    for n in notes:
        print(n)
    for r in runs:
        if r.get("first_attempt_error"):
            print(f"retried {r['system']} {r['test']}: first attempt failed: {r['first_attempt_error']}")
    for s in skipped:
        print(f"skipped {s['system']}: {s['reason']}")
    for err in errors:
        print(f"failed {err['system']}: {err['error'].splitlines()[0]}")
    if args.json:
        meta = {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "notes": notes,
            "tests": {t.name: t.describe() for t in args.tests},
            "skipped": skipped,
            "errors": errors,
            "host": {"cpus": os.cpu_count(), "clk_tck": CLK_TCK},
            "client": client,
            "wg25": wg25,
            "versions": {
                "wireguard-go": _version(["wireguard-go", "--version"]),
                **({"wireguard-go-0.0.20250522": _version([wg25, "--version"])} if wg25 else {}),
                "openvpn": _version(["openvpn", "--version"]),
                "iperf3": _version(["iperf3", "--version"]),
            },
        }
        Path(args.json).write_text(json.dumps(to_json(runs, systems, meta), indent=2) + "\n")
        print(f"wrote {args.json}", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fabric bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
