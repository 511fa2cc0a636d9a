"""What the admin commands show: rows built from broker replies, drawn as rich tables.

The row builders are pure functions of a reply (and `now`), so they are tested
with fixed dicts; `draw` turns rows into text. On a terminal the tables have
colour; piped or redirected they stay plain, readable tables without escape codes.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

# A process whose last report is older than this is "gone" rather than "silent":
# it was stopped on purpose or replaced, and no longer makes the fabric degraded
# unless nothing of its role is left.
GONE_AFTER = 60.0
# Counters whose increase per second is a process's load ("PKT/S").
LOAD_COUNTERS = {"edge": ("udp_in", "tun_in"), "worker": ("decrypted", "encrypted")}


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    title: str | None = None
    empty: str = ""  # printed instead of a table without rows
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns



def _console(file: IO[str] | None = None, width: int | None = None) -> Any:
    from rich.console import Console

    out = file if file is not None else sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    if width is None and not tty:
        width = int(os.environ.get("COLUMNS", "0") or 0) or 200  # no wrapping when piped
    return Console(file=out, width=width, highlight=False, soft_wrap=False,
                   color_system="auto" if tty else None, emoji=False, markup=False)


def _rich_table(t: Table) -> Any:
    from rich import box
    from rich.table import Table as RichTable

    rt = RichTable(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
                   header_style="bold")
    for i, h in enumerate(t.header):
        # a narrow terminal folds long cells onto more lines rather than cutting them
        rt.add_column(h, justify="right" if i in t.right else "left", overflow="fold",
                      min_width=len(h), no_wrap=i in t.right)
    for r in t.rows:
        rt.add_row(*[str(c) for c in r])
    return rt


def draw(tables: Iterable[Table | str], file: IO[str] | None = None, width: int | None = None) -> None:
    """Print tables (and plain lines, never wrapped) to `file` (stdout by default)."""
    out = file if file is not None else sys.stdout
    con = _console(out, width)
    with con.capture() as cap:
        for t in tables:
            if isinstance(t, str):
                con.print(t, soft_wrap=True)
            elif not t.rows:
                con.print(t.empty or f"no {t.title or 'rows'}", soft_wrap=True)
            else:
                if t.title:
                    con.print(t.title, soft_wrap=True)  # above the table, never wrapped to its width
                con.print(_rich_table(t))
    text = cap.get()
    if not con.is_terminal:  # plain text: no padding at line ends
        text = "\n".join(line.rstrip() for line in text.split("\n"))
    out.write(text)
    out.flush()


def to_text(tables: Iterable[Table | str], width: int = 200) -> str:
    """What `draw` prints, as a string without colour (tests, --output files)."""
    buf = io.StringIO()
    draw(tables, buf, width)
    return buf.getvalue()


# --- small formatters -----------------------------------------------------------------

def ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    return duration(max(0.0, now - t)) + " ago"


def duration(d: float) -> str:
    d = int(d)
    if d < 60:
        return f"{d}s"
    if d < 3600:
        return f"{d // 60}m{d % 60:02d}s"
    if d < 86400:
        return f"{d // 3600}h{d % 3600 // 60:02d}m"
    return f"{d // 86400}d{d % 86400 // 3600:02d}h"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _counts(d: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.1f}"


# --- peers, sessions, stats -----------------------------------------------------------

SHORT_PROTOCOL = {"wireguard": "wg", "openvpn": "ovpn"}  # in tables; --json says it whole


SHORT_CIPHER = {"AES-256-GCM": "aes256", "AES-128-GCM": "aes128", "CHACHA20-POLY1305": "chacha"}


def _proto(row: dict[str, Any]) -> str:
    """The protocol, and the data cipher where the protocol negotiates one (ovpn/aes256)."""
    name = str(row.get("protocol", "wireguard"))
    short = SHORT_PROTOCOL.get(name, name)
    cipher = row.get("cipher")
    if name != "wireguard" and cipher:
        short += "/" + SHORT_CIPHER.get(str(cipher), str(cipher).lower())
    return short


def peers_table(peers: Sequence[dict[str, Any]], now: float) -> Table:
    rows = [[
        p["name"], _proto(p), ", ".join(p["allowed_ips"]), p.get("endpoint") or "-",
        ago(p.get("latest_handshake"), now), size(p.get("rx_bytes", 0)), size(p.get("tx_bytes", 0)),
        str(p.get("sessions", 0)),
    ] for p in peers]
    # the public keys are in --json: 80 columns hold the rest, the protocol (and cipher) included
    return Table(["PEER", "PROTO", "ALLOWED IPS", "ENDPOINT", "HANDSHAKE", "RX", "TX", "SESSIONS"], rows,
                 empty="no peers; add one with `fabric peer add NAME`", right={5, 6, 7})


def sessions_table(sessions: Sequence[dict[str, Any]], now: float) -> Table:
    rows = [[
        str(s["session_id"]), s["peer"], _proto(s), s.get("endpoint") or "-",
        ago(s.get("latest_handshake"), now), size(s.get("rx_bytes", 0)), size(s.get("tx_bytes", 0)),
        _counts(s.get("packets_per_edge", {})), _counts(s.get("packets_per_worker", {})),
    ] for s in sessions]
    return Table(["SESSION", "PEER", "PROTO", "ENDPOINT", "HANDSHAKE", "RX", "TX", "PKTS/EDGE", "PKTS/WORKER"],
                 rows, empty="no sessions", right={5, 6})


def stats_tables(counters: dict[str, int], gauges: dict[str, int] | None = None) -> list[Table]:
    """Counters (and point-in-time gauges, when the broker sends them) grouped by role:
    `edge.udp_in` is summed over every edge. Drops stand out at the end of each group."""
    def key(name: str) -> tuple[str, bool, str]:
        role, _, rest = name.rpartition(".")
        return (role or "broker", rest.startswith("drop_"), rest)

    tables = [Table(["COUNTER", "VALUE"], [[k, f"{v:,}"] for k, v in sorted(counters.items(), key=lambda kv: key(kv[0]))],
                    title="counters (totals over all processes)", empty="no counters yet", right={1})]
    if gauges:
        tables.append(Table(["GAUGE", "VALUE"], [[k, f"{v:,}"] for k, v in sorted(gauges.items())],
                            title="gauges (now)", right={1}))
    return tables


# --- status ------------------------------------------------------------------------------

def _load(p: dict[str, Any]) -> float | None:
    rates = p.get("rates") or {}
    keys = LOAD_COUNTERS.get(p["role"], ())
    if not rates:
        return None
    return round(sum(float(rates.get(k, 0)) for k in keys), 1)


def _drops(d: dict[str, Any]) -> float:
    return sum(v for k, v in d.items() if k.startswith("drop_"))


# Handshakes an edge refused under a flood (fabric/protocols/wireguard/guard.py), by drop reason
REFUSED_HANDSHAKES = ("cookie_ratelimited", "cookie_budget", "ratelimited", "handshake_budget")


def load_view(st: dict[str, Any]) -> dict[str, Any]:
    """How the edges stand against handshake floods (whitepaper 5.4.7): which are under
    load, how many sources their socket filters ban, and per second the cookie replies
    sent, the handshakes refused and what the kernel dropped for them."""
    edges = [p for p in st.get("processes", []) if p["role"] == "edge" and p.get("alive")]

    def rate(*names: str) -> float:
        return round(sum(float((p.get("rates") or {}).get(n, 0)) for p in edges for n in names), 1)

    under = sorted({int(p["id"]) for p in edges if (p.get("gauges") or {}).get("under_load")})
    return {
        "under_load": bool(under), "edges_under_load": under,
        "banned_sources": sum(int((p.get("gauges") or {}).get("banned_sources", 0)) for p in edges),
        "cookie_replies_per_s": rate("cookie_replies"),
        "handshakes_refused_per_s": rate(*(f"drop_{r}" for r in REFUSED_HANDSHAKES)),
        "kernel_drops_per_s": rate("udp_socket_drops"),
    }


def load_line(load: dict[str, Any]) -> str | None:
    """One line for `fabric status`, or None when nothing is going on."""
    if not (load["under_load"] or load["banned_sources"] or load["kernel_drops_per_s"]):
        return None
    head = (f"under load (edges {', '.join(map(str, load['edges_under_load']))}): handshakes need a cookie"
            if load["under_load"] else "handshakes: normal")
    return (f"{head}; {load['banned_sources']} source(s) banned; per second: "
            f"{_num(load['cookie_replies_per_s'])} cookie replies, "
            f"{_num(load['handshakes_refused_per_s'])} handshakes refused, "
            f"{_num(load['kernel_drops_per_s'])} dropped by the kernel")


def status_view(st: dict[str, Any], sessions: list[dict[str, Any]] | None, now: float,
                cpu: dict[int, float | None] | None = None, server: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole fabric at a glance, from the broker's `status` reply (and `sessions`;
    `server`, its `server` reply, adds the UDP port of each protocol served).

    One row per (role, id): its newest process; older pids of the same role and id
    count as restarts. Health: "up" (reported within the broker's liveness window),
    "silent" (no report for a while: degraded), "gone" (silent for GONE_AFTER:
    stopped or replaced, not counted unless nothing of its role is up).
    """
    cpu = cpu or {}
    b = st["broker"]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in st.get("processes", []):
        groups.setdefault((p["role"], int(p["id"])), []).append(p)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for (role, rid), procs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "edge", kv[0])):
        p = min(procs, key=lambda q: q["age"])
        health = "up" if p["alive"] else "silent" if p["age"] < GONE_AFTER else "gone"
        if health == "silent":
            problems.append(f"{role} {rid} (pid {p['pid']}) silent for {duration(p['age'])}")
        rows.append({
            "role": role, "id": rid, "pid": p["pid"], "health": health, "alive": bool(p["alive"]),
            "last_report": p["age"], "restarts": len({q["pid"] for q in procs}) - 1,
            "packets_per_s": _load(p), "drops": _drops(p.get("counters", {})),
            "drops_per_s": round(_drops(p.get("rates") or {}), 1),
            "cpu_percent": cpu.get(p["pid"]), "metrics": p.get("metrics"),
        })
    for role, what in (("edge", "clients cannot connect: start `fabric edge` (or `fabric up`)"),
                       ("worker", "no packet can be decrypted: start `fabric worker` (or `fabric up`)")):
        if not any(r["role"] == role and r["health"] == "up" for r in rows):
            problems.append(f"no {role} is up: {what}")
    started = b.get("started")
    broker = {
        "pid": b["pid"], "uptime": round(now - started, 1) if started else None, "epoch": b.get("epoch"),
        "seq": b.get("seq"), "cpu_percent": cpu.get(b["pid"]), "metrics": b.get("metrics"),
    }
    ports = served_ports(server)
    if ports is not None:
        broker["ports"] = ports
    n_up = {role: sum(1 for r in rows if r["role"] == role and r["health"] == "up") for role in ("edge", "worker")}
    n_sessions = int(st.get("sessions", len(sessions or [])))
    counts = (f"{n_up['edge']} edge{'s' * (n_up['edge'] != 1)}, "
              f"{n_up['worker']} worker{'s' * (n_up['worker'] != 1)} up, "
              f"{st.get('peers', 0)} peer{'s' * (st.get('peers', 0) != 1)}, "
              f"{n_sessions} session{'s' * (n_sessions != 1)}")
    health = "degraded" if problems else "ok"
    summary = (f"fabric degraded: {'; '.join(problems)} ({counts})" if problems
               else f"fabric ok: broker up {duration(broker['uptime'] or 0)}, {counts}")
    return {
        "health": health, "problems": problems, "summary": summary, "broker": broker,
        "processes": rows, "peer_count": int(st.get("peers", 0)), "session_count": n_sessions,
        "sessions": sessions or [], "load": load_view(st),
    }


def served_ports(server: dict[str, Any] | None) -> dict[str, int] | None:
    """{protocol: UDP port} from the broker's `server` reply (one from before "ports":
    WireGuard on its listen_port); None without a reply."""
    if not server:
        return None
    ports = server.get("ports")
    if isinstance(ports, dict) and ports:
        return {str(k): int(v) for k, v in ports.items()}
    return {"wireguard": int(server["listen_port"])} if "listen_port" in server else None


def ports_text(ports: dict[str, int]) -> str:
    """"wireguard 51820/udp  openvpn 1194/udp" (`fabric status`'s broker line)."""
    return "  ".join(f"{name} {port}/udp" for name, port in ports.items())


def _opt(v: Any, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def status_tables(view: dict[str, Any], now: float) -> list[Table | str]:
    b = view["broker"]
    line = (f"broker  pid {b['pid']}  up {duration(b['uptime'] or 0)}  epoch {b['epoch']}  seq {b['seq']}"
            f"  cpu {_opt(b['cpu_percent'], '{:.1f}%')}")
    if b.get("metrics"):
        line += f"  metrics {b['metrics']}"
    if len(b.get("ports") or {}) > 1:  # more than WireGuard: name each protocol's port
        line += f"  {ports_text(b['ports'])}"
    procs = Table(
        ["ROLE", "ID", "PID", "HEALTH", "LAST REPORT", "RESTARTS", "PKT/S", "DROPS", "DROPS/S", "CPU%", "METRICS"],
        [[
            r["role"], str(r["id"]), str(r["pid"]), r["health"], duration(r["last_report"]) + " ago",
            str(r["restarts"]), _opt(r["packets_per_s"], "{:,.1f}"), _num(r["drops"]), _num(r["drops_per_s"]),
            _opt(r["cpu_percent"], "{:.1f}"), r["metrics"] or "-",
        ] for r in view["processes"]],
        title="processes", empty="no edge or worker has reported to the broker", right={5, 6, 7, 8, 9},
    )
    out: list[Table | str] = [line, procs]
    loaded = load_line(view["load"]) if "load" in view else None
    if loaded:
        out.append(loaded)
    if view["sessions"]:
        sess = sessions_table(view["sessions"], now)
        sess.title = f"sessions ({view['session_count']}, peers {view['peer_count']})"
        out.append(sess)
    else:
        out.append(f"peers {view['peer_count']}, no sessions")
    out.append(view["summary"])
    return out


def proc_cpu_times(pid: int) -> float | None:
    """utime + stime of a local fabric process in seconds, or None (not here, not fabric)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"fabric" not in f.read():
                return None  # another process reuses the pid, or another host's
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_percent(pids: Iterable[int], interval: float = 0.3) -> dict[int, float | None]:
    """CPU use of local processes over `interval` seconds, in percent of one core."""
    pids = list(dict.fromkeys(pids))
    t0 = time.monotonic()
    before = {p: proc_cpu_times(p) for p in pids}
    if any(v is not None for v in before.values()):
        time.sleep(interval)
    dt = max(time.monotonic() - t0, 1e-3)
    out: dict[int, float | None] = {}
    for p in pids:
        a, b = before[p], proc_cpu_times(p) if before[p] is not None else None
        out[p] = None if a is None or b is None else round(100.0 * max(0.0, b - a) / dt, 1)
    return out


# --- QR codes -------------------------------------------------------------------------------

QR_BORDER = 2


def qr_matrix(text: str, border: int = QR_BORDER) -> list[list[bool]]:
    """The QR code of `text` (True = dark module), with a quiet zone of `border` modules."""
    import qrcode
    from qrcode.constants import ERROR_CORRECT_L

    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_L, border=border)
    qr.add_data(text.encode())
    qr.make(fit=True)
    return [list(map(bool, row)) for row in qr.get_matrix()]


# Two modules per character, top and bottom. Light modules are drawn (foreground on a
# dark terminal), dark modules are blank, like `qrencode -t utf8`.
_HALF = {(False, False): "█", (False, True): "▀", (True, False): "▄", (True, True): " "}


def qr_text(text: str, border: int = QR_BORDER) -> str:
    """The QR code of `text` as UTF-8 half blocks: (size + 1) // 2 lines of `size` characters."""
    m = qr_matrix(text, border)
    if len(m) % 2:
        m = [*m, [False] * len(m[0])]  # a light row below: part of the quiet zone
    lines = ["".join(_HALF[(top, bottom)] for top, bottom in zip(m[i], m[i + 1], strict=True))
             for i in range(0, len(m), 2)]
    return "\n".join(lines) + "\n"


def qr_from_text(drawn: str) -> list[list[bool]]:
    """Read the modules back from `qr_text` output (for tests and tools)."""
    back = {v: k for k, v in _HALF.items()}
    rows: list[list[bool]] = []
    for line in drawn.rstrip("\n").split("\n"):
        pairs = [back[c] for c in line]
        rows.append([t for t, _ in pairs])
        rows.append([b for _, b in pairs])
    return rows
