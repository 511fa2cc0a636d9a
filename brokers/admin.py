"""The broker's admin requests (`fabric admin`, `fabric peer`, `fabric status`), answered
over its REP socket: every reply is a map with `ok`, and a bad request gets
`{"ok": False, "error": ...}` naming what to fix, never a crash.

`AdminRequests` belongs to one `Broker` (brokers/broker.py): it reads the broker's
peers, sessions and reports, and adds and removes peers through it.
"""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING, Any

from brokers.peers import Peer, b64
from fabric.control.records import DEFAULT_PROTOCOL
from fabric.ops.config import ConfigError, check_overlaps, parse_network
from fabric.ops.log import Log

if TYPE_CHECKING:
    from brokers.broker import Broker

log = Log("broker")
EDGE_GONE_AFTER = 5.0  # a process whose last report is older counts as gone


class AdminRequests:
    """The admin ops of one Broker: `handle(request, now)` -> reply."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker

    def handle(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        op = req.get("op")
        handler = {
            "peers": self._admin_peers,
            "sessions": self._admin_sessions,
            "peer_add": self._admin_peer_add,
            "peer_remove": self._admin_peer_remove,
            "status": self._admin_status_load,
            "stats": self._admin_stats,
            "server": self._admin_server,
        }.get(op if isinstance(op, str) else "")
        if handler is None:
            return {"ok": False, "error": f"unknown admin op {op!r}"}
        try:
            return handler(req, now)
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}


    def _admin_server(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        about = {name: a.describe() for name, a in self.b.authorities.items()}
        return {
            "ok": True, **about.get(DEFAULT_PROTOCOL, {}), "protocols": about, "addresses": self.b.addresses,
            "listen_port": self.b.listen_port, "ports": self.b.ports, "endpoint": self.b.endpoint,
        }

    def _fresh_reports(self, now: float) -> list[dict[str, Any]]:
        return [r for _, r in self.b.reports.latest.values()]

    def _peer_totals(self) -> dict[bytes, list[int]]:
        totals: dict[bytes, list[int]] = {}
        for _, r in self.b.reports.latest.values():
            for pub, vals in r.get("peers", {}).items():
                t = totals.setdefault(pub, [0, 0, 0, 0])
                for i, v in enumerate(vals[:4]):
                    t[i] += int(v)
        return totals

    def _session_rows(self, now: float) -> list[dict[str, Any]]:
        per_edge: dict[int, dict[str, int]] = {}
        per_worker: dict[int, dict[str, int]] = {}
        endpoints: dict[int, tuple[float, str]] = {}
        for (role, rid, _), (_, r) in self.b.reports.latest.items():
            target = per_edge if role == "edge" else per_worker
            for sid, info in r.get("sessions", {}).items():
                d = target.setdefault(int(sid), {})
                d[str(rid)] = d.get(str(rid), 0) + int(info.get("packets", 0))
                ep = info.get("endpoint")
                if ep and info.get("last_rx", 0) >= endpoints.get(int(sid), (0.0, ""))[0]:
                    endpoints[int(sid)] = (info.get("last_rx", 0), ep)
        totals = self._peer_totals()
        rows = []
        for sid, s in sorted(self.b.sessions.items()):
            p = self.b.peers.get(s.peer)
            if p is None:
                continue
            t = totals.get(p.public, [0, 0, 0, 0])
            rows.append({
                "session_id": sid,
                "peer": p.name,
                "public_key": b64(p.public),
                "endpoint": endpoints.get(sid, (0, ""))[1],
                "allowed_ips": p.allowed_ips,
                "protocol": s.protocol,
                "latest_handshake": s.created,
                "age": round(now - s.created, 1),
                "rx_bytes": t[0],
                "tx_bytes": t[1],
                "slot": s.slot,
                "receiver_index": s.data_key,  # the key its data datagrams carry (WireGuard's receiver index)
                "initiator": s.initiator,
                **self.b.protocols[s.protocol].describe(s),
                "packets_per_edge": per_edge.get(sid, {}),
                "packets_per_worker": per_worker.get(sid, {}),
            })
        return rows

    def _admin_sessions(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        return {"ok": True, "sessions": self._session_rows(now)}

    def _admin_peers(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        totals = self._peer_totals()
        rows = []
        sessions = self._session_rows(now)
        for p in sorted(self.b.peers.values(), key=lambda p: p.name):
            mine = [s for s in sessions if s["public_key"] == b64(p.public)]
            newest = max(mine, key=lambda s: s["latest_handshake"], default=None)
            t = totals.get(p.public, [0, 0, 0, 0])
            rows.append({
                "name": p.name,
                "protocol": p.protocol,
                "public_key": b64(p.public),
                "allowed_ips": p.allowed_ips,
                "endpoint": newest["endpoint"] if newest else "",
                "latest_handshake": newest["latest_handshake"] if newest else None,
                "rx_bytes": t[0],
                "tx_bytes": t[1],
                "rx_packets": t[2],
                "tx_packets": t[3],
                "persistent_keepalive": p.keepalive,
                "cipher": newest.get("cipher") if newest else None,
                "sessions": len(mine),
                "source": p.source,
            })
        return {"ok": True, "peers": rows}

    def _next_free_ips(self) -> list[str]:
        """One unused host address from each tunnel network (IPv4 and/or IPv6)."""
        # single addresses (canonical text, as parse_network wrote them) in a set, without
        # parsing each: thousands of peers (OpenVPN clients enrolled by CN) stay cheap
        single: set[str] = set()
        nets = []
        for p in self.b.peers.values():
            for n in p.allowed_ips:
                addr, _, plen = n.partition("/")
                if plen == ("128" if ":" in addr else "32"):
                    single.add(addr)
                else:
                    nets.append(ipaddress.ip_network(n))
        out = []
        for iface in self.b.interfaces:
            found = None
            wide = [n for n in nets if n.version == iface.version and n.overlaps(iface.network)]  # type: ignore[arg-type]
            for i, host in enumerate(iface.network.hosts()):
                if i > 1 << 16:
                    break
                if host != iface.ip and str(host) not in single and not any(host in n for n in wide):
                    found = f"{host}/{iface.max_prefixlen}"
                    break
            if found is None:
                raise ValueError(f"no free address found in {iface.network}; pass --allowed-ip")
            out.append(found)
        return out

    def _admin_peer_add(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        name = req.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise ValueError("peer name must be 1 to 64 printable characters")
        if any(p.name == name for p in self.b.peers.values()):
            raise ValueError(f"a peer named {name!r} exists already; remove it first or pick another name")
        ips = req.get("allowed_ips") or self._next_free_ips()
        nets = [parse_network(ip, "allowed-ip") for ip in ips]
        check_overlaps([(p.name, p.allowed_ips) for p in self.b.peers.values()] + [(name, nets)])
        protocol = req.get("protocol") or DEFAULT_PROTOCOL
        if protocol not in self.b.protocols:
            raise ValueError(f"unknown protocol {protocol!r}; this fabric speaks {', '.join(self.b.protocols)}")
        if protocol not in self.b.ports:
            raise ValueError(f"this fabric does not serve {protocol}: give it a port (e.g. `fabric up "
                             f"--{protocol}-port PORT`, or [{protocol}] port in the config file) and restart")
        made = self.b.authorities[protocol].new_peer(req)
        if made.public in self.b.peers:
            raise ValueError(f"that public key belongs to peer {self.b.peers[made.public].name!r} already")
        keepalive = req.get("keepalive", 0) or 0
        if not isinstance(keepalive, int) or isinstance(keepalive, bool) or not 0 <= keepalive <= 65535:
            raise ValueError("keepalive must be a whole number of seconds from 0 to 65535")
        self.b._put_peer(Peer(name, made.public, nets, made.psk, keepalive, protocol=protocol))
        log.info("peer added", peer=name, protocol=protocol, allowed_ips=",".join(nets))
        return {
            "ok": True,
            "name": name,
            "protocol": protocol,
            "public_key": b64(made.public),
            **made.reply,
            "allowed_ips": nets,
            "listen_port": self.b.ports[protocol],
            "endpoint": self.b.endpoint,
            "networks": [str(i.network) for i in self.b.interfaces],
        }

    def _admin_peer_remove(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        name = req.get("name")
        peer = next((p for p in self.b.peers.values() if p.name == name), None)
        if peer is None:
            raise ValueError(f"no peer named {name!r}; `fabric admin peers` lists them")
        if peer.source == "config":
            raise ValueError(f"peer {name!r} comes from the config file: delete its [[peer]] there and restart")
        self.b._drop_peer(peer)
        self.b._persist()
        log.info("peer removed", peer=name)
        return {"ok": True, "name": name}

    def _admin_status(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        procs = []
        for (role, rid, pid), (seen, r) in sorted(self.b.reports.latest.items()):
            procs.append({
                "role": role, "id": rid, "pid": pid, "age": round(now - seen, 1),
                "alive": now - seen < EDGE_GONE_AFTER, "counters": r.get("counters", {}),
                "gauges": r.get("gauges", {}), "metrics": r.get("metrics"),
            })
        return {
            "ok": True, "broker": {"pid": os.getpid(), "seq": self.b.seq, "epoch": self.b.epoch,
                                   "counters": self.b.counters, "metrics": self.b.metrics_addr,
                                   "gauges": {"sessions": len(self.b.sessions), "peers": len(self.b.peers),
                                              "queue_pending_handshakes": self.b.pending_count()}},
            "processes": procs, "sessions": len(self.b.sessions), "peers": len(self.b.peers),
        }

    def _admin_status_load(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        """`_admin_status` plus what `fabric status` shows as load: the broker's start
        time and each process's counter increase per second between its last two reports."""
        reply = self._admin_status(req, now)
        reply["broker"]["started"] = self.b.started
        for p in reply["processes"]:
            p["rates"] = self.b.reports.rates((p["role"], p["id"], p["pid"]))
        return reply

    def _admin_stats(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        totals: dict[str, int] = dict(self.b.counters)
        for _, r in self.b.reports.latest.values():
            for k, v in r.get("counters", {}).items():
                key = f"{r['role']}.{k}"
                totals[key] = totals.get(key, 0) + int(v)
        # point-in-time figures: the broker's and the live processes' only
        gauges = {"broker.sessions": len(self.b.sessions), "broker.peers": len(self.b.peers),
                  "broker.queue_pending_handshakes": self.b.pending_count()}
        for seen, r in self.b.reports.latest.values():
            if now - seen < EDGE_GONE_AFTER:
                for k, v in r.get("gauges", {}).items():
                    key = f"{r['role']}.{k}"
                    gauges[key] = gauges.get(key, 0) + int(v)
        return {"ok": True, "counters": dict(sorted(totals.items())), "gauges": dict(sorted(gauges.items()))}
