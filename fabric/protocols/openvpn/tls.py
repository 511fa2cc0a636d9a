"""The control channel's TLS, sans-I/O, over pyOpenSSL memory BIOs.

`TlsServer` is set up as an OpenVPN 2.6 server sets up OpenSSL with default options
(`ssl.c init_ssl`, `ssl_openssl.c tls_ctx_set_options`, `tls_ctx_restrict_ciphers`):

- TLS 1.2 minimum (`options.c options_set_backwards_compatible_options`: "Use TLS 1.2
  as proper default"), no maximum, so TLS 1.3 when both ends have it;
- the TLS 1.2 cipher list "DEFAULT:!EXP:!LOW:!MEDIUM:!kDH:!kECDH:!DSS:!PSK:!SRP:!kRSA",
  the library's default TLS 1.3 suites and groups (OpenSSL 3: no `--tls-groups`);
- SSL_OP_NO_TICKET, SSL_OP_CIPHER_SERVER_PREFERENCE, SSL_OP_NO_COMPRESSION, session
  cache off;
- SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT: a client certificate is required
  and verified against the CA (`ssl_verify_openssl.c verify_callback`), then the
  leaf (depth 0) is offered to the `verify` callable, as OpenVPN's `verify_cert`
  runs its checks at depth 0.

No sockets, no clock: `feed` takes the peer's TLS bytes (the payloads of P_CONTROL_V1
packets, in order), `pull` gives the TLS bytes to send, `read`/`write` carry the
plaintext (key method 2 messages, then NUL-terminated control messages). Every
failure is a `TlsError` with a `reason` token; once failed, the object stays failed
but `pull` still returns what is pending (an alert for the peer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

# ssl_openssl.c tls_ctx_restrict_ciphers, the list used when --tls-cipher is not given
OPENVPN_DEFAULT_CIPHER_LIST = b"DEFAULT:!EXP:!LOW:!MEDIUM:!kDH:!kECDH:!DSS:!PSK:!SRP:!kRSA"

TLS_VERSIONS: dict[str, int] = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# the largest TLS record plaintext (RFC 8446 5.1): what one recv can return
_RECV_SIZE = 16384
_BIO_CHUNK = 65536

_VERIFY_ERRORS: dict[int, str] = {
    value: name
    for name, value in vars(SSL.X509VerificationCodes).items()
    if name.isupper() and isinstance(value, int)
}

Verifier = Callable[[bytes], bool]
_PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


class TlsError(Exception):
    """A TLS failure. `reason` is a drop-counter label:

    config (unusable CA/cert/key), handshake (generic), bad_certificate (the chain does
    not verify against the CA), refused_certificate (the verify callable said no),
    verify_error (the verify callable raised), no_certificate (the client sent none),
    version (no common protocol version), peer_alert (the peer sent a fatal alert),
    protocol (a bad record after the handshake), not_ready (used before the handshake),
    closed (used after close_notify), export (keying material export failed)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _ssl_error_text(e: Exception) -> str:
    """The OpenSSL reason strings of a pyOpenSSL error, joined."""
    parts: list[str] = []
    for arg in e.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    parts.append(str(item[-1]))
                else:
                    parts.append(str(item))
        else:
            parts.append(str(arg))
    return "; ".join(p for p in parts if p) or type(e).__name__


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TlsError("config", f"{what}: {e}") from e
    if not certs:
        raise TlsError("config", f"{what}: no certificate")
    return certs


def _load_key(pem: bytes) -> _PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise TlsError("config", f"key: {e}") from e
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | dsa.DSAPrivateKey,
    ):
        raise TlsError("config", f"key: unsupported type {type(key).__name__}")
    return key


class TlsContext:
    """A CA, a certificate chain and its key loaded once, for many connections
    (OpenVPN's `struct tls_root_ctx`, `ssl.c init_ssl`)."""

    def __init__(
        self,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        server: bool,
        tls_min: str = "1.2",
        tls_max: str | None = None,
    ) -> None:
        if tls_min not in TLS_VERSIONS or (tls_max is not None and tls_max not in TLS_VERSIONS):
            raise TlsError("config", f"TLS versions {tls_min!r}..{tls_max!r}")
        self.server = server
        cas = _load_certs(ca_pem, "ca")
        chain = _load_certs(cert_pem, "cert")
        key = _load_key(key_pem)
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
        try:
            # ssl_openssl.c tls_ctx_set_options (SSL_OP_NO_RENEGOTIATION: OpenSSL 3 and
            # later refuse client-initiated renegotiation by default anyway)
            ctx.set_options(
                SSL.OP_NO_TICKET | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_COMPRESSION
            )
            ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            # ssl_openssl.c tls_ctx_set_tls_versions
            ctx.set_min_proto_version(TLS_VERSIONS[tls_min])
            if tls_max is not None:
                ctx.set_max_proto_version(TLS_VERSIONS[tls_max])
            ctx.set_cipher_list(OPENVPN_DEFAULT_CIPHER_LIST)
            # ssl_openssl.c tls_ctx_load_ca: the CA as trust anchor (and, on a server,
            # as the list of acceptable client CAs)
            store = ctx.get_cert_store()
            if store is None:
                raise TlsError("config", "no certificate store")
            for ca in cas:
                store.add_cert(crypto.X509.from_cryptography(ca))
                if server:
                    ctx.add_client_ca(ca)
            ctx.use_certificate(chain[0])
            for extra in chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except SSL.Error as e:
            raise TlsError("config", _ssl_error_text(e)) from e
        self.ssl_context = ctx


class _TlsEndpoint:
    """What TlsServer and TlsClient share: the memory-BIO pump."""

    def __init__(self, context: TlsContext, verify: Verifier | None) -> None:
        self.context = context
        self._verify = verify
        self._conn = SSL.Connection(context.ssl_context, None)
        # ssl_openssl.c tls_ctx_set_options: SSL_VERIFY_PEER, and on the server
        # SSL_VERIFY_FAIL_IF_NO_PEER_CERT (--verify-client-cert require, the default)
        mode = SSL.VERIFY_PEER
        if context.server:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self._conn.set_verify(mode, self._verify_callback)
        if context.server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
        self._handshake_done = False
        self._queued: list[bytes] = []
        self._plain: list[bytes] = []  # one entry per SSL_read, i.e. per TLS record
        self._verify_failure: TlsError | None = None
        self._error: TlsError | None = None
        self._closed = False
        self._peer_der: bytes | None = None

    # --- verification -------------------------------------------------------------------

    def _verify_callback(
        self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            name = _VERIFY_ERRORS.get(errnum, str(errnum))
            self._verify_failure = TlsError("bad_certificate", f"depth {depth}: {name}")
            return False
        if depth != 0:
            return True
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        if self._verify is not None:
            try:
                accepted = bool(self._verify(der))
            except Exception as e:  # the caller's bug must not escape as a pyOpenSSL error
                self._verify_failure = TlsError("verify_error", repr(e))
                return False
            if not accepted:
                self._verify_failure = TlsError("refused_certificate")
                return False
        self._peer_der = der
        return True

    # --- state --------------------------------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def closed(self) -> bool:
        """The peer sent close_notify."""
        return self._closed

    @property
    def failed(self) -> TlsError | None:
        return self._error

    @property
    def version(self) -> str:
        """The protocol version, "TLSv1.2" or "TLSv1.3", after the handshake; "" before."""
        if not self._handshake_done:
            return ""
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        """The TLS cipher suite's OpenSSL name after the handshake, "" before."""
        if not self._handshake_done:
            return ""
        return self._conn.get_cipher_name() or ""

    @property
    def peer_certificate_der(self) -> bytes | None:
        """The peer's leaf certificate (DER), once verified; None before."""
        if not self._handshake_done:
            return None
        if self._peer_der is None:
            cert = self._conn.get_peer_certificate(as_cryptography=True)
            if cert is not None:
                self._peer_der = cert.public_bytes(serialization.Encoding.DER)
        return self._peer_der

    def _fail(self, err: TlsError) -> TlsError:
        if self._error is None:
            self._error = err
        return err

    def _check_usable(self) -> None:
        if self._error is not None:
            raise TlsError(self._error.reason, self._error.detail)

    def _classify(self, e: Exception) -> TlsError:
        text = _ssl_error_text(e)
        if self._verify_failure is not None:
            return TlsError(self._verify_failure.reason, self._verify_failure.detail)
        lowered = text.lower()
        if "peer did not return a certificate" in lowered:
            return TlsError("no_certificate", text)
        if "alert" in lowered:
            return TlsError("peer_alert", text)
        if "version" in lowered or "no protocols available" in lowered:
            return TlsError("version", text)
        if "certificate verify failed" in lowered:
            return TlsError("bad_certificate", text)
        return TlsError("handshake" if not self._handshake_done else "protocol", text)

    # --- the pump -----------------------------------------------------------------------

    def _advance(self) -> None:
        if not self._handshake_done:
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                return
            except (SSL.Error, ValueError) as e:
                raise self._fail(self._classify(e)) from e
            self._handshake_done = True
            queued, self._queued = self._queued, []
            for chunk in queued:
                self._send(chunk)
        self._drain()

    def _drain(self) -> None:
        while not self._closed:
            try:
                chunk = self._conn.recv(_RECV_SIZE)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self._closed = True
                return
            except (SSL.Error, ValueError) as e:
                raise self._fail(self._classify(e)) from e
            if not chunk:
                return
            self._plain.append(chunk)

    def _send(self, data: bytes) -> None:
        try:
            self._conn.sendall(data)
        except (SSL.Error, ValueError) as e:
            raise self._fail(self._classify(e)) from e

    # --- the interface ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """TLS bytes from the peer, in order."""
        self._check_usable()
        if data:
            try:
                self._conn.bio_write(data)
            except (SSL.Error, ValueError) as e:
                raise self._fail(TlsError("protocol", _ssl_error_text(e))) from e
        self._advance()

    def pull(self) -> bytes:
        """TLS bytes to send to the peer (b"" if none). Works after a failure too,
        to flush the alert."""
        out = bytearray()
        while True:
            try:
                chunk = self._conn.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                break
            except (SSL.Error, ValueError):
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def read(self) -> bytes:
        """The application plaintext received so far (and not read before)."""
        return b"".join(self.read_records())

    def read_records(self) -> list[bytes]:
        """The same, one item per TLS record (SSL_read returns at most one record's
        data, and OpenVPN reads its peer's key method 2 message from exactly one:
        `ssl.c read_incoming_tls_plaintext`, then `key_method_2_read` discards the
        rest of that buffer)."""
        self._check_usable()
        out, self._plain = self._plain, []
        return out

    def write(self, data: bytes) -> None:
        """Application plaintext for the peer; held until the handshake is done. Each
        call becomes its own TLS record(s): write the key method 2 message and the
        PUSH_REPLY in separate calls (see `read_records`)."""
        self._check_usable()
        if self._closed:
            raise TlsError("closed")
        if not data:
            return
        if not self._handshake_done:
            self._queued.append(bytes(data))
            return
        self._send(bytes(data))

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        """RFC 5705 exporter without context, as ssl_openssl.c
        key_state_export_keying_material (SSL_export_keying_material(..., NULL, 0, 0))."""
        self._check_usable()
        if not self._handshake_done:
            raise TlsError("not_ready", "export before the handshake")
        try:
            return self._conn.export_keying_material(label, length, None)
        except (SSL.Error, ValueError) as e:
            raise TlsError("export", _ssl_error_text(e)) from e

    def close(self) -> None:
        """Queue a close_notify for `pull` (best effort)."""
        try:
            self._conn.shutdown()
        except (SSL.Error, ValueError):
            pass


class _TlsEnd(_TlsEndpoint):
    """TlsServer and TlsClient: an endpoint of the side `SERVER` names, on its own context
    or on a loaded one (`with_context`: one context per server, not per peer)."""

    SERVER: bool

    def __init__(
        self,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        verify: Verifier | None = None,
        *,
        tls_min: str = "1.2",
        tls_max: str | None = None,
    ) -> None:
        context = TlsContext(
            ca_pem, cert_pem, key_pem, server=self.SERVER, tls_min=tls_min, tls_max=tls_max
        )
        self._start(context, verify)

    def _start(self, context: TlsContext, verify: Verifier | None) -> None:
        _TlsEndpoint.__init__(self, context, verify)
        if not self.SERVER:
            self._advance()  # the ClientHello, ready to pull

    @classmethod
    def with_context(cls, context: TlsContext, verify: Verifier | None = None) -> Self:
        """A connection on an already loaded context of this side."""
        if context.server != cls.SERVER:
            raise TlsError("config", "a client context" if cls.SERVER else "a server context")
        self = cls.__new__(cls)
        self._start(context, verify)
        return self


class TlsServer(_TlsEnd):
    """The server end of one control channel (one OpenVPN key_state's TLS object)."""

    SERVER = True


class TlsClient(_TlsEnd):
    """The client end, for in-memory tests and an in-process test client. The
    ClientHello is ready to `pull` right after construction."""

    SERVER = False
