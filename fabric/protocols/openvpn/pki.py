"""The fabric's own PKI for OpenVPN: a CA, server and client certificates, the
tls-crypt/tls-auth static key and the inline client profile.

Choices, for Debian's OpenVPN 2.6.14 client on OpenSSL 3.0:

- EC P-256 keys, ECDSA-with-SHA256 signatures: accepted at every OpenSSL security
  level a 2.6 client uses (`ssl_openssl.c tls_ctx_set_cert_profile`: level 1 for the
  default "legacy" profile, 2 for "preferred"), by TLS 1.2 (ECDHE-ECDSA suites) and
  TLS 1.3 alike.
- The server certificate carries keyUsage and extendedKeyUsage serverAuth: the
  profile's `remote-cert-tls server` requires the keyUsage extension to be present
  (`options.c` "remote-cert-tls": `OPENVPN_KU_REQUIRED`,
  `ssl_verify_openssl.c x509_verify_cert_ku`) and the EKU "TLS Web Server
  Authentication" (`x509_verify_cert_eku`).
- The client certificate carries EKU clientAuth: OpenSSL checks the "ssl_client"
  purpose of the peer's leaf on the server side by default.

Certificates are built with the `cryptography` package; this module reads the clock
(for validity) and the random source, and is not on the sans-I/O protocol path.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fabric.protocols.openvpn.constants import STATIC_KEY2_SIZE
from fabric.protocols.openvpn.wire import WireError
from fabric.protocols.openvpn.wrap import format_static_key, parse_static_key

VALIDITY = datetime.timedelta(days=3650)
# not_before is set a little in the past so clients with a slow clock accept a fresh cert
BACKDATE = datetime.timedelta(hours=1)

# crypto.c: static_key_head / static_key_foot, and struct key2 (2 x 128 bytes)

WRAPS = ("tls-crypt", "tls-auth", "none")


class PkiError(ValueError):
    """Unusable PKI input. `reason` is a short token."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise PkiError("bad_name", "empty common name")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_ca(
    ca_cert_pem: bytes, ca_key_pem: bytes
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca_cert_pem)
        key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except ValueError as e:
        raise PkiError("bad_ca", str(e)) from e
    # EC (the fabric's own CA) or RSA (an imported one, e.g. easy-rsa's default)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError("bad_ca", "CA key is not an EC or RSA key")
    if cert.public_key() != key.public_key():
        raise PkiError("bad_ca", "CA key does not match the CA certificate")
    return cert, key


def make_ca(common_name: str, *, now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, PKCS#8 key PEM)."""
    key = _new_key()
    name = _name(common_name)
    t = _now(now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - BACKDATE)
        .not_valid_after(t + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """digitalSignature (what an ECDSA key signs the handshake with), and for the CA
    keyCertSign and cRLSign."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_leaf(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    eku: x509.ObjectIdentifier,
    now: datetime.datetime | None,
) -> tuple[bytes, bytes]:
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    key = _new_key()
    t = _now(now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - BACKDATE)
        .not_valid_after(t + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_server_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, *, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A server certificate (EKU serverAuth, for `remote-cert-tls server`): (cert PEM, key PEM)."""
    return _make_leaf(ca_cert_pem, ca_key_pem, common_name, ExtendedKeyUsageOID.SERVER_AUTH, now)


def make_client_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, *, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A client certificate (EKU clientAuth): (cert PEM, key PEM)."""
    return _make_leaf(ca_cert_pem, ca_key_pem, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, now)


def cert_der(cert_pem_or_der: bytes) -> bytes:
    """The DER form of a certificate given as PEM or DER."""
    try:
        if cert_pem_or_der.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(cert_pem_or_der)
        else:
            cert = x509.load_der_x509_certificate(cert_pem_or_der)
    except ValueError as e:
        raise PkiError("bad_certificate", str(e)) from e
    return cert.public_bytes(serialization.Encoding.DER)


def cert_fingerprint(cert_pem_or_der: bytes) -> bytes:
    """SHA-256 of the certificate's DER (32 bytes): a peer's identity key."""
    return hashlib.sha256(cert_der(cert_pem_or_der)).digest()


def cert_common_name(cert_pem_or_der: bytes) -> str:
    """The subject's first commonName, or "" (for logs)."""
    cert = x509.load_der_x509_certificate(cert_der(cert_pem_or_der))
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# --- the static key (tls-crypt / tls-auth) ------------------------------------------------


def new_static_key() -> bytes:
    """256 random bytes: the struct key2 of a tls-crypt/tls-auth key file
    (`openvpn --genkey secret`, crypto.c write_key_file with nkeys 2)."""
    return os.urandom(STATIC_KEY2_SIZE)


# --- the client profile ------------------------------------------------------------------


def _block(tag: str, body: str | bytes) -> str:
    text = body.decode("ascii") if isinstance(body, bytes) else body
    if not text.endswith("\n"):
        text += "\n"
    return f"<{tag}>\n{text}</{tag}>\n"


def inline_profile(
    remote_host: str,
    remote_port: int,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    static_key: str | bytes,
    wrap: str = "tls-crypt",
    extra: Iterable[str] = (),
    key_direction: int | None = 1,
) -> str:
    """One client config that `openvpn --config FILE` (2.6) takes unchanged.

    `static_key` is the key file text or its 256 raw bytes; `wrap` is "tls-crypt",
    "tls-auth" (client key-direction 1, so the server uses direction 0, `--auth`
    default SHA1) or "none" (the key is then unused). `proto udp` without a family
    lets a 2.6 client resolve the remote as IPv4 or IPv6 (socket.c: PROTO_UDP with
    AF_UNSPEC), so an IPv6 literal works as the remote too. No compression and no
    cipher pinning: the server pushes `cipher` from the client's IV_CIPHERS (NCP).
    `extra` lines are appended before the inline blocks. `key_direction`: the client's
    tls-auth key direction (1, the other side of a server's 0; None: bidirectional)."""
    if wrap not in WRAPS:
        raise PkiError("bad_wrap", wrap)
    if not 0 < remote_port < 65536:
        raise PkiError("bad_port", str(remote_port))
    if not remote_host or any(c.isspace() for c in remote_host):
        raise PkiError("bad_host", remote_host)
    if remote_host.startswith("[") and remote_host.endswith("]"):
        remote_host = remote_host[1:-1]  # OpenVPN takes IPv6 literals without brackets
    key_text = format_static_key(static_key) if isinstance(static_key, bytes) else static_key
    if wrap != "none":
        try:  # refuse a broken key here rather than in the client
            parse_static_key(key_text)
        except WireError as exc:
            raise PkiError("bad_static_key", str(exc)) from None
    lines = [
        "client",
        "dev tun",
        "proto udp",
        f"remote {remote_host} {remote_port}",
        "resolv-retry infinite",
        "nobind",
        "persist-key",
        "persist-tun",
        "remote-cert-tls server",
        "verb 3",
        "explicit-exit-notify 1",  # say goodbye on exit: the server ends the session at once
    ]
    if wrap == "tls-auth" and key_direction is not None:
        lines.append(f"key-direction {key_direction}")
    for line in extra:
        if "\n" in line or "\r" in line:
            raise PkiError("bad_extra", repr(line))
        lines.append(line)
    out = "\n".join(lines) + "\n"
    out += _block("ca", ca_pem)
    out += _block("cert", cert_pem)
    out += _block("key", key_pem)
    if wrap == "tls-crypt":
        out += _block("tls-crypt", key_text)
    elif wrap == "tls-auth":
        out += _block("tls-auth", key_text)
    return out


def tls_auth_profile(
    remote_host: str,
    remote_port: int,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    static_key: str | bytes,
    extra: Iterable[str] = (),
) -> str:
    """`inline_profile` with wrap="tls-auth" (`<tls-auth>` + key-direction 1)."""
    return inline_profile(
        remote_host, remote_port, ca_pem, cert_pem, key_pem, static_key, "tls-auth", extra
    )
