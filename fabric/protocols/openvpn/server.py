"""The OpenVPN server's settings as edges and workers receive them: the `openvpn/server`
record the broker publishes (authority.py), parsed once, and the pieces both sides
derive from it: the control-channel wrapping and the stateless cookie.

The cookie is the server's session id in its HARD_RESET_SERVER_V2 (ssl_pkt.c
tls_reset_standalone, calculate_session_id_hmac): an HMAC of the client's address,
its session id and a time bucket, so an edge answers a hard reset without keeping
state and a worker allocates state only for a client that echoed a valid cookie
(the ack block of its next packet names our session id).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

from fabric.control.records import RecordError
from fabric.protocols.openvpn.constants import SID_SIZE
from fabric.protocols.openvpn.keys import CIPHERS
from fabric.protocols.openvpn.wrap import ControlWrap, NoWrap, TlsAuth, TlsCrypt

SERVER_KEY = b"openvpn/server"  # the record's key
WRAPS = ("tls-crypt", "tls-auth", "none")
COOKIE_BUCKET = 30  # seconds per cookie bucket; the current and the previous are valid
_BUCKET = struct.Struct("!Q")

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class ServerConfig:
    """Everything of the server that edges and workers need (authority.py makes it)."""

    ca: bytes  # PEM
    cert: bytes  # PEM
    key: bytes  # PEM
    static_key: bytes  # 256 bytes (tls-crypt / tls-auth)
    cookie_key: bytes  # 32 bytes
    wrap: str = "tls-crypt"
    ciphers: tuple[str, ...] = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")
    interfaces: tuple[str, ...] = ()  # the server's tunnel addresses, e.g. 198.18.211.1/24
    ping: int = 10
    ping_restart: int = 60
    reneg_sec: int = 3600
    push: tuple[str, ...] = ()  # extra options pushed to every client
    _wraps: dict[bool, ControlWrap] = field(default_factory=dict, compare=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"ca": self.ca, "cert": self.cert, "key": self.key, "static_key": self.static_key,
                "cookie_key": self.cookie_key, "wrap": self.wrap, "ciphers": list(self.ciphers),
                "interfaces": list(self.interfaces), "ping": self.ping, "ping_restart": self.ping_restart,
                "reneg_sec": self.reneg_sec, "push": list(self.push)}

    @classmethod
    def from_wire(cls, d: Any) -> ServerConfig:
        if not isinstance(d, dict):
            raise RecordError("openvpn/server: a map")
        try:
            out = cls(
                bytes(d["ca"]), bytes(d["cert"]), bytes(d["key"]), bytes(d["static_key"]), bytes(d["cookie_key"]),
                str(d.get("wrap", "tls-crypt")), tuple(str(c) for c in d.get("ciphers") or ()),
                tuple(str(i) for i in d.get("interfaces") or ()), int(d.get("ping", 10)),
                int(d.get("ping_restart", 60)), int(d.get("reneg_sec", 3600)),
                tuple(str(p) for p in d.get("push") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"openvpn/server: {exc}") from None
        if out.wrap not in WRAPS or len(out.static_key) != 256 or len(out.cookie_key) != 32:
            raise RecordError("openvpn/server: wrap, static key (256 bytes) or cookie key (32 bytes)")
        if not out.ciphers or any(c not in CIPHERS for c in out.ciphers):
            raise RecordError(f"openvpn/server: ciphers {out.ciphers!r}")
        return out

    def wrapper(self, server: bool = True) -> ControlWrap:
        """The control-channel wrapping (a server's direction by default; cached)."""
        got = self._wraps.get(server)
        if got is None:
            if self.wrap == "tls-crypt":
                got = TlsCrypt(self.static_key, server=server)
            elif self.wrap == "tls-auth":  # the profile says key-direction 1 for clients
                got = TlsAuth(self.static_key, 0 if server else 1)
            else:
                got = NoWrap()
            self._wraps[server] = got
        return got

    def networks(self) -> list[Interface]:
        return [ipaddress.ip_interface(i) for i in self.interfaces]


def cookie(key: bytes, addr: bytes, client_sid: bytes, bucket: int) -> bytes:
    """The server session id for a client's hard reset (ssl_pkt.c calculate_session_id_hmac)."""
    mac = hmac.new(key, addr + client_sid + _BUCKET.pack(bucket), hashlib.sha256).digest()
    return mac[:SID_SIZE]


def cookie_now(key: bytes, addr: bytes, client_sid: bytes, now: float) -> bytes:
    return cookie(key, addr, client_sid, int(now) // COOKIE_BUCKET)


def cookie_valid(key: bytes, addr: bytes, client_sid: bytes, server_sid: bytes, now: float) -> bool:
    """Made for this address and client session in this bucket or the one before
    (ssl_pkt.c check_session_id_hmac accepts a few handshake-window halves)."""
    bucket = int(now) // COOKIE_BUCKET
    return any(hmac.compare_digest(cookie(key, addr, client_sid, b), server_sid) for b in (bucket, bucket - 1))
