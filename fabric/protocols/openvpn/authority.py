"""OpenVPN's rules at the broker: the server's PKI, peer-ids, and what a worker may commit.

* The server identity (made on the first start, kept in `<state dir>/openvpn/`): a CA,
  the server's certificate, the tls-crypt/tls-auth key and the cookie key. The broker
  publishes them with the settings as `openvpn/server` (server.py).
* A peer is a client certificate the CA signed (`fabric peer add NAME --openvpn`); its
  identity in the fabric is the SHA-256 of the certificate's DER, so a removed peer's
  certificate is refused from then on.
* Each peer has one peer-id (24 bits, openvpn.h MAX_PEER_ID excluded), given at its
  first session and kept with the broker's state; a session's data key is
  peer-id << 3 | key id, what its P_DATA_V2 packets carry (ssl.c tls_prepend_opcode_v2).
* `session`: a key state finished its key exchange (key method 2); a new connection
  (another client session id) ends the peer's previous one, as a 2.6 server without
  --duplicate-cn does; a key id reused by a renegotiation replaces the old key's session.
* `end`: the client said EXIT (or OCC_EXIT): its connection's sessions end.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fabric.control.records import PeerRecord, SessionRecord
from fabric.protocols.base import (
    Authority,
    EndSessions,
    NewSession,
    PeerProvision,
    Protocol,
    ServerSetup,
    SetupError,
)
from fabric.protocols.openvpn import pki
from fabric.protocols.openvpn.constants import (
    HANDSHAKE_WINDOW_DEFAULT,
    MAX_PEER_ID,
    SID_SIZE,
    TRANSITION_WINDOW_DEFAULT,
)
from fabric.protocols.openvpn.keys import CIPHERS, DEFAULT_DATA_CIPHERS
from fabric.protocols.openvpn.server import SERVER_KEY, WRAPS, ServerConfig
from fabric.protocols.openvpn.wire import WireError
from fabric.protocols.openvpn.wrap import format_static_key, parse_static_key

NAME = "openvpn"
FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "ta.key", "cookie.key")
NEVER_RENEGOTIATED = 30 * 86400.0  # a session's lifetime when reneg_sec is 0
IMPLICIT_IV = 8


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


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The `[openvpn]` settings with defaults; SetupError names what is wrong."""
    out: dict[str, Any] = {
        "data_ciphers": list(DEFAULT_DATA_CIPHERS), "wrap": "tls-crypt", "reneg_sec": 3600,
        "ping": 10, "ping_restart": 60, "push": [],
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
    return out


class OvpnAuthority(Authority):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.config: ServerConfig | None = None
        self.ca_key = b""
        self.peer_ids: dict[bytes, int] = {}  # peer (certificate fingerprint) -> peer-id
        self.lifetime = session_lifetime(3600)

    # --- the server and its peers ----------------------------------------------------

    def start(self, setup: ServerSetup) -> list[tuple[bytes, dict[str, Any]]]:
        """The PKI in `<state dir>/openvpn/` (0600 keys), made on the first start."""
        opts = check_options(setup.options)
        root = setup.root / NAME
        root.mkdir(mode=0o700, exist_ok=True)
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
        v4 = [i for i in setup.interfaces if i.version == 4]
        if not v4:
            raise SetupError("OpenVPN needs an IPv4 tunnel address (--address 198.18.x.1/24) for its clients")
        self.config = ServerConfig(
            ca, cert, key, static_key, cookie_key, opts["wrap"], tuple(opts["data_ciphers"]),
            tuple(str(i) for i in setup.interfaces), opts["ping"], opts["ping_restart"], opts["reneg_sec"],
            tuple(opts["push"]),
        )
        self.lifetime = session_lifetime(opts["reneg_sec"])
        return [(SERVER_KEY, self.config.to_wire())]

    def describe(self) -> dict[str, Any]:
        if self.config is None:
            return {}
        return {"ca_fingerprint": pki.cert_fingerprint(self.config.ca).hex(), "wrap": self.config.wrap,
                "data_ciphers": list(self.config.ciphers)}

    def new_peer(self, req: dict[str, Any]) -> PeerProvision:
        """A client certificate with the peer's name as its CN; the profile's pieces are
        told once (the CA keeps no copy of the client's key)."""
        if self.config is None:
            raise ValueError("this fabric does not serve OpenVPN")
        if req.get("public_key") or req.get("psk"):
            raise ValueError("OpenVPN peers get a certificate: --public-key and --preshared-key are WireGuard's")
        name = str(req.get("name") or "")
        cert, key = pki.make_client_cert(self.config.ca, self.ca_key, name)
        return PeerProvision(pki.cert_fingerprint(cert), None, {
            "ca": self.config.ca.decode(), "cert": cert.decode(), "key": key.decode(),
            "static_key": format_static_key(self.config.static_key), "wrap": self.config.wrap,
        })

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
        return NewSession(peer_id << 3 | key_id, params, keys, False,
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
        self.peer_ids.pop(public, None)
        return []

    def state(self) -> dict[str, Any]:
        return {"peer_ids": dict(self.peer_ids)}

    def load(self, state: dict[str, Any]) -> None:
        ids = state.get("peer_ids") or {}
        if isinstance(ids, dict):
            self.peer_ids = {k: v for k, v in ids.items() if isinstance(k, bytes) and isinstance(v, int)
                             and not isinstance(v, bool) and 0 <= v < MAX_PEER_ID}
