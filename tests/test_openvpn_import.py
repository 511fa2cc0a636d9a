"""An existing OpenVPN server's PKI imported ([openvpn] ca, cert, key, tls_auth | tls_crypt,
key_direction, auth, crl, ca_key, enroll), so that its client profiles connect unchanged.

The PKI is made with the `openssl` CLI as an operator's would be (an RSA CA and server,
EC clients, a CRL from `openssl ca -gencrl` revoking one client) and the static key with
`openvpn --genkey secret`. Covered:

* the [openvpn] table: the new keys, their combinations, and `fabric config check`
  reading the files (missing, key not the certificate's, certificate of another CA,
  not a static key, a tls-crypt-v2 key, a CRL of another CA, an encrypted key);
* the broker's rules (authority.py): enrollment by CN (revoked, removed, other CA),
  registration by CN or certificate, no new profiles without the CA key and profiles
  with it, the refusals kept across a restart, the CRL re-read when it changes;
* the worker's certificate check (workerside.py) over a stand-in for the worker;
* the broker adding an enrolled peer with the next free address, and refusing it once
  removed (a real Broker, no sockets);
* end to end (netns): Debian's `openvpn` with a classic client config (separate ca,
  cert, key and tls-auth files) connects to the fabric, pings the server's tunnel
  address and is pinged back; a revoked client is refused; a removed one too, until
  `fabric peer add NAME --openvpn --cn CN` registers it again.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from brokers.broker import Broker
from fabric.control.records import PeerRecord
from fabric.ops import config
from fabric.ops.config import ConfigError
from fabric.ops.paths import StateDir
from fabric.protocols import registry
from fabric.protocols.base import Admit, ServerSetup, SetupError
from fabric.protocols.openvpn import OpenVPN
from fabric.protocols.openvpn.authority import OvpnAuthority, check_options
from fabric.protocols.openvpn.server import SERVER_KEY, ServerConfig, cn_identity
from fabric.protocols.openvpn.workerside import OvpnWorker
from fabric.protocols.openvpn.wrap import TlsAuth, parse_static_key

ADDRESS = "198.19.100.1/24"
SERVER_IP = "198.19.100.1"
WG_PORT, PORT = 51820, 1194

needs_tools = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("openvpn") is None,
                                 reason="needs the openssl and openvpn commands")


# --------------------------------------------------------------------------- the PKI


def sh(*argv: str | Path, cwd: Path | None = None) -> None:
    cp = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, f"{argv}: {cp.stderr}"


CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
SERVER_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth\n")


def openssl_ca(d: Path, name: str, rsa: bool) -> None:
    """A self-signed CA d/name.crt, d/name.key, as `openssl req -x509` makes one."""
    key = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    sh("openssl", "req", "-x509", *key, "-nodes", "-keyout", d / f"{name}.key", "-out", d / f"{name}.crt",
       "-subj", f"/CN={name}", "-days", "30", "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def openssl_leaf(d: Path, ca: str, name: str, ext: str, rsa: bool = False) -> None:
    """d/name.crt and d/name.key, signed by CA `ca` of d."""
    key = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    sh("openssl", "req", *key, "-nodes", "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
       "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text(ext)
    sh("openssl", "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / f"{ca}.crt", "-CAkey", d / f"{ca}.key",
       "-CAcreateserial", "-out", d / f"{name}.crt", "-days", "30", "-extfile", d / f"{name}.ext")


def openssl_crl(d: Path, revoke: list[str]) -> None:
    """d/crl.pem of CA `ca`, revoking the certificates d/NAME.crt (`openssl ca`)."""
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(f"[ ca ]\ndefault_ca = d\n[ d ]\ndatabase = {d}/index.txt\n"
                              f"crlnumber = {d}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n"
                              f"certificate = {d}/ca.crt\nprivate_key = {d}/ca.key\n")
    for name in revoke:
        sh("openssl", "ca", "-config", d / "ca.cnf", "-revoke", d / f"{name}.crt")
    sh("openssl", "ca", "-config", d / "ca.cnf", "-gencrl", "-out", d / "crl.pem")


def make_pki(d: Path) -> Path:
    """An operator's PKI in d: RSA CA and server, EC clients alice, bob (revoked in
    crl.pem) and carol, ta.key; another CA ("other") with a client "mallory" and a CRL."""
    d.mkdir(parents=True, exist_ok=True)
    openssl_ca(d, "ca", rsa=True)
    openssl_leaf(d, "ca", "server", SERVER_EXT, rsa=True)
    for name in ("alice", "bob", "carol"):
        openssl_leaf(d, "ca", name, CLIENT_EXT)
    openssl_crl(d, ["bob"])
    sh("openvpn", "--genkey", "secret", d / "ta.key")
    other = d / "other"
    other.mkdir()
    openssl_ca(other, "ca", rsa=False)
    openssl_leaf(other, "ca", "mallory", CLIENT_EXT)
    openssl_crl(other, [])
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None or shutil.which("openvpn") is None:
        pytest.skip("needs the openssl and openvpn commands")
    return make_pki(tmp_path_factory.mktemp("pki"))


def table(d: Path, **more: Any) -> dict[str, Any]:
    """The [openvpn] table for the PKI in d (tls-auth, direction 0, SHA256, CRL, enroll)."""
    return {"ca": str(d / "ca.crt"), "cert": str(d / "server.crt"), "key": str(d / "server.key"),
            "tls_auth": str(d / "ta.key"), "key_direction": 0, "auth": "SHA256", "crl": str(d / "crl.pem"),
            "enroll": "cn", **more}


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def authority(root: Path, options: dict[str, Any]) -> OvpnAuthority:
    a = OpenVPN().authority()
    assert isinstance(a, OvpnAuthority)
    root.mkdir(parents=True, exist_ok=True)
    a.start(ServerSetup(root, (ipaddress.ip_interface(ADDRESS),), PORT, options))
    return a


def admit(a: OvpnAuthority, cert: Path, cn: str | None = None) -> Admit | str:
    return a.admit({"protocol": "openvpn", "admit": True, "peer": cn_identity(cn or cert.stem),
                    "certificate": der(cert)}, time.time())


# --------------------------------------------------------------------------- the [openvpn] table


def parse(**t: Any) -> dict[str, Any]:
    out = config.parse({"openvpn": t}).server.openvpn
    assert out is not None
    return out


def test_table_with_an_existing_pki(pki: Path) -> None:
    out = parse(**table(pki, auth="sha-256"))
    assert out["wrap"] == "tls-auth" and out["key_direction"] == 0 and out["auth"] == "SHA256"
    assert out["ca"] == str(pki / "ca.crt") and out["enroll"] == "cn"
    assert parse(ca="/a", cert="/b", key="/c", tls_crypt="/d")["wrap"] == "tls-crypt"
    assert parse(ca="/a", cert="/b", key="/c", wrap="none")["wrap"] == "none"
    plain = parse()
    assert "ca" not in plain and "enroll" not in plain  # the defaults stay as they were
    # what the broker's own check (authority.check_options) makes of the parsed table
    opts = check_options({k: v for k, v in out.items() if k != "port"})
    assert opts["wrap"] == "tls-auth" and opts["key_direction"] == 0 and opts["enroll"] == "cn"


@pytest.mark.parametrize(("t", "words"), [
    ({"ca": "ca.crt", "cert": "/b", "key": "/c", "wrap": "none"}, ["openvpn.ca", "absolute path"]),
    ({"ca": "/a", "key": "/c", "wrap": "none"}, ["openvpn.cert", "missing", "ca, cert and key"]),
    ({"tls_auth": "/t"}, ["openvpn.tls_auth", "existing PKI"]),
    ({"crl": "/t"}, ["openvpn.crl", "existing PKI"]),
    ({"enroll": "cn"}, ["openvpn.enroll", "existing PKI"]),
    ({"ca": "/a", "cert": "/b", "key": "/c"}, ["openvpn.ca", "tls_crypt", "tls_auth", "wrap = \"none\""]),
    ({"ca": "/a", "cert": "/b", "key": "/c", "tls_crypt": "/t", "tls_auth": "/t"}, ["not both"]),
    ({"ca": "/a", "cert": "/b", "key": "/c", "tls_crypt": "/t", "wrap": "tls-auth"}, ["openvpn.wrap", "contradicts"]),
    ({"ca": "/a", "cert": "/b", "key": "/c", "tls_auth": "/t", "key_direction": 2}, ["key_direction", "0 or 1"]),
    ({"ca": "/a", "cert": "/b", "key": "/c", "tls_crypt": "/t", "key_direction": 1}, ["key_direction", "tls_auth"]),
    ({"ca": "/a", "cert": "/b", "key": "/c", "tls_auth": "/t", "auth": "MD5"}, ["openvpn.auth", "SHA256"]),
    ({"ca": "/a", "cert": "/b", "key": "/c", "wrap": "none", "enroll": "yes"}, ["openvpn.enroll", "\"cn\""]),
    ({"ca": "/a", "cert": "/b", "key": "/c", "wrap": "none", "ca_cert": "/x"}, ["openvpn.ca_cert", "unknown"]),
])
def test_table_errors_name_the_key(t: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse(**t)
    for w in words:
        assert w in str(err.value), str(err.value)


def check(pki: Path, tmp_path: Path, **changes: Any) -> str:
    """The message `fabric config check` gives for the table with `changes` (files made in tmp_path)."""
    t = table(pki)
    for key, content in changes.items():
        if isinstance(content, Path):
            t[key] = str(content)
        else:
            path = tmp_path / key
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            t[key] = str(path)
    with pytest.raises(ConfigError) as err:
        config.check_files(config.parse({"openvpn": t}))
    return str(err.value)


def test_config_check_reads_the_files(pki: Path, tmp_path: Path) -> None:
    config.check_files(config.parse({"openvpn": table(pki)}))  # all fine
    config.check_files(config.parse({"openvpn": {}}))  # nothing to read
    msg = check(pki, tmp_path, ca=tmp_path / "nope.crt")
    assert "openvpn.ca" in msg and "does not exist" in msg
    msg = check(pki, tmp_path, key=pki / "alice.key")
    assert "openvpn.key" in msg and "not the key of the certificate" in msg
    msg = check(pki, tmp_path, cert=pki / "other" / "mallory.crt", key=pki / "other" / "mallory.key")
    assert "openvpn.cert" in msg and "does not verify against the CA" in msg
    msg = check(pki, tmp_path, tls_auth="#\n-----BEGIN OpenVPN Static key V1-----\n00ff\n"
                                         "-----END OpenVPN Static key V1-----\n")
    assert "openvpn.tls_auth" in msg and "not an OpenVPN static key file" in msg and "2 key bytes, need 256" in msg
    msg = check(pki, tmp_path, tls_auth="-----BEGIN OpenVPN tls-crypt-v2 server key-----\nAAAA\n"
                                         "-----END OpenVPN tls-crypt-v2 server key-----\n")
    assert "tls-crypt-v2" in msg
    msg = check(pki, tmp_path, crl=pki / "other" / "crl.pem")
    assert "openvpn.crl" in msg and "not signed by a CA" in msg
    msg = check(pki, tmp_path, crl="garbage")
    assert "openvpn.crl" in msg and "not a CRL" in msg
    msg = check(pki, tmp_path, ca=(pki / "ca.crt").read_bytes()[:40])
    assert "openvpn.ca" in msg and "no PEM certificate" in msg
    sh("openssl", "x509", "-in", pki / "ca.crt", "-outform", "der", "-out", tmp_path / "ca.der")
    msg = check(pki, tmp_path, ca=tmp_path / "ca.der")
    assert "it is DER" in msg
    sh("openssl", "pkey", "-in", pki / "server.key", "-aes256", "-passout", "pass:secret", "-out",
       tmp_path / "locked.key")
    msg = check(pki, tmp_path, key=tmp_path / "locked.key")
    assert "openvpn.key" in msg and "passphrase" in msg
    msg = check(pki, tmp_path, ca_key=pki / "alice.key")
    assert "openvpn.ca_key" in msg and "not the key of a certificate in openvpn.ca" in msg


def test_fabric_config_check_command(pki: Path, tmp_path: Path) -> None:
    """`fabric config check FILE` prints the summary, or the file's problem and exits 1."""
    good = tmp_path / "good.toml"
    good.write_text("[openvpn]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in table(pki).items()))
    cp = subprocess.run([sys.executable, "-m", "fabric", "config", "check", str(good)], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "existing: ca" in cp.stdout and "no new profiles (no ca_key)" in cp.stdout and "enroll by CN" in cp.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace(str(pki / "server.key"), str(pki / "carol.key")))
    cp = subprocess.run([sys.executable, "-m", "fabric", "config", "check", str(bad)], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 1 and "openvpn.key" in cp.stderr and "not the key of the certificate" in cp.stderr


@pytest.mark.parametrize(("argv", "words"), [
    (["--cn", "alice"], "--cn registers an existing OpenVPN client"),
    (["--certificate", "/x.crt"], "--certificate registers an existing OpenVPN client"),
    (["--openvpn", "--cn", "alice", "--certificate", "/x.crt"], "give one"),
])
def test_peer_add_flags(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fabric import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["peer", "add", "alice", *argv])
    assert exc.value.code == 2 and words in capsys.readouterr().err


# --------------------------------------------------------------------------- the broker's rules


def test_start_reads_the_files_and_copies_no_key(pki: Path, tmp_path: Path) -> None:
    a = authority(tmp_path, table(pki))
    cfg = a.config
    assert cfg is not None
    assert cfg.ca == (pki / "ca.crt").read_bytes() and cfg.key == (pki / "server.key").read_bytes()
    assert cfg.static_key == parse_static_key((pki / "ta.key").read_text())
    assert (cfg.wrap, cfg.key_direction, cfg.auth, cfg.enroll) == ("tls-auth", 0, "SHA256", "cn")
    about = a.describe()
    assert about["pki"] == "imported" and about["new_profiles"] is False and about["crl_revoked"] == 1
    # only the cookie key is the fabric's; none of the operator's keys are copied
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert made == ["openvpn/imported/cookie.key"]
    # the record workers get carries it all
    wire = ServerConfig.from_wire(cfg.to_wire())
    assert wire.key_direction == 0 and wire.auth == "SHA256" and wire.revoked(der(pki / "bob.crt"))
    assert not wire.revoked(der(pki / "alice.crt"))
    # the server's tls-auth direction 0 and the client's 1 (`tls-auth ta.key 1`, `auth SHA256`)
    server, client = wire.wrapper(server=True), wire.wrapper(server=False)
    assert isinstance(server, TlsAuth) and isinstance(client, TlsAuth)
    assert (server.direction, client.direction, server.digest) == (0, 1, "SHA256")
    packet = bytes(9) + b"payload"
    assert client.unwrap(server.wrap(packet, 1, 1000))[0] == packet
    # bidirectional (no key direction) both ways
    both = authority(tmp_path / "b", {**table(pki), "key_direction": None})
    assert both.config is not None
    wrapper = both.config.wrapper(server=False)
    assert isinstance(wrapper, TlsAuth) and wrapper.direction is None


def test_start_refuses_bad_files(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="openvpn.key: .* not the key of the certificate"):
        authority(tmp_path, {**table(pki), "key": str(pki / "carol.key")})
    with pytest.raises(SetupError, match=r"\[openvpn\] ca: say how"):
        authority(tmp_path, {k: v for k, v in table(pki).items() if k not in ("tls_auth", "key_direction", "auth")})


def test_enrollment_by_cn(pki: Path, tmp_path: Path) -> None:
    a = authority(tmp_path, table(pki))
    got = admit(a, pki / "alice.crt")
    assert got == Admit("alice", cn_identity("alice"))
    assert admit(a, pki / "bob.crt") == "revoked"
    assert admit(a, pki / "other" / "mallory.crt") == "bad_certificate"
    assert admit(a, pki / "carol.crt", cn="alice") == "bad_request"  # the identity must be its CN's
    assert a.admit({"peer": cn_identity("alice"), "certificate": b"junk"}, 0.0) == "bad_request"
    off = authority(tmp_path / "off", {**table(pki), "enroll": "none"})
    assert admit(off, pki / "alice.crt") == "unknown_peer"


def test_removed_peer_refused_until_registered_again(pki: Path, tmp_path: Path) -> None:
    a = authority(tmp_path, table(pki))
    assert isinstance(admit(a, pki / "alice.crt"), Admit)
    a.forget_peer(cn_identity("alice"))
    assert admit(a, pki / "alice.crt") == "removed_cn"
    a.forget_peer(b"\x01" * 32)  # a WireGuard peer: nothing to refuse
    assert a.refused_cns == {"alice"} and not a.refused_certs
    # refusals survive a restart (broker.state)
    b = authority(tmp_path / "again", table(pki))
    b.load(a.state())
    assert admit(b, pki / "alice.crt") == "removed_cn"
    made = b.new_peer({"name": "alice2", "cn": "alice"})
    assert made.public == cn_identity("alice") and made.reply == {"cn": "alice", "registered": "cn"}
    assert isinstance(admit(b, pki / "alice.crt"), Admit)
    with pytest.raises(ValueError, match="--cn"):
        b.new_peer({"name": "x", "cn": "bad\nname"})


def test_registration_by_certificate(pki: Path, tmp_path: Path) -> None:
    a = authority(tmp_path, table(pki))
    made = a.new_peer({"name": "carol", "certificate": (pki / "carol.crt").read_text()})
    fp = made.public
    assert made.reply["cn"] == "carol" and made.reply["registered"] == "certificate" and fp.hex() == made.reply["fingerprint"]
    with pytest.raises(ValueError, match="does not verify"):
        a.new_peer({"name": "m", "certificate": (pki / "other" / "mallory.crt").read_text()})
    with pytest.raises(ValueError, match="revoked"):
        a.new_peer({"name": "b", "certificate": (pki / "bob.crt").read_text()})
    with pytest.raises(ValueError, match="not a PEM certificate"):
        a.new_peer({"name": "b", "certificate": "hello"})
    a.forget_peer(fp)
    assert admit(a, pki / "carol.crt") == "removed_certificate"  # that very certificate
    profile = OpenVPN().client_profile({**made.reply, "name": "carol", "allowed_ips": ["198.19.100.9/32"]},
                                       "198.18.1.1:1194")
    assert "<cert>" not in profile and "198.19.100.9/32" in profile and "unchanged" in profile


def test_new_profiles_need_the_ca_key(pki: Path, tmp_path: Path) -> None:
    a = authority(tmp_path, table(pki))
    with pytest.raises(ValueError) as err:
        a.new_peer({"name": "dave"})
    assert "ca_key" in str(err.value) and "--cn" in str(err.value)
    a = authority(tmp_path / "k", table(pki, ca_key=str(pki / "ca.key")))
    assert a.describe()["new_profiles"] is True
    made = a.new_peer({"name": "dave"})
    cert = x509.load_pem_x509_certificate(made.reply["cert"].encode())
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # signed with the operator's RSA CA key
    assert made.reply["key_direction"] == 1 and made.reply["extra"] == ["auth SHA256"]
    profile = OpenVPN().client_profile({**made.reply, "name": "dave"}, "198.18.1.1:1194")
    assert "key-direction 1\n" in profile and "auth SHA256\n" in profile and "<tls-auth>" in profile
    both = authority(tmp_path / "both", table(pki, ca_key=str(pki / "ca.key"), key_direction=None))
    assert "key-direction" not in OpenVPN().client_profile({**both.new_peer({"name": "e"}).reply, "name": "e"},
                                                           "198.18.1.1:1194")


def test_crl_read_again_when_it_changes(pki: Path, tmp_path: Path) -> None:
    crl_path = tmp_path / "crl.pem"
    shutil.copy(pki / "crl.pem", crl_path)
    a = authority(tmp_path, table(pki, crl=str(crl_path)))
    assert a.tick(time.time()) == []  # unchanged
    alice = x509.load_pem_x509_certificate((pki / "alice.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    old = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now) \
        .next_update(now + datetime.timedelta(days=1))
    for r in [*old, x509.RevokedCertificateBuilder().serial_number(alice.serial_number).revocation_date(now).build()]:
        builder = builder.add_revoked_certificate(r)
    crl_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]
    out = a.tick(time.time() + 10)
    assert [k for k, _ in out] == [SERVER_KEY]
    assert ServerConfig.from_wire(out[0][1]).revoked(der(pki / "alice.crt"))
    assert admit(a, pki / "alice.crt") == "revoked"
    crl_path.write_text("broken")  # a broken file leaves the previous CRL in force
    assert a.tick(time.time() + 20) == [] and "not a CRL" in a.describe()["crl_error"]
    assert a.config is not None and a.config.revoked(der(pki / "alice.crt"))


# --------------------------------------------------------------------------- the worker's check


class Host:
    """What OvpnWorker sees of its worker (WorkerHost): peers, the commit REQ, counters."""

    def __init__(self, reply: dict[str, Any] | None) -> None:
        self.peers: dict[bytes, PeerRecord] = {}
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.counters: dict[str, int] = {}

    def commit(self, request: dict[str, Any]) -> dict[str, Any] | None:
        self.requests.append(request)
        return self.reply

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


def worker(a: OvpnAuthority, reply: dict[str, Any] | None) -> tuple[OvpnWorker, Host]:
    host = Host(reply)
    w = OvpnWorker(OpenVPN(), host)
    assert a.config is not None
    w.on_record(SERVER_KEY, a.config.to_wire())
    return w, host


def peer(name: str, public: bytes) -> PeerRecord:
    return PeerRecord(name, public, ("198.19.100.2/32",), "openvpn")


def test_worker_accepts_and_enrolls(pki: Path, tmp_path: Path) -> None:
    a = authority(tmp_path, table(pki))
    alice = peer("alice", cn_identity("alice"))
    w, host = worker(a, {"ok": True, "peer": alice.to_wire()})
    assert w._verify(der(pki / "alice.crt"))  # enrolled through the broker
    assert host.requests == [{"protocol": "openvpn", "admit": True, "peer": cn_identity("alice"),
                              "certificate": der(pki / "alice.crt")}]
    assert host.peers[cn_identity("alice")] == alice and host.counters["openvpn_enrolled"] == 1
    assert w._verify(der(pki / "alice.crt")) and len(host.requests) == 1  # a peer now: no second ask
    assert w._identify(der(pki / "alice.crt")) == cn_identity("alice")
    assert not w._verify(der(pki / "bob.crt"))  # revoked: the broker is not even asked
    assert len(host.requests) == 1 and host.counters["drop_openvpn_revoked_certificate"] == 1
    # a peer by certificate is that certificate's fingerprint
    carol_fp = hashlib.sha256(der(pki / "carol.crt")).digest()
    host.peers[carol_fp] = peer("carol", carol_fp)
    assert w._identify(der(pki / "carol.crt")) == carol_fp and w._verify(der(pki / "carol.crt"))


def test_worker_refuses(pki: Path, tmp_path: Path) -> None:
    a = authority(tmp_path, table(pki))
    w, host = worker(a, {"ok": False, "reason": "removed_cn"})
    assert not w._verify(der(pki / "alice.crt"))
    assert host.counters["drop_openvpn_enroll_removed_cn"] == 1 and cn_identity("alice") not in host.peers
    w, host = worker(a, None)  # broker unavailable
    assert not w._verify(der(pki / "alice.crt")) and host.counters["drop_openvpn_enroll_broker_unavailable"] == 1
    off = authority(tmp_path / "off", {**table(pki), "enroll": "none"})
    w, host = worker(off, {"ok": True})
    assert not w._verify(der(pki / "alice.crt")) and host.requests == []  # registered peers only
    host.peers[cn_identity("alice")] = peer("alice", cn_identity("alice"))  # `peer add --cn alice`
    assert w._verify(der(pki / "alice.crt"))


# --------------------------------------------------------------------------- the broker


def broker(path: Path, options: dict[str, Any]) -> Broker:
    return Broker(StateDir.at(path).ensure(), [ADDRESS], WG_PORT, None, [], protocols=registry(),
                  ports={"wireguard": WG_PORT, "openvpn": PORT}, options={"openvpn": options})


def test_broker_adds_enrolled_peers(pki: Path, tmp_path: Path) -> None:
    b = broker(tmp_path / "state", table(pki))
    wg = b.admin({"op": "peer_add", "name": "alice"}, 0.0)  # a WireGuard peer named alice: the name is taken
    assert wg["ok"] and wg["allowed_ips"] == ["198.19.100.2/32"]
    req = {"protocol": "openvpn", "admit": True, "peer": cn_identity("alice"), "certificate": der(pki / "alice.crt")}
    reply = b.commit(req, time.time())
    assert reply["ok"], reply
    got = PeerRecord.from_wire(reply["peer"])
    assert (got.name, got.allowed_ips, got.protocol) == ("alice~2", ("198.19.100.3/32",), "openvpn")
    assert b.commit(req, time.time())["peer"] == reply["peer"]  # asked again: the same peer
    assert b.counters["peers_enrolled"] == 1
    bob = {**req, "peer": cn_identity("bob"), "certificate": der(pki / "bob.crt")}
    assert b.commit(bob, time.time()) == {"ok": False, "reason": "revoked"}
    assert b.admin({"op": "peer_remove", "name": "alice~2"}, 0.0)["ok"]
    assert b.commit(req, time.time()) == {"ok": False, "reason": "removed_cn"}
    # a restart keeps the refusal; `peer add --cn` lifts it
    b2 = broker(tmp_path / "state", table(pki))
    assert b2.commit(req, time.time()) == {"ok": False, "reason": "removed_cn"}
    added = b2.admin({"op": "peer_add", "name": "alice-again", "protocol": "openvpn", "cn": "alice"}, 0.0)
    assert added["ok"] and added["cn"] == "alice" and "cert" not in added
    assert b2.commit(req, time.time())["peer"]["name"] == "alice-again"
    no_key = b2.admin({"op": "peer_add", "name": "new", "protocol": "openvpn"}, 0.0)
    assert not no_key["ok"] and "ca_key" in no_key["error"]


def test_many_enrolled_peers_stay_cheap(pki: Path, tmp_path: Path) -> None:
    """Thousands of clients: the next free address is found without scanning every peer per host."""
    b = broker(tmp_path / "state", table(pki))
    b.interfaces = [ipaddress.ip_interface("198.18.0.1/16")]
    from brokers.peers import Peer

    for i in range(3000):
        b.peers[bytes([1]) + i.to_bytes(31, "big")] = Peer(f"p{i}", bytes([1]) + i.to_bytes(31, "big"),
                                                         [f"198.18.{(i + 2) >> 8}.{(i + 2) & 255}/32"])
    t = time.monotonic()
    ips = b.admin_requests._next_free_ips()
    assert time.monotonic() - t < 1.0
    assert ips == [f"198.18.{3002 >> 8}.{3002 & 255}/32"]


# --------------------------------------------------------------------------- end to end


def classic_profile(pki: Path, name: str, server: str) -> str:
    """A client config as existing deployments have them: files beside it, tls-auth with
    a key direction, --auth, and a --cipher line from the OpenVPN 2.4 days."""
    return "\n".join([
        "client", "dev tun", "proto udp", f"remote {server} {PORT}", "resolv-retry infinite", "nobind",
        "persist-key", "persist-tun", f"ca {pki / 'ca.crt'}", f"cert {pki / name}.crt", f"key {pki / name}.key",
        "remote-cert-tls server", f"tls-auth {pki / 'ta.key'} 1", "auth SHA256", "cipher AES-256-CBC", "verb 3",
    ]) + "\n"


@pytest.fixture
def topo(topo2: Any) -> Any:
    """conftest's two-client topology under this file's name for it."""
    return topo2


def counter(fab: Any, name: str) -> int:
    return int(fab.stats().get(name, 0))  # counters summed, by role (the broker's without)


def wait_counter(fab: Any, name: str, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = counter(fab, name)
        if n > 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


@needs_tools
@pytest.mark.netns
def test_existing_client_config_connects(topo: Any) -> None:
    from fabric.testbed.fabriccluster import FabricCluster
    from fabric.testbed.netns import TopologyError
    from fabric.testbed.ovpnclient import OvpnClient

    d = make_pki(topo.workdir / "pki")
    fab = FabricCluster(topo, address=ADDRESS, listen_port=WG_PORT, edges=2, workers=2, openvpn_port=PORT,
                        openvpn_options=table(d)).start()
    server = topo.server_underlay(1)
    alice = OvpnClient(topo, topo.ns_of_client(1), classic_profile(d, "alice", server), "alice").start()
    assert topo.wait_ping(topo.ns_of_client(1), SERVER_IP, timeout=20).ok
    [row] = [p for p in fab.peers() if p["name"] == "alice"]
    assert row["protocol"] == "openvpn" and row["allowed_ips"] == [f"{alice.tunnel_ip()}/32"]
    assert topo.ping(topo.server_ns, alice.tunnel_ip(), count=3).all_ok  # and back
    assert counter(fab, "peers_enrolled") == 1  # the broker's own counters carry no role prefix
    # a client the CRL revokes never gets in
    bob = OvpnClient(topo, topo.ns_of_client(2), classic_profile(d, "bob", topo.server_underlay(2)), "bob")
    with pytest.raises(TopologyError):
        bob.start(timeout=6)
    bob.stop()
    assert wait_counter(fab, "worker.drop_openvpn_revoked_certificate") > 0
    assert not [p for p in fab.peers() if p["name"] == "bob"]
    # removed: its sessions end (HALT) and the CN is refused from then on
    fab.peer_remove("alice")
    assert topo.wait_no_ping(topo.ns_of_client(1), SERVER_IP, timeout=20)
    alice.stop()
    with pytest.raises(TopologyError):
        alice.start(timeout=6)
    alice.stop()
    assert wait_counter(fab, "worker.drop_openvpn_enroll_removed_cn") > 0
    # registered again by its CN: the same unchanged config connects
    out = fab.cli("peer", "add", "alice-again", "--openvpn", "--cn", "alice", "--state-dir", str(fab.state_dir)).stdout
    assert "tunnel address 198.19.100." in out and "<cert>" not in out
    alice.start(timeout=30)
    assert topo.wait_ping(topo.ns_of_client(1), SERVER_IP, timeout=20).ok
    fab.check_alive()
    alice.stop()
    fab.stop()


@needs_tools
@pytest.mark.netns
@pytest.mark.parametrize("wrap", ["tls-crypt", "none"])
def test_existing_profiles_tls_crypt_and_no_wrapping(topo: Any, wrap: str) -> None:
    """The other two ways existing profiles protect the control channel; with tls-crypt
    the CA key is given too, and a new profile the fabric makes (signed by the operator's
    RSA CA) connects beside the existing one."""
    from fabric.testbed.fabriccluster import FabricCluster
    from fabric.testbed.ovpnclient import OvpnClient

    d = make_pki(topo.workdir / "pki")
    options = {k: v for k, v in table(d).items() if k not in ("tls_auth", "key_direction", "auth")}
    if wrap == "tls-crypt":
        options.update(tls_crypt=str(d / "ta.key"), ca_key=str(d / "ca.key"))
    else:
        options["wrap"] = "none"
    fab = FabricCluster(topo, address=ADDRESS, listen_port=WG_PORT, edges=2, workers=2, openvpn_port=PORT,
                        openvpn_options=options).start()
    profile = classic_profile(d, "carol", topo.server_underlay(1)).replace(f"tls-auth {d / 'ta.key'} 1\nauth SHA256\n",
                                                                           "")
    if wrap == "tls-crypt":
        profile += f"tls-crypt {d / 'ta.key'}\n"
    assert "tls-auth" not in profile
    carol = OvpnClient(topo, topo.ns_of_client(1), profile, "carol").start()
    assert topo.wait_ping(topo.ns_of_client(1), SERVER_IP, timeout=20).ok
    assert [p["name"] for p in fab.peers()] == ["carol"]
    if wrap == "tls-crypt":
        made = fab.add_ovpn_peer("dave", 2)
        assert "<tls-crypt>" in made and "<cert>" in made
        dave = OvpnClient(topo, topo.ns_of_client(2), made, "dave").start()
        assert topo.wait_ping(topo.ns_of_client(2), SERVER_IP, timeout=20).ok
        assert topo.ping(topo.server_ns, dave.tunnel_ip(), count=2).all_ok
        dave.stop()
    else:
        cp = fab.cli("peer", "add", "dave", "--openvpn", "--state-dir", str(fab.state_dir), check=False)
        assert cp.returncode != 0 and "ca_key" in cp.stderr
    assert topo.ping(topo.server_ns, carol.tunnel_ip(), count=2).all_ok
    fab.check_alive()
    carol.stop()
    fab.stop()
