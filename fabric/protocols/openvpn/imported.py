"""An existing OpenVPN server's PKI, so that its client profiles connect unchanged.

The `[openvpn]` settings `ca`, `cert`, `key` (the server's), `tls_crypt` or `tls_auth`
(the static key file), `crl` and `ca_key` name files the broker reads at every start
(they stay where the operator keeps them: a renewed server certificate or a new CRL
takes effect at the next start, a CRL also while running, see authority.py). This
module reads them and checks what OpenVPN would find out only at the first client:

- `ca`: one or more PEM certificates (OpenVPN's --ca file);
- `cert`: the server's PEM certificate (followed by intermediates, if any), which must
  verify against `ca` (signature, validity dates);
- `key`: its unencrypted PEM private key, which must belong to `cert`;
- `tls_crypt` / `tls_auth`: an `OpenVPN Static key V1` file of 256 bytes
  (`openvpn --genkey secret FILE`; crypto.c read_key_file), not a tls-crypt-v2 key;
- `crl`: PEM (one or more) or DER CRLs, each signed by a certificate of `ca`;
- `ca_key`: the CA's private key (only to make new client certificates), which must
  belong to a certificate of `ca`.

Errors are SetupError with a message that names the setting (`openvpn.cert`), the file
and the fix; `fabric config check` shows it as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from fabric.protocols.base import SetupError
from fabric.protocols.openvpn.wire import WireError
from fabric.protocols.openvpn.wrap import parse_static_key

FILES = ("ca", "cert", "key", "ca_key", "tls_crypt", "tls_auth", "crl")  # settings that name files
MAX_FILE = 64 << 20  # a CRL of a large PKI runs to megabytes; nothing here is bigger
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


@dataclass(frozen=True)
class ImportedPki:
    """What the files hold, checked."""

    ca: bytes  # PEM, the file as it is (it may hold several CAs)
    cert: bytes  # PEM: the server's certificate and its intermediates
    key: bytes  # PEM: its private key
    static_key: bytes | None  # 256 bytes of tls_crypt or tls_auth; None when neither is given
    crl: tuple[bytes, ...] = ()  # DER CRLs
    ca_key: bytes = b""  # PEM, or b"" when not given
    signing_ca: bytes = b""  # PEM of the certificate of `ca` that ca_key belongs to


def where(setting: str) -> str:
    return f"openvpn.{setting}"


def read_file(setting: str, path: Any) -> bytes:
    """The bytes of the file a setting names; SetupError saying what is wrong with it."""
    if not isinstance(path, str) or not path:
        raise SetupError(f"{where(setting)}: {path!r} must be the path of a file")
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SetupError(f"{where(setting)}: {path} does not exist") from None
    except OSError as exc:
        raise SetupError(f"{where(setting)}: {path}: {exc.strerror}") from None
    if not p.is_file():
        raise SetupError(f"{where(setting)}: {path} is not a file")
    if st.st_size > MAX_FILE:
        raise SetupError(f"{where(setting)}: {path} is {st.st_size} bytes, too big for a {setting} file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise SetupError(f"{where(setting)}: {path} cannot be read ({exc.strerror}); the broker reads it "
                         f"at every start: let its user read the file") from None


def _certificates(setting: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        hint = ""
        try:
            x509.load_der_x509_certificate(data)
            hint = f"; it is DER: convert it with openssl x509 -inform der -in {path} -out {path}.pem"
        except ValueError:
            pass
        raise SetupError(f"{where(setting)}: {path} holds no PEM certificate "
                         f"(-----BEGIN CERTIFICATE-----){hint}")
    return certs


def _private_key(setting: str, path: str, data: bytes) -> Any:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise SetupError(f"{where(setting)}: {path} is encrypted with a passphrase, which fabric cannot ask "
                         f"for: write a copy without one (openssl pkey -in {path} -out NEW.key; chmod 600 "
                         "NEW.key) and name that") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SetupError(f"{where(setting)}: {path} is not a PEM private key ({exc})") from None


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


def ca_store(cas: list[x509.Certificate]) -> crypto.X509Store:
    store = crypto.X509Store()
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    return store


def chain_error(store: crypto.X509Store, leaf: x509.Certificate,
                chain: list[x509.Certificate] | None = None) -> str | None:
    """Why `leaf` (with intermediates `chain`) does not verify against the CAs of `store`
    (signatures and validity dates, as OpenSSL checks a peer), or None when it does."""
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf),
                                  [crypto.X509.from_cryptography(c) for c in chain or ()] or None)
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError as exc:
        return str(exc.args[0]) if exc.args else "does not verify"
    return None


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def static_key(setting: str, path: str, data: bytes) -> bytes:
    """The 256 bytes of a static key file."""
    text = data.decode("utf-8", "replace")
    if "tls-crypt-v2" in text:
        raise SetupError(f"{where(setting)}: {path} is a tls-crypt-v2 key, which fabric does not speak; "
                         "give a tls-crypt (v1) or tls-auth key (openvpn --genkey secret FILE)")
    try:
        return parse_static_key(text)
    except WireError as exc:
        raise SetupError(f"{where(setting)}: {path} is not an OpenVPN static key file: "
                         f"{str(exc).removeprefix(exc.reason + ': ')}") from None


def crls(path: str, data: bytes, cas: list[x509.Certificate]) -> tuple[bytes, ...]:
    """The DER CRLs of a PEM (one or more) or DER file, each signed by a CA of `cas`."""
    blocks = _PEM_CRL.findall(data)
    try:
        parsed = [x509.load_pem_x509_crl(b) for b in blocks] if blocks else [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise SetupError(f"{where('crl')}: {path} is not a CRL (PEM -----BEGIN X509 CRL----- or DER): "
                         f"{exc}") from None
    out = []
    for crl in parsed:
        issuers = [ca for ca in cas if ca.subject == crl.issuer]
        try:
            signed = any(crl.is_signature_valid(ca.public_key()) for ca in issuers)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            signed = False
        if not signed:
            raise SetupError(f"{where('crl')}: {path} is a CRL of {crl.issuer.rfc4514_string()!r}, not signed "
                             f"by a CA in {where('ca')}: give the CRL of this CA (easy-rsa gen-crl, "
                             "pki/crl.pem)")
        out.append(crl.public_bytes(serialization.Encoding.DER))
    return tuple(out)


def load(options: dict[str, Any]) -> ImportedPki:
    """Read and check the files the settings name (`ca`, `cert` and `key` at least)."""
    ca_path, cert_path, key_path = (str(options.get(k) or "") for k in ("ca", "cert", "key"))
    ca_data = read_file("ca", ca_path)
    cas = _certificates("ca", ca_path, ca_data)
    cert_data = read_file("cert", cert_path)
    chain = _certificates("cert", cert_path, cert_data)
    key_data = read_file("key", key_path)
    key = _private_key("key", key_path, key_data)
    if _spki(key.public_key()) != _spki(chain[0].public_key()):
        raise SetupError(f"{where('key')}: {key_path} is not the key of the certificate in {where('cert')} "
                         f"({cert_path}): give the server's own key (OpenVPN's `key` line)")
    why = chain_error(ca_store(cas), chain[0], chain[1:])
    if why is not None:
        raise SetupError(f"{where('cert')}: {cert_path} does not verify against the CA in {where('ca')} "
                         f"({ca_path}): {why}; give the CA that signed the server's certificate "
                         "(OpenVPN's `ca` line)")
    static = None
    for setting in ("tls_crypt", "tls_auth"):
        if options.get(setting):
            path = str(options[setting])
            static = static_key(setting, path, read_file(setting, path))
    crl: tuple[bytes, ...] = ()
    if options.get("crl"):
        crl = crls(str(options["crl"]), read_file("crl", str(options["crl"])), cas)
    ca_key_pem, signing = b"", b""
    if options.get("ca_key"):
        path = str(options["ca_key"])
        ca_key = _private_key("ca_key", path, read_file("ca_key", path))
        mine = next((ca for ca in cas if _spki(ca.public_key()) == _spki(ca_key.public_key())), None)
        if mine is None:
            raise SetupError(f"{where('ca_key')}: {path} is not the key of a certificate in {where('ca')} "
                             f"({ca_path}): give the CA's own key (easy-rsa: pki/private/ca.key)")
        ca_key_pem = ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        signing = mine.public_bytes(serialization.Encoding.PEM)
    return ImportedPki(ca_data, cert_data, key_data, static, crl, ca_key_pem, signing)


def reload_crl(path: str, ca_pem: bytes) -> tuple[bytes, ...]:
    """The CRL file read again (while running); SetupError when it is unusable."""
    return crls(path, read_file("crl", path), x509.load_pem_x509_certificates(ca_pem))


def file_stamp(path: str) -> tuple[int, int, int]:
    """What tells a changed file (mtime, size, inode); zeros when it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def client_error(ca_pem: bytes, cert: x509.Certificate) -> str | None:
    """Why a client certificate does not verify against the CA(s), or None."""
    return chain_error(ca_store(x509.load_pem_x509_certificates(ca_pem)), cert)


def fingerprint(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
