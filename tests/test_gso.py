"""fabric.dataplane.udp: which datagrams one UDP GSO send may carry (gso_runs), and
receiving coalesced runs with UDP GRO."""

from __future__ import annotations

import socket
import sys
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.dataplane import udp
from fabric.dataplane.udp import (
    GRO_CMSG_SPACE,
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    enable_gro,
    gro_size,
    gso_runs,
    split_gro,
)


def test_equal_sizes_with_a_shorter_tail() -> None:
    assert gso_runs([100, 100, 100, 50, 100, 100]) == [(0, 4), (4, 6)]


def test_limits_on_segments_and_bytes() -> None:
    assert gso_runs([10] * 70) == [(0, 64), (64, 70)]
    assert gso_runs([30000] * 3) == [(0, 2), (2, 3)]


def test_growing_sizes_break_runs() -> None:
    assert gso_runs([5, 7, 7]) == [(0, 1), (1, 3)]
    assert gso_runs([]) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([32, 48, 1452, 1500, 60000]) | st.integers(1, 65000), max_size=200))
def test_runs_cover_everything_and_obey_gso_rules(sizes: list[int]) -> None:
    runs = gso_runs(sizes)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(sizes)))
    for a, b in runs:
        seg = sizes[a:b]
        assert 1 <= len(seg) <= GSO_MAX_SEGMENTS
        if len(seg) > 1:
            assert all(s == seg[0] for s in seg[:-1]) and seg[-1] <= seg[0]
            assert sum(seg) <= GSO_MAX_BYTES


# --- UDP GRO on receive (fabric.dataplane.udp.enable_gro, gro_size, split_gro) ---------------


def test_split_gro_cuts_equal_segments_and_a_shorter_tail() -> None:
    assert split_gro(b"aaabbbc", 3) == [b"aaa", b"bbb", b"c"]
    assert split_gro(b"aaa", 3) == [b"aaa"]
    assert split_gro(b"aaa", 0) == [b"aaa"]  # no size reported: one datagram


def test_gro_size_reads_only_the_udp_gro_message() -> None:
    size = (1400).to_bytes(4, sys.byteorder)
    assert gro_size([(SOL_UDP, UDP_GRO, size)]) == 1400
    assert gro_size([(socket.SOL_SOCKET, UDP_GRO, size)]) == 0
    assert gro_size([(SOL_UDP, UDP_GRO, b"\x01")]) == 0  # truncated: ignored
    assert gro_size([]) == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 1500))
def test_split_gro_loses_no_byte(data: bytes, size: int) -> None:
    parts = split_gro(data, size)
    assert b"".join(parts) == data
    assert all(len(p) == size for p in parts[:-1]) and len(parts[-1]) <= size


def test_a_gso_send_arrives_as_one_coalesced_receive_on_loopback() -> None:
    """The kernel path the edge uses: a sender's GSO run (UDP_SEGMENT) reaches a
    socket with UDP_GRO as one receive and is cut back into the same datagrams."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        if not enable_gro(rx):
            pytest.skip("this kernel has no UDP_GRO")
        rx.settimeout(2)
        sent = [bytes([i]) * 1200 for i in range(5)] + [b"tail" * 10]
        try:
            tx.sendmsg([b"".join(sent)], [(SOL_UDP, UDP_SEGMENT, (1200).to_bytes(2, sys.byteorder))], 0,
                       rx.getsockname())
        except OSError as exc:
            pytest.skip(f"no UDP GSO here: {exc}")
        got: list[bytes] = []
        calls = 0
        while len(got) < len(sent) and calls < len(sent):
            data, anc, _flags, _sa = rx.recvmsg(65535, GRO_CMSG_SPACE)
            got += split_gro(data, gro_size(anc))
            calls += 1
        assert got == sent
        assert calls == 1  # one coalesced receive
    finally:
        rx.close()
        tx.close()


RECEIVERS = [("python", lambda sock, limit: udp.receive_py(sock, limit, True))]
if udp._recv_batch is not None:  # the extension (FABRIC_REQUIRE_NATIVE=1 makes its absence an error)
    RECEIVERS.append(("native", lambda sock, limit: udp.receive(sock, limit, True)))


@pytest.mark.parametrize("name,receive", RECEIVERS)
def test_receive_takes_single_datagrams_and_runs_from_several_sources(name: str, receive: Any) -> None:
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # dual stack, as the edge's "::"
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        rx.bind(("::", 0))
        rx.setblocking(False)
        if not enable_gro(rx):
            pytest.skip("this kernel has no UDP_GRO")
        dest = ("127.0.0.1", rx.getsockname()[1])
        expect: list[tuple[bytes, int]] = []
        for i in range(5):
            for k, s in enumerate(senders):
                d = bytes([k, i]) * (50 + i)
                s.sendto(d, dest)
                expect.append((d, k))
        run = [bytes([9, i]) * 600 for i in range(4)] + [b"short"]
        senders[0].sendmsg([b"".join(run)], [(SOL_UDP, UDP_SEGMENT, (1200).to_bytes(2, sys.byteorder))], 0, dest)
        expect += [(d, 0) for d in run]
        ports = [s.getsockname()[1] for s in senders]
        time.sleep(0.1)
        got, sources, runs = receive(rx, 3)  # a limit (a run is taken whole, so may pass it: here it comes last)
        assert 1 <= len(got) <= 3
        while True:
            more, more_sources, more_runs = receive(rx, 256)
            if not more:
                break
            got += more
            sources += more_sources
            runs += more_runs
        assert [(d, ports.index(sa[1])) for d, sa in zip(got, sources, strict=True)] == expect
        assert all(sa[0] == "::ffff:127.0.0.1" and len(sa) == 4 for sa in sources)
        assert runs == 1
        assert receive(rx, 256) == ([], [], 0)  # nothing waiting: empty, no exception
    finally:
        rx.close()
        for s in senders:
            s.close()


@pytest.mark.parametrize("name,receive", RECEIVERS)
def test_receive_on_a_closed_socket_raises(name: str, receive: Any) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.close()
    with pytest.raises(OSError):
        receive(rx, 8)
