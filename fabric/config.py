"""The TOML configuration file, validated with messages that name the key and the fix.

    [server]
    listen_port = 51820              # UDP port all edges share
    address = "198.18.100.1/24"      # the server's tunnel address(es): one string, or a list for
                                     # IPv4 and IPv6; peers get addresses from these networks
    tun = "fabric0"
    edges = 2                        # default: number of cores
    workers = 2                      # default: number of cores
    state_dir = "/var/lib/fabric"
    endpoint = "vpn.example.org:51820"   # written into client configs by `fabric peer add`
    metrics = "127.0.0.1:9580"       # Prometheus endpoints: broker 9580, edges 9581.., workers after
                                     # them, `fabric up` last (off when absent)

    [[peer]]
    name = "laptop"
    public_key = "base64..."
    allowed_ips = ["198.18.100.2/32"]
    preshared_key = "base64..."      # optional
    persistent_keepalive = 25        # optional, seconds
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from fabric.crypto import key_from_base64

DEFAULT_PORT = 51820
DEFAULT_ADDRESS = "198.18.100.1/24"
DEFAULT_TUN = "fabric0"


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
    state_dir: str | None = None
    endpoint: str | None = None
    metrics: str | None = None  # base HOST:PORT of the Prometheus endpoints (fabric/metrics.py)


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    peers: list[PeerConfig] = field(default_factory=list)


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


_SERVER_KEYS = {"listen_port", "address", "tun", "edges", "workers", "state_dir", "endpoint", "metrics"}
_PEER_KEYS = {"name", "public_key", "allowed_ips", "preshared_key", "persistent_keepalive"}


def parse(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document."""
    unknown = set(data) - {"server", "peer"}
    if unknown:
        raise ConfigError(f"unknown section {sorted(unknown)[0]!r}; the sections are [server] and [[peer]]")
    cfg = Config()
    srv = data.get("server", {})
    if not isinstance(srv, dict):
        raise ConfigError("server: must be a table ([server])")
    for key in srv:
        if key not in _SERVER_KEYS:
            raise ConfigError(f"server.{key}: unknown key; known keys are {', '.join(sorted(_SERVER_KEYS))}")
    s = cfg.server
    if "listen_port" in srv:
        s.listen_port = parse_port(srv["listen_port"], "server.listen_port")
    if "address" in srv:
        s.addresses = parse_interfaces(srv["address"], "server.address")
    if "tun" in srv:
        tun = srv["tun"]
        if not isinstance(tun, str) or not 1 <= len(tun) <= 15:
            raise ConfigError(f"server.tun: {tun!r} must be an interface name of 1 to 15 characters")
        s.tun = tun
    if "edges" in srv:
        s.edges = _int(srv["edges"], "server.edges", 1, 256)
    if "workers" in srv:
        s.workers = _int(srv["workers"], "server.workers", 1, 256)
    if "state_dir" in srv:
        s.state_dir = str(srv["state_dir"])
    if "endpoint" in srv:
        s.endpoint = str(srv["endpoint"])
    if "metrics" in srv:
        from fabric.metrics import format_address, parse_address

        if not isinstance(srv["metrics"], str):
            raise ConfigError(f"server.metrics: {srv['metrics']!r} must be a string \"HOST:PORT\", e.g. \"127.0.0.1:9580\"")
        s.metrics = format_address(*parse_address(srv["metrics"], "server.metrics"))
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
                raise ConfigError(f"{where}.{key}: unknown key; known keys are {', '.join(sorted(_PEER_KEYS))}")
        name = p.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: every peer needs a name")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used twice; peer names must be unique")
        names.add(name)
        if "public_key" not in p:
            raise ConfigError(f"{where}.public_key: missing; put the client's `wg pubkey` here")
        pub = _key(p["public_key"], f"{where}.public_key")
        if pub in keys:
            raise ConfigError(f"{where}.public_key: the same key is given to two peers")
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
    check_overlaps([(p.name, p.allowed_ips) for p in cfg.peers])
    return cfg


def check_overlaps(peers: list[tuple[str, list[str]]]) -> None:
    """Allowed IPs must not be claimed by two peers (routing would be ambiguous)."""
    seen: dict[str, str] = {}
    for name, nets in peers:
        for n in nets:
            if n in seen and seen[n] != name:
                raise ConfigError(f"allowed IP {n} is given to both {seen[n]!r} and {name!r}; give each peer its own")
            seen[n] = name


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
