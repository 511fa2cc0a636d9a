"""Client commands that talk to a running fabric: `fabric admin ...`, `fabric peer ...`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import zmq

from fabric.paths import StateDir
from fabric.reqclient import ReqClient, RequestTimeout


class AdminError(RuntimeError):
    pass


def endpoint_for(state_dir: str | None, admin: str | None) -> str:
    if admin:
        return admin
    sd = StateDir.at(state_dir)
    sock = sd.run / "admin.sock"
    if not sock.exists():
        raise AdminError(
            f"no fabric is running on state dir {sd.root} ({sock} is missing): "
            "start one with `fabric up`, or pass --state-dir/--admin"
        )
    return sd.admin


def request(endpoint: str, req: dict[str, Any], timeout: float = 5.0,
            curve: dict[int, Any] | None = None) -> dict[str, Any]:
    ctx: zmq.Context = zmq.Context.instance()
    client = ReqClient(ctx, endpoint, curve=curve)
    try:
        reply = client.call(req, timeout)
    except RequestTimeout:
        hint = ("is its broker running, and is your --key authorized (`fabric keys client`)?"
                if endpoint.startswith("tcp://") else "is its broker running?")
        raise AdminError(f"the fabric at {endpoint} did not answer within {timeout:g}s: {hint}") from None
    finally:
        client.close()
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error") or reply.get("reason") or "request refused"))
    return reply


def _ago(t: float | None) -> str:
    if not t:
        return "never"
    d = max(0.0, time.time() - t)
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _counts(d: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"


def format_peers(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return "no peers; add one with `fabric peer add NAME`"
    rows = [[
        p["name"], p["public_key"][:10] + "…", ",".join(p["allowed_ips"]), p["endpoint"] or "-",
        _ago(p["latest_handshake"]), _bytes(p["rx_bytes"]), _bytes(p["tx_bytes"]),
    ] for p in peers]
    return table(rows, ["PEER", "KEY", "ALLOWED IPS", "ENDPOINT", "HANDSHAKE", "RX", "TX"])


def format_sessions(sessions: list[dict[str, Any]]) -> str:
    if not sessions:
        return "no sessions"
    rows = [[
        str(s["session_id"]), s["peer"], s["endpoint"] or "-", _ago(s["latest_handshake"]),
        _bytes(s["rx_bytes"]), _bytes(s["tx_bytes"]),
        _counts(s["packets_per_edge"]), _counts(s["packets_per_worker"]),
    ] for s in sessions]
    return table(rows, ["SESSION", "PEER", "ENDPOINT", "HANDSHAKE", "RX", "TX", "PKTS/EDGE", "PKTS/WORKER"])


def format_status(st: dict[str, Any]) -> str:
    b = st["broker"]
    lines = [f"broker   pid {b['pid']}  seq {b['seq']}  peers {st['peers']}  sessions {st['sessions']}"]
    rows = []
    for p in st["processes"]:
        c = p["counters"]
        drops = sum(v for k, v in c.items() if k.startswith("drop_"))
        load = c.get("udp_in", c.get("decrypted", 0)) + c.get("tun_in", c.get("encrypted", 0))
        rows.append([p["role"], str(p["id"]), str(p["pid"]), "up" if p["alive"] else f"silent {p['age']}s",
                     str(load), str(drops)])
    lines.append(table(rows, ["ROLE", "ID", "PID", "HEALTH", "PACKETS", "DROPS"]))
    return "\n".join(lines)


def format_stats(counters: dict[str, int]) -> str:
    return table([[k, str(v)] for k, v in counters.items()], ["COUNTER", "VALUE"])


def client_config(reply: dict[str, Any], endpoint: str) -> str:
    """A wg-quick configuration for the peer that `peer_add` created."""
    private = reply.get("private_key") or "<the private key matching the public key you gave>"
    lines = [
        f"# fabric peer {reply['name']}",
        "[Interface]",
        f"PrivateKey = {private}",
        f"Address = {', '.join(reply['allowed_ips'])}",
        "",
        "[Peer]",
        f"PublicKey = {reply['server_public_key']}",
    ]
    if reply.get("preshared_key"):
        lines.append(f"PresharedKey = {reply['preshared_key']}")
    lines += [
        f"Endpoint = {endpoint}",
        f"AllowedIPs = {', '.join(reply['networks'])}",
        "PersistentKeepalive = 25",
    ]
    return "\n".join(lines) + "\n"


def default_endpoint(listen_port: int) -> str:
    """This host's first global address: good enough on a LAN; pass --endpoint otherwise."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for a in ipr.get_addr(family=2):
                if a["scope"] == 0:
                    ip = a.get_attr("IFA_ADDRESS")
                    if ip and not ip.startswith("127."):
                        return f"{ip}:{listen_port}"
    except Exception:
        pass
    return f"127.0.0.1:{listen_port}"


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def write_private(path: str, text: str) -> None:
    p = Path(path)
    p.write_text(text)
    p.chmod(0o600)
