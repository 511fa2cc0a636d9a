"""Control-channel wrapping (shared/openvpn-protocol.md sections 1.4, 1.5), sans-I/O.

A wrapper turns an unwrapped control packet (ControlPacket.pack: op|kid, own session
id, ack block, message id, payload) into the datagram and back:

* TlsCrypt (--tls-crypt, v1): header (op|kid, sid, packet id, net time) || HMAC-SHA256 tag
  || AES-256-CTR(rest, IV = tag[:16])                      (tls_crypt.c tls_crypt_wrap)
* TlsAuth (--tls-auth): op|kid, sid || HMAC || packet id, net time || rest
                                        (ssl_pkt.c tls_wrap_control, swap_hmac)
* NoWrap: the unwrapped packet itself, with no packet id or time (ssl.c tls_pre_decrypt).

`unwrap` authenticates and returns (packet, packet_id, net_time); the caller checks
the long-form packet id against a ReplayWindow (crypto.c crypto_check_replay) and adds
it once the packet is accepted. Parsers raise WireError with a drop-counter `reason`.

Static key files (`openvpn --genkey secret`) hold key[0] || key[1], each
cipher (64 bytes) || hmac (64 bytes) (crypto.h struct key2; crypto.c read_key_file).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from typing import ClassVar, Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fabric.protocols.openvpn.constants import (
    DEFAULT_SEQ_BACKTRACK,
    DEFAULT_TIME_BACKTRACK,
    MAX_CIPHER_KEY_LENGTH,
    PACKET_ID_LONG_SIZE,
    PACKET_ID_MAX,
    SID_SIZE,
    STATIC_KEY2_SIZE,
    STATIC_KEY_BYTES_PER_LINE,
    STATIC_KEY_FOOT,
    STATIC_KEY_HEAD,
    STATIC_KEY_SIZE,
    TLS_AUTH_DIGEST_DEFAULT,
    TLS_AUTH_DIGEST_SIZES,
    TLS_CRYPT_BLOCK_SIZE,
    TLS_CRYPT_KEY_SIZE,
    TLS_CRYPT_OFF_CT,
    TLS_CRYPT_OFF_PID,
    TLS_CRYPT_OFF_TAG,
    TLS_CRYPT_OVERHEAD,
)
from fabric.protocols.openvpn.wire import WireError

_PID = struct.Struct("!II")  # packet id, net time (packet_id.c packet_id_write, long form)
_HEAD = 1 + SID_SIZE  # op|kid and the sender's session id
_HEX = frozenset("0123456789abcdefABCDEF")


# --- static key files ----------------------------------------------------------------


def parse_static_key(text: str) -> bytes:
    """The 256 bytes of an `OpenVPN Static key V1` file (crypto.c read_key_file).

    Lines before the header (comments) are ignored; between header and footer only hex
    digits and white space may appear. Raises WireError("bad_key_file", what is wrong).
    OpenVPN itself would accept a file with one 128-byte key for tls-auth without a key
    direction, and ignores hex beyond 256 bytes; both are refused here.
    """
    if not isinstance(text, str):
        raise WireError("bad_key_file", "a static key file is text")
    lines = text.replace("\r\n", "\n").split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == STATIC_KEY_HEAD)
    except StopIteration:
        raise WireError("bad_key_file", f"no '{STATIC_KEY_HEAD}' line") from None
    digits: list[str] = []
    for number, line in enumerate(lines[start + 1:], start + 2):
        stripped = line.strip()
        if stripped.startswith("-"):  # crypto.c read_key_file: a '-' line ends the data
            if stripped != STATIC_KEY_FOOT:
                raise WireError("bad_key_file", f"line {number}: expected '{STATIC_KEY_FOOT}'")
            break
        for c in stripped:
            if c in _HEX:
                digits.append(c)
            elif not c.isspace():
                raise WireError("bad_key_file", f"line {number}: non-hex character {c!r}")
    else:
        raise WireError("bad_key_file", f"no '{STATIC_KEY_FOOT}' line")
    want = 2 * STATIC_KEY2_SIZE
    if len(digits) != want:
        raise WireError("bad_key_file", f"{len(digits) // 2} key bytes, need {STATIC_KEY2_SIZE} "
                        "(make one with: openvpn --genkey secret FILE)")
    return bytes.fromhex("".join(digits))


def format_static_key(key: bytes) -> str:
    """The text `openvpn --genkey secret` writes for `key` (crypto.c write_key_file)."""
    if len(key) != STATIC_KEY2_SIZE:
        raise ValueError(f"a static key is {STATIC_KEY2_SIZE} bytes")
    hexed = key.hex()
    step = 2 * STATIC_KEY_BYTES_PER_LINE
    body = "\n".join(hexed[i:i + step] for i in range(0, len(hexed), step))
    return (f"#\n# {STATIC_KEY2_SIZE * 8} bit OpenVPN static key\n#\n"
            f"{STATIC_KEY_HEAD}\n{body}\n{STATIC_KEY_FOOT}\n")


def _key_half(static_key: bytes, index: int) -> tuple[bytes, bytes]:
    """(cipher, hmac) of key[index] (crypto.h struct key: cipher[64] || hmac[64])."""
    half = static_key[index * STATIC_KEY_SIZE:(index + 1) * STATIC_KEY_SIZE]
    return half[:MAX_CIPHER_KEY_LENGTH], half[MAX_CIPHER_KEY_LENGTH:]


def _check_key(static_key: bytes) -> None:
    if not isinstance(static_key, (bytes, bytearray)) or len(static_key) != STATIC_KEY2_SIZE:
        raise ValueError(f"a static key is {STATIC_KEY2_SIZE} bytes (parse_static_key)")


def _check_pid(packet: bytes, packet_id: int, net_time: int) -> None:
    if len(packet) < _HEAD:
        raise ValueError("a control packet starts with op|kid and an 8-byte session id")
    if not 0 <= packet_id <= PACKET_ID_MAX or not 0 <= net_time <= PACKET_ID_MAX:
        raise ValueError("packet id and net time are u32")


# --- wrappers ------------------------------------------------------------------------


class ControlWrap(Protocol):
    """What TlsCrypt, TlsAuth and NoWrap have in common."""

    @property
    def overhead(self) -> int:
        """Bytes the wrapping adds to an unwrapped packet."""
        ...

    @property
    def replay_protected(self) -> bool:
        """Unwrap returns a packet id and time to check."""
        ...

    def wrap(self, packet: bytes, packet_id: int, net_time: int) -> bytes: ...

    def unwrap(self, data: bytes) -> tuple[bytes, int, int]: ...


class TlsCrypt:
    """--tls-crypt (v1): AES-256-CTR and HMAC-SHA256 with the first 32 bytes of each
    half of the static key (tls_crypt.c tls_crypt_kt, tls_crypt_wrap, tls_crypt_unwrap).

    A server uses KEY_DIRECTION_NORMAL: it sends with key[0] and receives with key[1];
    a client the inverse (tls_crypt.c tls_crypt_init_key, crypto.c key_direction_state_init).
    """

    overhead: ClassVar[int] = TLS_CRYPT_OVERHEAD
    replay_protected: ClassVar[bool] = True

    def __init__(self, static_key: bytes, server: bool) -> None:
        _check_key(static_key)
        out_index, in_index = (0, 1) if server else (1, 0)
        cipher, auth = _key_half(bytes(static_key), out_index)
        self._ke_out, self._ka_out = cipher[:TLS_CRYPT_KEY_SIZE], auth[:TLS_CRYPT_KEY_SIZE]
        cipher, auth = _key_half(bytes(static_key), in_index)
        self._ke_in, self._ka_in = cipher[:TLS_CRYPT_KEY_SIZE], auth[:TLS_CRYPT_KEY_SIZE]
        self.server = server

    @staticmethod
    def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
        ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
        return ctx.update(data) + ctx.finalize()

    def wrap(self, packet: bytes, packet_id: int, net_time: int) -> bytes:
        """header || tag || AES-256-CTR(packet[9:]) (tls_crypt.c tls_crypt_wrap)."""
        _check_pid(packet, packet_id, net_time)
        header = bytes(packet[:_HEAD]) + _PID.pack(packet_id, net_time)
        msg = bytes(packet[_HEAD:])
        tag = hmac.new(self._ka_out, header + msg, hashlib.sha256).digest()
        return header + tag + self._ctr(self._ke_out, tag[:TLS_CRYPT_BLOCK_SIZE], msg)

    def unwrap(self, data: bytes) -> tuple[bytes, int, int]:
        """(unwrapped packet, packet id, net time); WireError short or tls_crypt_auth."""
        data = bytes(data)
        if len(data) < TLS_CRYPT_OFF_CT:  # tls_crypt.c tls_crypt_unwrap: "packet too short"
            raise WireError("short", f"tls-crypt packet of {len(data)} bytes")
        tag = data[TLS_CRYPT_OFF_TAG:TLS_CRYPT_OFF_CT]
        msg = self._ctr(self._ke_in, tag[:TLS_CRYPT_BLOCK_SIZE], data[TLS_CRYPT_OFF_CT:])
        check = hmac.new(self._ka_in, data[:TLS_CRYPT_OFF_TAG] + msg, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, check):
            raise WireError("tls_crypt_auth")
        packet_id, net_time = _PID.unpack_from(data, TLS_CRYPT_OFF_PID)
        return data[:_HEAD] + msg, packet_id, net_time


class TlsAuth:
    """--tls-auth: an HMAC (--auth, SHA1 by default) over packet id, time and the packet
    (crypto.c openvpn_encrypt_v1 without a cipher), moved behind the session id on the
    wire (ssl_pkt.c swap_hmac). The key is the first digest-size bytes of a half's hmac part.

    `direction`: the "key-direction" (or --tls-auth's second argument): None uses key[0]
    both ways; 0 sends with key[0] and receives with key[1]; 1 the inverse (crypto.c
    key_direction_state_init). A server with "0" talks to clients with "1".
    """

    replay_protected: ClassVar[bool] = True

    def __init__(self, static_key: bytes, direction: int | None,
                 digest: str = TLS_AUTH_DIGEST_DEFAULT) -> None:
        _check_key(static_key)
        name = digest.upper().replace("-", "")
        size = TLS_AUTH_DIGEST_SIZES.get(name)
        if size is None:
            raise ValueError(f"tls-auth digest {digest!r} not one of {sorted(TLS_AUTH_DIGEST_SIZES)}")
        if direction is None:
            out_index = in_index = 0
        elif direction == 0:
            out_index, in_index = 0, 1
        elif direction == 1:
            out_index, in_index = 1, 0
        else:
            raise ValueError(f"key direction must be 0, 1 or None, not {direction!r}")
        self.digest = name
        self.hmac_size = size
        self.overhead = size + PACKET_ID_LONG_SIZE
        self.direction = direction
        self._hash = getattr(hashlib, name.lower())
        self._k_out = _key_half(bytes(static_key), out_index)[1][:size]
        self._k_in = _key_half(bytes(static_key), in_index)[1][:size]

    def wrap(self, packet: bytes, packet_id: int, net_time: int) -> bytes:
        """op|kid, sid || HMAC(pid, time, packet) || pid, time || rest (ssl_pkt.c tls_wrap_control)."""
        _check_pid(packet, packet_id, net_time)
        packet = bytes(packet)
        pid = _PID.pack(packet_id, net_time)
        mac = hmac.new(self._k_out, pid + packet, self._hash).digest()
        return packet[:_HEAD] + mac + pid + packet[_HEAD:]

    def unwrap(self, data: bytes) -> tuple[bytes, int, int]:
        """(unwrapped packet, packet id, net time); WireError short or tls_auth_hmac."""
        data = bytes(data)
        end = _HEAD + self.hmac_size + PACKET_ID_LONG_SIZE
        if len(data) < end:  # ssl_pkt.c swap_hmac: "cannot locate HMAC"
            raise WireError("short", f"tls-auth packet of {len(data)} bytes")
        mac = data[_HEAD:_HEAD + self.hmac_size]
        pid = data[_HEAD + self.hmac_size:end]
        packet = data[:_HEAD] + data[end:]
        check = hmac.new(self._k_in, pid + packet, self._hash).digest()
        if not hmac.compare_digest(mac, check):
            raise WireError("tls_auth_hmac")
        packet_id, net_time = _PID.unpack(pid)
        return packet, packet_id, net_time


class NoWrap:
    """No control-channel wrapping: no packet id, no time, no authentication
    (ssl_pkt.c read_control_auth, TLS_WRAP_NONE). unwrap returns packet id and time 0."""

    overhead: ClassVar[int] = 0
    replay_protected: ClassVar[bool] = False

    def wrap(self, packet: bytes, packet_id: int = 0, net_time: int = 0) -> bytes:
        if len(packet) < _HEAD:
            raise ValueError("a control packet starts with op|kid and an 8-byte session id")
        return bytes(packet)

    def unwrap(self, data: bytes) -> tuple[bytes, int, int]:
        data = bytes(data)
        if len(data) < _HEAD:  # ssl_pkt.c tls_pre_decrypt_lite: opcode and session id
            raise WireError("short", f"control packet of {len(data)} bytes")
        return data, 0, 0


# --- replay window -------------------------------------------------------------------

_EXPIRED = -math.inf  # packet_id.c SEQ_EXPIRED; None stands for SEQ_UNSEEN


class ReplayWindow:
    """Long-form (id, time) packet ids in backtrack mode (packet_id.c packet_id_test,
    packet_id_add, packet_id_reap; `--replay-window 64 15`).

    Id 0 is refused; a time older than the newest seen is refused; a newer time is
    accepted (and restarts the window); at the same time, an id above the highest is
    accepted and one up to `backtrack - 1` below it only if not seen yet. With `now`
    (seconds, any clock), ids older than a seen id that arrived more than
    `time_backtrack` seconds ago are expired, as packet_id_reap does.
    """

    def __init__(self, backtrack: int = DEFAULT_SEQ_BACKTRACK,
                 time_backtrack: float = DEFAULT_TIME_BACKTRACK) -> None:
        if backtrack < 1:
            raise ValueError("backtrack must be at least 1")
        self.backtrack = backtrack
        self.time_backtrack = time_backtrack
        self.id = 0  # highest id seen at `time` (packet_id_rec.id)
        self.time = 0  # packet_id_rec.time
        # slot i: id - i; None unseen, a float the (local) time it was seen, _EXPIRED
        self._slots: list[float | None] = []

    def check(self, packet_id: int, net_time: int, now: float | None = None) -> bool:
        """Would (packet_id, net_time) be accepted? Records nothing (packet_id.c
        packet_id_test); with `now`, expires old slots first (crypto.c crypto_check_replay)."""
        if now is not None:
            self.reap(now)
        if packet_id == 0:
            return False
        if net_time == self.time:
            if packet_id > self.id:
                return True
            diff = self.id - packet_id
            if diff >= len(self._slots):
                return False
            return self._slots[diff] is None
        return net_time > self.time  # time going back: refused; forward: accepted

    def add(self, packet_id: int, net_time: int, now: float | None = None) -> None:
        """Record an accepted id (packet_id.c packet_id_add), after authentication."""
        seen = math.inf if now is None else now
        if (not self._slots or net_time > self.time
                or (packet_id >= self.backtrack and packet_id - self.backtrack > self.id)):
            # a newer time (or a jump past the window) starts a new sequence
            self.time = net_time
            self.id = packet_id - self.backtrack if packet_id > self.backtrack else 0
            self._slots = []
        if packet_id > self.id:
            grow = packet_id - self.id
            self._slots[0:0] = [None] * min(grow, self.backtrack)
            del self._slots[self.backtrack:]
            self.id = packet_id
        diff = self.id - packet_id
        if diff < len(self._slots):
            self._slots[diff] = seen

    def reap(self, now: float) -> None:
        """Expire every slot at or below the newest one seen more than time_backtrack
        seconds before `now` (packet_id.c packet_id_reap)."""
        if not self.time_backtrack:
            return
        expire = False
        for i, t in enumerate(self._slots):
            if t == _EXPIRED:
                break
            if not expire and t is not None and t + self.time_backtrack < now:
                expire = True
            if expire:
                self._slots[i] = _EXPIRED
