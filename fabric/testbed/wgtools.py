"""Stock wireguard-go devices in the test namespaces, configured from wg-quick text with `wg`."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fabric.testbed.netns import WG_RUN_DIR, PingResult, Topology, TopologyError, tail

# --------------------------------------------------------------------------- wireguard


def gen_keypair() -> tuple[str, str]:
    """(private, public) as base64, like ``wg genkey`` / ``wg pubkey``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    k = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    priv = k.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = k.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


_WG_QUICK_ONLY = {
    "address",
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
}


@dataclass
class WgConfig:
    """A wg-quick style config split into what ``wg setconf`` takes and the rest."""

    text: str
    addresses: list[str] = field(default_factory=list)
    mtu: int | None = None
    stripped: str = ""
    peers: list[dict[str, str]] = field(default_factory=list)
    interface: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> WgConfig:
        cfg = cls(text=text)
        out: list[str] = []
        section = ""
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                section = line.strip("[]").strip().lower()
                if section == "peer":
                    cfg.peers.append({})
                out.append(line)
                continue
            if "=" not in line:
                raise ValueError(f"bad config line: {raw!r}")
            key, value = (s.strip() for s in line.split("=", 1))
            lk = key.lower()
            if section == "interface":
                if lk == "address":
                    cfg.addresses += [a.strip() for a in value.split(",") if a.strip()]
                    continue
                if lk == "mtu":
                    cfg.mtu = int(value)
                    continue
                if lk in _WG_QUICK_ONLY:
                    continue
                cfg.interface[lk] = value
            elif section == "peer":
                d = cfg.peers[-1]
                d[lk] = f"{d[lk]}, {value}" if lk in d else value
            out.append(f"{key} = {value}")
        cfg.stripped = "\n".join(out) + "\n"
        return cfg

    @property
    def allowed_ips(self) -> list[str]:
        ips: list[str] = []
        for p in self.peers:
            ips += [a.strip() for a in p.get("allowedips", "").split(",") if a.strip()]
        return ips

    def tunnel_ip(self) -> str:
        """The first interface address without its prefix length."""
        if not self.addresses:
            raise ValueError("config has no Address")
        return self.addresses[0].split("/")[0]


class WgDevice:
    """A ``wireguard-go -f`` process in a namespace, configured from wg-quick text."""

    def __init__(
        self,
        topo: Topology,
        ns: str,
        ifname: str,
        config: str | WgConfig,
        start_timeout: float = 10.0,
        binary: str = "wireguard-go",
    ) -> None:
        self.topo = topo
        self.binary = binary  # Debian's wireguard-go, or another build (bench --client)
        self.ns = ns
        self.ifname = ifname
        self.config = config if isinstance(config, WgConfig) else WgConfig.parse(config)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    # lifecycle ------------------------------------------------------------
    def start(self) -> WgDevice:
        if self.proc is not None and self.proc.poll() is None:
            raise TopologyError(f"{self.ifname} already running")
        sock = WG_RUN_DIR / f"{self.ifname}.sock"
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
        self._starts += 1
        self.proc = self.topo.popen(
            self.ns,
            [self.binary, "-f", self.ifname],
            log_path=self.topo.log_dir / f"wg-{self.ifname}-{self._starts}.log",
            env=env,
            label=f"wireguard-go:{self.ifname}",
        )
        deadline = time.monotonic() + self.start_timeout
        while not (sock.exists() and self.topo.link_exists(self.ns, self.ifname)):
            if self.proc.poll() is not None:
                raise TopologyError(
                    f"wireguard-go {self.ifname} exited rc={self.proc.returncode}\n"
                    f"{tail(self.topo.log_path(self.proc))}"
                )
            if time.monotonic() >= deadline:
                raise TopologyError(
                    f"wireguard-go {self.ifname}: no UAPI socket after {self.start_timeout}s"
                )
            time.sleep(0.05)
        self._configure()
        return self

    def _configure(self) -> None:
        conf_path = self.topo.workdir / f"{self.ifname}.conf"
        fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config.stripped)
        run = self.topo.run
        run(self.ns, ["wg", "setconf", self.ifname, str(conf_path)])
        for addr in self.config.addresses:
            fam = "-6" if ":" in addr else "-4"
            run(self.ns, ["ip", fam, "addr", "add", addr, "dev", self.ifname])
        if self.config.mtu:
            run(self.ns, ["ip", "link", "set", "mtu", str(self.config.mtu), "dev", self.ifname])
        run(self.ns, ["ip", "link", "set", self.ifname, "up"])
        for cidr in self.config.allowed_ips:
            net = ipaddress.ip_network(cidr, strict=False)
            fam = "-6" if net.version == 6 else "-4"
            # v6 routes are best effort: a namespace may have IPv6 disabled
            run(
                self.ns,
                ["ip", fam, "route", "replace", str(net), "dev", self.ifname],
                check=net.version == 4,
            )

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        self.topo.stop(self.proc, timeout=timeout)
        # wireguard-go removes its TUN and socket on exit; wait for both (bounded)
        deadline = time.monotonic() + 5.0
        while self.topo.link_exists(self.ns, self.ifname) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            (WG_RUN_DIR / f"{self.ifname}.sock").unlink()

    def restart(self) -> WgDevice:
        """New wireguard-go process with the same config: a fresh handshake."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # queries ------------------------------------------------------------
    def public_key(self) -> str:
        return self.topo.run(self.ns, ["wg", "show", self.ifname, "public-key"]).stdout.strip()

    def latest_handshakes(self) -> dict[str, float]:
        cp = self.topo.run(self.ns, ["wg", "show", self.ifname, "latest-handshakes"])
        out: dict[str, float] = {}
        for line in cp.stdout.splitlines():
            f = line.split()
            if len(f) == 2:
                out[f[0]] = float(f[1])
        return out

    def latest_handshake(self) -> float:
        """Most recent handshake with any peer (epoch seconds, 0 if none)."""
        return max(self.latest_handshakes().values(), default=0.0)

    def transfer(self) -> dict[str, tuple[int, int]]:
        """public key -> (rx_bytes, tx_bytes)."""
        cp = self.topo.run(self.ns, ["wg", "show", self.ifname, "transfer"])
        out: dict[str, tuple[int, int]] = {}
        for line in cp.stdout.splitlines():
            f = line.split()
            if len(f) == 3:
                out[f[0]] = (int(f[1]), int(f[2]))
        return out

    def wait_handshake(self, after: float = 0.0, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout * 10) + 1):
            hs = self.latest_handshake()
            if hs > after:
                return hs
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise TimeoutError(f"{self.ifname}: no handshake newer than {after} within {timeout}s")

    def ping(self, dst: str, count: int = 3, timeout: float = 2.0) -> PingResult:
        return self.topo.ping(self.ns, dst, count=count, timeout=timeout)

    def wait_ping(self, dst: str, timeout: float = 20.0) -> PingResult:
        return self.topo.wait_ping(self.ns, dst, timeout=timeout)


class WgClient(WgDevice):
    """A stock wireguard-go client, e.g. from the text ``fabric peer add`` prints."""


def start_wg_server(
    topo: Topology,
    address: str = "198.19.200.1/24",
    listen_port: int = 51820,
    peers: Sequence[tuple[str, str]] = (),
    private_key: str | None = None,
    ifname: str | None = None,
    binary: str = "wireguard-go",
) -> WgDevice:
    """wireguard-go as the server in ``topo.server_ns`` (the anchor, and the
    harness's own peer). ``peers`` are (public key, allowed-ips) pairs."""
    if private_key is None:
        private_key, _ = gen_keypair()
    lines = [
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"ListenPort = {listen_port}",
        f"Address = {address}",
    ]
    for pub, allowed in peers:
        lines += ["", "[Peer]", f"PublicKey = {pub}", f"AllowedIPs = {allowed}"]
    return WgDevice(topo, topo.server_ns, ifname or topo.ifname("wgs"), "\n".join(lines),
                    binary=binary).start()


def client_config(
    private_key: str,
    address: str,
    server_public_key: str,
    endpoint: str,
    allowed_ips: str,
    keepalive: int = 25,
) -> str:
    return (
        f"[Interface]\nPrivateKey = {private_key}\nAddress = {address}\n\n"
        f"[Peer]\nPublicKey = {server_public_key}\nEndpoint = {endpoint}\n"
        f"AllowedIPs = {allowed_ips}\nPersistentKeepalive = {keepalive}\n"
    )
