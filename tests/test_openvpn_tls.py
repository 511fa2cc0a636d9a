"""OpenVPN control channel pieces: the fabric's PKI, sans-I/O TLS, key method 2,
key derivation and NCP (fabric.protocols.openvpn.{pki,tls,keys})."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from fabric.protocols.openvpn import keys, pki, tls
from fabric.protocols.openvpn.keys import KeyMethodError, KeySource
from fabric.protocols.openvpn.tls import TlsClient, TlsError, TlsServer
from fabric.protocols.openvpn.wrap import format_static_key, parse_static_key

OPENSSL = shutil.which("openssl")
OPENVPN = shutil.which("openvpn")

# What Debian's 2.6.14 client sends (shared/openvpn-protocol.md 2.1, observed)
DEBIAN_OPTIONS = (
    "V4,dev-type tun,link-mtu 1541,tun-mtu 1500,proto UDPv4,auth SHA1,keysize 128,"
    "key-method 2,tls-client"
)
DEBIAN_PEER_INFO = (
    "IV_VER=2.6.14\nIV_PLAT=linux\nIV_TCPNL=1\nIV_MTU=1600\nIV_NCP=2\n"
    "IV_CIPHERS=AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\nIV_PROTO=990\n"
    "IV_LZO_STUB=1\nIV_COMP_STUB=1\nIV_COMP_STUBv2=1\n"
)


# --- fixtures -----------------------------------------------------------------------------


class Pki:
    def __init__(self) -> None:
        self.ca, self.ca_key = pki.make_ca("fabric test CA")
        self.server_cert, self.server_key = pki.make_server_cert(self.ca, self.ca_key, "server")
        self.client_cert, self.client_key = pki.make_client_cert(self.ca, self.ca_key, "client1")
        self.other_ca, self.other_ca_key = pki.make_ca("another CA")
        self.foreign_cert, self.foreign_key = pki.make_client_cert(
            self.other_ca, self.other_ca_key, "intruder"
        )


@pytest.fixture(scope="module")
def p() -> Pki:
    return Pki()


def pump(server: tls._TlsEndpoint, client: tls._TlsEndpoint, rounds: int = 10) -> None:
    """Shuttle TLS bytes both ways until neither side has anything to send."""
    for _ in range(rounds):
        a = client.pull()
        if a:
            server.feed(a)
        b = server.pull()
        if b:
            client.feed(b)
        if not a and not b:
            return


def connected(
    p: Pki, tls_min: str = "1.2", tls_max: str | None = None
) -> tuple[TlsServer, TlsClient]:
    s = TlsServer(
        p.ca, p.server_cert, p.server_key, lambda der: True, tls_min=tls_min, tls_max=tls_max
    )
    c = TlsClient(p.ca, p.client_cert, p.client_key, tls_min=tls_min, tls_max=tls_max)
    pump(s, c)
    assert s.handshake_done and c.handshake_done
    return s, c


# --- pki ----------------------------------------------------------------------------------


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_certificates_parse_with_expected_extensions(p: Pki) -> None:
    ca = _cert(p.ca)
    server = _cert(p.server_cert)
    client = _cert(p.client_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for cert, eku in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        assert cert.issuer == ca.subject
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        # remote-cert-tls needs the keyUsage extension (ssl_verify_openssl.c x509_verify_cert_ku)
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
        pub = cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert life >= datetime.timedelta(days=3650)
        assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.UTC)
    assert len({ca.serial_number, server.serial_number, client.serial_number}) == 3
    key = serialization.load_pem_private_key(p.client_key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == client.public_key()


def _client_verifier(ca_pem: bytes) -> verification.ClientVerifier:
    """cryptography's chain verification, with the EE policy relaxed to what OpenVPN
    needs (no SAN: OpenVPN identifies peers by certificate, not by name) but still
    requiring EKU clientAuth."""

    def client_auth(
        policy: verification.Policy, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None
    ) -> None:
        if ext is None or ExtendedKeyUsageOID.CLIENT_AUTH not in ext:
            raise ValueError("no clientAuth")

    ee = verification.ExtensionPolicy.permit_all().require_present(
        x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, client_auth
    )
    return (
        verification.PolicyBuilder()
        .store(verification.Store([_cert(ca_pem)]))
        .time(datetime.datetime.now(datetime.UTC))
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
        )
        .build_client_verifier()
    )


def test_client_cert_verifies_against_ca(p: Pki) -> None:
    verified = _client_verifier(p.ca).verify(_cert(p.client_cert), [])
    assert verified.chain[-1] == _cert(p.ca) and verified.chain[0] == _cert(p.client_cert)
    with pytest.raises(verification.VerificationError):
        _client_verifier(p.other_ca).verify(_cert(p.client_cert), [])
    with pytest.raises(verification.VerificationError):
        _client_verifier(p.ca).verify(_cert(p.server_cert), [])  # serverAuth only


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
def test_openssl_verify_purposes(p: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(p.ca)
    (tmp_path / "server.pem").write_bytes(p.server_cert)
    (tmp_path / "client.pem").write_bytes(p.client_cert)

    def verify(name: str, purpose: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(OPENSSL),
                "verify",
                "-CAfile",
                str(tmp_path / "ca.pem"),
                "-purpose",
                purpose,
                str(tmp_path / name),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok_client = verify("client.pem", "sslclient")
    ok_server = verify("server.pem", "sslserver")
    assert ok_client.returncode == 0 and ": OK" in ok_client.stdout
    assert ok_server.returncode == 0 and ": OK" in ok_server.stdout
    assert verify("client.pem", "sslserver").returncode != 0
    assert verify("server.pem", "sslclient").returncode != 0


def test_cert_fingerprint(p: Pki) -> None:
    der = _cert(p.client_cert).public_bytes(serialization.Encoding.DER)
    fp = pki.cert_fingerprint(p.client_cert)
    assert fp == hashlib.sha256(der).digest() and len(fp) == 32
    assert pki.cert_fingerprint(der) == fp
    assert pki.cert_fingerprint(p.server_cert) != fp
    assert pki.cert_common_name(p.client_cert) == "client1"
    with pytest.raises(pki.PkiError) as e:
        pki.cert_fingerprint(b"not a certificate")
    assert e.value.reason == "bad_certificate"


def test_new_static_key_is_a_key_file_of_random_bytes() -> None:
    key = pki.new_static_key()
    assert len(key) == 256 and pki.new_static_key() != key
    assert parse_static_key(format_static_key(key)) == key


def test_inline_profile_blocks(p: Pki) -> None:
    key = pki.new_static_key()
    prof = pki.inline_profile("vpn.example.net", 1194, p.ca, p.client_cert, p.client_key, key)
    lines = prof.splitlines()
    for directive in (
        "client",
        "dev tun",
        "proto udp",
        "remote vpn.example.net 1194",
        "nobind",
        "persist-key",
        "persist-tun",
        "remote-cert-tls server",
        "verb 3",
    ):
        assert directive in lines
    for tag, body in (("ca", p.ca), ("cert", p.client_cert), ("key", p.client_key)):
        assert f"<{tag}>\n{body.decode()}</{tag}>\n" in prof
    assert "<tls-crypt>\n" in prof and "</tls-crypt>\n" in prof
    assert parse_static_key(prof.split("<tls-crypt>")[1]) == key
    assert "key-direction" not in prof and "<tls-auth>" not in prof
    assert not any(x.startswith(("comp", "compress", "cipher", "data-ciphers")) for x in lines)

    auth = pki.tls_auth_profile(
        "2001:db8::1",
        443,
        p.ca,
        p.client_cert,
        p.client_key,
        format_static_key(key),
        extra=["explicit-exit-notify 1"],
    )
    assert "key-direction 1" in auth.splitlines() and "<tls-auth>\n" in auth
    assert "remote 2001:db8::1 443" in auth.splitlines()
    assert "explicit-exit-notify 1" in auth.splitlines() and "<tls-crypt>" not in auth
    none = pki.inline_profile("[::1]", 1, p.ca, p.client_cert, p.client_key, key, wrap="none")
    assert "remote ::1 1" in none.splitlines() and "<tls-" not in none
    for args in (("h", 0, "tls-crypt"), ("h", 1194, "tls-v3"), ("a b", 1194, "tls-crypt")):
        with pytest.raises(pki.PkiError):
            pki.inline_profile(
                args[0], int(args[1]), p.ca, p.client_cert, p.client_key, key, wrap=str(args[2])
            )


def _run_real_client(profile: Path, family: int, sock: socket.socket) -> tuple[str, bytes]:
    """Start Debian's openvpn on `profile` (pointing at `sock`), wait for its first
    datagram, stop it; returns (log, first datagram)."""
    log_path = profile.with_suffix(".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(OPENVPN),
                "--config",
                str(profile),
                "--dev",
                "null",
                "--verb",
                "4",
                "--connect-retry-max",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=profile.parent,
        )
    datagram = b""
    try:
        sock.settimeout(0.2)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                datagram, _ = sock.recvfrom(4096)
                break
            except TimeoutError:
                continue
        time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    return log_path.read_text(errors="replace"), datagram


@pytest.mark.skipif(OPENVPN is None, reason="openvpn not installed")
@pytest.mark.parametrize(("wrap", "host"), [("tls-crypt", "127.0.0.1"), ("tls-auth", "::1")])
def test_inline_profile_accepted_by_real_client(
    p: Pki, tmp_path: Path, wrap: str, host: str
) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
    except OSError as e:
        pytest.skip(f"cannot bind {host}: {e}")
    with sock:
        port = sock.getsockname()[1]
        profile = tmp_path / "client.ovpn"
        profile.write_text(
            pki.inline_profile(
                host, port, p.ca, p.client_cert, p.client_key, pki.new_static_key(), wrap=wrap
            )
        )
        log, datagram = _run_real_client(profile, family, sock)
    assert "Options error" not in log, log
    assert "OpenVPN 2." in log
    fam = "UDPv6" if family == socket.AF_INET6 else "UDPv4"
    shown = f"[AF_INET6]{host}:{port}" if family == socket.AF_INET6 else f"[AF_INET]{host}:{port}"
    assert f"{fam} link remote: {shown}" in log, log
    if wrap == "tls-crypt":
        assert "Outgoing Control Channel Encryption: Cipher 'AES-256-CTR'" in log
    else:
        assert "Outgoing Control Channel Authentication: Using 160 bit message hash 'SHA1'" in log
    # its first packet: P_CONTROL_HARD_RESET_CLIENT_V2 (7) with key_id 0 (ssl_pkt.h)
    assert datagram[:1] == bytes([7 << 3]), datagram[:16].hex()


# --- TLS ----------------------------------------------------------------------------------


def test_tls_default_negotiates_13_with_data_and_ekm(p: Pki) -> None:
    seen: list[bytes] = []

    def verify(der: bytes) -> bool:
        seen.append(der)
        return True

    s = TlsServer(p.ca, p.server_cert, p.server_key, verify)
    c = TlsClient(p.ca, p.client_cert, p.client_key)
    assert not s.handshake_done and s.version == "" and s.peer_certificate_der is None
    with pytest.raises(TlsError) as e:
        s.export_keying_material(b"x", 8)
    assert e.value.reason == "not_ready"
    # the client writes its key method 2 message before the handshake ends (ssl.c S_START)
    c.write(b"client first")
    pump(s, c)
    assert s.handshake_done and c.handshake_done
    assert s.version == c.version == "TLSv1.3"
    assert s.cipher.startswith("TLS_")
    client_der = pki.cert_der(p.client_cert)
    assert seen == [client_der]
    assert s.peer_certificate_der == client_der
    assert c.peer_certificate_der == pki.cert_der(p.server_cert)
    assert s.read() == b"client first"
    s.write(b"server answer")
    s.write(b"PUSH_REPLY\x00")
    pump(s, c)
    assert c.read_records() == [b"server answer", b"PUSH_REPLY\x00"]  # one record per write
    assert s.read() == b"" and c.read() == b""
    big = os.urandom(50_000)  # several records
    c.write(big)
    pump(s, c)
    assert s.read() == big
    ekm = s.export_keying_material(keys.EKM_LABEL, 256)
    assert len(ekm) == 256 and ekm == c.export_keying_material(keys.EKM_LABEL, 256)
    assert keys.key_expansion_ekm(s) == ekm == keys.key_expansion_ekm(c)
    assert s.export_keying_material(b"EXPORTER-other", 256) != ekm


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_forced_versions(p: Pki, version: str) -> None:
    s, c = connected(p, tls_min=version, tls_max=version)
    assert s.version == c.version == f"TLSv{version}"
    if version == "1.2":
        assert s.cipher.startswith("ECDHE-ECDSA-")  # forward secret, as OpenVPN's list wants
    c.write(b"ping")
    pump(s, c)
    assert s.read() == b"ping"
    s.write(b"pong")
    pump(s, c)
    assert c.read() == b"pong"
    assert s.export_keying_material(keys.EKM_LABEL, 64) == c.export_keying_material(
        keys.EKM_LABEL, 64
    )


def test_tls_client_max_12_meets_default_server(p: Pki) -> None:
    s = TlsServer(p.ca, p.server_cert, p.server_key)
    c = TlsClient(p.ca, p.client_cert, p.client_key, tls_max="1.2")
    pump(s, c)
    assert s.version == "TLSv1.2" and c.handshake_done


def _expect_server_failure(s: TlsServer, c: TlsClient, reason: str) -> None:
    with pytest.raises(TlsError) as e:
        pump(s, c)
    assert e.value.reason == reason, e.value
    assert not s.handshake_done
    assert s.failed is not None and s.failed.reason == reason
    # the object stays failed, with the same reason, and never leaks pyOpenSSL errors
    with pytest.raises(TlsError) as again:
        s.feed(b"")
    assert again.value.reason == reason
    with pytest.raises(TlsError):
        s.read()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_foreign_ca_refused(p: Pki, version: str) -> None:
    s = TlsServer(p.ca, p.server_cert, p.server_key, lambda der: True, tls_max=version)
    c = TlsClient(p.ca, p.foreign_cert, p.foreign_key, tls_max=version)
    _expect_server_failure(s, c, "bad_certificate")
    # the alert still goes out, and the client learns about it
    alert = s.pull()
    assert alert
    with pytest.raises(TlsError) as e:
        c.feed(alert)
        c.read()
    assert e.value.reason in ("peer_alert", "protocol")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_verify_callback_refuses(p: Pki, version: str) -> None:
    s = TlsServer(p.ca, p.server_cert, p.server_key, lambda der: False, tls_max=version)
    c = TlsClient(p.ca, p.client_cert, p.client_key, tls_max=version)
    _expect_server_failure(s, c, "refused_certificate")


def test_tls_verify_callback_exception_is_a_tls_error(p: Pki) -> None:
    def boom(der: bytes) -> bool:
        raise RuntimeError("bug")

    s = TlsServer(p.ca, p.server_cert, p.server_key, boom)
    c = TlsClient(p.ca, p.client_cert, p.client_key)
    _expect_server_failure(s, c, "verify_error")


def test_tls_server_cert_is_not_a_client_cert(p: Pki) -> None:
    # OpenSSL checks the "ssl_client" purpose of the client's leaf (EKU clientAuth)
    s = TlsServer(p.ca, p.server_cert, p.server_key)
    c = TlsClient(p.ca, p.server_cert, p.server_key)
    _expect_server_failure(s, c, "bad_certificate")
    assert s.failed is not None and "INVALID_PURPOSE" in s.failed.detail


def test_tls_client_refuses_foreign_server(p: Pki) -> None:
    s = TlsServer(p.ca, p.server_cert, p.server_key)
    c = TlsClient(p.other_ca, p.foreign_cert, p.foreign_key)
    with pytest.raises(TlsError) as e:
        pump(s, c)
    assert e.value.reason in ("bad_certificate", "peer_alert")


def _raw_client_without_cert() -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    return conn


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_client_certificate_required(p: Pki, version: str) -> None:
    s = TlsServer(p.ca, p.server_cert, p.server_key, tls_max=version)
    conn = _raw_client_without_cert()
    with pytest.raises(TlsError) as e:
        for _ in range(6):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                break
            while True:
                try:
                    out = conn.bio_read(65536)
                except SSL.WantReadError:
                    break
                s.feed(out)
            back = s.pull()
            if back:
                conn.bio_write(back)
    assert e.value.reason == "no_certificate", e.value


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4))
def test_tls_garbage_only_raises_tls_error(p: Pki, chunks: list[bytes]) -> None:
    s = TlsServer(p.ca, p.server_cert, p.server_key)
    try:
        for chunk in chunks:
            s.feed(chunk)
            s.pull()
            s.read()
    except TlsError as e:
        assert e.reason in ("handshake", "version", "peer_alert", "protocol")
    assert not s.handshake_done


def test_tls_close_notify(p: Pki) -> None:
    s, c = connected(p)
    c.close()
    pump(s, c)
    assert s.closed
    with pytest.raises(TlsError) as e:
        s.write(b"x")
    assert e.value.reason == "closed"


def test_tls_context_shared_between_connections(p: Pki) -> None:
    ctx = tls.TlsContext(p.ca, p.server_cert, p.server_key, server=True)
    accepted: list[str] = []

    def accept(der: bytes) -> bool:
        accepted.append(pki.cert_common_name(der))
        return True

    for name in ("a", "b"):
        cert, key = pki.make_client_cert(p.ca, p.ca_key, name)
        s = TlsServer.with_context(ctx, accept)
        c = TlsClient(p.ca, cert, key)
        pump(s, c)
        assert s.handshake_done
    assert accepted == ["a", "b"]
    with pytest.raises(TlsError):
        TlsClient.with_context(ctx)


def test_tls_bad_config_is_a_tls_error(p: Pki) -> None:
    for args in (
        (b"junk", p.server_cert, p.server_key),
        (p.ca, b"junk", p.server_key),
        (p.ca, p.server_cert, b"junk"),
        (p.ca, p.server_cert, p.client_key),
    ):
        with pytest.raises(TlsError) as e:
            TlsServer(*args)
        assert e.value.reason == "config"
    with pytest.raises(TlsError):
        TlsServer(p.ca, p.server_cert, p.server_key, tls_min="1.0")


class _SClientServer:
    """A TCP listener that runs one TlsServer over a socket for `openssl s_client`."""

    def __init__(self, p: Pki) -> None:
        self.p = p
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(15)
        self.port = self.sock.getsockname()[1]
        self.result: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(10)
                s = TlsServer(self.p.ca, self.p.server_cert, self.p.server_key, lambda der: True)
                got = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    s.feed(data)
                    got += s.read()
                    if b"ping" in got:
                        s.write(b"pong\n")
                        self.result = {
                            "version": s.version,
                            "cipher": s.cipher,
                            "ekm": s.export_keying_material(keys.EKM_LABEL, 32).hex().upper(),
                        }
                        s.close()
                        conn.sendall(s.pull())
                        return
                    out = s.pull()
                    if out:
                        conn.sendall(out)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.sock.close()


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
@pytest.mark.parametrize("version", ["1_2", "1_3"])
def test_tls_interop_with_system_openssl_client(p: Pki, tmp_path: Path, version: str) -> None:
    """Debian's OpenSSL (what its openvpn links) as the client, with OpenVPN's
    default cipher list: handshake, data, and the RFC 5705 exporter agree."""
    for name, data in (("ca", p.ca), ("cert", p.client_cert), ("key", p.client_key)):
        (tmp_path / f"{name}.pem").write_bytes(data)
    srv = _SClientServer(p)
    proc = subprocess.Popen(
        [
            str(OPENSSL),
            "s_client",
            "-connect",
            f"127.0.0.1:{srv.port}",
            "-CAfile",
            str(tmp_path / "ca.pem"),
            "-cert",
            str(tmp_path / "cert.pem"),
            "-key",
            str(tmp_path / "key.pem"),
            f"-tls{version}",
            "-cipher",
            tls.OPENVPN_DEFAULT_CIPHER_LIST.decode(),
            "-verify_return_error",
            "-keymatexport",
            keys.EKM_LABEL.decode(),
            "-keymatexportlen",
            "32",
            "-ign_eof",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(0.3)
        assert proc.stdin is not None
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    srv.thread.join(timeout=10)
    text = out.decode(errors="replace")
    assert srv.error is None, srv.error
    assert srv.result, text
    want = "TLSv1.2" if version == "1_2" else "TLSv1.3"
    assert srv.result["version"] == want
    assert f"New, {want}, Cipher is {srv.result['cipher']}" in text
    assert "Verify return code: 0 (ok)" in text
    assert f"Keying material: {srv.result['ekm']}" in text
    assert "\npong\n" in text


# --- key method 2 ---------------------------------------------------------------------------


def _client_source() -> KeySource:
    return KeySource(bytes(range(32)), bytes(range(32, 64)), bytes(range(100, 148)))


def test_key_method_2_client_round_trip() -> None:
    src = _client_source()
    data = keys.build_client(src, DEBIAN_OPTIONS, "alice", "pässword", DEBIAN_PEER_INFO)
    # layout: u32 0 | u8 2 | pre_master | random1 | random2 | strings
    assert data[:5] == b"\x00\x00\x00\x00\x02"
    assert (
        data[5:53] == src.pre_master and data[53:85] == src.random1 and data[85:117] == src.random2
    )
    (olen,) = struct.unpack("!H", data[117:119])
    assert olen == len(DEBIAN_OPTIONS) + 1 and data[119 + olen - 1] == 0
    msg = keys.parse_client(data)
    assert msg.source == src
    assert msg.options == DEBIAN_OPTIONS
    assert msg.username == "alice" and msg.password == "pässword"
    assert msg.peer_info_text == DEBIAN_PEER_INFO
    assert msg.peer_info["IV_VER"] == "2.6.14"
    assert msg.peer_info["IV_CIPHERS"] == "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305"
    assert keys.iv_proto(msg.peer_info) == 990
    assert keys.iv_proto(msg.peer_info) & keys.IV_PROTO_REQUEST_PUSH
    assert keys.iv_proto(msg.peer_info) & keys.IV_PROTO_TLS_KEY_EXPORT
    assert msg.key_method_flags == 2
    # no credentials: three zero lengths before peer-info
    anon = keys.parse_client(keys.build_client(src, DEBIAN_OPTIONS, peer_info={"IV_VER": "2.6.14"}))
    assert anon.username == anon.password == "" and anon.peer_info == {"IV_VER": "2.6.14"}


def test_key_method_2_prefix_and_trailing() -> None:
    data = keys.build_client(_client_source(), DEBIAN_OPTIONS, peer_info=DEBIAN_PEER_INFO)
    msg, used = keys.parse_client_prefix(data + b"PUSH_REQUEST\x00")
    assert used == len(data) and msg.options == DEBIAN_OPTIONS
    with pytest.raises(KeyMethodError) as e:
        keys.parse_client(data + b"PUSH_REQUEST\x00")
    assert e.value.reason == "trailing_data"


def test_key_method_2_every_truncation_refused() -> None:
    data = keys.build_client(_client_source(), "V4,tls-client", "u", "p", "IV_VER=2.6.14\n")
    no_peer_info = len(data) - 2 - len("IV_VER=2.6.14\n") - 1
    for n in range(len(data)):
        if n == no_peer_info:
            # a message ending after the password has no peer info (read_string_alloc NULL)
            msg = keys.parse_client(data[:n])
            assert msg.peer_info_text is None and msg.peer_info == {} and msg.password == "p"
            continue
        with pytest.raises(KeyMethodError) as e:
            keys.parse_client(data[:n])
        assert e.value.reason == "truncated"


def test_key_method_2_malformed() -> None:
    good = bytearray(keys.build_client(_client_source(), "V4", peer_info="IV_VER=2.6\n"))
    cases: dict[str, bytes] = {}
    b = bytearray(good)
    b[0] = 1
    cases["bad_header"] = bytes(b)
    b = bytearray(good)
    b[4] = 1  # key method 1
    cases["bad_key_method"] = bytes(b)
    long_opts = b"x" * 600 + b"\x00"
    cases["options_too_long"] = bytes(good[:117]) + struct.pack("!H", len(long_opts)) + long_opts
    cases["bad_string"] = bytes(good[:117]) + b"\x00\x03ab" + b"c"  # no NUL terminator
    embedded = bytes(good[:117]) + b"\x00\x04a\x00b\x00" + b"\x00\x00" * 3
    long_user = b"u" * 5000 + b"\x00"
    too_long_user = (
        bytes(good[:117]) + b"\x00\x03V4\x00" + struct.pack("!H", len(long_user)) + long_user
    )
    for reason, data in cases.items():
        with pytest.raises(KeyMethodError) as e:
            keys.parse_client(data)
        assert e.value.reason == reason
    for data, reason in ((embedded, "bad_string"), (too_long_user, "user_pass_too_long")):
        with pytest.raises(KeyMethodError) as e:
            keys.parse_client(data)
        assert e.value.reason == reason
    not_utf8 = bytes(good[:117]) + b"\x00\x03\xff\xfe\x00" + b"\x00\x00" * 3
    with pytest.raises(KeyMethodError) as e:
        keys.parse_client(not_utf8)
    assert e.value.reason == "bad_string"
    # flag bits above KEY_METHOD_MASK are tolerated, as key_method_2_read does
    b = bytearray(good)
    b[4] = 0x12
    assert keys.parse_client(bytes(b)).key_method_flags == 0x12


_VALID = keys.build_client(_client_source(), DEBIAN_OPTIONS, "user", "pw", DEBIAN_PEER_INFO)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parse_client_fuzz_random(data: bytes) -> None:
    try:
        msg = keys.parse_client(data)
    except KeyMethodError as e:
        assert e.reason
    else:
        assert len(msg.source.pre_master) == 48


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(_VALID)),
)
def test_parse_client_fuzz_mutations(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for pos, value in flips:
        data[pos] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            keys.parse_client(candidate)
            keys.parse_client_prefix(candidate)
        except KeyMethodError as e:
            assert e.reason


def test_key_method_2_server_message() -> None:
    server = KeySource(b"\x11" * 32, b"\x22" * 32)
    opts = keys.mirror_options(DEBIAN_OPTIONS)
    assert opts.endswith(",key-method 2,tls-server") and "tls-client" not in opts
    data = keys.build_server(server, opts)
    # u32 0, u8 2, random1, random2 (no pre_master), options, three empty strings
    assert data[:5] == b"\x00\x00\x00\x00\x02"
    assert data[5:37] == server.random1 and data[37:69] == server.random2
    assert data[69:71] == struct.pack("!H", len(opts) + 1)
    assert data[71 : 71 + len(opts) + 1] == opts.encode() + b"\x00"
    assert data[71 + len(opts) + 1 :] == b"\x00" * 6
    msg = keys.parse_server(data)
    assert msg.source == server and msg.options == opts
    assert msg.username == msg.password == "" and msg.peer_info == {} and msg.peer_info_text == ""
    with pytest.raises(KeyMethodError):
        keys.parse_client(data)  # 48 bytes short of a client message's strings


def test_mirror_options_keydir() -> None:
    client = "V4,dev-type tun,link-mtu 1569,tun-mtu 1500,proto UDPv4,keydir 1,auth SHA1,keysize 128,tls-auth,key-method 2,tls-client"
    assert keys.mirror_options(client) == client.replace("keydir 1", "keydir 0").replace(
        "tls-client", "tls-server"
    )


def test_parse_peer_info() -> None:
    info = keys.parse_peer_info(DEBIAN_PEER_INFO)
    assert info == {
        "IV_VER": "2.6.14",
        "IV_PLAT": "linux",
        "IV_TCPNL": "1",
        "IV_MTU": "1600",
        "IV_NCP": "2",
        "IV_CIPHERS": "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
        "IV_PROTO": "990",
        "IV_LZO_STUB": "1",
        "IV_COMP_STUB": "1",
        "IV_COMP_STUBv2": "1",
    }
    assert keys.parse_peer_info("") == {}
    assert keys.parse_peer_info("A=1\r\nnoequals\n=x\nB=a=b\nA=2") == {"A": "1", "B": "a=b"}
    assert keys.iv_proto({"IV_PROTO": "junk"}) == 0 and keys.iv_proto({}) == 0


# --- PRF and key expansion --------------------------------------------------------------------

# OpenVPN's own unit test (tests/unit_tests/openvpn/test_crypto.c crypto_test_tls_prf, v2.6.14)
PRF_SECRET = (
    b"Lorem ipsum dolor sit amet, consectetur adipisici elit, sed eiusmod tempor "
    b"incidunt ut labore et dolore magna aliqua."
)
PRF_SEED = b"Quis aute iure reprehenderit in voluptate velit esse cillum dolore"
PRF_GOOD = bytes.fromhex("d98c8518c85e946927916acfc2d592fbb1567e4b4b1459e6a904ac2ddab72d67")


def test_prf_openvpn_unit_test_vector() -> None:
    assert len(PRF_SECRET) % 2 == 1  # the odd-length split is exercised
    assert keys.openvpn_prf(PRF_SECRET, b"", PRF_SEED, 32) == PRF_GOOD
    # label and seed are simply concatenated (openvpn_PRF builds one seed buffer)
    assert keys.openvpn_prf(PRF_SECRET, PRF_SEED[:10], PRF_SEED[10:], 32) == PRF_GOOD
    assert keys.openvpn_prf(PRF_SECRET, b"", PRF_SEED, 100)[:32] == PRF_GOOD
    assert keys.openvpn_prf(PRF_SECRET, b"", PRF_SEED, 0) == b""


def _openssl_prf(secret: bytes, seed: bytes, n: int) -> bytes:
    out = subprocess.run(
        [
            str(OPENSSL),
            "kdf",
            "-keylen",
            str(n),
            "-kdfopt",
            "digest:MD5-SHA1",
            "-kdfopt",
            f"hexsecret:{secret.hex()}",
            "-kdfopt",
            f"hexseed:{seed.hex()}",
            "TLS1-PRF",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return bytes.fromhex(out.strip().replace(":", ""))


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
def test_prf_against_openssl_kdf() -> None:
    assert _openssl_prf(PRF_SECRET, PRF_SEED, 32) == PRF_GOOD
    for secret_len, seed_len, n in ((48, 77, 48), (47, 13, 256), (1, 1, 7)):
        secret, seed = os.urandom(secret_len), os.urandom(seed_len)
        assert keys.openvpn_prf(secret, b"", seed, n) == _openssl_prf(secret, seed, n)


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
def test_key_expansion_prf_against_openssl_kdf() -> None:
    client, server = KeySource.new_client(), KeySource.new_server()
    csid, ssid = os.urandom(8), os.urandom(8)
    key2 = keys.key_expansion_prf(client, server, csid, ssid)
    master = _openssl_prf(
        client.pre_master, b"OpenVPN master secret" + client.random1 + server.random1, 48
    )
    want = _openssl_prf(
        master, b"OpenVPN key expansion" + client.random2 + server.random2 + csid + ssid, 256
    )
    assert key2 == want and len(key2) == 256
    # the session ids are ordered client then server, whoever computes it
    assert keys.key_expansion_prf(client, server, ssid, csid) != key2


def test_key_expansion_prf_inputs() -> None:
    client, server = KeySource.new_client(), KeySource.new_server()
    with pytest.raises(KeyMethodError):
        keys.key_expansion_prf(server, server, b"\0" * 8, b"\0" * 8)
    with pytest.raises(KeyMethodError):
        keys.key_expansion_prf(client, server, b"\0" * 7, b"\0" * 8)
    with pytest.raises(KeyMethodError):
        KeySource(b"\0" * 31, b"\0" * 32)


# --- data keys and NCP ----------------------------------------------------------------------


@pytest.mark.parametrize("cipher", sorted(keys.CIPHERS))
def test_data_keys_directions(cipher: str) -> None:
    key2 = os.urandom(256)
    keylen = keys.CIPHERS[cipher]
    s = keys.data_keys(key2, cipher, server=True)
    c = keys.data_keys(key2, cipher, server=False)
    assert s.encrypt_key == c.decrypt_key and s.decrypt_key == c.encrypt_key
    assert s.encrypt_implicit_iv == c.decrypt_implicit_iv
    assert s.decrypt_implicit_iv == c.encrypt_implicit_iv
    # shared/openvpn-protocol.md 3.1
    assert s.encrypt_key == key2[128 : 128 + keylen] and s.encrypt_implicit_iv == key2[192:200]
    assert s.decrypt_key == key2[:keylen] and s.decrypt_implicit_iv == key2[64:72]
    assert len(s.encrypt_implicit_iv) == 8 and s.encrypt_key != s.decrypt_key
    # a server-to-client AEAD packet opens with the client's keys (nonce = packet_id || iv)
    aead = AESGCM if cipher.startswith("AES") else ChaCha20Poly1305
    pid = struct.pack("!I", 1)
    sealed = aead(s.encrypt_key).encrypt(pid + s.encrypt_implicit_iv, b"ip packet", pid)
    assert aead(c.decrypt_key).decrypt(pid + c.decrypt_implicit_iv, sealed, pid) == b"ip packet"


def test_data_keys_bad_input() -> None:
    with pytest.raises(KeyMethodError):
        keys.data_keys(b"\0" * 255, "AES-256-GCM", True)
    with pytest.raises(KeyMethodError):
        keys.data_keys(b"\0" * 256, "BF-CBC", True)


def test_select_cipher() -> None:
    ours = ["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"]
    assert keys.select_cipher("AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305", ours) == "AES-256-GCM"
    # the server's order wins
    assert keys.select_cipher("CHACHA20-POLY1305:AES-128-GCM", ours) == "AES-128-GCM"
    assert keys.select_cipher("CHACHA20-POLY1305", ours) == "CHACHA20-POLY1305"
    assert keys.select_cipher("BF-CBC", ours) is None
    assert keys.select_cipher("aes-256-gcm", ours) is None  # strcmp, as tls_item_in_cipher_list
    # no IV_CIPHERS: IV_NCP=2 implies the two GCM ciphers (ssl_ncp.c tls_peer_ncp_list)
    assert keys.select_cipher(None, ["CHACHA20-POLY1305", "AES-128-GCM"], iv_ncp=2) == "AES-128-GCM"
    assert keys.select_cipher(None, ["CHACHA20-POLY1305"], iv_ncp=2) is None
    # ... and the OCC cipher of a client without IV_CIPHERS
    assert keys.select_cipher(None, ours, remote_cipher="CHACHA20-POLY1305") == "CHACHA20-POLY1305"
    assert keys.select_cipher("AES-128-GCM", ours, remote_cipher="AES-256-GCM") == "AES-128-GCM"
    assert keys.select_cipher(None, ours) is None
    msg = keys.parse_client(
        keys.build_client(_client_source(), DEBIAN_OPTIONS, peer_info=DEBIAN_PEER_INFO)
    )
    assert keys.select_cipher_for(msg) == "AES-256-GCM"
    assert keys.select_cipher_for(msg, ["CHACHA20-POLY1305"]) == "CHACHA20-POLY1305"


def test_full_exchange_in_memory(p: Pki) -> None:
    """TLS, both key method 2 messages, and both derivations give matching keys."""
    s, c = connected(p)
    csrc, ssrc = KeySource.new_client(), KeySource.new_server()
    csid, ssid = os.urandom(8), os.urandom(8)
    c.write(keys.build_client(csrc, DEBIAN_OPTIONS, peer_info=DEBIAN_PEER_INFO))
    pump(s, c)
    got = keys.parse_client(s.read())
    assert got.source == csrc
    s.write(keys.build_server(ssrc, keys.mirror_options(got.options)))
    pump(s, c)
    back = keys.parse_server(c.read())
    cipher = keys.select_cipher_for(got)
    assert cipher == "AES-256-GCM"
    for derive in (
        lambda: (
            keys.key_expansion_prf(got.source, ssrc, csid, ssid),
            keys.key_expansion_prf(csrc, back.source, csid, ssid),
        ),
        lambda: (keys.key_expansion_ekm(s), keys.key_expansion_ekm(c)),
    ):
        server_key2, client_key2 = derive()
        assert server_key2 == client_key2
        sk = keys.data_keys(server_key2, cipher, server=True)
        ck = keys.data_keys(client_key2, cipher, server=False)
        assert sk.encrypt_key == ck.decrypt_key and ck.encrypt_key == sk.decrypt_key
