"""OpenVPN's rules at the broker: the server's PKI, peer-ids, and what a worker may commit.

* The server identity (made on the first start, kept in `<state dir>/openvpn/`): a CA,
  the server's certificate, the tls-crypt/tls-auth key and the cookie key. The broker
  publishes them with the settings as `openvpn/server` (server.py).
* Or an existing OpenVPN server's PKI (`[openvpn] ca, cert, key, tls_crypt | tls_auth,
  crl, ca_key`; imported.py), read from the operator's files at every start (not
  copied: renewals apply at the next start; the CRL file is re-read when it changes).
  Only the cookie key (and a static key, when `wrap` asks for one without a file) is
  made, in `<state dir>/openvpn/imported/`. Without `ca_key` the fabric makes no new
  client certificates.
* A peer is a client certificate the CA signed (`fabric peer add NAME --openvpn`, or an
  existing one with `--certificate FILE`); its identity in the fabric is the SHA-256 of
  the certificate's DER, so a removed peer's certificate is refused from then on.
* Or a common name (`fabric peer add NAME --openvpn --cn CN`, or `enroll = "cn"`: a
  client whose certificate the CA signed becomes a peer at its first connection, named
  by its CN, with the next free tunnel address): any unrevoked certificate of the CA
  with that CN, as OpenVPN servers tell clients apart; identity `server.cn_identity(CN)`.
  A removed peer's CN (or certificate) is refused by enrollment from then on, until
  `fabric peer add` names it again.
* Each peer has one peer-id (24 bits, openvpn.h MAX_PEER_ID excluded), given at its
  first session and kept with the broker's state; a session's data key is
  peer-id << 3 | key id, what its P_DATA_V2 packets carry (ssl.c tls_prepend_opcode_v2).
* `session`: a key state finished its key exchange (key method 2); a new connection
  (another client session id) ends the peer's previous one, as a 2.6 server without
  --duplicate-cn does; a key id reused by a renegotiation replaces the old key's session.
* `end`: the client said EXIT (or OCC_EXIT): its connection's sessions end.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fabric.control.records import PeerRecord, SessionRecord
from fabric.protocols.base import (
    Admit,
    Authority,
    EndSessions,
    NewSession,
    PeerProvision,
    Protocol,
    ServerSetup,
    SetupError,
)
from fabric.protocols.openvpn import imported, pki
from fabric.protocols.openvpn.constants import (
    HANDSHAKE_WINDOW_DEFAULT,
    MAX_PEER_ID,
    SID_SIZE,
    TLS_AUTH_DIGEST_DEFAULT,
    TLS_AUTH_DIGEST_SIZES,
    TRANSITION_WINDOW_DEFAULT,
)
from fabric.protocols.openvpn.keys import CIPHERS, DEFAULT_DATA_CIPHERS
from fabric.protocols.openvpn.server import ENROLL, SERVER_KEY, WRAPS, ServerConfig, cn_identity
from fabric.protocols.openvpn.tls import TlsContext, TlsError
from fabric.protocols.openvpn.wire import WireError
from fabric.protocols.openvpn.wrap import format_static_key, parse_static_key

NAME = "openvpn"
FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "ta.key", "cookie.key")
NEVER_RENEGOTIATED = 30 * 86400.0  # a session's lifetime when reneg_sec is 0
IMPLICIT_IV = 8
IMPORTED = "imported"  # what the fabric makes for an imported PKI: <state dir>/openvpn/imported/
CRL_CHECK_EVERY = 5.0  # seconds between looks at the CRL file (its mtime, size, inode)
MAX_NAME = 64  # a peer name's length (brokers/admin.py), and X.509's ub-common-name


def session_lifetime(reneg_sec: float) -> float:
    """How long a key lives: until the next renegotiation, then as the lame duck for the
    transition window (ssl.c key_state_soft_reset: must_die = now + transition_window)."""
    if reneg_sec <= 0:
        return NEVER_RENEGOTIATED
    return reneg_sec + TRANSITION_WINDOW_DEFAULT + HANDSHAKE_WINDOW_DEFAULT


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read_or_make(path: Path, size: int, text: bool = False) -> bytes:
    """A key the fabric keeps (hex, or a static key file with `text`): read, or made once."""
    if not path.exists():
        fresh = os.urandom(size)
        _write_private(path, format_static_key(fresh).encode() if text else fresh.hex().encode())
    raw = path.read_text()
    key = parse_static_key(raw) if text else bytes.fromhex(raw.strip())
    if len(key) != size:
        raise ValueError(f"{path}: not {size} bytes; remove it to make another")
    return key


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The `[openvpn]` settings with defaults; SetupError names what is wrong. The files
    of an imported PKI are checked when read (imported.load)."""
    out: dict[str, Any] = {
        "data_ciphers": list(DEFAULT_DATA_CIPHERS), "wrap": "tls-crypt", "reneg_sec": 3600,
        "ping": 10, "ping_restart": 60, "push": [],
        **dict.fromkeys(imported.FILES, ""), "key_direction": None, "auth": TLS_AUTH_DIGEST_DEFAULT,
        "enroll": "none",
    }
    for key, value in options.items():
        if key == "port":
            continue
        if key not in out:
            raise SetupError(f"[openvpn] {key}: unknown setting; known: {', '.join(sorted(out))}, port")
        out[key] = value
    ciphers = out["data_ciphers"]
    if not isinstance(ciphers, list | tuple) or not ciphers or any(c not in CIPHERS for c in ciphers):
        raise SetupError(f"[openvpn] data_ciphers: a list of {', '.join(CIPHERS)}")
    if out["wrap"] not in WRAPS:
        raise SetupError(f"[openvpn] wrap: one of {', '.join(WRAPS)}")
    for key in ("reneg_sec", "ping", "ping_restart"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "reneg_sec" else 1) or v > 86400:
            raise SetupError(f"[openvpn] {key}: whole seconds up to 86400")
    if out["ping_restart"] <= out["ping"]:
        raise SetupError("[openvpn] ping_restart must be longer than ping")
    push = out["push"]
    if not isinstance(push, list | tuple) or any(not isinstance(p, str) or not p or re.search(r"[,\n\r\0]", p)
                                                 for p in push):
        raise SetupError("[openvpn] push: a list of options without commas or newlines")
    _check_import(out, set(options))
    return out


def _check_import(out: dict[str, Any], given: set[str]) -> None:
    """The settings of an imported PKI, together (their files: imported.load)."""
    for key in imported.FILES:
        if not isinstance(out[key], str) or "\0" in out[key]:
            raise SetupError(f"[openvpn] {key}: the path of a file")
    trio = [k for k in ("ca", "cert", "key") if out[k]]
    if trio and len(trio) != 3:
        raise SetupError("[openvpn] ca, cert and key: an existing PKI needs all three (the CA, the server's "
                         f"certificate and its key); missing: {', '.join(k for k in ('ca', 'cert', 'key') if not out[k])}")
    needs_ca = [k for k in ("ca_key", "tls_crypt", "tls_auth", "crl") if out[k]]
    needs_ca += [k for k in ("key_direction", "auth") if k in given]
    needs_ca += ["enroll"] if out["enroll"] != "none" else []
    if needs_ca and not out["ca"]:
        raise SetupError(f"[openvpn] {needs_ca[0]}: goes with an existing PKI (ca, cert and key)")
    if out["tls_crypt"] and out["tls_auth"]:
        raise SetupError("[openvpn] tls_crypt and tls_auth: give one (a server wraps its control channel one way)")
    for key, wrap in (("tls_crypt", "tls-crypt"), ("tls_auth", "tls-auth")):
        if out[key]:
            if "wrap" in given and out["wrap"] != wrap:
                raise SetupError(f"[openvpn] wrap: {out['wrap']!r} contradicts {key}; leave wrap out")
            out["wrap"] = wrap
    if out["ca"] and not (out["tls_crypt"] or out["tls_auth"] or "wrap" in given):
        raise SetupError("[openvpn] ca: say how the existing profiles wrap the control channel: tls_crypt = "
                         "PATH or tls_auth = PATH (the server's key file), or wrap = \"none\" for neither")
    kd = out["key_direction"]
    if kd is not None and (kd not in (0, 1) or isinstance(kd, bool) or not out["tls_auth"]):
        raise SetupError("[openvpn] key_direction: 0 or 1, with tls_auth (leave it out for none)")
    if "auth" in given and (out["auth"] not in TLS_AUTH_DIGEST_SIZES or not out["tls_auth"]):
        raise SetupError(f"[openvpn] auth: one of {', '.join(TLS_AUTH_DIGEST_SIZES)}, with tls_auth")
    if out["enroll"] not in ENROLL:
        raise SetupError(f"[openvpn] enroll: one of {', '.join(ENROLL)}")


class OvpnAuthority(Authority):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.config: ServerConfig | None = None
        self.ca_key = b""  # PEM; b"" for an imported CA without its key (no new profiles)
        self.signing_ca = b""  # PEM of the CA certificate ca_key signs as
        self.imported = False
        self.peer_ids: dict[bytes, int] = {}  # peer (certificate fingerprint) -> peer-id
        self.lifetime = session_lifetime(3600)
        self.cns: dict[bytes, str] = {}  # peers by CN: identity -> CN
        self.certs: set[bytes] = set()  # peers by certificate: fingerprints (made or registered here)
        self.refused_cns: set[str] = set()  # removed: enrollment refuses them
        self.refused_certs: set[bytes] = set()
        self._store: Any = None  # the CA(s) as an OpenSSL store, to check certificates
        self.crl_path = ""
        self.crl_stamp = (0, 0, 0)
        self.crl_check_at = 0.0
        self.crl_error = ""

    # --- the server and its peers ----------------------------------------------------

    def start(self, setup: ServerSetup) -> list[tuple[bytes, dict[str, Any]]]:
        """The PKI in `<state dir>/openvpn/` (0600 keys), made on the first start."""
        opts = check_options(setup.options)
        root = setup.root / NAME
        root.mkdir(mode=0o700, exist_ok=True)
        if opts["ca"]:
            return self._start_imported(setup, opts, root / IMPORTED)
        paths = {name: root / name for name in FILES}
        present = [n for n, p in paths.items() if p.exists()]
        if present and len(present) != len(FILES):
            missing = ", ".join(n for n in FILES if n not in present)
            raise SetupError(f"{root}: {missing} missing; restore them, or remove the directory to make a new "
                             "server identity (every client then needs a new profile)")
        if not present:
            ca, ca_key = pki.make_ca("fabric OpenVPN CA")
            cert, key = pki.make_server_cert(ca, ca_key, "fabric server")
            paths["ca.crt"].write_bytes(ca)
            _write_private(paths["ca.key"], ca_key)
            paths["server.crt"].write_bytes(cert)
            _write_private(paths["server.key"], key)
            _write_private(paths["ta.key"], format_static_key(pki.new_static_key()).encode())
            _write_private(paths["cookie.key"], os.urandom(32).hex().encode())
        try:
            static_key = parse_static_key(paths["ta.key"].read_text())
            cookie_key = bytes.fromhex(paths["cookie.key"].read_text().strip())
            ca, self.ca_key = paths["ca.crt"].read_bytes(), paths["ca.key"].read_bytes()
            cert, key = paths["server.crt"].read_bytes(), paths["server.key"].read_bytes()
            pki.cert_fingerprint(ca)
            pki.cert_fingerprint(cert)
        except (OSError, ValueError, WireError, pki.PkiError) as exc:
            raise SetupError(f"{root}: {exc}; remove the directory to make a new server identity") from None
        if len(cookie_key) != 32:
            raise SetupError(f"{paths['cookie.key']}: not 32 bytes of hex; remove it to make another")
        self.signing_ca = ca
        return self._serve(setup, opts, ServerConfig(ca, cert, key, static_key, cookie_key))

    def _start_imported(self, setup: ServerSetup, opts: dict[str, Any],
                        own: Path) -> list[tuple[bytes, dict[str, Any]]]:
        """An existing server's files (imported.load checks them), read at every start."""
        pki_ = imported.load(opts)
        own.mkdir(mode=0o700, exist_ok=True)
        try:
            cookie_key = _read_or_make(own / "cookie.key", 32)
            static_key = pki_.static_key or _read_or_make(own / "ta.key", 256, text=True)
        except (OSError, ValueError, WireError) as exc:
            raise SetupError(f"{own}: {exc}; remove the file to make another") from None
        try:
            TlsContext(pki_.ca, pki_.cert, pki_.key, server=True)
        except TlsError as exc:
            raise SetupError(f"openvpn.cert, openvpn.key: TLS cannot use them: {exc}") from None
        self.imported = True
        self.ca_key, self.signing_ca = pki_.ca_key, pki_.signing_ca
        self._store = imported.ca_store(x509.load_pem_x509_certificates(pki_.ca))
        if opts["crl"]:
            self.crl_path = opts["crl"]
            self.crl_stamp = imported.file_stamp(self.crl_path)
        kd = opts["key_direction"] if opts["tls_auth"] else 0
        return self._serve(setup, opts, ServerConfig(
            pki_.ca, pki_.cert, pki_.key, static_key, cookie_key, key_direction=kd, auth=opts["auth"],
            crl=pki_.crl, enroll=opts["enroll"]))

    def _serve(self, setup: ServerSetup, opts: dict[str, Any],
               base: ServerConfig) -> list[tuple[bytes, dict[str, Any]]]:
        """The settings on top of the identity: the record to publish."""
        v4 = [i for i in setup.interfaces if i.version == 4]
        if not v4:
            raise SetupError("OpenVPN needs an IPv4 tunnel address (--address 198.18.x.1/24) for its clients")
        self.config = ServerConfig.from_wire({
            **base.to_wire(), "wrap": opts["wrap"], "ciphers": list(opts["data_ciphers"]),
            "interfaces": [str(i) for i in setup.interfaces], "ping": opts["ping"],
            "ping_restart": opts["ping_restart"], "reneg_sec": opts["reneg_sec"], "push": list(opts["push"]),
        })
        self.lifetime = session_lifetime(opts["reneg_sec"])
        return [(SERVER_KEY, self.config.to_wire())]

    def tick(self, now: float) -> list[tuple[bytes, dict[str, Any] | None]]:
        """The CRL file changed (easy-rsa gen-crl, revoke): read it again and publish, so
        workers refuse its serials at the next handshake, as OpenVPN re-reads --crl-verify.
        One that does not load leaves the previous in force (`describe`: crl_error says why)."""
        if not self.crl_path or self.config is None or now < self.crl_check_at:
            return []
        self.crl_check_at = now + CRL_CHECK_EVERY
        stamp = imported.file_stamp(self.crl_path)
        if stamp == self.crl_stamp:
            return []
        self.crl_stamp = stamp
        try:
            crl = imported.reload_crl(self.crl_path, self.config.ca)
        except SetupError as exc:
            self.crl_error = str(exc)
            return []
        self.crl_error = ""
        self.config = ServerConfig.from_wire({**self.config.to_wire(), "crl": list(crl)})
        return [(SERVER_KEY, self.config.to_wire())]

    def describe(self) -> dict[str, Any]:
        if self.config is None:
            return {}
        cfg = self.config
        out = {"ca_fingerprint": pki.cert_fingerprint(cfg.ca).hex(), "wrap": cfg.wrap,
               "data_ciphers": list(cfg.ciphers), "pki": IMPORTED if self.imported else "fabric",
               "enroll": cfg.enroll, "new_profiles": bool(self.ca_key)}
        if self.crl_path:
            out.update(crl=self.crl_path, crl_revoked=sum(len(v) for v in cfg.revoked_serials().values()))
            if self.crl_error:
                out["crl_error"] = self.crl_error
        return out

    def new_peer(self, req: dict[str, Any]) -> PeerProvision:
        """A client certificate with the peer's name as its CN; the profile's pieces are
        told once (the CA keeps no copy of the client's key). Or, with `cn` or
        `certificate` (PEM), an existing client registered: no key made, no profile."""
        if self.config is None:
            raise ValueError("this fabric does not serve OpenVPN")
        if req.get("public_key") or req.get("psk"):
            raise ValueError("OpenVPN peers get a certificate: --public-key and --preshared-key are WireGuard's")
        cn, certificate = req.get("cn"), req.get("certificate")
        if cn and certificate:
            raise ValueError("give --cn or --certificate, not both")
        if cn:
            return self._register_cn(cn)
        if certificate:
            return self._register_certificate(certificate)
        if not self.ca_key:
            raise ValueError(
                "this fabric serves an existing PKI ([openvpn] ca) without the CA's private key, so it cannot "
                "make new client certificates: give [openvpn] ca_key = PATH for new profiles, or register an "
                "existing client with `fabric peer add NAME --openvpn --cn CN` (or --certificate FILE)"
                + ("" if self.config.enroll == "cn" else "; [openvpn] enroll = \"cn\" adds them at their "
                   "first connection"))
        name = str(req.get("name") or "")
        cert, key = pki.make_client_cert(self.signing_ca, self.ca_key, name)
        fp = pki.cert_fingerprint(cert)
        self.certs.add(fp)
        cfg = self.config
        reply: dict[str, Any] = {"ca": cfg.ca.decode(), "cert": cert.decode(), "key": key.decode(),
                                 "static_key": format_static_key(cfg.static_key), "wrap": cfg.wrap}
        if cfg.wrap == "tls-auth":  # the client's side of the server's key direction, and --auth
            reply["key_direction"] = None if cfg.key_direction is None else 1 - cfg.key_direction
            if cfg.auth != TLS_AUTH_DIGEST_DEFAULT:
                reply["extra"] = [f"auth {cfg.auth}"]
        return PeerProvision(fp, None, reply)

    def _register_cn(self, cn: Any) -> PeerProvision:
        if not isinstance(cn, str) or not cn or len(cn) > MAX_NAME or not cn.isprintable():
            raise ValueError(f"--cn {cn!r}: a certificate common name of 1 to {MAX_NAME} printable characters")
        ident = cn_identity(cn)
        self.cns[ident] = cn
        self.refused_cns.discard(cn)
        return PeerProvision(ident, None, {"cn": cn, "registered": "cn"})

    def _register_certificate(self, text: Any) -> PeerProvision:
        assert self.config is not None
        try:
            cert = x509.load_pem_x509_certificate(text.encode() if isinstance(text, str) else bytes(text))
        except (ValueError, TypeError):
            raise ValueError("--certificate: not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
        why = imported.chain_error(self._ca_store(), cert)
        if why is not None:
            raise ValueError(f"--certificate: does not verify against this fabric's CA: {why}")
        der = cert.public_bytes(serialization.Encoding.DER)
        if self.config.revoked(der):
            raise ValueError("--certificate: revoked by [openvpn] crl")
        fp = hashlib.sha256(der).digest()
        self.certs.add(fp)
        self.refused_certs.discard(fp)
        return PeerProvision(fp, None, {"cn": imported.common_name(cert), "registered": "certificate",
                                        "fingerprint": fp.hex()})

    def _ca_store(self) -> Any:
        if self._store is None:
            assert self.config is not None
            self._store = imported.ca_store(x509.load_pem_x509_certificates(self.config.ca))
        return self._store

    def admit(self, req: dict[str, Any], now: float) -> Admit | str:
        """`enroll = "cn"`: a client whose certificate the CA signed, not revoked, whose CN
        (and certificate) no `fabric peer remove` refused, becomes a peer named by its CN.
        The worker's TLS checked the chain; the broker checks it again (it decides)."""
        cfg = self.config
        if cfg is None:
            return "not_served"
        if cfg.enroll != "cn":
            return "unknown_peer"
        der = req.get("certificate")
        if not isinstance(der, bytes):
            return "bad_request"
        try:
            cert = x509.load_der_x509_certificate(der)
            cn = imported.common_name(cert)
        except ValueError:
            return "bad_request"
        if imported.chain_error(self._ca_store(), cert) is not None:
            return "bad_certificate"
        if cfg.revoked(der):
            return "revoked"
        if hashlib.sha256(der).digest() in self.refused_certs:
            return "removed_certificate"
        if not cn or len(cn) > MAX_NAME or not cn.isprintable():
            return "bad_common_name"
        if cn in self.refused_cns:
            return "removed_cn"
        ident = cn_identity(cn)
        if req.get("peer") != ident:
            return "bad_request"
        self.cns[ident] = cn
        return Admit(cn, ident)

    # --- commits ------------------------------------------------------------------------

    def _peer_id(self, public: bytes) -> int | None:
        got = self.peer_ids.get(public)
        if got is None:
            used = set(self.peer_ids.values())
            got = next((i for i in range(MAX_PEER_ID) if i not in used), None)
            if got is None:
                return None
            self.peer_ids[public] = got
        return got

    def commit(self, req: dict[str, Any], peer: PeerRecord, sessions: Iterable[SessionRecord],
               now: float) -> NewSession | EndSessions | str:
        if self.config is None:
            return "not_served"
        role = req.get("role")
        client_sid = req.get("client_sid")
        if not isinstance(client_sid, bytes) or len(client_sid) != SID_SIZE:
            return "bad_request"
        mine = [s for s in sessions if s.peer == peer.public and s.protocol == NAME]
        if role == "end":
            return EndSessions(tuple(s.id for s in mine if s.params.get("client_sid") == client_sid))
        if role != "session":
            return "bad_request"
        key_id, cipher, server_sid = req.get("key_id"), req.get("cipher"), req.get("server_sid")
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id < 8 \
                or cipher not in self.config.ciphers \
                or not isinstance(server_sid, bytes) or len(server_sid) != SID_SIZE:
            return "bad_request"
        size = CIPHERS[cipher]
        keys = {k: req.get(k) for k in ("encrypt_key", "encrypt_iv", "decrypt_key", "decrypt_iv")}
        if not all(isinstance(v, bytes) and len(v) == (size if k.endswith("key") else IMPLICIT_IV)
                   for k, v in keys.items()):
            return "bad_request"
        peer_id = self._peer_id(peer.public)
        if peer_id is None:
            return "no_peer_id"
        endpoint = req.get("endpoint", b"")
        params = {"peer_id": peer_id, "key_id": key_id, "cipher": cipher, "client_sid": client_sid,
                  "server_sid": server_sid, "lifetime": self.lifetime, "ekm": bool(req.get("ekm")), "v1": bool(req.get("v1"))}
        # confirmed at once for key 0 (the connection has no other key: the server may send
        # first, e.g. to a client that has not spoken since it connected); a renegotiated key
        # only when the client's first packet with it arrives, so the server goes on sending
        # with the old key until the client surely has the new one (ssl.c: the send key
        # switches once the client acked the exchange)
        return NewSession(peer_id << 3 | key_id, params, keys, key_id == 0,
                          endpoint if isinstance(endpoint, bytes) else b"",
                          ends=tuple(s.id for s in mine if s.params.get("client_sid") != client_sid))

    def ended(self, record: SessionRecord, sessions: Iterable[SessionRecord]) -> tuple[int, ...]:
        """OCC_EXIT on one key ends the connection: every session of its client session id."""
        client = record.params.get("client_sid")
        return tuple(s.id for s in sessions if s.peer == record.peer and s.params.get("client_sid") == client)

    def silence_limit(self) -> float | None:
        """ping-restart on the server's side (the value pushed to clients)."""
        return float(self.config.ping_restart) if self.config is not None else None

    def forget_peer(self, public: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        """A removed peer's CN (or certificate) is refused by enrollment from then on."""
        self.peer_ids.pop(public, None)
        cn = self.cns.pop(public, None)
        if cn is not None:
            self.refused_cns.add(cn)
        elif public in self.certs:
            self.certs.discard(public)
            self.refused_certs.add(public)
        return []

    def state(self) -> dict[str, Any]:
        return {"peer_ids": dict(self.peer_ids), "cns": dict(self.cns), "certs": sorted(self.certs),
                "refused_cns": sorted(self.refused_cns), "refused_certs": sorted(self.refused_certs)}

    def load(self, state: dict[str, Any]) -> None:
        ids = state.get("peer_ids") or {}
        if isinstance(ids, dict):
            self.peer_ids = {k: v for k, v in ids.items() if isinstance(k, bytes) and isinstance(v, int)
                             and not isinstance(v, bool) and 0 <= v < MAX_PEER_ID}
        cns = state.get("cns") or {}
        if isinstance(cns, dict):
            self.cns = {k: v for k, v in cns.items() if isinstance(k, bytes) and isinstance(v, str)}
        self.certs = {c for c in state.get("certs") or () if isinstance(c, bytes)}
        self.refused_cns = {c for c in state.get("refused_cns") or () if isinstance(c, str)}
        self.refused_certs = {c for c in state.get("refused_certs") or () if isinstance(c, bytes)}
