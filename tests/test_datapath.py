"""The transport-data engine (fabric/dataplane/engine.py) in memory: the engine of one side
seals what the other side's engine opens, every bad datagram is a counted drop,
and the placement's switch between edge and workers."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.control import frames
from fabric.control.frames import Frame
from fabric.control.records import PeerRecord, SessionRecord
from fabric.dataplane import gro
from fabric.dataplane.engine import CryptoEngine
from fabric.dataplane.placement import (
    BUSY_HIGH,
    BUSY_LOW,
    BUSY_WINDOW,
    IDLE_TO_KEEP,
    IDLE_TO_OFFLOAD,
    RETRY_AFTER,
    CryptoPlacement,
    HostIdle,
)
from fabric.protocols import registry
from fabric.protocols.wireguard.constants import REJECT_AFTER_TIME

K_SERVER_SEND = bytes(range(32))
K_SERVER_RECV = bytes(range(32, 64))
SERVER_INDEX, CLIENT_INDEX = 0x11223344, 0x55667788
NOW = 1_000_000.0
ADDR = frames.pack_addr("198.18.0.2", 51000)


def ipv4(src: str, dst: str, payload: bytes, proto: int = 17) -> bytes:
    import socket

    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + payload


def wg_session(sid: int, peer: bytes, local: int, remote: int, send: bytes | None, recv: bytes | None
               ) -> SessionRecord:
    keys = {"send_key": send, "recv_key": recv} if send and recv else None
    return SessionRecord(sid, 1, peer, "wireguard", local, NOW, params={"remote_index": remote}, keys=keys)


def engines() -> tuple[CryptoEngine, CryptoEngine, Counter[str], Counter[str]]:
    """The server's engine and a client's mirror image (keys and indices swapped)."""
    server_counts: Counter[str] = Counter()
    client_counts: Counter[str] = Counter()
    server = CryptoEngine(lambda n, k: server_counts.update({n: k}), registry(), gro=False)
    client = CryptoEngine(lambda n, k: client_counts.update({n: k}), registry(), gro=False)
    server.install(wg_session(1, b"C" * 32, SERVER_INDEX, CLIENT_INDEX, K_SERVER_SEND, K_SERVER_RECV))
    client.install(wg_session(9, b"S" * 32, CLIENT_INDEX, SERVER_INDEX, K_SERVER_RECV, K_SERVER_SEND))
    server.set_peer(PeerRecord("client", b"C" * 32, ("198.18.0.2/32",)))
    client.set_peer(PeerRecord("server", b"S" * 32, ("0.0.0.0/0",)))
    return server, client, server_counts, client_counts


def seal(client: CryptoEngine, pkts: list[bytes], counter0: int = 0) -> list[bytes]:
    out = client.encrypt(Frame(frames.ENCRYPT, 0, 9, counter0, ADDR, pkts), NOW)
    assert out is not None and out.kind == frames.UDP_SEND
    return [bytes(p) for p in out.packets]


def test_transport_format_whitepaper_5_4_6() -> None:
    """Type 4, receiver index, little-endian counter, then ChaCha20-Poly1305 with the
    counter as the last 8 bytes of the nonce over the plaintext padded to 16."""
    _, client, _, _ = engines()
    pkt = ipv4("198.18.0.2", "198.18.0.1", b"x" * 7)  # 27 bytes -> padded to 32
    (dgram,) = seal(client, [pkt], counter0=5)
    kind, receiver, counter = struct.unpack_from("<IIQ", dgram)
    assert (kind, receiver, counter) == (4, SERVER_INDEX, 5)
    assert len(dgram) == 16 + 32 + 16
    plain = ChaCha20Poly1305(K_SERVER_RECV).decrypt(b"\0" * 4 + struct.pack("<Q", 5), dgram[16:], None)
    assert plain == pkt + bytes(5)


def test_round_trip_trims_padding_and_returns_counters() -> None:
    server, client, counts, _ = engines()
    pkts = [ipv4("198.18.0.2", "198.18.0.1", bytes([i]) * (10 + i)) for i in range(5)]
    dgrams = seal(client, pkts, counter0=100)
    res = server.decrypt(Frame(frames.DECRYPT, 3, 1, 0, ADDR, dgrams, seq=7), NOW)
    assert res is not None and res.kind == frames.TUN_WRITE and res.seq == 7 and res.edge == 3
    assert [bytes(p) for p in res.packets] == [gro.PLAIN + p for p in pkts]
    assert res.counters == [100, 101, 102, 103, 104]
    assert res.aux == [x for d in dgrams for x in (1, len(d))]
    assert counts["decrypted"] == 5


def test_keepalive_is_an_empty_packet() -> None:
    server, client, _, _ = engines()
    dgrams = seal(client, [b""], counter0=3)
    assert len(dgrams[0]) == 32  # whitepaper 6.5: header and tag only
    res = server.decrypt(Frame(frames.DECRYPT, 0, 1, 0, ADDR, dgrams), NOW)
    assert res is not None and res.packets == [b""] and res.counters == [3]


def test_bad_datagrams_are_counted_drops() -> None:
    server, client, counts, _ = engines()
    good = seal(client, [ipv4("198.18.0.2", "198.18.0.1", b"ok")])[0]
    spoofed = seal(client, [ipv4("198.18.0.99", "198.18.0.1", b"no")], counter0=1)[0]
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    other_index = good[:4] + struct.pack("<I", SERVER_INDEX + 1) + good[8:]
    res = server.decrypt(Frame(frames.DECRYPT, 0, 1, 0, ADDR, [good[:20], tampered, other_index, spoofed, good]), NOW)
    assert res is not None and res.counters == [0]
    assert (counts["drop_short"], counts["drop_decrypt"], counts["drop_unknown_index"],
            counts["drop_source_not_allowed"], counts["decrypted"]) == (1, 1, 1, 1, 1)


def test_wgkeys_open_takes_memoryviews_and_counts_every_reason() -> None:
    # a worker's frame holds memoryviews into one buffer; the header pass (short,
    # unknown_index) comes before the one AEAD call (decrypt), the inner checks after
    server, client, _, _ = engines()
    keys, mirror = server.sessions[1], client.sessions[9]
    ok = ipv4("198.18.0.2", "198.18.0.1", b"x" * 1400)  # 1420 -> padded to 1424, trimmed back
    bad_inner = ipv4("198.18.0.2", "198.18.0.1", b"y" * 10)[:2] + struct.pack("!H", 200) + bytes(26)
    spoofed = ipv4("198.18.0.7", "198.18.0.1", b"z")
    good, keepalive, inner, spoof, ok2 = mirror.seal(40, [ok, b"", bad_inner, spoofed, ok])
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    other = good[:4] + struct.pack("<I", SERVER_INDEX ^ 1) + good[8:]
    batch = [good, keepalive[:31], other, tampered, keepalive, inner, spoof, ok2]
    frame = bytearray(b"".join(batch))
    views, at = [], 0
    for d in batch:
        views.append(memoryview(frame)[at:at + len(d)])
        at += len(d)
    drops: dict[str, int] = {}
    plain, counters, sizes = keys.open(views, lambda src: src == bytes([198, 18, 0, 2]), drops)
    assert plain == [ok, b"", ok] and all(type(p) is bytes for p in plain)
    assert counters == [40, 41, 44] and sizes == [len(good), len(keepalive), len(ok2)]
    assert drops == {"short": 1, "unknown_index": 1, "decrypt": 1, "bad_inner": 1, "source_not_allowed": 1}


def ipv6(src: str, dst: str, payload: bytes) -> bytes:
    import ipaddress

    return (struct.pack("!IHBB", 6 << 28, len(payload), 17, 64) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed + payload)


def test_source_check_holds_for_every_packet_of_a_frame() -> None:
    # the engine remembers the last source it checked: alternating and repeated
    # sources, IPv4 and IPv6, must each get their own verdict
    server, client, counts, _ = engines()
    server.set_peer(PeerRecord("client", b"C" * 32, ("198.18.0.2/32", "2001:db8::2/128")))
    ok4, bad4 = ipv4("198.18.0.2", "198.18.0.1", b"a"), ipv4("198.18.0.3", "198.18.0.1", b"b")
    ok6, bad6 = ipv6("2001:db8::2", "2001:db8::1", b"c"), ipv6("2001:db8::3", "2001:db8::1", b"d")
    pkts = [ok4, bad4, bad4, ok4, ok4, ok6, bad6, ok6, bad4, ok4]
    res = server.decrypt(Frame(frames.DECRYPT, 0, 1, 0, ADDR, seal(client, pkts, counter0=10)), NOW)
    assert res is not None
    assert [bytes(p)[gro.VNET_HDR_LEN:] for p in res.packets] == [p for p in pkts if p in (ok4, ok6)]
    assert res.counters == [10 + i for i, p in enumerate(pkts) if p in (ok4, ok6)]
    assert counts["drop_source_not_allowed"] == 4


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([b"", b"tcp", b"udp"]), st.binary(max_size=64))
def test_one_packet_frame_is_written_as_coalescing_would(kind: bytes, payload: bytes) -> None:
    # a frame of one packet skips gro.coalesce (nothing to merge with): what it
    # writes must be what coalesce would have made of it
    server, client, _, _ = engines()
    server.gro = True
    pkt = b"" if not kind else ipv4("198.18.0.2", "198.18.0.1", struct.pack("!HHIIBBHHH", 5201, 40000, 1, 2, 0x50, 0x10, 500, 0, 0) + payload
                                    if kind == b"tcp" else payload,
                                    proto=6 if kind == b"tcp" else 17)
    res = server.decrypt(Frame(frames.DECRYPT, 0, 1, 0, ADDR, seal(client, [pkt])), NOW)
    assert res is not None
    assert res.packets == [data for data, _ in gro.coalesce([pkt])]
    assert res.aux[0] == 1 and res.counters == [0]


def test_unknown_or_expired_session_answers_ordered_frames_empty() -> None:
    server, client, counts, _ = engines()
    dgrams = seal(client, [b""])
    assert server.decrypt(Frame(frames.DECRYPT, 0, 2, 0, ADDR, dgrams), NOW) is None  # unordered: nothing owed
    res = server.decrypt(Frame(frames.DECRYPT, 0, 2, 0, ADDR, dgrams, seq=4), NOW)
    assert res is not None and (res.kind, res.seq, res.packets) == (frames.TUN_WRITE, 4, [])
    late = NOW + REJECT_AFTER_TIME + 1
    res = server.encrypt(Frame(frames.ENCRYPT, 0, 1, 0, ADDR, [b"x"], seq=5), late)
    assert res is not None and (res.kind, res.seq, res.packets) == (frames.UDP_SEND, 5, [])
    assert counts["drop_unknown_session"] == 2 and counts["drop_expired"] == 1


def test_public_session_record_has_no_keys_and_remove_forgets() -> None:
    server, _, _, _ = engines()
    assert not server.install(wg_session(5, b"C" * 32, 1, 2, None, None))
    assert 5 not in server.sessions
    server.remove(1)
    assert 1 not in server.sessions


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_fuzz_decrypt_never_raises(pkts: list[bytes]) -> None:
    server, _, counts, _ = engines()
    # every datagram is either authenticated (impossible here) or a counted drop
    res = server.decrypt(Frame(frames.DECRYPT, 0, 1, 0, ADDR, pkts), NOW)
    assert res is None
    assert sum(v for k, v in counts.items() if k.startswith("drop_")) == len(pkts)


# --- placement -------------------------------------------------------------------


def feed(p: CryptoPlacement, busy: float, t: float) -> float:
    """One window at `busy` fraction, starting at t; returns the next t."""
    span = 1.5 * BUSY_WINDOW
    p.work(0.0, t)
    p.work(busy * span, t + span)
    return t + span


def test_fixed_placements_never_switch() -> None:
    for mode, inline in (("edge", True), ("workers", False)):
        p = CryptoPlacement(mode, lambda: 16.0)
        t = 0.0
        for busy in (1.0, 0.0, 1.0):
            t = feed(p, busy, t)
            assert p.inline is inline


def test_auto_offloads_only_when_saturated_with_idle_cores() -> None:
    idle: list[float | None] = [0.3]
    p = CryptoPlacement("auto", lambda: idle[0])
    t = feed(p, 1.0, 0.0)
    assert p.inline and p.busy == pytest.approx(1.0)  # saturated, but no core idles
    idle[0] = None
    t = feed(p, 1.0, t)
    assert p.inline  # unknown: stay
    idle[0] = IDLE_TO_OFFLOAD + 0.5
    t = feed(p, (BUSY_HIGH + 1) / 2, t)
    assert not p.inline  # saturated, a core idles: workers take the AEAD
    idle[0] = IDLE_TO_KEEP + 0.1
    t = feed(p, (BUSY_HIGH + BUSY_LOW) / 2, t)
    assert not p.inline  # between the marks: no flapping
    t = feed(p, BUSY_LOW / 2, t)
    assert p.inline  # quiet again: back in the edge
    idle[0] = 4.0
    t = feed(p, 1.0, t)
    assert not p.inline
    idle[0] = IDLE_TO_KEEP / 2  # the workers filled the host: handing off only costs
    t = feed(p, 1.0, t)
    assert p.inline
    gave_up = t
    idle[0] = 4.0  # the cores the workers took are free again, but it waits
    while t + 2 * BUSY_WINDOW < gave_up + RETRY_AFTER:
        t = feed(p, 1.0, t)
        assert p.inline, t - gave_up
    t = feed(p, 1.0, gave_up + RETRY_AFTER)
    assert not p.inline


def test_host_idle_reads_the_cpus_it_is_given(tmp_path: Path) -> None:
    stat = tmp_path / "stat"

    def write(cpu0: tuple[int, int], cpu1: tuple[int, int]) -> None:
        # user nice system idle iowait irq softirq steal
        lines = ["cpu  1 2 3 4 5 6 7 8"]
        for n, (busy, idle) in enumerate((cpu0, cpu1)):
            lines.append(f"cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0")
        stat.write_text("\n".join(lines) + "\nintr 1 2\n")

    write((100, 100), (100, 100))
    both, first = HostIdle({0, 1}, str(stat)), HostIdle({0}, str(stat))
    write((110, 190), (200, 100))  # cpu0 idled 90 of 100 ticks, cpu1 0 of 100
    assert both() == pytest.approx(0.9) and first() == pytest.approx(0.9)
    write((210, 190), (200, 200))
    assert both() == pytest.approx(1.0)
    assert HostIdle({0}, str(tmp_path / "missing"))() is None


def test_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, edge, workers"):
        CryptoPlacement("gpu")
