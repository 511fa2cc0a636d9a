"""The TOML configuration file, validated with messages that name the key and the fix.

    [server]
    listen_port = 51820              # UDP port all edges share
    address = "198.18.100.1/24"      # the server's tunnel address(es): one string, or a list for
                                     # IPv4 and IPv6; peers get addresses from these networks
    tun = "fabric0"
    edges = 2                        # default: number of cores
    workers = 2                      # default: number of cores
    crypto = "auto"                  # where the AEAD of data runs: "auto", "edge" or "workers"
    state_dir = "/var/lib/fabric"
    endpoint = "vpn.example.org:51820"   # written into client configs by `fabric peer add`
    metrics = "127.0.0.1:9580"       # Prometheus endpoints: broker 9580, edges 9581.., workers after
                                     # them, `fabric up` last (off when absent)

    [openvpn]                        # optional: serve OpenVPN 2.6 clients too (off when absent)
    port = 1194                      # its UDP port (default 1194; not the WireGuard port)
    data_ciphers = ["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"]   # default: all three
    wrap = "tls-crypt"               # control channel: "tls-crypt" (default), "tls-auth" or "none"
    reneg_sec = 3600                 # renegotiate data keys this often (0: never; at most 86400)
    ping = 10                        # keepalive: ping every 10 s, restart after 60 s of silence
    ping_restart = 60
    push = ["route 198.18.60.0 255.255.255.0", "dhcp-option DNS 198.18.0.53"]   # extra options
    # an existing OpenVPN server's PKI, so its client profiles connect unchanged (absolute
    # paths, read at every broker start; see contrib/fabric.toml):
    ca = "/etc/openvpn/server/ca.crt"        # ca, cert, key: all three, the server's
    cert = "/etc/openvpn/server/server.crt"
    key = "/etc/openvpn/server/server.key"
    tls_auth = "/etc/openvpn/server/ta.key"  # or tls_crypt = PATH, or wrap = "none"
    key_direction = 0                        # tls-auth's direction on the server (leave out: none)
    auth = "SHA256"                          # tls-auth's HMAC digest (--auth; default SHA1)
    crl = "/etc/openvpn/server/crl.pem"      # revoked certificates are refused (re-read on change)
    ca_key = "/etc/openvpn/server/ca.key"    # only for new profiles (`fabric peer add --openvpn`)
    enroll = "cn"                            # a client of the CA becomes a peer at its first connection

    [[peer]]
    name = "laptop"
    public_key = "base64..."
    allowed_ips = ["198.18.100.2/32"]
    preshared_key = "base64..."      # optional
    persistent_keepalive = 25        # optional, seconds
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fabric.dataplane.moderation import DEFAULT_USECS, MAX_USECS
from fabric.protocols.wireguard.crypto import key_from_base64

DEFAULT_PORT = 51820
DEFAULT_ADDRESS = "198.18.100.1/24"
DEFAULT_TUN = "fabric0"
DEFAULT_OPENVPN_PORT = 1194
OPENVPN_CIPHERS = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")
OPENVPN_WRAPS = ("tls-crypt", "tls-auth", "none")
# the protocols' names in fabric.protocols.registry()
WIREGUARD = "wireguard"
OPENVPN = "openvpn"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to do."""


@dataclass
class PeerConfig:
    name: str
    public_key: bytes
    allowed_ips: list[str]
    preshared_key: bytes | None = None
    persistent_keepalive: int = 0


@dataclass
class ServerConfig:
    listen_port: int = DEFAULT_PORT
    addresses: list[str] = field(default_factory=lambda: [DEFAULT_ADDRESS])
    tun: str = DEFAULT_TUN
    edges: int = field(default_factory=lambda: os.cpu_count() or 1)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    crypto: str = "auto"  # fabric/dataplane/placement.py CRYPTO_MODES
    rx_usecs: int = DEFAULT_USECS  # receive moderation, fabric/dataplane/moderation.py (0: off)
    state_dir: str | None = None
    endpoint: str | None = None
    metrics: str | None = None  # base HOST:PORT of the Prometheus endpoints (fabric/ops/metrics.py)
    # the [openvpn] table with every key filled in (openvpn_defaults()), None when OpenVPN is off
    openvpn: dict[str, Any] | None = None

    def ports(self) -> dict[str, int]:
        """The UDP port of each protocol served, by protocol name (WireGuard always)."""
        out = {WIREGUARD: self.listen_port}
        if self.openvpn is not None:
            out[OPENVPN] = int(self.openvpn["port"])
        return out


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    peers: list[PeerConfig] = field(default_factory=list)
    # things that work but are probably not meant (e.g. a peer network the TUN does not route)
    warnings: list[str] = field(default_factory=list)


def parse_port(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: {value!r} is not a port; use a number from 1 to 65535")
    return value


def parse_interface(value: Any, where: str) -> str:
    try:
        iface = ipaddress.ip_interface(str(value))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an address with prefix; write e.g. 198.18.100.1/24") from None
    if iface.network.prefixlen == iface.max_prefixlen:
        raise ConfigError(f"{where}: {value} is a single address; give the tunnel network's prefix, e.g. /24")
    return str(iface)


def parse_interfaces(value: Any, where: str) -> list[str]:
    """One address or a list (a string may also be comma-separated); at most one per family."""
    items = value if isinstance(value, list) else str(value).split(",")
    out = [parse_interface(str(v).strip(), where) for v in items if str(v).strip()]
    if not out:
        raise ConfigError(f"{where}: no address given; write e.g. 198.18.100.1/24")
    versions = [ipaddress.ip_interface(a).version for a in out]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"{where}: give at most one IPv4 and one IPv6 address")
    return out


def parse_network(value: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IP network; write e.g. 198.18.100.2/32") from None


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {value!r} must be a whole number from {lo} to {hi}")
    return value


def _key(value: Any, where: str) -> bytes:
    try:
        return key_from_base64(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}; generate one with `wg genkey | wg pubkey`") from None


_SERVER_KEYS = {"listen_port", "address", "tun", "edges", "workers", "crypto", "rx_usecs", "state_dir", "endpoint",
                "metrics"}
_PEER_KEYS = {"name", "public_key", "allowed_ips", "preshared_key", "persistent_keepalive"}
_OPENVPN_KEYS = {"port", "data_ciphers", "wrap", "reneg_sec", "ping", "ping_restart", "push",
                 # an existing server's PKI (fabric.protocols.openvpn.imported)
                 "ca", "cert", "key", "ca_key", "tls_crypt", "tls_auth", "crl", "key_direction", "auth", "enroll"}
_OPENVPN_FILES = {"ca": "ca.crt", "cert": "server.crt", "key": "server.key", "ca_key": "ca.key",
                  "tls_crypt": "tc.key", "tls_auth": "ta.key", "crl": "crl.pem"}  # and an example name
_OPENVPN_DIGESTS = ("SHA1", "SHA224", "SHA256", "SHA384", "SHA512")  # tls-auth's --auth
_OPENVPN_ENROLL = ("none", "cn")
_SECTIONS = {"server": "[server]", "openvpn": "[openvpn]", "peer": "[[peer]]"}
_MAX_SECONDS = 86400  # reneg_sec, ping, ping_restart: at most a day (as the OpenVPN authority takes them)


def _unknown(where: str, key: str, known: set[str]) -> ConfigError:
    """An unknown key, with the nearest known one when it looks like a typo."""
    guess = difflib.get_close_matches(key.lower().replace("-", "_"), sorted(known), n=1, cutoff=0.6)
    if guess:
        return ConfigError(f"{where}: unknown key; did you mean {guess[0]!r}?")
    return ConfigError(f"{where}: unknown key; known keys are {', '.join(sorted(known))}")


def parse_endpoint(value: Any, where: str) -> str:
    """HOST:PORT (an IPv6 host in brackets), as written into client configs."""
    text = str(value) if isinstance(value, str) else ""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {value!r} must be HOST:PORT, e.g. \"vpn.example.org:51820\"")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"{where}: {value!r}: put an IPv6 address in brackets, e.g. \"[2001:db8::1]:51820\"")
    return text


def parse_peer_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: every peer needs a name, e.g. name = \"laptop\"")
    if len(value) > 64 or not value.isprintable():
        raise ConfigError(f"{where}: {value[:70]!r} must be 1 to 64 printable characters")
    return value


def parse(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document."""
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        name = sorted(unknown)[0]
        guess = difflib.get_close_matches(name.lower(), list(_SECTIONS), n=1, cutoff=0.6)
        hint = f"did you mean {_SECTIONS[guess[0]]}?" if guess else (
            "the sections are [server], [openvpn] and [[peer]]")
        raise ConfigError(f"unknown section {name!r}; {hint}")
    cfg = Config()
    srv = data.get("server", {})
    if not isinstance(srv, dict):
        raise ConfigError("server: must be a table ([server])")
    for key in srv:
        if key not in _SERVER_KEYS:
            raise _unknown(f"server.{key}", key, _SERVER_KEYS)
    s = cfg.server
    if "listen_port" in srv:
        s.listen_port = parse_port(srv["listen_port"], "server.listen_port")
    if "address" in srv:
        s.addresses = parse_interfaces(srv["address"], "server.address")
    if "tun" in srv:
        tun = srv["tun"]
        if not isinstance(tun, str) or not 1 <= len(tun.encode()) <= 15 or tun in (".", "..") or any(
                c in tun for c in "/: \t\n\0"):
            raise ConfigError(f"server.tun: {tun!r} must be an interface name of 1 to 15 characters "
                              "without '/', ':' or spaces, e.g. \"fabric0\"")
        s.tun = tun
    if "edges" in srv:
        s.edges = _int(srv["edges"], "server.edges", 1, 256)
    if "workers" in srv:
        s.workers = _int(srv["workers"], "server.workers", 1, 256)
    if "crypto" in srv:
        from fabric.dataplane.placement import CRYPTO_MODES

        if srv["crypto"] not in CRYPTO_MODES:
            raise ConfigError(f"server.crypto: {srv['crypto']!r} is not a placement; use one of "
                              + ", ".join(f'"{m}"' for m in CRYPTO_MODES))
        s.crypto = srv["crypto"]
    if "rx_usecs" in srv:
        s.rx_usecs = _int(srv["rx_usecs"], "server.rx_usecs", 0, MAX_USECS)
    if "state_dir" in srv:
        sd = srv["state_dir"]
        if not isinstance(sd, str) or not sd.strip() or "\0" in sd:
            raise ConfigError(f"server.state_dir: {sd!r} must be a directory path, e.g. \"/var/lib/fabric\"")
        s.state_dir = sd
    if "endpoint" in srv:
        s.endpoint = parse_endpoint(srv["endpoint"], "server.endpoint")
    if "metrics" in srv:
        from fabric.ops.metrics import format_address, parse_address

        if not isinstance(srv["metrics"], str):
            raise ConfigError(f"server.metrics: {srv['metrics']!r} must be a string \"HOST:PORT\", e.g. \"127.0.0.1:9580\"")
        s.metrics = format_address(*parse_address(srv["metrics"], "server.metrics"))
    if "openvpn" in data:
        s.openvpn = parse_openvpn(data["openvpn"])
        if s.openvpn["port"] == s.listen_port:
            raise ConfigError(
                f"openvpn.port: {s.listen_port} is server.listen_port (WireGuard's port) too; give each protocol "
                f"its own UDP port, e.g. port = {DEFAULT_OPENVPN_PORT if s.listen_port != DEFAULT_OPENVPN_PORT else 1195}")
    peers = data.get("peer", [])
    if not isinstance(peers, list):
        raise ConfigError("peer: peers are an array of tables; write [[peer]] for each")
    names: set[str] = set()
    keys: set[bytes] = set()
    for i, p in enumerate(peers):
        where = f"peer[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in p:
            if key not in _PEER_KEYS:
                raise _unknown(f"{where}.{key}", key, _PEER_KEYS)
        name = parse_peer_name(p.get("name"), f"{where}.name")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used twice; peer names must be unique")
        names.add(name)
        if "public_key" not in p:
            raise ConfigError(f"{where}.public_key: missing; put the client's `wg pubkey` here")
        pub = _key(p["public_key"], f"{where}.public_key")
        if pub in keys:
            other = next(q.name for q in cfg.peers if q.public_key == pub)
            raise ConfigError(f"{where}.public_key: peer {other!r} has this key already; each client needs its own key pair")
        keys.add(pub)
        ips = p.get("allowed_ips", [])
        if isinstance(ips, str):
            ips = [ips]
        if not isinstance(ips, list):
            raise ConfigError(f"{where}.allowed_ips: must be a list of networks")
        nets = [parse_network(ip, f"{where}.allowed_ips") for ip in ips]
        psk = _key(p["preshared_key"], f"{where}.preshared_key") if "preshared_key" in p else None
        ka = _int(p.get("persistent_keepalive", 0), f"{where}.persistent_keepalive", 0, 65535)
        cfg.peers.append(PeerConfig(name, pub, nets, psk, ka))
        cfg.warnings += _check_against_server(where, nets, s)
    check_overlaps([(p.name, p.allowed_ips) for p in cfg.peers])
    return cfg


def openvpn_defaults(port: int = DEFAULT_OPENVPN_PORT) -> dict[str, Any]:
    """The [openvpn] table an empty `[openvpn]` (or `--openvpn-port PORT`) stands for."""
    return {"port": port, "data_ciphers": list(OPENVPN_CIPHERS), "wrap": "tls-crypt",
            "reneg_sec": 3600, "ping": 10, "ping_restart": 60, "push": []}


def _ciphers(value: Any, where: str) -> list[str]:
    """A list of OpenVPN data cipher names (or OpenVPN's own "A:B" string), spelled
    as OpenVPN does, in order, each once."""
    items = value.split(":") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise ConfigError(f"{where}: must be a list of cipher names, e.g. [\"AES-256-GCM\", \"CHACHA20-POLY1305\"]")
    out: list[str] = []
    for c in items:
        name = next((k for k in OPENVPN_CIPHERS if k == c.strip().upper()), None)
        if name is None:
            raise ConfigError(f"{where}: {c!r} is not a data cipher fabric offers; use "
                              + ", ".join(f'"{k}"' for k in OPENVPN_CIPHERS))
        if name in out:
            raise ConfigError(f"{where}: {name} is listed twice; name each cipher once")
        out.append(name)
    if not out:
        raise ConfigError(f"{where}: no cipher given; leave the key out for all of "
                          + ", ".join(OPENVPN_CIPHERS))
    return out


def _push(value: Any, where: str) -> list[str]:
    """Extra options pushed to clients, one option per string (OpenVPN joins them with
    commas in its PUSH_REPLY, so an option may hold no comma and no line break)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: must be a list of options, e.g. [\"route 198.18.60.0 255.255.255.0\"]")
    out = []
    for i, opt in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(opt, str) or not opt.strip():
            raise ConfigError(f"{at}: {opt!r} must be an option as a non-empty string, e.g. "
                              "\"dhcp-option DNS 198.18.0.53\"")
        if "," in opt:
            raise ConfigError(f"{at}: {opt!r} holds a comma, which ends an option in OpenVPN's push message; "
                              "put each option in a string of its own")
        if any(c in opt for c in "\n\r\0"):
            raise ConfigError(f"{at}: {opt!r} holds a line break; put each option in a string of its own, on one line")
        out.append(opt.strip())
    return out


def parse_openvpn(table: Any, where: str = "openvpn") -> dict[str, Any]:
    """The [openvpn] table: every key filled in (openvpn_defaults() for those left out)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([openvpn])")
    for key in table:
        if key not in _OPENVPN_KEYS:
            raise _unknown(f"{where}.{key}", key, _OPENVPN_KEYS)
    out = openvpn_defaults()
    if "port" in table:
        out["port"] = parse_port(table["port"], f"{where}.port")
    if "data_ciphers" in table:
        out["data_ciphers"] = _ciphers(table["data_ciphers"], f"{where}.data_ciphers")
    if "wrap" in table:
        if table["wrap"] not in OPENVPN_WRAPS:
            raise ConfigError(f"{where}.wrap: {table['wrap']!r} is not a control channel wrapping; use one of "
                              + ", ".join(f'"{w}"' for w in OPENVPN_WRAPS))
        out["wrap"] = table["wrap"]
    if "reneg_sec" in table:
        out["reneg_sec"] = _int(table["reneg_sec"], f"{where}.reneg_sec", 0, _MAX_SECONDS)
    if "ping" in table:
        out["ping"] = _int(table["ping"], f"{where}.ping", 1, _MAX_SECONDS)
    if "ping_restart" in table:
        out["ping_restart"] = _int(table["ping_restart"], f"{where}.ping_restart", 1, _MAX_SECONDS)
    if out["ping_restart"] <= out["ping"]:
        raise ConfigError(f"{where}.ping_restart: {out['ping_restart']} must be more than ping ({out['ping']}), "
                          f"e.g. {max(60, out['ping'] * 6)}")
    if "push" in table:
        out["push"] = _push(table["push"], f"{where}.push")
    _openvpn_import(table, out, where)
    return out


def _openvpn_import(table: dict[str, Any], out: dict[str, Any], where: str) -> None:
    """The settings of an existing server's PKI (only those given go into `out`); the
    files themselves are read by the broker, and by `fabric config check` (check_files)."""
    for key in _OPENVPN_FILES:
        if key in table:
            path = table[key]
            if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
                raise ConfigError(f"{where}.{key}: {path!r} must be an absolute path, e.g. "
                                  f"\"/etc/openvpn/server/{_OPENVPN_FILES[key]}\"")
            out[key] = path
    trio = [k for k in ("ca", "cert", "key") if k in out]
    if trio and len(trio) != 3:
        missing = [k for k in ("ca", "cert", "key") if k not in out]
        raise ConfigError(f"{where}.{missing[0]}: missing; an existing PKI needs ca, cert and key (the CA, the "
                          "server's certificate and the server's key: the ca, cert and key lines of its "
                          "OpenVPN config)")
    later = [k for k in ("ca_key", "tls_crypt", "tls_auth", "crl", "key_direction", "auth", "enroll") if k in table]
    if later and "ca" not in out:
        raise ConfigError(f"{where}.{later[0]}: goes with an existing PKI; give ca, cert and key too (without "
                          "them the fabric makes its own CA and keys)")
    if "tls_crypt" in out and "tls_auth" in out:
        raise ConfigError(f"{where}.tls_auth: give tls_crypt or tls_auth, not both (the server's config has one "
                          "of the two lines)")
    for key, wrap in (("tls_crypt", "tls-crypt"), ("tls_auth", "tls-auth")):
        if key in out:
            if "wrap" in table and table["wrap"] != wrap:
                raise ConfigError(f"{where}.wrap: {table['wrap']!r} contradicts {key}; leave wrap out")
            out["wrap"] = wrap
    if "ca" in out and not ("tls_crypt" in out or "tls_auth" in out or "wrap" in table):
        raise ConfigError(f"{where}.ca: say how the existing profiles protect the control channel: "
                          "tls_crypt = PATH or tls_auth = PATH (the key file of the server's tls-crypt or "
                          "tls-auth line), or wrap = \"none\" when it has neither")
    if "key_direction" in table:
        kd = table["key_direction"]
        if kd not in (0, 1) or isinstance(kd, bool):
            raise ConfigError(f"{where}.key_direction: {kd!r} must be 0 or 1, the second argument of the "
                              "server's `tls-auth FILE 0` (or its key-direction); leave it out when there is none")
        if "tls_auth" not in out:
            raise ConfigError(f"{where}.key_direction: only with tls_auth")
        out["key_direction"] = kd
    if "auth" in table:
        digest = str(table["auth"]).upper().replace("-", "")
        if digest not in _OPENVPN_DIGESTS:
            raise ConfigError(f"{where}.auth: {table['auth']!r} must be one of {', '.join(_OPENVPN_DIGESTS)} "
                              "(the server's --auth, the tls-auth HMAC; default SHA1)")
        if "tls_auth" not in out:
            raise ConfigError(f"{where}.auth: only with tls_auth (with AEAD data ciphers --auth affects tls-auth only)")
        out["auth"] = digest
    if "enroll" in table:
        if table["enroll"] not in _OPENVPN_ENROLL:
            raise ConfigError(f"{where}.enroll: {table['enroll']!r} must be \"cn\" (a client of the CA becomes "
                              "a peer at its first connection, named by its certificate's CN) or \"none\"")
        out["enroll"] = table["enroll"]


def check_files(cfg: Config) -> None:
    """What `fabric config check` does beyond parsing: read the files the config names
    and check them as the broker will at its start (an existing OpenVPN PKI: present,
    readable, the key matches the certificate, the certificate verifies against the CA,
    the static key and CRL formats). ConfigError naming the key, the file and the fix."""
    ovpn = cfg.server.openvpn
    if ovpn is None or not ovpn.get("ca"):
        return
    from fabric.protocols.base import SetupError
    from fabric.protocols.openvpn import imported

    try:
        imported.load(ovpn)
    except SetupError as exc:
        raise ConfigError(str(exc)) from None


def served(s: ServerConfig, listen_port: int | None = None,
           openvpn_port: int | None = None) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """The protocols a process serves, from the config and its flags: (ports by protocol,
    each protocol's own options). `--openvpn-port` turns OpenVPN on (with the file's
    [openvpn] table if any, else the defaults) or moves it. WireGuard alone gives
    ({"wireguard": port}, {})."""
    wg = listen_port or s.listen_port
    ovpn = copy.deepcopy(s.openvpn) if s.openvpn is not None else None
    if openvpn_port:
        ovpn = {**(ovpn or openvpn_defaults()), "port": openvpn_port}
    if ovpn is None:
        return {WIREGUARD: wg}, {}
    port = int(ovpn.pop("port"))
    if port == wg:
        wg_from = ("--listen-port" if listen_port else "[server] listen_port" if wg != DEFAULT_PORT
                   else "its default; --listen-port or [server] listen_port")
        ov_from = "--openvpn-port" if openvpn_port else "[openvpn] port"
        raise ConfigError(f"UDP port {port} is given to WireGuard ({wg_from}) and to OpenVPN ({ov_from}); "
                          f"give each protocol its own port, e.g. --openvpn-port "
                          f"{DEFAULT_OPENVPN_PORT if wg != DEFAULT_OPENVPN_PORT else 1195}")
    return {WIREGUARD: wg, OPENVPN: port}, {OPENVPN: ovpn}


def require_protocols(names: Iterable[str]) -> None:
    """Every protocol named must be one this build of fabric speaks
    (fabric.protocols.registry()); a ConfigError with the fix otherwise."""
    from fabric.protocols import registry

    known = registry()
    for name in names:
        if name not in known:
            how = ("--openvpn-port and the [openvpn] table" if name == OPENVPN
                   else f"--{name}-port and the [{name}] table")
            raise ConfigError(f"this fabric cannot serve {name} yet (it speaks {', '.join(sorted(known))}): "
                              f"leave out {how}, or update fabric")


def _check_against_server(where: str, nets: list[str], s: ServerConfig) -> list[str]:
    """A peer network may not hold the server's own address; one outside the tunnel
    networks works only with a route of its own (a warning)."""
    ifaces = [ipaddress.ip_interface(a) for a in s.addresses]
    warnings = []
    for n in nets:
        net = ipaddress.ip_network(n)
        for iface in ifaces:
            if iface.version == net.version and iface.ip in net:
                raise ConfigError(
                    f"{where}.allowed_ips: {n} contains the server's own address {iface.ip}; "
                    f"give the peer its own address, e.g. {_example_host(iface)}")
        if not any(iface.version == net.version and net.subnet_of(iface.network) for iface in ifaces):  # type: ignore[arg-type]
            warnings.append(
                f"{where}.allowed_ips: {n} is outside the server's tunnel network(s) "
                f"{', '.join(str(i.network) for i in ifaces)}; traffic to it reaches the fabric "
                f"only with a route (ip route add {n} dev {s.tun})")
    return warnings


def _example_host(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
    for host in iface.network.hosts():
        if host != iface.ip:
            return f"{host}/{iface.max_prefixlen}"
    return str(iface)


def check_overlaps(peers: list[tuple[str, list[str]]]) -> None:
    """Allowed IPs of two peers must not overlap (which peer gets a packet would be ambiguous)."""
    seen: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, str]] = []
    for name, nets in peers:
        for n in nets:
            net = ipaddress.ip_network(n)
            for other, text, owner in seen:
                if owner != name and other.version == net.version and net.overlaps(other):
                    same = "is" if other == net else f"overlaps {text}, which is"
                    raise ConfigError(
                        f"allowed IP {n} of peer {name!r} {same} given to peer {owner!r}; "
                        "give each peer its own addresses")
            seen.append((net, n, name))


def load(path: str | None) -> Config:
    if not path:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give the path of a TOML file") from None
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def summary(cfg: Config) -> dict[str, Any]:
    """What `fabric config check` reports about a valid file (JSON-ready)."""
    s = cfg.server
    return {
        "listen_port": s.listen_port,
        "addresses": s.addresses,
        "tun": s.tun,
        "edges": s.edges,
        "workers": s.workers,
        "crypto": s.crypto,
        "rx_usecs": s.rx_usecs,
        "state_dir": s.state_dir,
        "endpoint": s.endpoint,
        "ports": s.ports(),
        "openvpn": s.openvpn,
        "peers": [{"name": p.name, "allowed_ips": p.allowed_ips, "preshared_key": p.preshared_key is not None,
                   "persistent_keepalive": p.persistent_keepalive} for p in cfg.peers],
        "warnings": cfg.warnings,
    }


def format_summary(path: str, cfg: Config) -> str:
    s = cfg.server
    lines = [
        f"{path}: ok",
        f"  listen port  {s.listen_port}/udp",
        f"  addresses    {', '.join(s.addresses)} on {s.tun}",
        f"  processes    {s.edges} edges, {s.workers} workers, crypto {s.crypto}, "
        f"rx-usecs {s.rx_usecs}{' (off)' if not s.rx_usecs else ''}",
        f"  state dir    {s.state_dir or '(default: $FABRIC_STATE_DIR or /var/lib/fabric)'}",
    ]
    if s.openvpn is not None:
        o = s.openvpn
        lines.append(f"  openvpn      {o['port']}/udp, {o['wrap']}, ciphers {':'.join(o['data_ciphers'])}, "
                     f"reneg {o['reneg_sec']}s, ping {o['ping']}/{o['ping_restart']}s"
                     + (f", push {len(o['push'])} option{'s' * (len(o['push']) != 1)}" if o["push"] else ""))
        if o.get("ca"):
            lines.append(f"  openvpn pki  existing: ca {o['ca']}, cert {o['cert']}"
                         + (f", {o['wrap']} {o.get('tls_crypt') or o.get('tls_auth')}"
                            if o.get("tls_crypt") or o.get("tls_auth") else "")
                         + (f", crl {o['crl']}" if o.get("crl") else "")
                         + (", new profiles (ca_key)" if o.get("ca_key") else ", no new profiles (no ca_key)")
                         + (", enroll by CN" if o.get("enroll") == "cn" else ""))
    if s.endpoint:
        lines.append(f"  endpoint     {s.endpoint}")
    lines.append(f"  peers        {len(cfg.peers)}" + (":" if cfg.peers else " (add them with `fabric peer add`)"))
    for p in cfg.peers:
        extra = (" +psk" if p.preshared_key else "") + (
            f" keepalive {p.persistent_keepalive}s" if p.persistent_keepalive else "")
        lines.append(f"    {p.name:<16} {', '.join(p.allowed_ips) or '(no allowed IPs)'}{extra}")
    lines += [f"warning: {w}" for w in cfg.warnings]
    return "\n".join(lines)
