"""The sans-I/O OpenVPN 2.6 client (fabric.protocols.openvpn.client).

In memory, against a small fake server built from the protocol modules: timers and
retransmits, PUSH_REQUEST repeats, renegotiation (ours and the server's), close,
and hypothesis fuzzing of receive_datagram. Then against a real OpenVPN 2.6 server
(Debian's /usr/sbin/openvpn) in a network namespace of its own: connect, ICMP echo
through the server's tun with each data cipher, tls-ekm and the legacy PRF, both
kinds of renegotiation, and an exit the server logs.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.protocols.openvpn import keys as km
from fabric.protocols.openvpn import pki
from fabric.protocols.openvpn.client import (
    DEFAULT_IV_PROTO,
    Closed,
    Connected,
    ControlMessage,
    Data,
    Event,
    OvpnClient,
    Renegotiated,
)
from fabric.protocols.openvpn.constants import (
    OCC_EXIT,
    OCC_MAGIC,
    P_ACK_V1,
    P_CONTROL_HARD_RESET_CLIENT_V2,
    P_CONTROL_HARD_RESET_SERVER_V2,
    P_CONTROL_SOFT_RESET_V1,
    P_CONTROL_V1,
    P_DATA_V1,
    P_DATA_V2,
    PING_STRING,
)
from fabric.protocols.openvpn.tls import TlsServer
from fabric.protocols.openvpn.wire import ControlPacket, data_v1_header, data_v2_header, parse_data
from fabric.protocols.openvpn.wrap import NoWrap, TlsAuth, TlsCrypt, format_static_key

OPENVPN = shutil.which("openvpn")
IP = shutil.which("ip")


@dataclass
class Pki:
    ca: bytes
    ca_key: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    static_key: bytes


@pytest.fixture(scope="module")
def p() -> Pki:
    ca, ca_key = pki.make_ca("fovc test CA")
    sc, sk = pki.make_server_cert(ca, ca_key, "server")
    cc, ck = pki.make_client_cert(ca, ca_key, "client1")
    return Pki(ca, ca_key, sc, sk, cc, ck, pki.new_static_key())


# --- an in-memory server ---------------------------------------------------------------

PUSH = ("PUSH_REPLY,route-gateway 198.18.211.1,topology subnet,ping 10,ping-restart 60,"
        "ifconfig 198.18.211.2 255.255.255.0,peer-id 7,cipher {cipher},"
        "protocol-flags cc-exit tls-ekm,tun-mtu 1500")


@dataclass
class _FKey:
    key_id: int
    tls: TlsServer
    source: km.KeySource = field(default_factory=km.KeySource.new_server)
    next_mid: int = 0
    expect: int = 0
    held: dict[int, bytes] = field(default_factory=dict)
    acks: list[int] = field(default_factory=list)
    client_msg: km.KeyMethod2Message | None = None
    seal: Any = None
    open: Any = None
    seal_iv: bytes = b""
    open_iv: bytes = b""
    send_pid: int = 0


class FakeServer:
    """Just enough of a 2.6 server for unit tests: answers resets, runs TLS and key
    method 2, pushes right away (IV_PROTO_REQUEST_PUSH), acks everything, never
    retransmits, and records what the client sent."""

    def __init__(self, p: Pki, wrap: str = "tls-crypt", cipher: str = "AES-256-GCM",
                 push: str | None = None, auto_push: bool = True, answer_push: bool = True) -> None:
        self.p = p
        self.wrapper: TlsCrypt | TlsAuth | NoWrap
        if wrap == "tls-crypt":
            self.wrapper = TlsCrypt(p.static_key, server=True)
        elif wrap == "tls-auth":
            self.wrapper = TlsAuth(p.static_key, direction=0)
        else:
            self.wrapper = NoWrap()
        self.cipher = cipher
        self.push = (push if push is not None else PUSH).format(cipher=cipher)
        self.ekm = "tls-ekm" in self.push
        self.auto_push = auto_push
        self.answer_push = answer_push
        self.sid = os.urandom(8)
        self.client_sid: bytes | None = None
        self.wrap_pid = 0
        self.keys: dict[int, _FKey] = {}
        self.primary: int | None = None
        self.out: list[bytes] = []
        self.control: list[str] = []
        self.data: list[tuple[int, bytes]] = []
        self.received: list[ControlPacket] = []
        self.pings = 0
        self.occ_exits = 0

    # control channel
    def _send(self, fk: _FKey, opcode: int, payload: bytes = b"") -> None:
        acks = tuple(fk.acks[:4])
        del fk.acks[:4]
        mid = None if opcode == P_ACK_V1 else fk.next_mid
        if mid is not None:
            fk.next_mid += 1
        pkt = ControlPacket(opcode, fk.key_id, self.sid, acks,
                            self.client_sid if acks else None, mid, payload)
        self.wrap_pid += 1
        self.out.append(self.wrapper.wrap(pkt.pack(), self.wrap_pid, 1000))

    def _new_key(self, key_id: int) -> _FKey:
        fk = _FKey(key_id, TlsServer(self.p.ca, self.p.server_cert, self.p.server_key))
        self.keys[key_id] = fk
        self.primary = key_id
        return fk

    def soft_reset(self, key_id: int) -> None:
        """Start a renegotiation ourselves."""
        fk = self._new_key(key_id)
        self._send(fk, P_CONTROL_SOFT_RESET_V1)

    def write(self, key_id: int, text: str) -> None:
        fk = self.keys[key_id]
        fk.tls.write(text.encode() + b"\x00")
        self._flush(fk)

    def receive(self, data: bytes) -> None:
        if data[0] >> 3 in (P_DATA_V1, P_DATA_V2):
            self._receive_data(data)
            return
        raw, _, _ = self.wrapper.unwrap(data)
        pkt = ControlPacket.unpack(raw)
        self.received.append(pkt)
        fk = self.keys.get(pkt.key_id)
        if pkt.opcode == P_CONTROL_HARD_RESET_CLIENT_V2 and fk is None:
            self.client_sid = pkt.session_id
            fk = self._new_key(0)
            fk.acks.append(0)
            fk.expect = 1
            self._send(fk, P_CONTROL_HARD_RESET_SERVER_V2)
            return
        if pkt.opcode == P_CONTROL_SOFT_RESET_V1 and pkt.key_id != self.primary:
            fk = self._new_key(pkt.key_id)
            fk.acks.append(0)
            fk.expect = 1
            self._send(fk, P_CONTROL_SOFT_RESET_V1)
            return
        assert fk is not None, pkt
        if pkt.message_id is not None:
            fk.acks.append(pkt.message_id)
            if pkt.message_id >= fk.expect:
                fk.held[pkt.message_id] = pkt.payload if pkt.opcode == P_CONTROL_V1 else b""
            while fk.expect in fk.held:
                chunk = fk.held.pop(fk.expect)
                fk.expect += 1
                if chunk:
                    fk.tls.feed(chunk)
        if fk.tls.handshake_done:
            for rec in fk.tls.read_records():
                self._plaintext(fk, rec)
        self._flush(fk)

    def _plaintext(self, fk: _FKey, rec: bytes) -> None:
        if fk.client_msg is None:
            fk.client_msg = km.parse_client(rec)
            fk.tls.write(km.build_server(fk.source, km.mirror_options(fk.client_msg.options)))
            if fk.key_id or self.auto_push:
                self._derive(fk)
            if fk.key_id == 0 and self.auto_push:
                fk.tls.write(self.push.encode() + b"\x00")
            return
        for raw in rec.split(b"\x00"):
            if raw:
                self.control.append(raw.decode())
                if raw == b"PUSH_REQUEST" and self.answer_push:
                    self._derive(fk)
                    fk.tls.write(self.push.encode() + b"\x00")

    def _flush(self, fk: _FKey) -> None:
        out = fk.tls.pull()
        for i in range(0, len(out), 1000):
            self._send(fk, P_CONTROL_V1, out[i:i + 1000])
        if fk.acks:
            self._send(fk, P_ACK_V1)

    def _derive(self, fk: _FKey) -> None:
        if fk.seal is not None or fk.client_msg is None:
            return
        assert self.client_sid is not None
        key2 = (km.key_expansion_ekm(fk.tls) if self.ekm else
                km.key_expansion_prf(fk.client_msg.source, fk.source, self.client_sid, self.sid))
        dk = km.data_keys(key2, self.cipher, server=True)
        aead = ChaCha20Poly1305 if self.cipher == "CHACHA20-POLY1305" else AESGCM
        fk.seal, fk.open = aead(dk.encrypt_key).encrypt, aead(dk.decrypt_key).decrypt
        fk.seal_iv, fk.open_iv = dk.encrypt_implicit_iv, dk.decrypt_implicit_iv

    # data channel
    def send_data(self, payload: bytes, key_id: int | None = None, v1: bool = False) -> bytes:
        if key_id is None:
            key_id = self.primary
        assert key_id is not None
        fk = self.keys[key_id]
        fk.send_pid += 1
        pid = struct.pack("!I", fk.send_pid)
        head = data_v1_header(key_id, fk.send_pid) if v1 else data_v2_header(key_id, 7, fk.send_pid)
        ct = fk.seal(pid + fk.seal_iv, payload, head[1:] if v1 else head)
        pkt = head + ct[-16:] + ct[:-16]
        self.out.append(pkt)
        return pkt

    def _receive_data(self, data: bytes) -> None:
        opcode, key_id, _, pid = parse_data(data)
        fk = self.keys[key_id]
        head = 8 if opcode == P_DATA_V2 else 5
        aad = data[:8] if opcode == P_DATA_V2 else data[1:5]
        plain = fk.open(struct.pack("!I", pid) + fk.open_iv, data[head + 16:] + data[head:head + 16], aad)
        if plain == PING_STRING:
            self.pings += 1
        elif plain == OCC_MAGIC + bytes([OCC_EXIT]):
            self.occ_exits += 1
        else:
            self.data.append((key_id, plain))

    def take(self) -> list[bytes]:
        out, self.out = self.out, []
        return out


def events(c: OvpnClient) -> list[Event]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def pump(c: OvpnClient, s: FakeServer, now: float,
         to_server: Callable[[bytes], bool] = lambda d: True,
         to_client: Callable[[bytes], bytes | None] = lambda d: d, rounds: int = 40) -> None:
    """Shuttle datagrams until both sides are quiet (`to_server` False drops one,
    `to_client` may replace or drop one)."""
    for _ in range(rounds):
        a = c.datagrams_to_send(now)
        for d in a:
            if to_server(d):
                s.receive(d)
        b = s.take()
        for d in b:
            m = to_client(d)
            if m is not None:
                c.receive_datagram(m, now)
        if not a and not b:
            return
    raise AssertionError("pump did not settle")


def new_client(p: Pki, now: float = 0.0, **kw: Any) -> OvpnClient:
    kw.setdefault("wrap", "tls-crypt")
    static = None if kw["wrap"] == "none" else p.static_key
    return OvpnClient(p.ca, p.client_cert, p.client_key, static, now=now, **kw)


def connected_pair(p: Pki, now: float = 0.0, **kw: Any) -> tuple[OvpnClient, FakeServer, Connected]:
    server_kw = {k: kw.pop(k) for k in ("push", "auto_push", "answer_push", "cipher") if k in kw}
    wrap = kw.pop("wrap", "tls-crypt")
    c = new_client(p, now, wrap=wrap, **kw)
    s = FakeServer(p, wrap=wrap, **server_kw)
    pump(c, s, now)
    evs = events(c)
    got = [e for e in evs if isinstance(e, Connected)]
    assert got, (evs, c.drops)
    return c, s, got[0]


def unwrap_client(s: FakeServer, d: bytes) -> ControlPacket:
    return ControlPacket.unpack(s.wrapper.unwrap(d)[0])


# --- in memory: the handshake and timers ---------------------------------------------


def test_hard_reset_and_retransmit_doubling(p: Pki) -> None:
    c = new_client(p, now=100.0, session_id=b"\x11" * 8)
    s = FakeServer(p)
    [d] = c.datagrams_to_send(100.0)
    raw, pid, net_time = s.wrapper.unwrap(d)
    assert (pid, net_time) == (1, 100)  # tls-crypt packet ids from 1, time fixed
    pkt = ControlPacket.unpack(raw)
    assert (pkt.opcode, pkt.key_id, pkt.message_id, pkt.acks) == (P_CONTROL_HARD_RESET_CLIENT_V2, 0, 0, ())
    assert pkt.session_id == b"\x11" * 8 and pkt.payload == b""
    # reliable.c: resent after --tls-timeout 2 s, then 4, 8, 16 s later
    sent_at = []
    now = 100.0
    for _ in range(200):
        t = c.get_timer()
        assert t is not None
        now = t
        c.handle_timer(now)
        for d in c.datagrams_to_send(now):
            raw, pid, net_time = s.wrapper.unwrap(d)
            assert net_time == 100
            assert ControlPacket.unpack(raw).message_id == 0
            sent_at.append(now)
        if c.closed:
            break
    assert sent_at == [102.0, 106.0, 114.0, 130.0]  # the next (162) is past the hand window
    assert c.closed == Closed("handshake-timeout", c.closed.detail if c.closed else "")
    assert c.get_timer() is None


def test_connect_in_memory_and_data(p: Pki) -> None:
    c, s, ev = connected_pair(p)
    assert ev.ifconfig == ("198.18.211.2", "255.255.255.0")
    assert (ev.peer_id, ev.cipher, ev.key_derivation, ev.topology) == (7, "AES-256-GCM", "tls-ekm", "subnet")
    assert (ev.ping, ev.ping_restart, ev.cc_exit) == (10.0, 60.0, True)
    assert "route-gateway 198.18.211.1" in ev.pushed
    # the client's key method 2 message
    msg = s.keys[0].client_msg
    assert msg is not None
    assert msg.options.startswith("V4,dev-type tun,") and msg.options.endswith("tls-client")
    assert msg.peer_info["IV_VER"] == "2.6.14" and msg.peer_info["IV_NCP"] == "2"
    assert msg.peer_info["IV_PROTO"] == str(DEFAULT_IV_PROTO)
    assert msg.peer_info["IV_CIPHERS"] == "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305"
    assert s.control == []  # the push came with the server's key method 2: no request needed
    # data both ways: P_DATA_V2 with the pushed peer-id, packet ids from 1
    assert c.send_data(b"\x45hello", 1.0)
    [d] = c.datagrams_to_send(1.0)
    assert parse_data(d) == (P_DATA_V2, 0, 7, 1)
    s.receive(d)
    assert s.data == [(0, b"\x45hello")]
    s.send_data(b"\x45back")
    s.send_data(PING_STRING)
    for d in s.take():
        c.receive_datagram(d, 1.0)
    assert events(c) == [Data(b"\x45back", 0)]
    assert c.stats["pings_received"] == 1
    # a replayed data packet is dropped
    pkt = s.send_data(b"\x45again")
    c.receive_datagram(pkt, 1.0)
    c.receive_datagram(pkt, 1.0)
    assert events(c) == [Data(b"\x45again", 0)] and c.drops["replay"] == 1


def test_ping_after_send_silence(p: Pki) -> None:
    c, s, _ = connected_pair(p, now=0.0)
    assert c.get_timer() == 10.0  # ping 10 was pushed
    c.handle_timer(9.9)
    assert c.datagrams_to_send(9.9) == []
    c.send_data(b"\x45x", 5.0)
    for d in c.datagrams_to_send(5.0):
        s.receive(d)
    assert c.get_timer() == 15.0  # sending data restarts the ping timer
    c.handle_timer(15.0)
    for d in c.datagrams_to_send(15.0):
        s.receive(d)
    assert s.pings == 1
    # ping-restart 60: nothing from the server for 60 s ends the session
    now = 15.0
    for _ in range(20):
        t = c.get_timer()
        assert t is not None
        now = t
        c.handle_timer(now)
        for d in c.datagrams_to_send(now):
            s.receive(d)
        if c.closed:
            break
    assert c.closed is not None and c.closed.reason == "ping-restart" and now == 60.0


def test_push_request_every_5s_then_no_push_reply(p: Pki) -> None:
    c = new_client(p)
    s = FakeServer(p, auto_push=False, answer_push=False)
    pump(c, s, 0.0)
    assert s.control == ["PUSH_REQUEST"] and c.connected is None
    now = 0.0
    for _ in range(40):
        t = c.get_timer()
        assert t is not None
        now = t
        c.handle_timer(now)
        pump(c, s, now)
        if c.closed:
            break
    # forward.c check_push_request: every PUSH_REQUEST_INTERVAL until hand-window
    assert len(s.control) == 12 and set(s.control) == {"PUSH_REQUEST"}
    assert c.closed is not None and c.closed.reason == "no-push-reply" and now == 60.0


def test_push_reply_after_request_and_prf(p: Pki) -> None:
    push = PUSH.replace(",protocol-flags cc-exit tls-ekm", "")
    c = new_client(p, iv_proto=DEFAULT_IV_PROTO & ~km.IV_PROTO_TLS_KEY_EXPORT)
    s = FakeServer(p, push=push, auto_push=False)
    pump(c, s, 0.0)
    [ev] = [e for e in events(c) if isinstance(e, Connected)]
    assert ev.key_derivation == "prf" and not ev.cc_exit
    assert c.send_data(b"\x45prf", 0.5)
    for d in c.datagrams_to_send(0.5):
        s.receive(d)
    assert s.data == [(0, b"\x45prf")]
    assert c.get_timer() != 5.0  # no more PUSH_REQUEST


def test_lost_tls_packet_is_retransmitted(p: Pki) -> None:
    c = new_client(p)
    s = FakeServer(p)
    lost: list[int] = []

    def to_server(d: bytes) -> bool:
        pkt = unwrap_client(s, d)
        if pkt.opcode == P_CONTROL_V1 and pkt.message_id == 2 and not lost:
            lost.append(pkt.message_id)
            return False
        return True

    pump(c, s, 0.0, to_server=to_server)
    assert lost == [2] and c.connected is None
    assert c.get_timer() == 2.0
    c.handle_timer(2.0)
    pump(c, s, 2.0)
    assert c.connected is not None and not c.drops


def test_duplicate_server_packets_are_acked_again(p: Pki) -> None:
    c = new_client(p)
    s = FakeServer(p)
    seen: list[bytes] = []

    def to_client(d: bytes) -> bytes:
        seen.append(d)
        return d

    pump(c, s, 0.0, to_client=to_client)
    assert c.connected is not None
    # a retransmitted control packet (new tls-crypt packet id, same message id)
    as_client = TlsCrypt(p.static_key, server=False)
    first = ControlPacket.unpack(as_client.unwrap(seen[0])[0])  # the server's reset
    s.wrap_pid += 1
    c.receive_datagram(s.wrapper.wrap(first.pack(), s.wrap_pid, 1000), 1.0)
    [d] = c.datagrams_to_send(1.0)
    ack = unwrap_client(s, d)
    assert ack.opcode == P_ACK_V1 and 0 in ack.acks and ack.remote_session_id == s.sid
    # the same datagram again is a tls-crypt replay
    c.receive_datagram(seen[1], 1.0)
    assert c.drops.get("replay") == 1


# --- in memory: renegotiation and close ---------------------------------------------


def test_client_renegotiation_in_memory(p: Pki) -> None:
    c, s, _ = connected_pair(p)
    key_ids = []
    now = 1.0
    for _ in range(8):
        old = c.send_key_id
        assert old is not None and c.renegotiate(now)
        [d] = c.datagrams_to_send(now)
        pkt = unwrap_client(s, d)
        assert (pkt.opcode, pkt.message_id, pkt.session_id) == (P_CONTROL_SOFT_RESET_V1, 0, c.session_id)
        assert c.send_key_id == old  # the old key sends until the new one is active
        s.receive(d)
        pump(c, s, now)
        [ev] = [e for e in events(c) if isinstance(e, Renegotiated)]
        assert not ev.initiated_by_server
        key_ids.append(ev.key_id)
        assert c.send_key_id == ev.key_id
        c.send_data(b"\x45new", now)
        for d in c.datagrams_to_send(now):
            s.receive(d)
        assert s.data[-1] == (ev.key_id, b"\x45new")
        # the lame duck still decrypts
        for d in [s.send_data(b"\x45old", key_id=old)]:
            c.receive_datagram(d, now)
        s.take()
        assert events(c) == [Data(b"\x45old", old)]
        now += 1.0
    assert key_ids == [1, 2, 3, 4, 5, 6, 7, 1]  # ssl.c key_state_init: wraps to 1
    assert not c.drops


def test_server_initiated_renegotiation_in_memory(p: Pki) -> None:
    c, s, _ = connected_pair(p)
    s.soft_reset(1)
    pump(c, s, 3.0)
    assert [e for e in events(c) if isinstance(e, Renegotiated)] == [Renegotiated(1, True)]
    # both ends sent their soft reset on key id 1
    assert any(r.opcode == P_CONTROL_SOFT_RESET_V1 and r.key_id == 1 for r in s.received)
    s.send_data(b"\x45k1")
    for d in s.take():
        c.receive_datagram(d, 3.0)
    assert events(c) == [Data(b"\x45k1", 1)]
    # a soft reset to a key id we would not pick is refused
    s.soft_reset(5)
    for d in s.take():
        c.receive_datagram(d, 3.0)
    assert c.drops == {"bad_soft_reset": 1}


def test_close_with_cc_exit(p: Pki) -> None:
    c, s, _ = connected_pair(p)
    c.close(1.0)
    pump(c, s, 1.0)
    assert s.control[-1] == "EXIT"
    assert events(c) == [Closed("exit")]
    assert not c.send_data(b"\x45late", 1.0) and c.get_timer() is None


def test_close_with_occ_exit(p: Pki) -> None:
    push = PUSH.replace("protocol-flags cc-exit tls-ekm", "key-derivation tls-ekm")
    c, s, ev = connected_pair(p, exit_notify=3, push=push)
    assert not ev.cc_exit and ev.key_derivation == "tls-ekm"
    c.close(1.0)
    times = []
    now = 1.0
    for _ in range(10):
        for d in c.datagrams_to_send(now):
            s.receive(d)
            times.append(now)
        if c.closed:
            break
        t = c.get_timer()
        assert t is not None
        now = t
        c.handle_timer(now)
    assert s.occ_exits == 3 and times == [1.0, 2.0, 3.0]
    assert c.closed == Closed("exit")


def test_data_v1_without_peer_id(p: Pki) -> None:
    c, s, ev = connected_pair(p, push=PUSH.replace(",peer-id 7", ""))
    assert ev.peer_id is None
    c.send_data(b"\x45v1", 1.0)
    [d] = c.datagrams_to_send(1.0)
    assert parse_data(d)[:3] == (P_DATA_V1, 0, None)
    s.receive(d)
    s.send_data(b"\x45v1back", v1=True)
    for d in s.take():
        c.receive_datagram(d, 1.0)
    assert events(c) == [Data(b"\x45v1back", 0)] and s.data == [(0, b"\x45v1")]


@pytest.mark.parametrize(("push", "reason"), [
    ("PUSH_REPLY,topology subnet,ifconfig 198.18.211.2 255.255.255.0", "no cipher pushed"),
    ("PUSH_REPLY,cipher BF-CBC", "cipher BF-CBC was not offered"),
    ("PUSH_REPLY,cipher AES-256-GCM,peer-id x", "bad peer-id 'x'"),
    ("PUSH_REPLY,cipher AES-256-GCM,ifconfig 198.18.211.999 255.255.255.0", "bad ifconfig"),
    ("PUSH_REPLY,cipher AES-256-GCM,protocol-flags dyn-tls-crypt", "dyn-tls-crypt"),
    ("PUSH_REPLY,cipher AES-256-GCM,compress lz4-v2", "compress"),
])
def test_bad_push_reply_closes(p: Pki, push: str, reason: str) -> None:
    c = new_client(p)
    s = FakeServer(p, push=push)
    pump(c, s, 0.0)
    evs = events(c)
    assert len(evs) == 1 and isinstance(evs[0], Closed) and evs[0].reason == "push"
    assert reason in evs[0].detail


def test_push_continuation_and_control_messages(p: Pki) -> None:
    c = new_client(p)
    s = FakeServer(p, push="PUSH_REPLY,topology subnet,ping 5,push-continuation 2", auto_push=True)
    pump(c, s, 0.0)
    assert c.connected is None
    s.write(0, "INFO,hello")
    s.write(0, "PUSH_REPLY,cipher AES-128-GCM,ifconfig 198.18.211.2 255.255.255.0,push-continuation 1")
    pump(c, s, 0.5)
    evs = events(c)
    assert evs[0] == ControlMessage("INFO,hello")
    ev = evs[1]
    assert isinstance(ev, Connected)
    assert ev.cipher == "AES-128-GCM" and ev.ping == 5.0 and ev.topology == "subnet"
    s.write(0, "RESTART,server going down")
    pump(c, s, 1.0)
    assert events(c) == [Closed("server-restart", "RESTART,server going down")]


@pytest.mark.parametrize("wrap", ["tls-auth", "none"])
def test_other_wraps_in_memory(p: Pki, wrap: str) -> None:
    c, s, ev = connected_pair(p, wrap=wrap)
    c.send_data(b"\x45w", 1.0)
    for d in c.datagrams_to_send(1.0):
        s.receive(d)
    assert s.data == [(0, b"\x45w")]


def test_softether_ack_cap_without_wrapping(p: Pki) -> None:
    """ssl_pkt.c write_control_auth: no wrapping and no tls-ekm: at most 4 acks."""
    push = PUSH.replace(" tls-ekm", "")
    c, s, _ = connected_pair(p, wrap="none", push=push)
    for i in range(6):
        s.write(0, f"INFO,{i}")
    for d in s.take():
        c.receive_datagram(d, 1.0)
    acks = [unwrap_client(s, d) for d in c.datagrams_to_send(1.0)]
    assert [a.opcode for a in acks] == [P_ACK_V1, P_ACK_V1]
    assert [len(a.acks) for a in acks] == [4, 4]  # the second repeats recent ones (MRU)
    last = s.keys[0].next_mid
    assert {i for a in acks for i in a.acks} == set(range(last - 6, last))
    assert len([e for e in events(c) if isinstance(e, ControlMessage)]) == 6


def test_wrong_session_and_foreign_acks_dropped(p: Pki) -> None:
    c, s, _ = connected_pair(p)
    other = ControlPacket(P_CONTROL_V1, 0, os.urandom(8), (), None, 50, b"x")
    s.wrap_pid += 1
    c.receive_datagram(s.wrapper.wrap(other.pack(), s.wrap_pid, 1000), 1.0)
    foreign = ControlPacket(P_ACK_V1, 0, s.sid, (1,), os.urandom(8))
    s.wrap_pid += 1
    c.receive_datagram(s.wrapper.wrap(foreign.pack(), s.wrap_pid, 1000), 1.0)
    c.receive_datagram(b"", 1.0)
    c.receive_datagram(bytes([P_DATA_V2 << 3 | 3]) + bytes(4) + b"\x01" + bytes(40), 1.0)
    assert c.drops == {"wrong_session": 1, "bad_ack_session": 1, "short": 1, "no_key": 1}


# --- fuzzing ------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_random_datagrams(p: Pki, datagrams: list[bytes]) -> None:
    c = new_client(p)
    c.datagrams_to_send(0.0)
    for d in datagrams:
        c.receive_datagram(d, 0.5)
    c.datagrams_to_send(0.5)
    assert "internal_error" not in c.drops, c.last_error
    assert c.server_session_id is None


@FUZZ
@given(wrap=st.sampled_from(["tls-crypt", "none"]), index=st.integers(0, 12),
       flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 1300)))
def test_fuzz_mutated_server_packets(p: Pki, wrap: str, index: int,
                                     flips: list[tuple[int, int]], cut: int | None) -> None:
    """One datagram of a real exchange (handshake, push, data) mutated in flight."""
    c = new_client(p, wrap=wrap)
    s = FakeServer(p, wrap=wrap)
    count = [0]

    def to_client(d: bytes) -> bytes | None:
        count[0] += 1
        if count[0] - 1 != index:
            return d
        m = bytearray(d if cut is None else d[:cut])
        for pos, x in flips:
            if m:
                m[pos % len(m)] ^= x
        return bytes(m)

    try:
        pump(c, s, 0.0, to_client=to_client)
    except Exception:  # noqa: BLE001 - the fake server may choke on what the client says next
        pass
    if c.connected is not None and c.closed is None:
        s.send_data(b"\x45data")
        for d in s.take():
            c.receive_datagram(bytes(to_client(d) or b""), 1.0)
    c.handle_timer(2.0)
    c.datagrams_to_send(2.0)
    assert "internal_error" not in c.drops, c.last_error


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.integers(0, 80)), junk=st.binary(max_size=64))
def test_fuzz_mutated_data_packets(p: Pki, flips: list[tuple[int, int]], cut: int | None,
                                   junk: bytes) -> None:
    c, s, _ = connected_pair(p)
    pkt = bytearray(s.send_data(b"\x45payload" * 4)[:cut] + junk)
    s.take()
    for pos, x in flips:
        if pkt:
            pkt[pos % len(pkt)] ^= x
    c.receive_datagram(bytes(pkt), 1.0)
    assert "internal_error" not in c.drops, c.last_error
    assert all(e.packet == b"\x45payload" * 4 for e in events(c) if isinstance(e, Data))


# --- the real OpenVPN 2.6 server -----------------------------------------------------

CLONE_NEWNET = 0x40000000
SERVER_PORT = 1194


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A namespace of our own (fovc-<random>) with lo up."""
    if OPENVPN is None or IP is None:
        pytest.skip("openvpn (Debian package) or ip not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    ns = f"fovc-{secrets.token_hex(4)}"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        # whatever still runs in it is ours (a server that outlived its test)
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=10).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)


def socket_in(ns: str) -> socket.socket:
    """A UDP socket created inside `ns`: setns in a throw-away thread (it only moves
    that thread), the socket stays in the namespace it was created in."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            box["sock"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    if "error" in box:
        raise box["error"]
    if "sock" not in box:
        raise AssertionError(f"no socket in {ns} after 10 s")
    sock: socket.socket = box["sock"]
    return sock


class RealServer:
    """`openvpn --server NET 255.255.255.0` in `ns`, on 127.0.0.1:1194, tls-crypt."""

    def __init__(self, ns: str, p: Pki, workdir: Path, net: str, cipher: str,
                 extra: tuple[str, ...] = ()) -> None:
        self.ns, self.net, self.log_path = ns, net, workdir / "server.log"
        files = {"ca.pem": p.ca, "server.pem": p.server_cert, "server.key": p.server_key,
                 "tc.key": format_static_key(p.static_key).encode()}
        for name, body in files.items():
            (workdir / name).write_bytes(body)
        (workdir / "server.key").chmod(0o600)
        argv = [IP or "ip", "netns", "exec", ns, OPENVPN or "openvpn",
                "--dev", "tun", "--proto", "udp", "--local", "127.0.0.1", "--port", str(SERVER_PORT),
                "--server", net, "255.255.255.0", "--topology", "subnet",
                "--ca", str(workdir / "ca.pem"), "--cert", str(workdir / "server.pem"),
                "--key", str(workdir / "server.key"), "--dh", "none",
                "--tls-crypt", str(workdir / "tc.key"), "--keepalive", "10", "60",
                "--data-ciphers", cipher, "--verb", "4", "--log", str(self.log_path), *extra]
        # `ip netns exec` execs openvpn: this pid is the server's
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.wait_log("Initialization Sequence Completed", 10.0)
        except BaseException:
            self.stop()
            raise

    @property
    def tunnel_ip(self) -> str:
        return self.net.rsplit(".", 1)[0] + ".1"

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            log = self.log
            if text in log:
                return log
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise AssertionError(f"server log has no {text!r} (rc={self.proc.poll()}):\n{self.log[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


@pytest.fixture
def real_server(netns: str, p: Pki, tmp_path: Path) -> Iterator[Callable[..., RealServer]]:
    started: list[RealServer] = []

    def start(net: str, cipher: str, extra: tuple[str, ...] = ()) -> RealServer:
        srv = RealServer(netns, p, tmp_path, net, cipher, extra)
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in started:
            srv.stop()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(src: str, dst: str, ident: int, seq: int, payload: bytes = b"fabric-ovpn") -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    return hdr + icmp


def is_echo_reply(pkt: bytes, src: str, ident: int, seq: int) -> bool:
    if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 1:
        return False
    ihl = (pkt[0] & 0x0F) * 4
    typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", pkt, ihl)
    return pkt[12:16] == socket.inet_aton(src) and (typ, rid, rseq) == (0, ident, seq)


class Driver:
    """The event loop: one UDP socket, one OvpnClient, bounded waits."""

    def __init__(self, sock: socket.socket, client: OvpnClient) -> None:
        self.sock, self.client = sock, client
        self.events: list[Event] = []

    def step(self, max_wait: float) -> None:
        c = self.client
        now = time.monotonic()
        for d in c.datagrams_to_send(now):
            self.sock.send(d)
        t = c.get_timer()
        wait = max_wait if t is None else min(max_wait, max(0.0, t - now))
        self.sock.settimeout(max(wait, 0.001))
        try:
            data = self.sock.recv(65535)
        except (TimeoutError, ConnectionRefusedError):
            data = None
        now = time.monotonic()
        if data is not None:
            c.receive_datagram(data, now)
        t = c.get_timer()
        if t is not None and now >= t:
            c.handle_timer(now)
        self.flush()

    def flush(self) -> None:
        """Send what is queued (also after Closed: the last OCC_EXIT) and take the events."""
        for d in self.client.datagrams_to_send(time.monotonic()):
            self.sock.send(d)
        while (e := self.client.next_event()) is not None:
            self.events.append(e)

    def until(self, pred: Callable[[Event], bool], timeout: float, what: str) -> Event:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        for _ in range(100000):
            self.flush()
            for e in self.events[seen:]:
                if pred(e):
                    return e
            seen = len(self.events)
            if time.monotonic() > deadline or self.client.closed is not None:
                break
            self.step(0.1)
        raise AssertionError(f"no {what} within {timeout} s: events {self.events[-5:]}, "
                             f"closed {self.client.closed}, drops {self.client.drops}")

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / 0.001) + 1):
            if time.monotonic() >= deadline or self.client.closed is not None:
                return
            self.step(max(0.001, deadline - time.monotonic()))

    def echo(self, src: str, dst: str, seq: int, timeout: float = 5.0) -> Data:
        ident = 0x4F56
        assert self.client.send_data(icmp_echo(src, dst, ident, seq), time.monotonic())
        e = self.until(lambda e: isinstance(e, Data) and is_echo_reply(e.packet, dst, ident, seq),
                       timeout, f"echo reply {seq} from {dst}")
        assert isinstance(e, Data)
        return e


    def echo_until_key(self, src: str, dst: str, key_id: int, seq: int) -> list[int]:
        """Echo until the reply comes on `key_id` (a 2.6 server switches its sending key
        once it generated the new key's data keys, up to a few seconds after the
        exchange: ssl.c tls_multi_process, tls_select_encryption_key); the key ids of
        the replies, bounded to 40 tries."""
        got: list[int] = []
        for i in range(40):
            got.append(self.echo(src, dst, seq + i).key_id)
            if got[-1] == key_id:
                break
            self.run_for(0.1)
        return got


def connect(ns: str, p: Pki, **kw: Any) -> tuple[Driver, Connected]:
    sock = socket_in(ns)
    sock.connect(("127.0.0.1", SERVER_PORT))
    client = OvpnClient(p.ca, p.client_cert, p.client_key, p.static_key, "tls-crypt",
                        now=time.monotonic(), **kw)
    drv = Driver(sock, client)
    ev = drv.until(lambda e: isinstance(e, Connected), 10.0, "Connected")
    assert isinstance(ev, Connected)
    return drv, ev


@pytest.mark.netns
@pytest.mark.parametrize(("cipher", "net", "ekm"), [
    ("AES-256-GCM", "198.18.211.0", True),
    ("AES-128-GCM", "198.18.212.0", False),
    ("CHACHA20-POLY1305", "198.18.213.0", True),
])
def test_real_server_ciphers(netns: str, p: Pki, real_server: Callable[..., RealServer],
                             cipher: str, net: str, ekm: bool) -> None:
    srv = real_server(net, cipher)
    iv_proto = DEFAULT_IV_PROTO if ekm else DEFAULT_IV_PROTO & ~km.IV_PROTO_TLS_KEY_EXPORT
    drv, ev = connect(netns, p, iv_proto=iv_proto)
    try:
        mine = net.rsplit(".", 1)[0] + ".2"
        assert ev.ifconfig == (mine, "255.255.255.0"), ev
        assert ev.cipher == cipher and ev.topology == "subnet" and ev.peer_id == 0
        assert ev.key_derivation == ("tls-ekm" if ekm else "prf")
        assert ev.cc_exit and (ev.ping, ev.ping_restart) == (10.0, 60.0)
        for seq in (1, 2):
            assert drv.echo(mine, srv.tunnel_ip, seq).key_id == 0
        log = srv.log
        assert f"PUSH_REPLY,route-gateway {srv.tunnel_ip},topology subnet" in log
        assert f"cipher {cipher}" in log
        assert f"protocol-flags cc-exit{' tls-ekm' if ekm else ''}" in log
        drv.client.close(time.monotonic())
        drv.until(lambda e: isinstance(e, Closed), 6.0, "Closed")
        assert drv.client.closed == Closed("exit")
        srv.wait_log("CC-EEN exit message received by peer", 5.0)
        assert not drv.client.drops, drv.client.drops
    finally:
        drv.sock.close()


@pytest.mark.netns
def test_real_server_client_renegotiation_and_occ_exit(
        netns: str, p: Pki, real_server: Callable[..., RealServer]) -> None:
    srv = real_server("198.18.214.0", "AES-256-GCM")
    # no IV_PROTO_CC_EXIT_NOTIFY: the server pushes no cc-exit, close sends OCC_EXIT
    drv, ev = connect(netns, p, iv_proto=DEFAULT_IV_PROTO & ~km.IV_PROTO_CC_EXIT_NOTIFY)
    try:
        mine, theirs = "198.18.214.2", srv.tunnel_ip
        assert not ev.cc_exit and ev.key_derivation == "tls-ekm"
        assert drv.echo(mine, theirs, 1).key_id == 0
        for key_id in (1, 2):
            assert drv.client.renegotiate(time.monotonic())
            r = drv.until(lambda e: isinstance(e, Renegotiated), 10.0, "Renegotiated")
            assert r == Renegotiated(key_id, False)
            assert drv.client.send_key_id == key_id
            replies = drv.echo_until_key(mine, theirs, key_id, 10 * key_id)
            assert replies[-1] == key_id and set(replies) <= {key_id - 1, key_id}, replies
        log = srv.log
        assert log.count("Control Channel: TLSv1.3") == 3  # three TLS handshakes
        drv.client.close(time.monotonic())
        drv.until(lambda e: isinstance(e, Closed), 3.0, "Closed")
        srv.wait_log("OCC exit message received by peer", 5.0)
        assert not drv.client.drops, drv.client.drops
    finally:
        drv.sock.close()


@pytest.mark.netns
def test_real_server_initiated_renegotiation(
        netns: str, p: Pki, real_server: Callable[..., RealServer]) -> None:
    srv = real_server("198.18.215.0", "CHACHA20-POLY1305", ("--reneg-sec", "4"))
    drv, ev = connect(netns, p)
    try:
        mine, theirs = "198.18.215.2", srv.tunnel_ip
        assert drv.echo(mine, theirs, 1).key_id == 0
        r = drv.until(lambda e: isinstance(e, Renegotiated), 12.0, "server-initiated Renegotiated")
        assert r == Renegotiated(1, True) and drv.client.send_key_id == 1
        # the server answers on key 0 until it has generated key 1's data keys itself
        # (ssl.c tls_multi_process); our requests already go with key 1
        replies = drv.echo_until_key(mine, theirs, 1, 2)
        assert replies[-1] == 1 and set(replies) <= {0, 1}, replies
        assert "TLS: soft reset sec=" in srv.log
        drv.client.close(time.monotonic())
        drv.until(lambda e: isinstance(e, Closed), 6.0, "Closed")
        srv.wait_log("CC-EEN exit message received by peer", 5.0)
        assert not drv.client.drops, drv.client.drops
    finally:
        drv.sock.close()
