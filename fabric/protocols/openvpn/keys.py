"""Key method 2, the data channel key derivation and NCP of OpenVPN 2.6.

Sans-I/O: byte strings in, byte strings and records out. Sources at tag v2.6.14:
`ssl.c key_method_2_write` / `key_method_2_read`, `key_source2_randomize_write` /
`key_source2_read`, `write_string` / `read_string`, `push_peer_info`,
`generate_key_expansion_openvpn_prf`, `openvpn_PRF`, `init_key_contexts`,
`key_ctx_update_implicit_iv`; `crypto_openssl.c ssl_tls1_PRF`; `crypto.c
key_direction_state_init`; `ssl_ncp.c ncp_get_best_cipher`, `tls_peer_ncp_list`.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# ssl.h
KEY_METHOD_2 = 2
KEY_METHOD_MASK = 0x0F
KEY_EXPANSION_ID = b"OpenVPN"
TLS_OPTIONS_LEN = 512  # the options string's limit, NUL included
# misc.h: 4096 with ENABLE_PKCS11 (Debian's build has [PKCS11]), else 128
USER_PASS_LEN = 4096
# ssl_backend.h EXPORT_KEY_DATA_LABEL
EKM_LABEL = b"EXPORTER-OpenVPN-datakeys"
# struct key_source (ssl_common.h)
PRE_MASTER_SIZE = 48
RANDOM_SIZE = 32
SID_SIZE = 8  # session_id.h
# struct key2: 2 x struct key { cipher[MAX_CIPHER_KEY_LENGTH 64]; hmac[MAX_HMAC_KEY_LENGTH 64] }
KEY2_SIZE = 256
_KEY_SIZE = 128
_CIPHER_KEY_MAX = 64
IMPLICIT_IV_SIZE = 8  # cipher IV length 12 - sizeof(packet_id_type) 4

# AEAD ciphers of the 2.6 default data-ciphers, with their key lengths
CIPHERS: dict[str, int] = {"AES-256-GCM": 32, "AES-128-GCM": 16, "CHACHA20-POLY1305": 32}
DEFAULT_DATA_CIPHERS: tuple[str, ...] = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")

# ssl.h IV_PROTO_* bits of the peer-info IV_PROTO value
IV_PROTO_DATA_V2 = 1 << 1
IV_PROTO_REQUEST_PUSH = 1 << 2
IV_PROTO_TLS_KEY_EXPORT = 1 << 3
IV_PROTO_AUTH_PENDING_KW = 1 << 4
IV_PROTO_NCP_P2P = 1 << 5
IV_PROTO_DNS_OPTION = 1 << 6
IV_PROTO_CC_EXIT_NOTIFY = 1 << 7
IV_PROTO_AUTH_FAIL_TEMP = 1 << 8
IV_PROTO_DYN_TLS_CRYPT = 1 << 9


class KeyMethodError(ValueError):
    """A key method 2 message or key input we refuse. `reason` is a drop-counter label:
    truncated, bad_header, bad_key_method, bad_string, options_too_long,
    user_pass_too_long, trailing_data, bad_input."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason



# --- key method 2 messages ----------------------------------------------------------------


@dataclass(frozen=True)
class KeySource:
    """One side's key material (struct key_source): the client sends pre_master (48),
    random1 and random2 (32 each); the server only the two randoms (pre_master b"")."""

    random1: bytes
    random2: bytes
    pre_master: bytes = b""

    def __post_init__(self) -> None:
        if len(self.random1) != RANDOM_SIZE or len(self.random2) != RANDOM_SIZE:
            raise KeyMethodError("bad_input", "randoms must be 32 bytes")
        if len(self.pre_master) not in (0, PRE_MASTER_SIZE):
            raise KeyMethodError("bad_input", "pre_master must be 48 bytes or empty")

    @classmethod
    def new_client(cls) -> KeySource:
        return cls(os.urandom(RANDOM_SIZE), os.urandom(RANDOM_SIZE), os.urandom(PRE_MASTER_SIZE))

    @classmethod
    def new_server(cls) -> KeySource:
        return cls(os.urandom(RANDOM_SIZE), os.urandom(RANDOM_SIZE))


@dataclass
class KeyMethod2Message:
    """A parsed key method 2 message (`ssl.c key_method_2_read`).

    `peer_info_text` is the raw peer-info string (None if the field is absent,
    as from a pre-2.2 peer); `peer_info` its parse."""

    source: KeySource
    options: str
    username: str = ""
    password: str = ""
    peer_info: dict[str, str] = field(default_factory=dict)
    peer_info_text: str | None = None
    key_method_flags: int = KEY_METHOD_2


def _write_string(s: str, maxlen: int | None = None) -> bytes:
    """ssl.c write_string: u16 length (NUL included), the bytes, NUL; "" is written
    as a zero length (write_empty_string)."""
    if not s:
        return b"\x00\x00"
    raw = s.encode("utf-8")
    if b"\x00" in raw:
        raise KeyMethodError("bad_input", "NUL inside a string")
    n = len(raw) + 1
    if (maxlen is not None and n > maxlen) or n > 0xFFFF:
        raise KeyMethodError("bad_input", f"string of {n} bytes")
    return struct.pack("!H", n) + raw + b"\x00"


def _peer_info_text(peer_info: str | Mapping[str, str]) -> str:
    if isinstance(peer_info, str):
        return peer_info
    return "".join(f"{k}={v}\n" for k, v in peer_info.items())


def build_client(
    source: KeySource,
    options: str,
    username: str = "",
    password: str = "",
    peer_info: str | Mapping[str, str] = "",
) -> bytes:
    """The client's message (`ssl.c key_method_2_write` with server false): for tests
    and an in-process client."""
    if len(source.pre_master) != PRE_MASTER_SIZE:
        raise KeyMethodError("bad_input", "a client source needs pre_master")
    return (
        struct.pack("!IB", 0, KEY_METHOD_2)
        + source.pre_master
        + source.random1
        + source.random2
        + _write_string(options, TLS_OPTIONS_LEN)
        + _write_string(username, USER_PASS_LEN)
        + _write_string(password, USER_PASS_LEN)
        + _write_string(_peer_info_text(peer_info))
    )


def build_server(server_source: KeySource, options: str) -> bytes:
    """The server's answer (`ssl.c key_method_2_write` on a p2mp server): u32 0,
    u8 2, random1, random2 (no pre_master: key_source2_randomize_write), the options
    string, then three empty strings: username and password (a server has no
    auth-user-pass) and peer-info (push_peer_info writes an empty string when
    push_peer_info_detail is 0, which init.c sets for MODE_SERVER)."""
    return (
        struct.pack("!IB", 0, KEY_METHOD_2)
        + server_source.random1
        + server_source.random2
        + _write_string(options, TLS_OPTIONS_LEN)
        + b"\x00\x00" * 3
    )


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise KeyMethodError("truncated", what)
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def string(self, what: str, capacity: int | None, too_long: str) -> str:
        """ssl.c read_string: u16 length including the NUL; 0 is the empty string."""
        (n,) = struct.unpack("!H", self.take(2, what))
        if n == 0:
            return ""
        if capacity is not None and n > capacity:
            raise KeyMethodError(too_long, f"{what}: {n} bytes")
        raw = self.take(n, what)
        if raw[-1] != 0 or b"\x00" in raw[:-1]:
            raise KeyMethodError("bad_string", f"{what}: not one NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise KeyMethodError("bad_string", f"{what}: not UTF-8") from e


def _parse(data: bytes, from_client: bool) -> tuple[KeyMethod2Message, int]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise KeyMethodError("bad_input", type(data).__name__)
    r = _Reader(bytes(data))
    zero, flags = struct.unpack("!IB", r.take(5, "header"))
    if zero != 0:
        raise KeyMethodError("bad_header", f"leading u32 {zero:#x}")
    if flags & KEY_METHOD_MASK != KEY_METHOD_2:
        raise KeyMethodError("bad_key_method", str(flags))
    pre_master = r.take(PRE_MASTER_SIZE, "pre_master") if from_client else b""
    random1 = r.take(RANDOM_SIZE, "random1")
    random2 = r.take(RANDOM_SIZE, "random2")
    options = r.string("options", TLS_OPTIONS_LEN, "options_too_long")
    username = r.string("username", USER_PASS_LEN, "user_pass_too_long")
    password = r.string("password", USER_PASS_LEN, "user_pass_too_long")
    # key_method_2_read: read_string_alloc; a message without the field has no peer info
    peer_text = None if r.at_end() else r.string("peer_info", None, "bad_string")
    msg = KeyMethod2Message(
        source=KeySource(random1, random2, pre_master),
        options=options,
        username=username,
        password=password,
        peer_info=parse_peer_info(peer_text or ""),
        peer_info_text=peer_text,
        key_method_flags=flags,
    )
    return msg, r.pos


def parse_client_prefix(data: bytes) -> tuple[KeyMethod2Message, int]:
    """The client's message at the start of `data` and how many bytes it took
    (for plaintext where a control message may follow in the same read)."""
    return _parse(data, from_client=True)


def parse_client(data: bytes) -> KeyMethod2Message:
    """The client's key method 2 message (what the server reads from TLS), exactly:
    trailing bytes are refused. Raises only KeyMethodError."""
    msg, used = _parse(data, from_client=True)
    if used != len(data):
        raise KeyMethodError("trailing_data", f"{len(data) - used} bytes")
    return msg


def parse_server(data: bytes) -> KeyMethod2Message:
    """The server's key method 2 message (no pre_master), exactly; for test clients."""
    msg, used = _parse(data, from_client=False)
    if used != len(data):
        raise KeyMethodError("trailing_data", f"{len(data) - used} bytes")
    return msg


def parse_peer_info(text: str) -> dict[str, str]:
    """Peer-info lines "NAME=value\\n" to a dict (a line without "=" is skipped; a
    repeated name keeps the first value, as ssl_util.c extract_var_peer_info finds
    the first occurrence)."""
    out: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.rstrip("\r")
        name, sep, value = line.partition("=")
        if not sep or not name:
            continue
        out.setdefault(name, value)
    return out


def iv_proto(peer_info: Mapping[str, str]) -> int:
    """The IV_PROTO bits (ssl_util.c extract_iv_proto: 0 when absent or not positive)."""
    try:
        value = int(peer_info.get("IV_PROTO", "0").strip())
    except ValueError:
        return 0
    return value if value > 0 else 0


def mirror_options(client_options: str) -> str:
    """The options string a 2.6 server would send to this client: the client checks
    the server's string against its own options_string(remote=true) (`ssl.c
    key_method_2_read`, `options.c options_cmp_equal`), which is its own string with
    tls-client/tls-server and keydir swapped (`options.c options_string`,
    `crypto.c keydirection2ascii`). A mismatch only logs warnings (no --opt-verify)."""
    parts = []
    for part in client_options.split(","):
        if part == "tls-client":
            part = "tls-server"
        elif part == "tls-server":
            part = "tls-client"
        elif part == "keydir 1":
            part = "keydir 0"
        elif part == "keydir 0":
            part = "keydir 1"
        parts.append(part)
    return ",".join(parts)


# --- key derivation -----------------------------------------------------------------------


def _p_hash(digest: str, secret: bytes, seed: bytes, n: int) -> bytes:
    """P_hash of RFC 2246 5 (TLS 1.0): HMAC(secret, A(i) + seed), A(i) = HMAC(secret, A(i-1))."""
    out = bytearray()
    a = seed
    while len(out) < n:
        a = hmac.new(secret, a, digest).digest()
        out += hmac.new(secret, a + seed, digest).digest()
    return bytes(out[:n])


def openvpn_prf(secret: bytes, label: bytes, seed: bytes, n: int) -> bytes:
    """The TLS 1.0/1.1 PRF (RFC 2246 5; `crypto_openssl.c ssl_tls1_PRF`: EVP_PKEY_TLS1_PRF
    with EVP_md5_sha1(), and the pre-1.1 fallback in the same file):
    P_MD5(S1, label + seed) XOR P_SHA1(S2, label + seed), S1/S2 the two halves of the
    secret, overlapping by one byte when its length is odd."""
    if n < 0:
        raise KeyMethodError("bad_input", "negative length")
    half = (len(secret) + 1) // 2
    s1 = secret[:half]
    s2 = secret[len(secret) - half :]
    md5 = _p_hash("md5", s1, label + seed, n)
    sha1 = _p_hash("sha1", s2, label + seed, n)
    return bytes(x ^ y for x, y in zip(md5, sha1, strict=True))


def key_expansion_prf(
    client: KeySource, server: KeySource, client_sid: bytes, server_sid: bytes
) -> bytes:
    """The 256-byte key2 of `ssl.c generate_key_expansion_openvpn_prf`:
    master = PRF(client.pre_master, "OpenVPN master secret",
                 client.random1 || server.random1, 48)
    key2   = PRF(master, "OpenVPN key expansion",
                 client.random2 || server.random2 || client_sid || server_sid, 256)
    (`openvpn_PRF` concatenates label, client seed, server seed, then the sids)."""
    if len(client.pre_master) != PRE_MASTER_SIZE:
        raise KeyMethodError("bad_input", "client source without pre_master")
    if len(client_sid) != SID_SIZE or len(server_sid) != SID_SIZE:
        raise KeyMethodError("bad_input", "session ids must be 8 bytes")
    master = openvpn_prf(
        client.pre_master, KEY_EXPANSION_ID + b" master secret", client.random1 + server.random1, 48
    )
    return openvpn_prf(
        master,
        KEY_EXPANSION_ID + b" key expansion",
        client.random2 + server.random2 + client_sid + server_sid,
        KEY2_SIZE,
    )


class _Exporter(Protocol):
    def export_keying_material(self, label: bytes, length: int) -> bytes: ...


def key_expansion_ekm(tls: _Exporter) -> bytes:
    """The 256-byte key2 with tls-ekm (`ssl.c generate_key_expansion_tls_export`):
    the RFC 5705 exporter with label EXPORTER-OpenVPN-datakeys and no context.
    Used only when the server pushed `key-derivation tls-ekm` or
    `protocol-flags ... tls-ekm`."""
    return tls.export_keying_material(EKM_LABEL, KEY2_SIZE)


@dataclass(frozen=True)
class DataKeys:
    """One end's data channel keys for an AEAD cipher: the nonce is
    packet_id (4) || implicit IV (8)."""

    encrypt_key: bytes
    encrypt_implicit_iv: bytes
    decrypt_key: bytes
    decrypt_implicit_iv: bytes


def data_keys(key2: bytes, cipher: str, server: bool) -> DataKeys:
    """Split key2 = keys[0] (cipher 64 | hmac 64) || keys[1] (cipher 64 | hmac 64).

    `ssl.c init_key_contexts`: the server uses KEY_DIRECTION_INVERSE, the client
    KEY_DIRECTION_NORMAL; `crypto.c key_direction_state_init` maps them to
    (out, in) = (1, 0) and (0, 1); `init_key_ctx` takes the first keylen bytes of
    keys[i].cipher. The implicit IVs are keys[server].hmac (encrypt) and
    keys[1 - server].hmac (decrypt), of which `key_ctx_update_implicit_iv` takes
    iv_length - sizeof(packet_id_type) = 12 - 4 = 8 bytes. So the server encrypts
    with key2[128:128+keylen], IV key2[192:200], and decrypts with key2[0:keylen],
    IV key2[64:72]; the client the other way round."""
    if len(key2) != KEY2_SIZE:
        raise KeyMethodError("bad_input", f"key2 of {len(key2)} bytes")
    keylen = CIPHERS.get(cipher)
    if keylen is None:
        raise KeyMethodError("bad_input", f"cipher {cipher!r}")
    keys = (key2[:_KEY_SIZE], key2[_KEY_SIZE:])
    out_i, in_i = (1, 0) if server else (0, 1)

    def cipher_key(k: bytes) -> bytes:
        return k[:keylen]

    def implicit_iv(k: bytes) -> bytes:
        return k[_CIPHER_KEY_MAX : _CIPHER_KEY_MAX + IMPLICIT_IV_SIZE]

    return DataKeys(
        encrypt_key=cipher_key(keys[out_i]),
        encrypt_implicit_iv=implicit_iv(keys[out_i]),
        decrypt_key=cipher_key(keys[in_i]),
        decrypt_implicit_iv=implicit_iv(keys[in_i]),
    )


# --- NCP ------------------------------------------------------------------------------------


def select_cipher(
    client_iv_ciphers: str | None,
    ours: Sequence[str],
    *,
    iv_ncp: int = 0,
    remote_cipher: str | None = None,
) -> str | None:
    """The cipher to push (`ssl_ncp.c ncp_get_best_cipher`): the first of ours
    (server preference) that the client offers. The client's list is IV_CIPHERS;
    without it, IV_NCP >= 2 means "AES-256-GCM:AES-128-GCM" (`tls_peer_ncp_list`),
    and a client without IV_CIPHERS may also get the `cipher` of its options
    string (`remote_cipher`, from OCC). Names compare exactly, as
    `tls_item_in_cipher_list` does (strcmp). None: nothing in common (a 2.6 server
    then fails the client unless data-ciphers-fallback is set)."""
    if client_iv_ciphers is not None:
        offered = [c for c in client_iv_ciphers.split(":") if c]
        remote_cipher = None  # "we cannot assume that they will accept remote_cipher"
    elif iv_ncp >= 2:
        offered = ["AES-256-GCM", "AES-128-GCM"]
    else:
        offered = []
    for name in ours:
        if name in offered or (remote_cipher is not None and name == remote_cipher):
            return name
    return None


def select_cipher_for(
    msg: KeyMethod2Message, ours: Sequence[str] = DEFAULT_DATA_CIPHERS
) -> str | None:
    """`select_cipher` fed from a parsed client message (IV_CIPHERS, IV_NCP, and the
    options string's `cipher` as `ssl.c key_method_2_read` extracts it)."""
    try:
        ncp = int(msg.peer_info.get("IV_NCP", "0").strip() or "0")
    except ValueError:
        ncp = 0
    remote = None
    for part in msg.options.split(","):
        if part.startswith("cipher "):
            remote = part[len("cipher ") :]
            break
    return select_cipher(msg.peer_info.get("IV_CIPHERS"), ours, iv_ncp=ncp, remote_cipher=remote)
