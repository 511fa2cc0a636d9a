"""The OpenVPN server's settings as edges and workers receive them: the `openvpn/server`
record the broker publishes (authority.py), parsed once, and the pieces both sides
derive from it: the control-channel wrapping and the stateless cookie.

The cookie is the server's session id in its HARD_RESET_SERVER_V2 (ssl_pkt.c
tls_reset_standalone, calculate_session_id_hmac): an HMAC of the client's address,
its session id and a time bucket, so an edge answers a hard reset without keeping
state and a worker allocates state only for a client that echoed a valid cookie
(the ack block of its next packet names our session id).

Who a client is: the SHA-256 of its certificate's DER (a peer the fabric made, or one
registered with its certificate), or `cn_identity` of its certificate's common name (a
client of an existing PKI, registered or enrolled by CN). `ServerConfig.revoked` checks
a certificate against the CRLs the operator gave (`[openvpn] crl`), as OpenVPN's
--crl-verify does at every TLS handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from fabric.control.records import RecordError
from fabric.protocols.openvpn.constants import (
    SID_SIZE,
    TLS_AUTH_DIGEST_DEFAULT,
    TLS_AUTH_DIGEST_SIZES,
)
from fabric.protocols.openvpn.keys import CIPHERS
from fabric.protocols.openvpn.wrap import ControlWrap, NoWrap, TlsAuth, TlsCrypt

SERVER_KEY = b"openvpn/server"  # the record's key
WRAPS = ("tls-crypt", "tls-auth", "none")
ENROLL = ("none", "cn")  # [openvpn] enroll: how a client of the CA that is no peer yet is taken
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
    # tls-auth: the server's key direction (its `tls-auth FILE 0`; None: bidirectional, the
    # key file's first key both ways) and --auth, the HMAC's digest
    key_direction: int | None = 0
    auth: str = TLS_AUTH_DIGEST_DEFAULT
    crl: tuple[bytes, ...] = ()  # CRLs (DER) of the operator's CA: revoked certificates are refused
    enroll: str = "none"  # "cn": a valid certificate that is no peer yet becomes one by its CN
    _wraps: dict[bool, ControlWrap] = field(default_factory=dict, compare=False, repr=False)
    _revoked: dict[bytes, frozenset[int]] = field(default_factory=dict, compare=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"ca": self.ca, "cert": self.cert, "key": self.key, "static_key": self.static_key,
                "cookie_key": self.cookie_key, "wrap": self.wrap, "ciphers": list(self.ciphers),
                "interfaces": list(self.interfaces), "ping": self.ping, "ping_restart": self.ping_restart,
                "reneg_sec": self.reneg_sec, "push": list(self.push), "key_direction": self.key_direction,
                "auth": self.auth, "crl": list(self.crl), "enroll": self.enroll}

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
                d.get("key_direction", 0), str(d.get("auth", TLS_AUTH_DIGEST_DEFAULT)),
                tuple(_der(c) for c in d.get("crl") or ()), str(d.get("enroll", "none")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"openvpn/server: {exc}") from None
        if out.wrap not in WRAPS or len(out.static_key) != 256 or len(out.cookie_key) != 32:
            raise RecordError("openvpn/server: wrap, static key (256 bytes) or cookie key (32 bytes)")
        if out.key_direction not in (0, 1, None) or isinstance(out.key_direction, bool) \
                or out.auth not in TLS_AUTH_DIGEST_SIZES or out.enroll not in ENROLL:
            raise RecordError(f"openvpn/server: key_direction {out.key_direction!r}, auth {out.auth!r} "
                              f"or enroll {out.enroll!r}")
        try:
            out.revoked_serials()
        except ValueError as exc:
            raise RecordError(f"openvpn/server: crl: {exc}") from None
        if not out.ciphers or any(c not in CIPHERS for c in out.ciphers):
            raise RecordError(f"openvpn/server: ciphers {out.ciphers!r}")
        return out

    def wrapper(self, server: bool = True) -> ControlWrap:
        """The control-channel wrapping (a server's direction by default; cached)."""
        got = self._wraps.get(server)
        if got is None:
            if self.wrap == "tls-crypt":
                got = TlsCrypt(self.static_key, server=server)
            elif self.wrap == "tls-auth":  # a client uses the other direction (or none, as we)
                kd = self.key_direction
                got = TlsAuth(self.static_key, kd if server or kd is None else 1 - kd, self.auth)
            else:
                got = NoWrap()
            self._wraps[server] = got
        return got

    def networks(self) -> list[Interface]:
        return [ipaddress.ip_interface(i) for i in self.interfaces]

    def revoked_serials(self) -> dict[bytes, frozenset[int]]:
        """Revoked serial numbers by issuer (the issuer name's DER), from `crl` (cached)."""
        if self.crl and not self._revoked:
            self._revoked.update(revoked_serials(self.crl))
        return self._revoked

    def revoked(self, der: bytes) -> bool:
        """The certificate (DER) is on a CRL of its issuer (ssl_verify_openssl.c, crl-verify)."""
        if not self.crl:
            return False
        cert = x509.load_der_x509_certificate(der)
        return cert.serial_number in self.revoked_serials().get(cert.issuer.public_bytes(), frozenset())


def _der(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"a CRL is bytes, not {type(value).__name__}")
    return value


def revoked_serials(crls: tuple[bytes, ...]) -> dict[bytes, frozenset[int]]:
    """{issuer name DER: revoked serials} of DER CRLs; ValueError for one that does not parse."""
    out: dict[bytes, set[int]] = {}
    for der in crls:
        crl = x509.load_der_x509_crl(der)
        out.setdefault(crl.issuer.public_bytes(), set()).update(r.serial_number for r in crl)
    return {k: frozenset(v) for k, v in out.items()}


def cn_identity(common_name: str) -> bytes:
    """The identity (peer key) of a client registered by its certificate's common name:
    any certificate the CA signed with that CN, as OpenVPN servers tell clients apart."""
    return hashlib.sha256(b"openvpn-cn\0" + common_name.encode()).digest()


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
