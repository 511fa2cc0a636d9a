"""CURVE keys for the fabric's ZeroMQ sockets (DESIGN.md invariant 6).

`fabric keys init` creates the fabric's CURVE server keypair in
<state-dir>/curve/. From then on every ZeroMQ socket of that fabric uses CURVE,
on ipc and tcp alike: processes that bind (broker, edges) are CURVE servers and
run a ZAP handler that admits only public keys found in curve/authorized/
(CURVE without ZAP admits anyone who knows the server key). Local processes
use the server keypair as their client key; remote workers and admin clients
get their own from `fabric keys client NAME`, which also authorizes it.
Revoking is removing the key from curve/authorized/ (checked every few seconds).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from fabric.ops.paths import StateDir

ZAP_DOMAIN = b"fabric"


class KeyError_(RuntimeError):
    pass


def curve_dir(sd: StateDir) -> Path:
    return sd.root / "curve"


def enabled(sd: StateDir) -> bool:
    return (curve_dir(sd) / "server.key_secret").exists()


def init(sd: StateDir) -> tuple[Path, bool]:
    """Create the server keypair (once); returns (its public key file, created now?)."""
    d = curve_dir(sd)
    sd.ensure()
    for sub in (d, d / "authorized", d / "clients"):
        sub.mkdir(mode=0o700, exist_ok=True)
        os.chmod(sub, 0o700)
    if not (d / "server.key_secret").exists():
        zmq.auth.create_certificates(str(d), "server")
        os.chmod(d / "server.key_secret", 0o600)
        shutil.copy(d / "server.key", d / "authorized" / "server.key")
        return d / "server.key", True
    return d / "server.key", False


def new_client(sd: StateDir, name: str) -> tuple[Path, Path]:
    """A client keypair NAME, authorized; returns (public file, secret file)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name == "server":
        raise KeyError_(f"client key name {name!r}: use letters, digits, - _ . (not 'server')")
    d = curve_dir(sd)
    if not enabled(sd):
        raise KeyError_(f"no CURVE keys in {d}: run `fabric keys init --state-dir {sd.root}` first")
    if (d / "clients" / f"{name}.key_secret").exists():
        raise KeyError_(f"client key {name!r} exists already ({d / 'clients'})")
    zmq.auth.create_certificates(str(d / "clients"), name)
    os.chmod(d / "clients" / f"{name}.key_secret", 0o600)
    shutil.copy(d / "clients" / f"{name}.key", d / "authorized" / f"{name}.key")
    return d / "clients" / f"{name}.key", d / "clients" / f"{name}.key_secret"


def revoke(sd: StateDir, name: str) -> bool:
    path = curve_dir(sd) / "authorized" / f"{name}.key"
    if name == "server" or not path.exists():
        return False
    path.unlink()
    return True


def authorized(sd: StateDir) -> list[str]:
    return sorted(p.stem for p in (curve_dir(sd) / "authorized").glob("*.key"))


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read CURVE key {path}: {exc}") from None
    return public, secret


@dataclass(frozen=True)
class Curve:
    """Socket options for one process: as server (binding) and as client (connecting)."""

    server: dict[int, Any]
    client: dict[int, Any]


def local(sd: StateDir) -> Curve | None:
    """Options for a process on the fabric's own host, or None if CURVE is off."""
    if not enabled(sd):
        return None
    public, secret = _load(curve_dir(sd) / "server.key_secret")
    server: dict[int, Any] = {zmq.CURVE_SERVER: 1, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret,
              zmq.ZAP_DOMAIN: ZAP_DOMAIN}
    client: dict[int, Any] = {zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret,
                              zmq.CURVE_SERVERKEY: public}
    return Curve(server, client)


def remote(key_secret: str | Path, server_key: str | Path) -> Curve:
    """Client options for a remote worker or admin: its own keypair, the fabric's public key."""
    public, secret = _load(Path(key_secret))
    if secret is None:
        raise KeyError_(f"{key_secret} holds no secret key: pass the .key_secret file")
    server_public, _ = _load(Path(server_key))
    client: dict[int, Any] = {zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret,
                              zmq.CURVE_SERVERKEY: server_public}
    return Curve({}, client)


class Authenticator:
    """ZAP handler admitting the keys in curve/authorized/, reloaded every few seconds."""

    RELOAD = 3.0

    def __init__(self, ctx: zmq.Context, sd: StateDir) -> None:
        self.location = str(curve_dir(sd) / "authorized")
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=self.location)
        self.loaded = 0.0

    def tick(self, now: float) -> None:
        if now - self.loaded >= self.RELOAD:
            self.auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=self.location)
            self.loaded = now

    def stop(self) -> None:
        self.auth.stop()


def apply(sock: zmq.Socket, options: dict[int, Any] | None) -> zmq.Socket:
    for opt, val in (options or {}).items():
        sock.setsockopt(opt, val)
    return sock


def tcp_endpoints(base: str, count: int) -> list[str]:
    """HOST:PORT -> tcp://HOST:PORT, tcp://HOST:PORT+1, ... (IPv6 hosts in brackets)."""
    host, sep, port = base.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise KeyError_(f"{base!r} must be HOST:PORT, e.g. 198.18.1.1:52000")
    p = int(port)
    if not 1 <= p <= 65535 - count:
        raise KeyError_(f"port {p} leaves no room for {count} consecutive ports")
    return [f"tcp://{host}:{p + i}" for i in range(count)]
