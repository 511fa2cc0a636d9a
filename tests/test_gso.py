"""fabric.dataplane.udp: which datagrams one UDP GSO send may carry (gso_runs), and
receiving coalesced runs with UDP GRO."""

from __future__ import annotations

import socket
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
