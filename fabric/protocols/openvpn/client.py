"""A sans-I/O OpenVPN 2.6 UDP client, in the style of aioquic's QuicConnection.

No sockets and no clock: the caller feeds the server's datagrams
(`receive_datagram`), inner IP packets (`send_data`), fires timers (`get_timer`,
`handle_timer`), and collects what to transmit (`datagrams_to_send`) and what
happened (`next_event`). It behaves as a stock 2.6 client with `client`,
`dev tun`, `proto udp`, `remote-cert-tls server` and no compression
(shared/openvpn-protocol.md; OpenVPN's source at v2.6.14 cited as `file function`):

* key id 0 starts with P_CONTROL_HARD_RESET_CLIENT_V2 (message id 0); the server's
  HARD_RESET_SERVER_V2 gives its session id (ssl.c tls_pre_decrypt), later control
  packets must come from that session and ack ours;
* TLS over P_CONTROL_V1 (reliable.c: per-id acks, retransmit after --tls-timeout 2 s,
  doubling; at most 6 messages in flight; TLS chunks sized so a packet fits
  --tls-mtu 1250 with an IPv6/UDP header, ssl.c calc_control_channel_frame_overhead);
* key method 2 (ssl.c key_method_2_write) once our reset is acked, the server's
  answer read after the handshake; the key state is "active" once that is done and
  everything we sent on it is acked (ssl.c tls_process_state, session_move_active);
* PUSH_REQUEST when key 0 turns active, again every 5 s until a PUSH_REPLY
  (forward.c check_push_request); data keys of key 0 only after the reply
  (tls-ekm if `protocol-flags ... tls-ekm` or `key-derivation tls-ekm` was
  pushed, else the TLS1-PRF: ssl.c generate_key_expansion);
* AEAD data packets (P_DATA_V2 with the pushed peer-id, else P_DATA_V1), packet ids
  from 1, the 64-deep replay window of `--replay-window 64 15`; pings (ping.c) are
  consumed, and one is sent after `ping` seconds without sending data;
* renegotiation (`renegotiate`, the server's P_CONTROL_SOFT_RESET_V1, or `reneg_seconds`
  after a key turned active): a new key id 1..7 with its own reliable stream, TLS
  session and key method 2 exchange (ssl.c key_state_soft_reset); we send with it
  once it is active, and keep decrypting with the previous one (the lame duck,
  --tran-window 3600 s);
* `close`: the control message EXIT if `cc-exit` was pushed, else OCC_EXIT data
  packets (sig.c process_explicit_exit_notification_init, occ.c).

`now` is in seconds on any monotonic clock. The tls-crypt/tls-auth "net time" is
taken from `now` at construction (pass `net_time` to use wall-clock seconds as
OpenVPN does; the server only requires that it never goes back within a session).

Untrusted input never raises out of `receive_datagram`: what is refused is counted
in `drops` by reason; a failure that ends the session (TLS error, bad key method 2
message, a bad PUSH_REPLY) yields a `Closed` event.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.x509.oid import ExtendedKeyUsageOID

from fabric.protocols.openvpn import keys as km
from fabric.protocols.openvpn.constants import (
    AEAD_TAG_SIZE,
    CONTROL_SEND_ACK_MAX,
    DATA_V1_HEADER_SIZE,
    DATA_V2_HEADER_SIZE,
    DEFAULT_SEQ_BACKTRACK,
    DEFAULT_TIME_BACKTRACK,
    HANDSHAKE_WINDOW_DEFAULT,
    KEY_ID_MAX,
    MAX_PEER_ID,
    OCC_EXIT,
    OCC_MAGIC,
    P_ACK_V1,
    P_CONTROL_HARD_RESET_CLIENT_V2,
    P_CONTROL_HARD_RESET_CLIENT_V3,
    P_CONTROL_HARD_RESET_SERVER_V2,
    P_CONTROL_SOFT_RESET_V1,
    P_CONTROL_V1,
    P_CONTROL_WKC_V1,
    P_DATA_V1,
    P_DATA_V2,
    PACKET_ID_SIZE,
    PACKET_ID_WRAP_TRIGGER,
    PING_STRING,
    PRE_PULL_INITIAL_PING_RESTART,
    PUSH_REQUEST_INTERVAL,
    RELIABLE_ACK_SIZE,
    RENEGOTIATE_SECONDS_DEFAULT,
    SID_SIZE,
    SOFTETHER_ACK_MAX,
    TLS_MTU_DEFAULT,
    TRANSITION_WINDOW_DEFAULT,
)
from fabric.protocols.openvpn.keys import KeyMethod2Message, KeyMethodError, KeySource
from fabric.protocols.openvpn.reliable import ReliableReceive, ReliableSend
from fabric.protocols.openvpn.tls import TlsClient, TlsContext, TlsError
from fabric.protocols.openvpn.wire import (
    ControlPacket,
    WireError,
    data_v1_header,
    data_v2_header,
    opcode_key_id,
    parse_data,
)
from fabric.protocols.openvpn.wrap import ControlWrap, NoWrap, ReplayWindow, TlsAuth, TlsCrypt

__all__ = [
    "Closed",
    "Connected",
    "ControlMessage",
    "DEFAULT_IV_PROTO",
    "DEFAULT_OPTIONS",
    "Data",
    "Event",
    "OvpnClient",
    "Renegotiated",
    "peer_info",
]

# ssl.c push_peer_info of a 2.6 client, limited to what this client does: DATA_V2,
# REQUEST_PUSH, TLS_KEY_EXPORT, CC_EXIT_NOTIFY (no AUTH_PENDING_KW, DNS_OPTION,
# AUTH_FAIL_TEMP, DYN_TLS_CRYPT)
DEFAULT_IV_PROTO = (km.IV_PROTO_DATA_V2 | km.IV_PROTO_REQUEST_PUSH | km.IV_PROTO_TLS_KEY_EXPORT
                    | km.IV_PROTO_CC_EXIT_NOTIFY)
# options.c options_string of Debian's 2.6.14 client (shared/openvpn-protocol.md 2.1);
# the server only logs warnings when it differs from its own (ssl.c key_method_2_read)
DEFAULT_OPTIONS = ("V4,dev-type tun,link-mtu 1541,tun-mtu 1500,proto UDPv4,auth SHA1,"
                   "keysize 128,key-method 2,tls-client")
IV_VER = "2.6.14"
TUN_MAX_MTU = 1600  # options.c: tun-max-mtu default (tun-mtu + 100), sent as IV_MTU
DEFAULT_TUN_MTU = 1500
# ssl.c calc_control_channel_frame_overhead: an IPv6 + UDP header (datagram_overhead)
_DATAGRAM_OVERHEAD = 40 + 8
# sig.c: with cc-exit, give the EXIT this long to be acked (the server waits 5 s too,
# forward.c receive_exit_message)
EXIT_WAIT = 5.0
OCC_EXIT_INTERVAL = 1.0  # sig.c: OCC_EXIT is repeated once a second
_WRAPS = ("tls-crypt", "tls-auth", "none")

_AEADS: dict[str, Callable[[bytes], Any]] = {
    "AES-256-GCM": AESGCM, "AES-128-GCM": AESGCM, "CHACHA20-POLY1305": ChaCha20Poly1305,
}
_U32 = struct.Struct("!I")
_RESET_OPCODES = frozenset({P_CONTROL_HARD_RESET_SERVER_V2, P_CONTROL_SOFT_RESET_V1})
_CLIENT_OPCODES = frozenset({P_CONTROL_HARD_RESET_CLIENT_V2, P_CONTROL_HARD_RESET_CLIENT_V3,
                             P_CONTROL_WKC_V1})

# key state progress (ssl_common.h S_*: S_PRE_START, S_START, S_SENT_KEY, S_GOT_KEY, S_ACTIVE)
_PRE_START, _START, _SENT_KEY, _GOT_KEY, _ACTIVE = range(5)


# --- events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of what `next_event` returns."""


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """Key 0 is active and the PUSH_REPLY was applied: data can flow.

    `pushed` holds the pushed options in order ("ifconfig 198.18.211.2 255.255.255.0",
    ...); `options` maps each option's first word to the rest of its last occurrence."""

    pushed: tuple[str, ...]
    options: dict[str, str]
    ifconfig: tuple[str, str] | None  # (address, netmask with topology subnet, else peer)
    ifconfig_ipv6: tuple[str, str] | None  # ("address/bits", remote)
    peer_id: int | None  # None: P_DATA_V1
    cipher: str
    key_derivation: str  # "tls-ekm" or "prf"
    topology: str | None
    ping: float | None
    ping_restart: float | None
    cc_exit: bool


@dataclass(frozen=True, slots=True)
class Data(Event):
    """An inner packet the server sent (pings and OCC messages are not reported)."""

    packet: bytes
    key_id: int


@dataclass(frozen=True, slots=True)
class Renegotiated(Event):
    """A new key id is active: we send with it from now on."""

    key_id: int
    initiated_by_server: bool


@dataclass(frozen=True, slots=True)
class ControlMessage(Event):
    """A control message other than PUSH_REPLY and the ones that end the session
    (INFO, INFO_PRE, AUTH_PENDING, CR_RESPONSE, ...)."""

    text: str


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The session is over; nothing is received or sent after this.

    `reason`: exit (our close), closed (close before connecting), handshake-timeout,
    renegotiation-timeout, no-push-reply, ping-restart, server-exit, server-restart,
    server-halt, auth-failed, tls: <TlsError reason>, key-method: <reason>,
    push: <what was wrong>."""

    reason: str
    detail: str = ""


# --- helpers -----------------------------------------------------------------------


def peer_info(ciphers: Sequence[str], iv_proto: int) -> str:
    """The peer-info a 2.6 client sends (ssl.c push_peer_info with push_peer_info_detail 2
    and --pull): no IV_LZO_STUB/IV_COMP_STUB lines, since this client has no compression
    framing at all."""
    lines = [f"IV_VER={IV_VER}", "IV_PLAT=linux", "IV_TCPNL=1", f"IV_MTU={TUN_MAX_MTU}"]
    if "AES-128-GCM" in ciphers and "AES-256-GCM" in ciphers:
        lines.append("IV_NCP=2")
    lines.append(f"IV_CIPHERS={':'.join(ciphers)}")
    lines.append(f"IV_PROTO={iv_proto}")
    return "".join(line + "\n" for line in lines)


def _server_cert_ok(der: bytes) -> bool:
    """--remote-cert-tls server: the leaf has a keyUsage extension and the extended
    key usage serverAuth (ssl_verify_openssl.c x509_verify_cert_ku / _eku)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.extensions.get_extension_for_class(x509.KeyUsage)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku


def _next_key_id(key_id: int) -> int:
    """ssl.c key_state_init: key ids 0, then 1..7 and round to 1."""
    key_id = (key_id + 1) & KEY_ID_MAX
    return key_id or 1


class _DataChannel:
    """One key id's AEAD data channel (crypto.c openvpn_encrypt_aead / _decrypt_aead)."""

    __slots__ = ("cipher", "_seal", "_open", "_seal_iv", "_open_iv", "send_pid", "replay")

    def __init__(self, cipher: str, dk: km.DataKeys) -> None:
        aead = _AEADS[cipher]
        self.cipher = cipher
        self._seal = aead(dk.encrypt_key).encrypt
        self._open = aead(dk.decrypt_key).decrypt
        self._seal_iv, self._open_iv = dk.encrypt_implicit_iv, dk.decrypt_implicit_iv
        self.send_pid = 0  # the last packet id sent; the first is 1
        self.replay = ReplayWindow(DEFAULT_SEQ_BACKTRACK, DEFAULT_TIME_BACKTRACK)

    def seal(self, key_id: int, peer_id: int | None, payload: bytes) -> bytes:
        self.send_pid += 1
        pid = self.send_pid
        if peer_id is not None:
            head = data_v2_header(key_id, peer_id, pid)
            aad = head
        else:
            head = data_v1_header(key_id, pid)
            aad = head[1:]
        ct = self._seal(_U32.pack(pid) + self._seal_iv, payload, aad)
        return head + ct[-AEAD_TAG_SIZE:] + ct[:-AEAD_TAG_SIZE]  # 2.6: the tag first

    def open(self, data: bytes, opcode: int, packet_id: int) -> bytes:
        """The plaintext, or InvalidTag."""
        head = DATA_V2_HEADER_SIZE if opcode == P_DATA_V2 else DATA_V1_HEADER_SIZE
        aad = data[:head] if opcode == P_DATA_V2 else data[1:head]
        tag = data[head:head + AEAD_TAG_SIZE]
        ct = data[head + AEAD_TAG_SIZE:]
        return self._open(_U32.pack(packet_id) + self._open_iv, ct + tag, aad)


class _KeyState:
    """One key id's control channel (ssl_common.h struct key_state)."""

    def __init__(self, key_id: int, initial_opcode: int, tls: TlsClient, now: float,
                 hand_window: float) -> None:
        self.key_id = key_id
        self.send = ReliableSend()
        self.recv = ReliableReceive()
        self.tls = tls
        self.state = _PRE_START
        self.source = KeySource.new_client()
        self.server_msg: KeyMethod2Message | None = None
        self.tls_out = bytearray()  # TLS ciphertext not yet in the send window
        self.paybuf: list[bytes] = []  # control messages held until active (ssl.c paybuf)
        self.data: _DataChannel | None = None
        self.started = now
        self.must_negotiate: float | None = now + hand_window
        self.established: float | None = None
        self.must_die: float | None = None
        self.initiated_by_server = False
        self.send.queue(b"", initial_opcode)  # message 0: the reset


# --- the client --------------------------------------------------------------------


@dataclass
class _Push:
    """What the PUSH_REPLY said (apply_push_options), accumulated over continuations."""

    parts: list[str] = field(default_factory=list)
    done: bool = False


class OvpnClient:
    """One OpenVPN 2.6 client session over UDP, with no I/O and no clock.

    `ca_pem`, `cert_pem`, `key_pem`: the profile's <ca>, <cert>, <key>;
    `static_key`: the 256 bytes of the <tls-crypt> or <tls-auth> key (None with
    wrap="none"); `wrap`: "tls-crypt", "tls-auth" (key-direction 1, --auth SHA1) or
    "none"; `ciphers`: --data-ciphers (IV_CIPHERS); `iv_proto`: the IV_PROTO bits
    sent (leave out IV_PROTO_TLS_KEY_EXPORT to get the legacy PRF, IV_PROTO_CC_EXIT_NOTIFY
    to get OCC_EXIT on close). `reneg_seconds` (None: never) renegotiates that long
    after a key turned active, as --reneg-sec does on a client.
    """

    def __init__(
        self,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        static_key: bytes | None,
        wrap: str = "tls-crypt",
        ciphers: Sequence[str] = km.DEFAULT_DATA_CIPHERS,
        *,
        now: float,
        iv_proto: int = DEFAULT_IV_PROTO,
        options: str = DEFAULT_OPTIONS,
        reneg_seconds: float | None = RENEGOTIATE_SECONDS_DEFAULT,
        hand_window: float = HANDSHAKE_WINDOW_DEFAULT,
        tran_window: float = TRANSITION_WINDOW_DEFAULT,
        exit_notify: int = 1,
        tls_mtu: int = TLS_MTU_DEFAULT,
        net_time: int | None = None,
        session_id: bytes | None = None,
        verify_server_eku: bool = True,
    ) -> None:
        if wrap not in _WRAPS:
            raise ValueError(f"wrap must be one of {_WRAPS}")
        ciphers = tuple(ciphers)
        if not ciphers or any(c not in km.CIPHERS for c in ciphers):
            raise ValueError(f"ciphers must be among {sorted(km.CIPHERS)}")
        self._wrapper: ControlWrap
        if wrap == "none":
            self._wrapper = NoWrap()
        elif static_key is None:
            raise ValueError(f"{wrap} needs the static key")
        elif wrap == "tls-crypt":
            self._wrapper = TlsCrypt(static_key, server=False)
        else:
            self._wrapper = TlsAuth(static_key, direction=1)
        if session_id is None:
            session_id = os.urandom(SID_SIZE)
        if len(session_id) != SID_SIZE or session_id == bytes(SID_SIZE):
            raise ValueError("a session id is 8 bytes, not all zero")
        self.wrap = wrap
        self.ciphers = ciphers
        self.iv_proto = iv_proto
        self.options_string = options
        self.peer_info = peer_info(ciphers, iv_proto)
        self.reneg_seconds = reneg_seconds
        self.hand_window = hand_window
        self.tran_window = tran_window
        self.exit_notify = max(1, exit_notify)
        self.session_id = session_id
        self.server_session_id: bytes | None = None
        self.drops: dict[str, int] = {}
        self.stats: dict[str, int] = {}
        self.last_error: BaseException | None = None  # of an "internal_error" drop
        self.server_options: str | None = None  # the options string of key method 2

        self._tls_context = TlsContext(ca_pem, cert_pem, key_pem, server=False)
        self._verify = _server_cert_ok if verify_server_eku else None
        # the control packet id of tls-crypt/tls-auth: from 1, time fixed at the first
        # send (packet_id.c packet_id_send_update)
        self._wrap_pid = 0
        self._net_time = (int(now) if net_time is None else int(net_time)) & 0xFFFFFFFF
        self._replay = ReplayWindow() if self._wrapper.replay_protected else None
        # ssl.c write_outgoing_tls_ciphertext / calc_control_channel_frame_overhead
        overhead = (1 + SID_SIZE + 1 + PACKET_ID_SIZE * CONTROL_SEND_ACK_MAX + SID_SIZE
                    + PACKET_ID_SIZE + self._wrapper.overhead + _DATAGRAM_OVERHEAD)
        self.tls_chunk = max(16, tls_mtu - overhead)

        self._primary = self._new_key_state(0, P_CONTROL_HARD_RESET_CLIENT_V2, now)
        self._lame: _KeyState | None = None
        self._next_key = _next_key_id(0)

        self._push = _Push()
        self._push_options: dict[str, str] = {}
        self._push_request_at: float | None = None
        self._push_deadline: float | None = None
        self.connected: Connected | None = None
        self.cipher: str | None = None
        self.peer_id: int | None = None
        self.ekm = False
        self.cc_exit = False
        self.ping: float | None = None
        self.ping_restart: float | None = None
        self.tun_mtu = DEFAULT_TUN_MTU
        self._last_data_sent = now
        self._last_received = now

        self._closing: str | None = None  # "exit" (EXIT control message) or "occ"
        self._closing_at: float | None = None  # the deadline, or the next OCC_EXIT
        self._occ_left = 0
        self.closed: Closed | None = None

        self._datagrams: list[bytes] = []
        self._events: deque[Event] = deque()

    # --- public sans-I/O interface ------------------------------------------------

    @property
    def key_id(self) -> int:
        """The key id of the primary (newest) key state."""
        return self._primary.key_id

    @property
    def send_key_id(self) -> int | None:
        """The key id data is sent with now (None: not connected)."""
        ks = self._send_key()
        return None if ks is None else ks.key_id

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Process one UDP payload from the server. Never raises for bad input."""
        if self.closed is not None:
            self._drop("closed")
            return
        try:
            data = bytes(data)
            if not data:
                raise WireError("short", "empty datagram")
            opcode, _ = opcode_key_id(data[0])
            if opcode in (P_DATA_V1, P_DATA_V2):
                self._receive_data(data, now)
            else:
                self._receive_control(data, now)
        except (WireError, KeyMethodError) as e:
            self._drop(e.reason)
        except Exception as e:  # a bug must not take the caller's loop down
            self.last_error = e
            self._drop("internal_error")

    def send_data(self, packet: bytes, now: float) -> bool:
        """Seal one inner IP packet for the server; False (and a drop) if it cannot go."""
        packet = bytes(packet)
        if self.closed is not None or self._closing is not None:
            self._drop("closed")
            return False
        if not packet:
            self._drop("empty")
            return False
        if len(packet) > max(self.tun_mtu, DEFAULT_TUN_MTU):
            self._drop("too_long")
            return False
        if self.connected is None:
            self._drop("not_connected")
            return False
        return self._send_payload(packet, now)

    def renegotiate(self, now: float) -> bool:
        """Start a soft reset (P_CONTROL_SOFT_RESET_V1 on the next key id). False if the
        current key is not yet usable (ssl.c tls_pre_decrypt: a peer accepts a soft
        reset only once the previous key has data keys) or the session is over."""
        if self.closed is not None or self._closing is not None:
            return False
        if self._primary.data is None or self.connected is None:
            return False
        self._soft_reset(now, by_server=False)
        return True

    def close(self, now: float) -> None:
        """Leave: EXIT over the control channel if cc-exit was pushed, else
        `exit_notify` OCC_EXIT data packets a second apart; Closed("exit") follows."""
        if self.closed is not None or self._closing is not None:
            return
        if self.connected is None or self._send_key() is None:
            self._close("closed")
            return
        if self.cc_exit:
            self._closing = "exit"
            self._closing_at = now + EXIT_WAIT
            self._send_control(self._primary, b"EXIT")
            self._advance(self._primary, now)
        else:
            self._closing = "occ"
            self._occ_left = self.exit_notify
            self._send_occ_exit(now)

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called, None if nothing is armed."""
        if self.closed is not None:
            return None
        times: list[float] = []
        ks = self._primary
        t = ks.send.next_timer()
        if t is not None:
            times.append(t)
        for k in (ks, self._lame):
            if k is None:
                continue
            if k.must_negotiate is not None:
                times.append(k.must_negotiate)
            if k.must_die is not None:
                times.append(k.must_die)
        if ks.established is not None and self.reneg_seconds and ks.data is not None:
            times.append(ks.established + self.reneg_seconds)
        for t2 in (self._push_request_at, self._push_deadline, self._closing_at):
            if t2 is not None:
                times.append(t2)
        if self.connected is not None and self._closing is None:
            if self.ping:
                times.append(self._last_data_sent + self.ping)
        restart = self._ping_restart_at()
        if restart is not None:
            times.append(restart)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run every timer due at `now`; retransmissions go out with the next
        `datagrams_to_send`."""
        if self.closed is not None:
            return
        try:
            self._handle_timer(now)
        except Exception as e:  # pragma: no cover - a bug; keep the caller alive
            self.last_error = e
            self._drop("internal_error")

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """UDP payloads to send to the server, in order; empties the queue."""
        if self.closed is None:
            try:
                self._advance(self._primary, now)
                self._flush_control(self._primary, now)
            except Exception as e:  # pragma: no cover - a bug; keep the caller alive
                self.last_error = e
                self._drop("internal_error")
        out, self._datagrams = self._datagrams, []
        return out

    # --- bookkeeping --------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _close(self, reason: str, detail: str = "") -> None:
        if self.closed is None:
            self.closed = Closed(reason, detail)
            self._events.append(self.closed)

    def _new_key_state(self, key_id: int, opcode: int, now: float) -> _KeyState:
        tls = TlsClient.with_context(self._tls_context, self._verify)
        return _KeyState(key_id, opcode, tls, now, self.hand_window)

    def _send_key(self) -> _KeyState | None:
        """ssl.c tls_select_encryption_key: the primary once active with keys, else
        the lame duck."""
        for ks in (self._primary, self._lame):
            if ks is not None and ks.data is not None and ks.state >= _ACTIVE:
                return ks
        return None

    def _ping_restart_at(self) -> float | None:
        if self._closing is not None:
            return None
        if self.connected is not None:
            return self._last_received + self.ping_restart if self.ping_restart else None
        if self._primary.state >= _ACTIVE:  # ping.h PRE_PULL_INITIAL_PING_RESTART
            return self._last_received + PRE_PULL_INITIAL_PING_RESTART
        return None

    # --- timers -------------------------------------------------------------------

    def _handle_timer(self, now: float) -> None:
        ks = self._primary
        if ks.must_negotiate is not None and now >= ks.must_negotiate:
            # ssl.c tls_process_state: "TLS key negotiation failed to occur within ..."
            self._close("handshake-timeout" if ks.key_id == 0 else "renegotiation-timeout",
                        f"key id {ks.key_id} not active after {self.hand_window:g} s")
            return
        lame = self._lame
        if lame is not None and lame.must_die is not None and now >= lame.must_die:
            self._lame = None  # ssl.c lame_duck_must_die
        if self._closing == "exit" and self._closing_at is not None and now >= self._closing_at:
            self._close("exit", "EXIT not acked")
            return
        if self._closing == "occ" and self._closing_at is not None and now >= self._closing_at:
            self._send_occ_exit(now)
            return
        restart = self._ping_restart_at()
        if restart is not None and now >= restart:
            self._close("ping-restart", f"nothing from the server for {now - self._last_received:g} s")
            return
        if self._push_deadline is not None and now >= self._push_deadline:
            self._close("no-push-reply")  # push.c send_push_request
            return
        if self._push_request_at is not None and now >= self._push_request_at:
            self._send_control(ks, b"PUSH_REQUEST")
            self._push_request_at = now + PUSH_REQUEST_INTERVAL
        if (self.reneg_seconds and ks.established is not None and ks.data is not None
                and now >= ks.established + self.reneg_seconds and self._closing is None):
            self._soft_reset(now, by_server=False)  # ssl.c tls_process: renegotiate_seconds
        if (self.connected is not None and self._closing is None and self.ping
                and now >= self._last_data_sent + self.ping):
            self._send_payload(PING_STRING, now)  # ping.c check_ping_send_dowork
            self._count("pings_sent")

    # --- control channel: receive -------------------------------------------------

    def _receive_control(self, data: bytes, now: float) -> None:
        opcode, key_id = opcode_key_id(data[0])
        if opcode in _CLIENT_OPCODES:
            raise WireError("client_opcode", "client->client connection attempted")
        raw, pid, net_time = self._wrapper.unwrap(data)
        if self._replay is not None and not self._replay.check(pid, net_time, now):
            raise WireError("replay", f"control packet id {pid}")
        pkt = ControlPacket.unpack(raw)
        if self.server_session_id is None:
            if pkt.opcode != P_CONTROL_HARD_RESET_SERVER_V2:
                raise WireError("no_session", f"opcode {pkt.opcode} before the server reset")
            if not pkt.acks:
                raise WireError("bad_ack", "server reset without an ack of ours")
        elif pkt.session_id != self.server_session_id:
            raise WireError("wrong_session", "control packet of another session")
        if pkt.acks and pkt.remote_session_id != self.session_id:
            # reliable.c reliable_ack_read: "ACK read BAD SESSION-ID FROM REMOTE"
            raise WireError("bad_ack_session", "acks for another session")
        ks = self._primary
        if pkt.opcode == P_CONTROL_SOFT_RESET_V1 and key_id != ks.key_id:
            # ssl.c tls_pre_decrypt: the server asks for a renegotiation, accepted once
            # the current key has data keys and only on the key id we would pick too
            if ks.data is None or key_id != self._next_key or self._closing is not None:
                raise WireError("bad_soft_reset", f"soft reset to key id {key_id}")
            self._soft_reset(now, by_server=True)
            ks = self._primary
        elif key_id != ks.key_id:
            # ssl.c tls_pre_decrypt: "local/remote key IDs out of sync"
            raise WireError("bad_key_id", f"key id {key_id}, ours {ks.key_id}")
        if self._replay is not None:
            self._replay.add(pid, net_time, now)
        if self.server_session_id is None:
            self.server_session_id = pkt.session_id
        self._last_received = now
        ks.send.on_acks(pkt.acks)
        if pkt.opcode != P_ACK_V1:
            assert pkt.message_id is not None
            payload = b"" if pkt.opcode in _RESET_OPCODES else pkt.payload
            if not ks.recv.on_packet(pkt.message_id, payload):
                self._count("control_not_stored")
        self._advance(ks, now)

    # --- control channel: the key state machine -----------------------------------

    def _advance(self, ks: _KeyState, now: float) -> None:
        """ssl.c tls_process_state for the primary key state: reset acked -> key method
        2 written; TLS in and out; the server's key method 2 and control messages."""
        if self.closed is not None or ks is not self._primary:
            return
        try:
            self._advance_tls(ks, now)
        except TlsError as e:
            self._drop(f"tls_{e.reason}")
            self._close(f"tls: {e.reason}", e.detail)
        except KeyMethodError as e:
            self._drop(f"km2_{e.reason}")
            self._close(f"key-method: {e.reason}", str(e))

    def _advance_tls(self, ks: _KeyState, now: float) -> None:
        if ks.state == _PRE_START and ks.send.acked(0):
            ks.state = _START  # our reset is acked (S_START)
        if ks.state == _START:
            # ssl.c key_method_2_write; held by TlsClient until the handshake is done
            ks.tls.write(km.build_client(ks.source, self.options_string,
                                         peer_info=self.peer_info))
            ks.state = _SENT_KEY
        for payload in ks.recv.read():
            if payload:
                ks.tls.feed(payload)
        if ks.tls.handshake_done:
            for record in ks.tls.read_records():
                self._on_plaintext(ks, record, now)
                if self.closed is not None or ks is not self._primary:
                    return
        self._pull(ks)
        if ks.state == _GOT_KEY and ks.send.all_acked and not ks.tls_out:
            self._on_active(ks, now)
        if (self._closing == "exit" and ks.state >= _ACTIVE and not ks.paybuf
                and not ks.tls_out and ks.send.all_acked):
            self._close("exit")

    def _pull(self, ks: _KeyState) -> None:
        """TLS ciphertext into the send window in tls_chunk pieces (ssl.c
        write_outgoing_tls_ciphertext), once our reset is acked (S_START)."""
        if ks.state < _START:
            return
        ks.tls_out += ks.tls.pull()
        while ks.tls_out and ks.send.available > 0:
            chunk = bytes(ks.tls_out[:self.tls_chunk])
            del ks.tls_out[:self.tls_chunk]
            ks.send.queue(chunk, P_CONTROL_V1)

    def _on_plaintext(self, ks: _KeyState, record: bytes, now: float) -> None:
        if ks.state == _SENT_KEY:
            # ssl.c key_method_2_read: one plaintext buffer holds the server's message
            ks.server_msg = km.parse_server(record)
            self.server_options = ks.server_msg.options
            ks.state = _GOT_KEY
            if ks.key_id != 0 or self._push.done:
                self._derive(ks)
            return
        if ks.state < _GOT_KEY:
            self._drop("early_plaintext")
            return
        # forward.c check_incoming_control_channel: NUL-terminated messages
        for raw in record.split(b"\x00"):
            if raw:
                self._on_control_message(raw.decode("utf-8", "replace"), now)
                if self.closed is not None:
                    return

    def _on_active(self, ks: _KeyState, now: float) -> None:
        """ssl.c session_move_active: everything we sent on this key is acked."""
        ks.state = _ACTIVE
        ks.must_negotiate = None
        ks.established = now
        for message in ks.paybuf:  # ssl.c flush_payload_buffer
            ks.tls.write(message)
        ks.paybuf.clear()
        self._pull(ks)
        if ks.key_id == 0:
            if not self._push.done:
                # forward.c check_connection_established: PUSH_REQUEST right away
                self._send_control(ks, b"PUSH_REQUEST")
                self._push_request_at = now + PUSH_REQUEST_INTERVAL
                self._push_deadline = now + self.hand_window
            self._maybe_connected(now)
        elif ks.data is not None:
            self._events.append(Renegotiated(ks.key_id, ks.initiated_by_server))

    def _send_control(self, ks: _KeyState, text: bytes) -> None:
        """A NUL-terminated control message (ssl.c tls_send_payload: held in paybuf
        until the key state is active)."""
        message = text + b"\x00"
        if ks.state < _ACTIVE:
            ks.paybuf.append(message)
            return
        try:
            ks.tls.write(message)
            self._pull(ks)
        except TlsError as e:
            self._drop(f"tls_{e.reason}")
            self._close(f"tls: {e.reason}", e.detail)

    def _soft_reset(self, now: float, by_server: bool) -> None:
        """ssl.c key_state_soft_reset: the primary becomes the lame duck (kept for
        --tran-window), a fresh key state on the next key id starts with its own
        P_CONTROL_SOFT_RESET_V1 (message 0)."""
        old = self._primary
        old.must_die = now + self.tran_window
        old.must_negotiate = None
        new = self._new_key_state(self._next_key, P_CONTROL_SOFT_RESET_V1, now)
        new.initiated_by_server = by_server
        self._next_key = _next_key_id(self._next_key)
        self._lame = old
        self._primary = new
        self._count("renegotiations")

    # --- PUSH_REPLY ---------------------------------------------------------------

    def _on_control_message(self, text: str, now: float) -> None:
        # forward.c parse_incoming_control_channel_command
        if text.startswith("PUSH_REPLY"):
            self._on_push_reply(text[len("PUSH_REPLY"):], now)
        elif text.startswith("AUTH_FAILED"):
            self._close("auth-failed", text)
        elif text.startswith("RESTART"):
            self._close("server-restart", text)
        elif text.startswith("HALT"):
            self._close("server-halt", text)
        elif text.startswith("EXIT"):
            self._close("server-exit", text)
        else:
            self._events.append(ControlMessage(text))

    def _on_push_reply(self, body: str, now: float) -> None:
        if self._push.done:
            self._count("push_reply_again")  # an answer to a repeated PUSH_REQUEST
            return
        # push.c process_incoming_push_reply: "PUSH_REPLY," then options split on ','
        if not body.startswith(","):
            self._drop("bad_push_reply")
            return
        parts = [p.strip() for p in body[1:].split(",")]
        parts = [p for p in parts if p]
        continuation = 0
        for p in parts:
            if p.startswith("push-continuation "):
                try:
                    continuation = int(p.split()[1])
                except (ValueError, IndexError):
                    continuation = 0
        self._push.parts.extend(p for p in parts if not p.startswith("push-continuation"))
        if continuation == 2:
            return  # more to come
        self._push.done = True
        self._push_request_at = None
        self._push_deadline = None
        error = self._apply_push(self._push.parts)
        if error:
            self._close("push", error)
            return
        ks0 = self._primary if self._primary.key_id == 0 else None
        if ks0 is not None and ks0.state >= _GOT_KEY:
            self._derive(ks0)
        self._maybe_connected(now)

    def _apply_push(self, parts: list[str]) -> str:
        """Apply the pushed options; a non-empty result says what is unacceptable."""
        opts: dict[str, str] = {}
        for p in parts:
            word, _, rest = p.partition(" ")
            opts[word] = rest.strip()
        cipher = opts.get("cipher")
        if cipher is None:
            # ssl_ncp.c check_pull_client_ncp: "failed to negotiate cipher with server"
            return "no cipher pushed"
        if cipher not in self.ciphers:
            return f"cipher {cipher} was not offered"
        self.cipher = cipher
        if "peer-id" in opts:
            try:
                peer_id = int(opts["peer-id"])
            except ValueError:
                return f"bad peer-id {opts['peer-id']!r}"
            if not 0 <= peer_id < MAX_PEER_ID:
                return f"peer-id {peer_id} out of range"
            self.peer_id = peer_id
        flags = opts.get("protocol-flags", "").split()
        for flag in flags:
            if flag not in ("cc-exit", "tls-ekm"):
                # dyn-tls-crypt would change the control channel key (not offered)
                return f"protocol-flags {flag} not supported"
        self.cc_exit = "cc-exit" in flags
        self.ekm = "tls-ekm" in flags or opts.get("key-derivation") == "tls-ekm"
        for name in ("ping", "ping-restart", "tun-mtu"):
            if name in opts:
                try:
                    value = int(opts[name])
                except ValueError:
                    return f"bad {name} {opts[name]!r}"
                if value < 0 or (name == "tun-mtu" and not 68 <= value <= 65535):
                    return f"bad {name} {value}"
                if name == "ping":
                    self.ping = float(value) or None
                elif name == "ping-restart":
                    self.ping_restart = float(value) or None
                else:
                    self.tun_mtu = value
        for name in ("comp-lzo", "compress"):
            if name in opts:
                return f"{name} is not supported (no compression framing)"
        if "ifconfig" in opts:
            words = opts["ifconfig"].split()
            try:
                if len(words) != 2:
                    raise ValueError(opts["ifconfig"])
                for w in words:
                    ipaddress.IPv4Address(w)
            except ValueError:
                return f"bad ifconfig {opts['ifconfig']!r}"
        if "ifconfig-ipv6" in opts:
            words = opts["ifconfig-ipv6"].split()
            try:
                if len(words) != 2:
                    raise ValueError(opts["ifconfig-ipv6"])
                ipaddress.IPv6Interface(words[0])
                ipaddress.IPv6Address(words[1])
            except ValueError:
                return f"bad ifconfig-ipv6 {opts['ifconfig-ipv6']!r}"
        self._push_options = opts
        return ""

    def _derive(self, ks: _KeyState) -> None:
        """ssl.c generate_key_expansion: key2 by tls-ekm or the TLS1-PRF, then the
        client's half (KEY_DIRECTION_NORMAL, ssl.c init_key_contexts)."""
        if ks.data is not None or self.cipher is None or ks.server_msg is None:
            return
        assert self.server_session_id is not None
        if self.ekm:
            key2 = km.key_expansion_ekm(ks.tls)
        else:
            key2 = km.key_expansion_prf(ks.source, ks.server_msg.source, self.session_id,
                                        self.server_session_id)
        ks.data = _DataChannel(self.cipher, km.data_keys(key2, self.cipher, server=False))

    def _maybe_connected(self, now: float) -> None:
        ks = self._primary
        if (self.connected is not None or ks.key_id != 0 or ks.state < _ACTIVE
                or ks.data is None or not self._push.done or self.closed is not None):
            return
        opts = self._push_options
        ifc = opts.get("ifconfig", "").split()
        ifc6 = opts.get("ifconfig-ipv6", "").split()
        self.connected = Connected(
            pushed=tuple(self._push.parts),
            options=dict(opts),
            ifconfig=(ifc[0], ifc[1]) if len(ifc) == 2 else None,
            ifconfig_ipv6=(ifc6[0], ifc6[1]) if len(ifc6) == 2 else None,
            peer_id=self.peer_id,
            cipher=self.cipher or "",
            key_derivation="tls-ekm" if self.ekm else "prf",
            topology=opts.get("topology"),
            ping=self.ping,
            ping_restart=self.ping_restart,
            cc_exit=self.cc_exit,
        )
        self._last_received = max(self._last_received, now)
        self._last_data_sent = now
        self._events.append(self.connected)

    # --- control channel: send ----------------------------------------------------

    def _ack_max(self) -> int:
        """Acks in a P_ACK_V1: RELIABLE_ACK_SIZE, but 4 for a client without wrapping
        whose keys do not come from tls-ekm (ssl_pkt.c write_control_auth, the
        SoftEther workaround)."""
        if self.wrap == "none" and not self.ekm:
            return SOFTETHER_ACK_MAX
        return RELIABLE_ACK_SIZE

    def _flush_control(self, ks: _KeyState, now: float) -> None:
        """reliable.c reliable_send for what is due, acks piggy-backed (at most
        CONTROL_SEND_ACK_MAX), then a P_ACK_V1 for acks still pending (ssl.c tls_process)."""
        if self.closed is not None:
            return
        for message_id, payload in ks.send.due(now):
            acks = ks.recv.acks_to_send(CONTROL_SEND_ACK_MAX) if self.server_session_id else []
            self._emit(ControlPacket(
                ks.send.opcode(message_id), ks.key_id, self.session_id, tuple(acks),
                self.server_session_id if acks else None, message_id, payload))
        while ks.recv.has_pending_acks and self.server_session_id is not None:
            acks = ks.recv.acks_to_send(self._ack_max())
            self._emit(ControlPacket(P_ACK_V1, ks.key_id, self.session_id, tuple(acks),
                                     self.server_session_id))

    def _emit(self, pkt: ControlPacket) -> None:
        self._wrap_pid += 1
        self._datagrams.append(self._wrapper.wrap(pkt.pack(), self._wrap_pid, self._net_time))

    # --- data channel -------------------------------------------------------------

    def _send_payload(self, payload: bytes, now: float) -> bool:
        ks = self._send_key()
        if ks is None or ks.data is None:
            self._drop("no_key")
            return False
        if self._primary.recv.has_pending_acks:
            # acks first: the server uses a new key id only once it saw our ack of its
            # key method 2 message (ssl.c tls_process_state "Wait for ACK")
            self._flush_control(self._primary, now)
        self._datagrams.append(ks.data.seal(ks.key_id, self.peer_id, payload))
        self._last_data_sent = now
        if (ks.data.send_pid >= PACKET_ID_WRAP_TRIGGER and ks is self._primary
                and self._closing is None):
            self._soft_reset(now, by_server=False)  # packet_id_close_to_wrapping
        return True

    def _send_occ_exit(self, now: float) -> None:
        self._send_payload(OCC_MAGIC + bytes([OCC_EXIT]), now)
        self._occ_left -= 1
        if self._occ_left <= 0:
            self._close("exit")
        else:
            self._closing_at = now + OCC_EXIT_INTERVAL

    def _receive_data(self, data: bytes, now: float) -> None:
        opcode, key_id, _peer_id, packet_id = parse_data(data)
        ks = next((k for k in (self._primary, self._lame)
                   if k is not None and k.key_id == key_id and k.data is not None), None)
        if ks is None or ks.data is None:
            raise WireError("no_key", f"no data key for key id {key_id}")
        dc = ks.data
        if not dc.replay.check(packet_id, 0, now):
            raise WireError("replay", f"data packet id {packet_id}")
        try:
            plain = dc.open(data, opcode, packet_id)
        except InvalidTag:
            raise WireError("decrypt") from None
        dc.replay.add(packet_id, 0, now)
        self._last_received = now
        if plain == PING_STRING:  # ping.c: a keepalive
            self._count("pings_received")
            return
        if plain[:len(OCC_MAGIC)] == OCC_MAGIC:  # occ.c: not for the tunnel
            self._count("occ_received")
            return
        if not plain:
            self._drop("empty")
            return
        self._events.append(Data(plain, key_id))
