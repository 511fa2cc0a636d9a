"""The server's AEAD data path (fabric/protocols/openvpn/datapath.py, OvpnKeys) against
the client's (fabric/protocols/openvpn/client.py _DataChannel, which talks to a real
OpenVPN 2.6 server in tests/test_openvpn_client.py): both sides derive their keys
from one key2 block with `keys.data_keys` (ssl.c init_key_contexts), so a packet one
seals the other must open, for every cipher and both data formats; tampering,
another key id, short and garbage input are counted drops, never exceptions.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.control.records import SessionRecord
from fabric.protocols.base import END_SESSION
from fabric.protocols.openvpn import keys as km
from fabric.protocols.openvpn.client import _DataChannel
from fabric.protocols.openvpn.constants import (
    OCC_EXIT,
    OCC_MAGIC,
    P_DATA_V1,
    P_DATA_V2,
    PING_STRING,
)
from fabric.protocols.openvpn.datapath import KEY_SIZES, OvpnKeys

CIPHERS = sorted(KEY_SIZES)
KEY2 = bytes(range(256))
PEER_ID, KEY_ID = 0x12345, 3
CLIENT_IP = "198.19.100.2"


def ipv4(src: str, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton("198.19.100.1")) + payload


def pair(cipher: str, v1: bool = False) -> tuple[OvpnKeys, _DataChannel]:
    dk = km.data_keys(KEY2, cipher, server=True)
    record = SessionRecord(id=1, slot=1, peer=bytes(32), protocol="openvpn", data_key=PEER_ID << 3 | KEY_ID,
                           created=0.0, params={"cipher": cipher, "peer_id": PEER_ID, "key_id": KEY_ID, "v1": v1},
                           keys={"encrypt_key": dk.encrypt_key, "encrypt_iv": dk.encrypt_implicit_iv,
                                 "decrypt_key": dk.decrypt_key, "decrypt_iv": dk.decrypt_implicit_iv})
    return OvpnKeys(record), _DataChannel(cipher, km.data_keys(KEY2, cipher, server=False))


def allowed(src: bytes) -> bool:
    return src == socket.inet_aton(CLIENT_IP)


@pytest.mark.parametrize("v1", [False, True])
@pytest.mark.parametrize("cipher", CIPHERS)
def test_client_and_server_open_what_the_other_sealed(cipher: str, v1: bool) -> None:
    server, client = pair(cipher, v1)
    peer_id = None if v1 else PEER_ID
    ups = [ipv4(CLIENT_IP, os.urandom(n)) for n in (0, 1, 100, 1380)]
    wire = [client.seal(KEY_ID, peer_id, p) for p in ups]
    assert all(w[0] >> 3 == (P_DATA_V1 if v1 else P_DATA_V2) and w[0] & 7 == KEY_ID for w in wire)
    drops: dict[str, int] = {}
    plain, counters, sizes = server.open(wire, allowed, drops)
    assert (plain, counters, sizes, drops) == (ups, [1, 2, 3, 4], [len(w) for w in wire], {})
    # server -> client: packet ids from the session table's reservation (here 7, 8, ...)
    downs = [ipv4("198.19.100.1", os.urandom(n)) for n in (5, 1400)]
    sealed = server.seal(7, [*downs, b""])
    head = 5 if v1 else 8
    for pid, (w, want) in enumerate(zip(sealed, [*downs, PING_STRING], strict=True), start=7):
        assert struct.unpack_from("!I", w, head - 4)[0] == pid
        op = w[0] >> 3
        assert client.open(w, op, pid) == want
        if not v1:
            assert w[1:4] == PEER_ID.to_bytes(3, "big")


@pytest.mark.parametrize("cipher", CIPHERS)
def test_drops_are_counted_by_reason(cipher: str) -> None:
    server, client = pair(cipher)
    good = client.seal(KEY_ID, PEER_ID, ipv4(CLIENT_IP, b"x" * 40))
    flipped = bytearray(good)
    flipped[-1] ^= 1
    other_key = bytes([good[0] ^ 1]) + good[1:]
    spoofed = client.seal(KEY_ID, PEER_ID, ipv4("198.19.100.9", b"y" * 40))
    ping = client.seal(KEY_ID, PEER_ID, PING_STRING)
    occ = client.seal(KEY_ID, PEER_ID, OCC_MAGIC + bytes([OCC_EXIT]))
    drops: dict[str, int] = {}
    plain, counters, _ = server.open([bytes(flipped), other_key, good[:20], b"\x00" * 30, spoofed, ping, occ],
                                     allowed, drops)
    # the keepalive opens to an empty plaintext (counted by the edge, not written)
    assert plain == [b""] and counters == [3]
    assert drops == {"decrypt": 1, "bad_key_id": 1, "short": 1, "bad_opcode": 1, "source_not_allowed": 1,
                     END_SESSION: 1}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=64), st.integers(0, 1500)), max_size=8),
       st.sampled_from(CIPHERS))
def test_fuzz_open_never_raises(edits: list[tuple[int, bytes, int]], cipher: str) -> None:
    server, client = pair(cipher)
    batch = []
    for kind, junk, at in edits:
        pkt = bytearray(client.seal(KEY_ID, PEER_ID, ipv4(CLIENT_IP, junk)))
        if kind == 0:  # a flipped byte somewhere
            pkt[at % len(pkt)] ^= 0xFF
        elif kind == 1:  # cut short
            pkt = pkt[: at % len(pkt)]
        else:  # random bytes behind a valid-looking header
            pkt = pkt[:8] + bytearray(junk)
        batch.append(bytes(pkt))
    drops: dict[str, int] = {}
    plain, counters, sizes = server.open(batch, allowed, drops)
    assert len(plain) == len(counters) == len(sizes)
    assert len(plain) + sum(drops.values()) == len(batch)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_batch_mixing_both_data_formats_keeps_its_order(cipher: str) -> None:
    # in practice a client sends one format; a mixed batch (P_DATA_V1 and V2 of one key)
    # opens with one AEAD call per format and comes back in arrival order
    server, client = pair(cipher)
    ups = [ipv4(CLIENT_IP, bytes([i]) * (10 + i)) for i in range(6)]
    formats = [PEER_ID, None, None, PEER_ID, None, PEER_ID]  # None: P_DATA_V1 (no peer-id)
    wire = [client.seal(KEY_ID, peer_id, p) for peer_id, p in zip(formats, ups, strict=True)]
    bad = bytearray(wire[2])
    bad[-1] ^= 1
    drops: dict[str, int] = {}
    batch = [wire[0], wire[1], bytes(bad), memoryview(wire[3]), wire[4][:21], wire[5]]
    plain, counters, sizes = server.open(batch, allowed, drops)
    assert plain == [ups[0], ups[1], ups[3], ups[5]]
    assert counters == [1, 2, 4, 6] and sizes == [len(wire[i]) for i in (0, 1, 3, 5)]
    assert drops == {"decrypt": 1, "short": 1}
