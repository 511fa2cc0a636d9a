"""The `fabric` command line."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fabric import __version__
from fabric.ops import log as logmod
from fabric.ops.config import (
    DEFAULT_ADDRESS,
    DEFAULT_OPENVPN_PORT,
    DEFAULT_PORT,
    DEFAULT_TUN,
    ConfigError,
)

PROTOCOLS = ("wireguard", "openvpn")


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{v} is not a port; use 1 to 65535")
    return v


def _whole(text: str, lo: int, hi: int, noun: str = "number", low: str = "") -> int:
    """`text` as a whole number from `lo` to `hi` (`low` names what `lo` means), or the
    error argparse prints for the flag."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
    if not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"{v} is out of range; use {lo}{low} to {hi}")
    return v


def _count(text: str) -> int:
    return _whole(text, 1, 256)


def _id(text: str) -> int:
    return _whole(text, 0, 255)


def _usecs(text: str) -> int:
    from fabric.dataplane.moderation import MAX_USECS

    return _whole(text, 0, MAX_USECS, "number of microseconds", " (off)")


def _id_or_auto(text: str) -> int | None:
    return None if text == "auto" else _id(text)


def _cidrs(text: str) -> list[str]:
    from fabric.ops.config import parse_interfaces

    try:
        return parse_interfaces(text, "--address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--address: ")) from None


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP network, e.g. 198.18.100.7/32") from None


def _endpoint(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} must be HOST:PORT, e.g. vpn.example.org:51820")
    _port(port)
    return text


def _metrics_address(text: str) -> str:
    from fabric.ops.metrics import format_address, parse_address

    try:
        return format_address(*parse_address(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--metrics: ")) from None


def _metrics(p: argparse.ArgumentParser, hlp: str) -> None:
    p.add_argument("--metrics", metavar="HOST:PORT", type=_metrics_address, help=hlp)


def _crypto(p: argparse.ArgumentParser) -> None:
    from fabric.dataplane.placement import CRYPTO_MODES

    p.add_argument("--crypto", choices=CRYPTO_MODES,
                   help="where the AEAD of data runs: 'edge' (no hand-off: lowest latency and CPU), "
                        "'workers' (the edge only moves packets), 'auto' (the edge, and workers while "
                        "the edge is saturated and other cores idle; default: [server] crypto, else auto)")


def _rx_usecs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rx-usecs", type=_usecs, metavar="N",
                   help="receive moderation: after a pass that read a burst of datagrams and little "
                        "from the TUN, the edge waits N microseconds before reading again, so a stream "
                        "from a client that sends one datagram at a time costs fewer wake-ups (a NIC's "
                        "rx-usecs; lone packets never wait); 0 turns it off "
                        "(default: [server] rx_usecs, else 100)")


def _metrics_for(args: argparse.Namespace, base: str | None, role: str, ident: int | None,
                 edges: int) -> str | None:
    """--metrics, else this process's place in the config's `metrics` layout (off without either)."""
    from fabric.ops.metrics import child_address

    if args.metrics:
        return str(args.metrics)
    if base and ident is None:
        raise ConfigError("--id auto has no place in the config's metrics layout: give --metrics HOST:PORT")
    return child_address(base, role, ident, edges) if base and ident is not None else None


def _openvpn_port(p: argparse.ArgumentParser, hlp: str) -> None:
    p.add_argument("--openvpn-port", metavar="PORT", type=_port, help=hlp)


def _state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None,
                   help="keys, state and sockets (default $FABRIC_STATE_DIR or /var/lib/fabric)")


def _client(p: argparse.ArgumentParser) -> None:
    _state_dir(p)
    p.add_argument("--admin", metavar="ENDPOINT",
                   help="admin socket of the fabric (default: from --state-dir), e.g. tcp://HOST:PORT")
    p.add_argument("--key", metavar="FILE", help="your CURVE key (.key_secret from `fabric keys client`), for tcp")
    p.add_argument("--server-key", metavar="FILE", help="the fabric's CURVE public key (curve/server.key), for tcp")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=_timeout, default=5.0,
                   help="seconds to wait for the broker's answer (default 5)")


def _timeout(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= v <= 300:
        raise argparse.ArgumentTypeError(f"{v:g} is out of range; use 0.1 to 300 seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fabric", description="A WireGuard-compatible VPN server spread over processes.")
    parser.add_argument("--version", action="version", version=f"fabric {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    up = sub.add_parser("up", help="run broker, edges and workers on this host (the embedded default)")
    _state_dir(up)
    up.add_argument("--config", help="TOML configuration file")
    up.add_argument("--listen-port", type=_port, help=f"UDP port (default {DEFAULT_PORT})")
    _openvpn_port(up, f"also serve OpenVPN on this UDP port (e.g. {DEFAULT_OPENVPN_PORT}), with the "
                      "config's [openvpn] options or the defaults (default: [openvpn] port, else off)")
    up.add_argument("--listen", default="::", help="UDP address to bind (default :: = all, IPv4 and IPv6)")
    up.add_argument("--address", type=_cidrs, help=f"server tunnel address(es) with prefix, comma-separated for IPv4 and IPv6 (default {DEFAULT_ADDRESS})")
    up.add_argument("--edges", type=_count, help="edge processes (default: number of cores)")
    up.add_argument("--workers", type=_count, help="worker processes (default: number of cores)")
    up.add_argument("--tun", help=f"TUN device name (default {DEFAULT_TUN})")
    up.add_argument("--endpoint", type=_endpoint, help="HOST:PORT that client configs point at")
    up.add_argument("--no-reuseport", action="store_true", help="edge i binds port+i instead of sharing one port")
    _crypto(up)
    _rx_usecs(up)
    _metrics(up, "Prometheus endpoints from this base: broker PORT, edge i PORT+1+i, workers after the "
                 "edges, `fabric up` itself last (default: [server] metrics, else off)")

    br = sub.add_parser("broker", help="run the session broker")
    _state_dir(br)
    br.add_argument("--config", help="TOML configuration file (peers, [server] address)")
    br.add_argument("--address", type=_cidrs, help=f"server tunnel address(es) with prefix, comma-separated for IPv4 and IPv6 (default {DEFAULT_ADDRESS})")
    br.add_argument("--listen-port", type=_port, help=f"the UDP port edges use (default {DEFAULT_PORT})")
    _openvpn_port(br, "serve OpenVPN too, on this UDP port of the edges, with the config's [openvpn] "
                      "options or the defaults (default: [openvpn] port, else off)")
    br.add_argument("--endpoint", type=_endpoint, help="HOST:PORT that client configs point at")
    br.add_argument("--tcp", metavar="HOST:PORT", type=_endpoint,
                    help="also listen on tcp PORT..PORT+4 (pub, snapshot, commit, stats, admin); needs `fabric keys init`")
    _metrics(br, "serve Prometheus metrics here, e.g. 127.0.0.1:9580 (default: [server] metrics, else off)")

    ed = sub.add_parser("edge", help="run one edge (UDP socket + TUN queue)")
    _state_dir(ed)
    ed.add_argument("--id", type=_id, required=True, help="edge number, unique on this host")
    ed.add_argument("--config", help="TOML configuration file ([server] listen_port, tun, address, state_dir)")
    ed.add_argument("--listen", default="::", help="UDP address to bind (default ::)")
    ed.add_argument("--listen-port", type=_port, help=f"UDP port (default {DEFAULT_PORT})")
    _openvpn_port(ed, "also listen for OpenVPN on this UDP port (default: [openvpn] port, else off)")
    ed.add_argument("--tun", help=f"multiqueue TUN device (default {DEFAULT_TUN})")
    ed.add_argument("--address", type=_cidrs, help="create/configure the TUN with these addresses if needed")
    ed.add_argument("--no-reuseport", action="store_true", help="bind port+id instead of SO_REUSEPORT")
    _crypto(ed)
    _rx_usecs(ed)
    ed.add_argument("--tcp", metavar="HOST:PORT", type=_endpoint,
                    help="also offer work on tcp PORT, PORT+1, PORT+2 (work, results, control) for remote workers; "
                         "needs `fabric keys init`")
    _metrics(ed, "serve Prometheus metrics here (default: base+1+id from [server] metrics, else off)")

    wk = sub.add_parser("worker", help="run one crypto worker")
    _state_dir(wk)
    wk.add_argument("--id", type=_id_or_auto, required=True,
                    help="worker number, unique on this host; 'auto' takes the first free one (replicas)")
    wk.add_argument("--config", help="TOML configuration file ([server] state_dir)")
    wk.add_argument("--broker", metavar="tcp://HOST:PORT",
                    help="a remote broker's --tcp address: serve its fabric from another host over CURVE")
    wk.add_argument("--key", metavar="FILE", help="this worker's CURVE key (.key_secret from `fabric keys client`)")
    wk.add_argument("--server-key", metavar="FILE", help="the fabric's CURVE public key (curve/server.key)")
    _metrics(wk, "serve Prometheus metrics here (default: base+1+edges+id from [server] metrics, else off)")

    ks = sub.add_parser("keys", help="CURVE keys that protect the fabric's ZeroMQ sockets")
    ksub = ks.add_subparsers(dest="keys_action", metavar="ACTION")
    ksub.required = True
    kinit = ksub.add_parser("init", help="create the fabric's CURVE keypair (turns CURVE on for every socket)")
    _state_dir(kinit)
    kcl = ksub.add_parser("client", help="create and authorize a key for a remote worker or admin client")
    kcl.add_argument("name")
    _state_dir(kcl)
    krv = ksub.add_parser("revoke", help="stop admitting a client key")
    krv.add_argument("name")
    _state_dir(krv)
    kls = ksub.add_parser("list", help="authorized client keys")
    _state_dir(kls)
    kls.add_argument("--json", action="store_true", help="machine-readable output")

    stt = sub.add_parser("status", help="the whole fabric at a glance: processes, health, load, sessions",
                         description="Every process of the fabric with its health and load. Exit code: "
                                     "0 healthy, 1 degraded (the summary says which process), "
                                     "2 the broker cannot be reached.")
    _client(stt)

    cf = sub.add_parser("config", help="check a TOML configuration file")
    csub = cf.add_subparsers(dest="config_action", metavar="ACTION")
    csub.required = True
    cck = csub.add_parser("check", help="validate FILE; print a summary, or the problem and its fix (exit 1)")
    cck.add_argument("file", metavar="FILE")
    cck.add_argument("--json", action="store_true", help="machine-readable output")

    adm = sub.add_parser("admin", help="inspect a running fabric")
    asub = adm.add_subparsers(dest="what", metavar="WHAT")
    asub.required = True
    for name, hlp in (("peers", "configured peers with traffic counters"),
                      ("sessions", "live sessions with per-edge and per-worker packets"),
                      ("status", "every process that reported to the broker (`fabric status` sums it up)"),
                      ("stats", "all counters, drops by reason")):
        ap = asub.add_parser(name, help=hlp)
        if name in ("peers", "sessions"):
            ap.add_argument("name", nargs="?", help="only this peer")
        _client(ap)

    peer = sub.add_parser("peer", help="add or remove peers at runtime")
    psub = peer.add_subparsers(dest="action", metavar="ACTION")
    psub.required = True
    hlp = "add a peer and print its client config (wg-quick file, or .ovpn profile with --openvpn)"
    add = psub.add_parser("add", help=hlp, description=hlp[0].upper() + hlp[1:] + ".")
    add.add_argument("name")
    add.add_argument("--protocol", choices=PROTOCOLS, default=None,
                     help="the peer's wire protocol (default wireguard); the fabric must serve it")
    add.add_argument("--openvpn", action="store_true",
                     help="an OpenVPN peer: print an inline .ovpn profile (same as --protocol openvpn)")
    add.add_argument("--cn", metavar="CN",
                     help="OpenVPN: register the existing client(s) whose certificate the CA signed with this "
                          "common name; no key or profile is made, the client's own profile connects unchanged")
    add.add_argument("--certificate", metavar="FILE",
                     help="OpenVPN: register the existing client with this certificate (PEM); no key or profile "
                          "is made")
    add.add_argument("--allowed-ip", action="append", type=_network, dest="allowed_ips",
                     help="tunnel address(es) of the peer (default: next free address)")
    add.add_argument("--endpoint", type=_endpoint, help="HOST:PORT to write into the client config")
    add.add_argument("--public-key", help="use this client public key instead of generating a key pair (WireGuard)")
    add.add_argument("--preshared-key", action="store_true", help="also generate a preshared key (WireGuard)")
    add.add_argument("--keepalive", type=int, default=0, help="server-side persistent keepalive, seconds")
    add.add_argument("--output", "-o", help="write the config to this file (0600) instead of stdout")
    add.add_argument("--qr", action="store_true",
                     help="also print the config as a QR code (for the WireGuard phone apps)")
    _client(add)
    rm = psub.add_parser("remove", help="remove a peer and end its sessions")
    rm.add_argument("name")
    _client(rm)

    try:
        from fabric.testbed import demo
    except ImportError:
        demo = None  # type: ignore[assignment]
    if demo is not None:
        dm = sub.add_parser("demo", help="run the fabric and a wireguard-go client (--openvpn: an OpenVPN one) "
                                         "in network namespaces")
        demo.add_arguments(dm)
    import importlib

    for name, hlp in (("cluster", "run or check compose.yaml as processes in network namespaces"),
                      ("soak", "wireguard-go clients under load while processes are killed"),
                      ("bench", "measure fabric against wireguard-go and OpenVPN in one run")):
        try:
            mod = importlib.import_module(f"fabric.testbed.{name}")
        except ImportError:
            continue
        mod.add_arguments(sub.add_parser(name, help=hlp))
    # `fabric up -v` as well as `fabric -v up` (the counts add up)
    for sp in sub.choices.values():
        try:
            sp.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose",
                            help="more log output (-vv for debug)")
        except argparse.ArgumentError:
            pass
    return parser


def _admin_target(args: argparse.Namespace) -> tuple[str, dict[int, object] | None]:
    """The admin endpoint and CURVE client options to reach it."""
    from fabric.control import zmqcurve as curve
    from fabric.ops import admin
    from fabric.ops.paths import StateDir

    ep = admin.endpoint_for(args.state_dir, args.admin)
    if args.key or args.server_key:
        if not (args.key and args.server_key):
            raise ConfigError("--key and --server-key go together")
        return ep, curve.remote(args.key, args.server_key).client
    if ep.startswith("tcp://"):
        raise ConfigError("a tcp admin endpoint needs --key FILE and --server-key FILE (CURVE)")
    local = curve.local(StateDir.at(args.state_dir))
    return ep, local.client if local else None


def cmd_keys(args: argparse.Namespace) -> int:
    from fabric.control import zmqcurve as curve
    from fabric.ops.paths import StateDir

    sd = StateDir.at(args.state_dir)
    if args.keys_action == "init":
        path, created = curve.init(sd)
        print(f"{'created' if created else 'kept existing'} CURVE server key: {path}")
        print("every socket of this fabric now uses CURVE; restart its processes to apply")
    elif args.keys_action == "client":
        public, secret = curve.new_client(sd, args.name)
        print(f"authorized {args.name}: give {secret} (secret) and {curve.curve_dir(sd) / 'server.key'} to it")
    elif args.keys_action == "revoke":
        if not curve.revoke(sd, args.name):
            raise ConfigError(f"no authorized client key {args.name!r}; `fabric keys list` shows them")
        print(f"revoked {args.name} (takes effect within seconds)")
    elif getattr(args, "json", False):
        from fabric.ops.admin import dump

        print(dump(curve.authorized(sd)))
    else:
        print("\n".join(curve.authorized(sd)))
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    import time

    from fabric.ops import admin, render

    ep, opts = _admin_target(args)
    reply = admin.request(ep, {"op": args.what}, timeout=args.timeout, curve=opts)
    now = time.time()
    if args.what == "peers":
        peers = reply["peers"]
        if args.name is not None:
            peers = [admin.check_peer(peers, args.name)]
        out: object = peers
        tables: list[render.Table | str] = [render.peers_table(peers, now)]
    elif args.what == "sessions":
        sessions = reply["sessions"]
        if args.name is not None:
            peers = admin.request(ep, {"op": "peers"}, timeout=args.timeout, curve=opts)["peers"]
            admin.check_peer(peers, args.name)
            sessions = [s for s in sessions if s["peer"] == args.name]
        out = sessions
        tables = [render.sessions_table(sessions, now)]
    elif args.what == "status":
        out = reply
        tables = render.status_tables(render.status_view(reply, None, now), now)
    else:
        out = reply["counters"]
        tables = list(render.stats_tables(reply["counters"], reply.get("gauges")))
    if args.json:
        print(admin.dump(out))
    else:
        render.draw(tables)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """`fabric status`: 0 healthy, 1 degraded, 2 unreachable (one line on stderr)."""
    import time

    from fabric.ops import admin, render

    try:
        ep, opts = _admin_target(args)
        st = admin.request(ep, {"op": "status"}, timeout=args.timeout, curve=opts)
        sessions = admin.request(ep, {"op": "sessions"}, timeout=args.timeout, curve=opts)["sessions"]
        server = admin.request(ep, {"op": "server"}, timeout=args.timeout, curve=opts)
    except admin.Unreachable as exc:
        if args.json:
            print(admin.dump({"health": "unreachable", "problems": [str(exc)], "summary": f"fabric unreachable: {exc}"}))
        print(f"fabric: unreachable: {exc}", file=sys.stderr)
        return 2
    pids = [st["broker"]["pid"], *(p["pid"] for p in st.get("processes", []) if p.get("alive"))]
    view = render.status_view(st, sessions, time.time(), render.cpu_percent(pids), server=server)
    if args.json:
        print(admin.dump(view))
    else:
        render.draw(render.status_tables(view, time.time()))
    return 0 if view["health"] == "ok" else 1


def cmd_peer(args: argparse.Namespace) -> int:
    from fabric.ops import admin, render

    ep, opts = _admin_target(args)
    if args.action == "remove":
        admin.request(ep, {"op": "peer_remove", "name": args.name}, timeout=args.timeout, curve=opts)
        print(f"removed peer {args.name}" if not args.json else admin.dump({"removed": args.name}))
        return 0
    if args.keepalive < 0 or args.keepalive > 65535:
        raise ConfigError("--keepalive must be 0 to 65535 seconds")
    protocol = peer_protocol(args)
    if args.public_key:
        from fabric.protocols.wireguard.crypto import key_from_base64

        try:
            key_from_base64(args.public_key)
        except ValueError as exc:
            raise ConfigError(f"--public-key: {exc}") from None
    certificate = None
    if args.certificate:
        try:
            certificate = Path(args.certificate).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--certificate {args.certificate}: cannot be read ({exc})") from None
    reply = admin.request(ep, {
        "op": "peer_add", "name": args.name, "protocol": protocol, "allowed_ips": args.allowed_ips,
        "public_key": args.public_key, "psk": args.preshared_key, "keepalive": args.keepalive,
        **({"cn": args.cn} if args.cn else {}), **({"certificate": certificate} if certificate else {}),
    }, timeout=args.timeout, curve=opts)
    reply.setdefault("protocol", protocol)
    endpoint = admin.client_endpoint(reply, protocol, args.endpoint)
    text = admin.client_config(reply, endpoint)
    qr = render.qr_text(text) if args.qr else None
    if args.json:
        reply.pop("ok", None)
        print(admin.dump({**reply, "config": text, "client_endpoint": endpoint,
                          **({"qr": qr} if qr is not None else {})}))
        return 0
    if args.output:
        admin.write_private(args.output, text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    if qr is not None:
        if not args.output:
            print()
        tty = sys.stdout.isatty()
        for line in qr.splitlines():
            # light modules in white on black, so phones read it on any terminal theme
            print(f"\x1b[38;5;255;48;5;232m{line}\x1b[0m" if tty else line)
    return 0


# flags of `fabric peer add` that only a WireGuard peer has: what to say instead
WIREGUARD_ONLY = {
    "public_key": ("--public-key", "an OpenVPN peer gets a key and certificate made by the fabric, "
                                   "inline in its profile"),
    "preshared_key": ("--preshared-key", "OpenVPN's control channel is protected by the server's "
                                         "tls-crypt/tls-auth key, inline in the profile"),
    "qr": ("--qr", "the phone apps scan WireGuard configs only; copy the .ovpn profile (--output FILE)"),
}


def peer_protocol(args: argparse.Namespace) -> str:
    """The protocol of `fabric peer add` (--protocol, or --openvpn); UsageError for
    contradicting flags or WireGuard-only flags on another protocol."""
    protocol = args.protocol or ("openvpn" if args.openvpn else "wireguard")
    if args.openvpn and protocol != "openvpn":
        raise UsageError(f"--openvpn contradicts --protocol {protocol}: give one of them")
    for flag in ("cn", "certificate"):
        if getattr(args, flag, None) and protocol != "openvpn":
            raise UsageError(f"--{flag} registers an existing OpenVPN client: give it with --openvpn")
    if getattr(args, "cn", None) and getattr(args, "certificate", None):
        raise UsageError("--cn and --certificate: give one (a client by its common name, or by its certificate)")
    if protocol != "wireguard":
        for dest, (flag, why) in WIREGUARD_ONLY.items():
            if getattr(args, dest, None):
                raise UsageError(f"{flag} is for WireGuard peers, not with --protocol {protocol}: {why}")
    return protocol


class UsageError(ConfigError):
    """A combination of command-line arguments that cannot work (exit 2 with usage)."""


def check_usage(args: argparse.Namespace) -> None:
    """Checks across arguments, made before a command does anything; UsageError."""
    if args.command == "peer" and args.action == "add":
        peer_protocol(args)


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` came from, for its usage line."""
    path = [args.command, *(v for k in ("action", "what", "keys_action", "config_action")
                            if isinstance(v := getattr(args, k, None), str))]
    p = parser
    for name in path:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            break
        p = subs[0].choices[name]
    return p


def cmd_config(args: argparse.Namespace) -> int:
    from fabric.ops import admin, config

    try:
        cfg = config.load(args.file)
        try:
            config.require_protocols(cfg.server.ports())  # e.g. [openvpn] on a fabric without OpenVPN
            config.check_files(cfg)  # e.g. an existing OpenVPN PKI: the files it names, checked
        except ConfigError as exc:
            raise ConfigError(f"{args.file}: {exc}") from None
    except ConfigError as exc:
        if not args.json:
            raise
        print(admin.dump({"ok": False, "file": args.file, "error": str(exc)}))
        return 1
    if args.json:
        print(admin.dump({"ok": True, "file": args.file, **config.summary(cfg)}))
    else:
        print(config.format_summary(args.file, cfg))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from brokers import broker
    from fabric.ops import config, preflight
    from fabric.ops.paths import StateDir

    cfg = config.load(args.config)
    ports, options = config.served(cfg.server, args.listen_port, args.openvpn_port)
    config.require_protocols(ports)
    sd = StateDir.at(args.state_dir or cfg.server.state_dir)
    preflight.for_broker(sd)
    more = len(ports) > 1  # WireGuard alone: nothing extra (the broker's default)
    return broker.run(sd, args.address or cfg.server.addresses, ports["wireguard"],
                      args.endpoint or cfg.server.endpoint, cfg.peers, tcp=args.tcp,
                      metrics_addr=_metrics_for(args, cfg.server.metrics, "broker", 0, cfg.server.edges),
                      ports=ports if more else None, options=options if more else None)


def cmd_edge(args: argparse.Namespace) -> int:
    from fabric.dataplane import edge
    from fabric.ops import config, preflight
    from fabric.ops.paths import StateDir

    cfg = config.load(args.config).server
    addresses = args.address or (cfg.addresses if args.config else None)
    ports, _ = config.served(cfg, args.listen_port, args.openvpn_port)
    config.require_protocols(ports)
    port, ovpn = ports["wireguard"], ports.get("openvpn")
    shift = 0 if not args.no_reuseport else args.id  # edge i binds port+i without SO_REUSEPORT
    preflight.for_edge(args.listen, port + shift, not args.no_reuseport, args.tun or cfg.tun,
                       ovpn + shift if ovpn else None)
    served: dict[str, Any] = {"ports": ports} if len(ports) > 1 else {}
    return edge.run(StateDir.at(args.state_dir or cfg.state_dir), args.id, args.listen,
                    port, args.tun or cfg.tun, addresses, not args.no_reuseport,
                    tcp=args.tcp, metrics_addr=_metrics_for(args, cfg.metrics, "edge", args.id, cfg.edges),
                    crypto=args.crypto or cfg.crypto,
                    rx_usecs=cfg.rx_usecs if args.rx_usecs is None else args.rx_usecs, **served)


def cmd_worker(args: argparse.Namespace) -> int:
    from fabric.control import zmqcurve as curve
    from fabric.ops import config
    from fabric.ops.paths import StateDir
    from workers import worker

    cfg = config.load(args.config).server
    keys = None
    if args.key or args.server_key:
        if not (args.key and args.server_key):
            raise ConfigError("--key and --server-key go together")
        keys = curve.remote(args.key, args.server_key)
    if args.broker and not args.broker.startswith("tcp://"):
        raise ConfigError(f"--broker {args.broker!r}: give the broker's tcp address, tcp://HOST:PORT")
    return worker.run(StateDir.at(args.state_dir or cfg.state_dir), args.id, broker=args.broker, keys=keys,
                      metrics_addr=_metrics_for(args, cfg.metrics, "worker", args.id, cfg.edges))


def cmd_up(args: argparse.Namespace) -> int:
    from fabric.ops import up

    return up.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_usage(args)
    except UsageError as exc:
        _subparser(parser, args).error(str(exc))
    args.verbose += getattr(args, "sub_verbose", 0)
    logmod.setup(args.verbose)
    handlers = {
        "admin": cmd_admin, "peer": cmd_peer, "broker": cmd_broker, "edge": cmd_edge,
        "worker": cmd_worker, "up": cmd_up, "keys": cmd_keys, "config": cmd_config, "status": cmd_status,
    }
    try:
        if args.command == "demo":
            from fabric.testbed import demo

            return demo.run(args)
        if args.command in ("soak", "bench", "cluster"):
            import importlib

            return int(importlib.import_module(f"fabric.testbed.{args.command}").run(args))
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fabric admin peers | head`: the reader left, nothing to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        from fabric.control.zmqcurve import KeyError_
        from fabric.dataplane.tun import TunError
        from fabric.ops.admin import AdminError

        if isinstance(exc, ConfigError | AdminError | TunError | KeyError_ | RuntimeError | PermissionError | OSError):
            print(f"fabric: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
