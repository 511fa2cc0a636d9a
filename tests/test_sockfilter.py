"""The socket filter: the assembler, the WireGuard program, and the kernel agreeing.

The program is checked two ways: by a small classic-BPF interpreter here (every
datagram hypothesis makes, against the rules written in fabric/protocols/wireguard/guard.py), and by
the kernel itself on a loopback socket (SO_ATTACH_FILTER needs no privilege).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.dataplane import sockfilter as bpf
from fabric.protocols.wireguard.constants import COOKIE_REPLY_SIZE, INITIATION_SIZE, RESPONSE_SIZE
from fabric.protocols.wireguard.guard import (
    SAMPLE,
    SAMPLE_MALFORMED,
    SAMPLE_UNKNOWN_INDEX,
    filter_program,
)

V4_MAPPED = bytes(10) + b"\xff\xff"


class Interp:
    """Classic BPF as the kernel runs it on a UDP socket: offset 0 is the UDP header,
    SKF_NET_OFF the IP header, SKF_AD_RANDOM a number we choose."""

    def __init__(self, program: bytes) -> None:
        self.insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]

    def run(self, payload: bytes, ip_header: bytes, random: int = 1) -> int:
        pkt = bytes(8) + payload  # the UDP header's contents do not matter here
        a = 0
        mem = [0] * 16
        pc = 0
        for _ in range(len(self.insns) + 1):  # forward jumps only: every run ends
            code, jt, jf, k = self.insns[pc]
            cls = code & 0x07
            pc += 1
            if cls == bpf.BPF_LD:
                mode, size = code & 0xE0, code & 0x18
                if mode == bpf.BPF_LEN:
                    a = len(pkt)
                elif mode == bpf.BPF_MEM:
                    a = mem[k]
                elif mode == bpf.BPF_ABS:
                    off = k - (1 << 32) if k & 0x80000000 else k
                    n = {bpf.BPF_W: 4, bpf.BPF_H: 2, bpf.BPF_B: 1}[size]
                    if off == bpf.SKF_AD_OFF + bpf.SKF_AD_RANDOM:
                        a = random
                    elif off <= bpf.SKF_NET_OFF + 0x10000 and off >= bpf.SKF_NET_OFF:
                        a = int.from_bytes(ip_header[off - bpf.SKF_NET_OFF : off - bpf.SKF_NET_OFF + n], "big")
                    else:
                        if off + n > len(pkt):
                            return 0  # the kernel drops on an out-of-bounds load
                        a = int.from_bytes(pkt[off : off + n], "big")
                else:
                    raise AssertionError(f"unexpected load {code:#x}")
            elif cls == bpf.BPF_ST:
                mem[k] = a
            elif cls == bpf.BPF_ALU:
                op = code & 0xF0
                if op == bpf.BPF_AND:
                    a &= k
                elif op == bpf.BPF_RSH:
                    a >>= k
                else:
                    raise AssertionError(f"unexpected alu {code:#x}")
            elif cls == bpf.BPF_JMP:
                op = code & 0xF0
                if op == bpf.BPF_JA:
                    pc += k
                    continue
                cond = {bpf.BPF_JEQ: a == k, bpf.BPF_JGT: a > k, bpf.BPF_JGE: a >= k,
                        bpf.BPF_JSET: bool(a & k)}[op]
                pc += jt if cond else jf
            elif cls == bpf.BPF_RET:
                return k
            else:
                raise AssertionError(f"unexpected class {code:#x}")
        raise AssertionError("program did not return")


def ipv4_header(src: str) -> bytes:
    return bytes([0x45]) + bytes(11) + socket.inet_aton(src) + socket.inet_aton("198.18.1.1")


def ipv6_header(src: str) -> bytes:
    return bytes([0x60]) + bytes(7) + socket.inet_pton(socket.AF_INET6, src) + bytes(16)


def v4_key(addr: str) -> bytes:
    return V4_MAPPED + socket.inet_aton(addr)


def v6_key(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr)[:8]


def transport(index: int, size: int = 64) -> bytes:
    return b"\x04\x00\x00\x00" + struct.pack("<IQ", index, 7) + bytes(size - 16)


def expected(payload: bytes, indexes: set[int] | None, banned_src: bool) -> str:
    """What fabric/protocols/wireguard/guard.py says the filter does with a payload: pass, malformed,
    unknown or banned (the WireGuard sizes of whitepaper 5.4)."""
    n = len(payload)
    if n < 4 or payload[1:4] != b"\x00\x00\x00" or payload[0] not in (1, 2, 3, 4):
        return "malformed"
    sizes = {1: INITIATION_SIZE, 2: RESPONSE_SIZE, 3: COOKIE_REPLY_SIZE}
    if payload[0] == 4:
        if n < 32:
            return "malformed"
        if indexes is not None and struct.unpack_from("<I", payload, 4)[0] not in indexes:
            return "unknown"
        return "pass"
    if n != sizes[payload[0]]:
        return "malformed"
    if payload[0] in (1, 2) and banned_src:
        return "banned"
    return "pass"


def verdict(interp: Interp, payload: bytes, ip: bytes) -> str:
    """Run twice: with a random number that is not a sample, and one that is."""
    dropped, sampled = interp.run(payload, ip, random=1), interp.run(payload, ip, random=SAMPLE * 7)
    if dropped == bpf.PASS_ALL:
        assert sampled == bpf.PASS_ALL
        return "pass"
    assert dropped == 0, dropped
    if sampled == bpf.PASS_ALL:
        return "banned"  # a banned source's sample comes through whole
    return {8 + SAMPLE_MALFORMED: "malformed", 8 + SAMPLE_UNKNOWN_INDEX: "unknown"}[sampled]


# --------------------------------------------------------------------------- assembler


def test_far_jumps_get_trampolines() -> None:
    """A conditional jump reaches 255 instructions; farther targets go through a `ja`."""
    def prog(gap: int) -> bytes:
        p = bpf.Program()
        p.ld_len()  # 8: the UDP header of an empty datagram
        p.jump(bpf.BPF_JEQ, 8, "far", None)
        for _ in range(gap):
            p.st(0)
        p.ret(1)
        p.label("far")
        p.ret(2)
        return p.assemble()

    near, far = prog(200), prog(300)
    assert len(near) // 8 == 1 + 1 + 200 + 2
    assert len(far) // 8 == 1 + 1 + 1 + 300 + 2  # one trampoline
    for code in (near, far):
        assert Interp(code).run(b"", b"") == 2
        assert Interp(code).run(b"x", b"") == 1


def test_assembler_refuses_what_the_kernel_would() -> None:
    p = bpf.Program()
    p.ja("nowhere")
    with pytest.raises(bpf.FilterError, match="unknown label"):
        p.assemble()
    p = bpf.Program()
    p.label("x")
    p.ld_len()
    p.ja("x")
    with pytest.raises(bpf.FilterError, match="forward"):
        p.assemble()
    p = bpf.Program()
    for _ in range(bpf.BPF_MAXINSNS + 1):
        p.st(0)
    with pytest.raises(bpf.FilterError, match="instructions"):
        p.assemble()


@given(st.lists(st.integers(0, 2**32 - 1), max_size=300, unique=True), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_search_finds_exactly_the_values(values: list[int], probe: int) -> None:
    p = bpf.Program()
    p.ld(bpf.BPF_W, 8)
    bpf.search(p, sorted(values), "hit", "miss", "s")
    p.label("hit")
    p.ret(1)
    p.label("miss")
    p.ret(0)
    interp = Interp(p.assemble())
    for v in [probe, *values[:20]]:
        assert interp.run(v.to_bytes(4, "big"), b"") == (1 if v in values else 0)


# --------------------------------------------------------------------------- the program


INDEXES = {7, 0x11223344, 2**32 - 1}
BANNED = [v4_key("198.18.2.2"), v6_key("2001:db8:1:2::5")]
PROGRAM = Interp(filter_program(INDEXES, BANNED))
UNFILTERED = Interp(filter_program(None, []))

wireguardish = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, body: bytes([t, 0, 0, 0]) + body, st.integers(0, 6), st.binary(max_size=200)),
    st.builds(lambda t, n: bytes([t, 0, 0, 0]) + bytes(n - 4),
              st.sampled_from([1, 2, 3]), st.sampled_from([INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE])),
    st.builds(transport, st.sampled_from([*INDEXES, 8, 0]), st.integers(32, 1500)),
)
sources = st.sampled_from([ipv4_header("198.18.2.2"), ipv4_header("198.18.1.2"),
                           ipv6_header("2001:db8:1:2::9"), ipv6_header("2001:db8:1:3::5")])


@given(wireguardish, sources)
@settings(max_examples=500, deadline=None)
def test_program_follows_the_rules(payload: bytes, ip: bytes) -> None:
    banned_src = ip in (ipv4_header("198.18.2.2"), ipv6_header("2001:db8:1:2::9"))
    assert verdict(PROGRAM, payload, ip) == expected(payload, INDEXES, banned_src)
    assert verdict(UNFILTERED, payload, ip) == expected(payload, None, False)


def test_program_cases() -> None:
    ip = ipv4_header("198.18.1.2")
    assert verdict(PROGRAM, transport(7), ip) == "pass"
    assert verdict(PROGRAM, transport(8), ip) == "unknown"
    assert verdict(PROGRAM, transport(7, 31), ip) == "malformed"
    assert verdict(PROGRAM, transport(7, 1452), ip) == "pass"  # a full-MTU packet: not a multiple of 16
    init = b"\x01\x00\x00\x00" + bytes(INITIATION_SIZE - 4)
    assert verdict(PROGRAM, init, ip) == "pass"
    assert verdict(PROGRAM, init + b"\x00", ip) == "malformed"
    assert verdict(PROGRAM, init[:-1], ip) == "malformed"
    assert verdict(PROGRAM, b"\x01\x00\x01\x00" + init[4:], ip) == "malformed"  # a reserved byte
    assert verdict(PROGRAM, init, ipv4_header("198.18.2.2")) == "banned"
    # a banned source's transport datagrams are never banned (forged sources)
    assert verdict(PROGRAM, transport(7), ipv4_header("198.18.2.2")) == "pass"
    assert verdict(PROGRAM, init, ipv6_header("2001:db8:1:2::1234")) == "banned"  # the whole /64
    assert verdict(PROGRAM, init, ipv6_header("2001:db8:1:3::5")) == "pass"
    assert verdict(PROGRAM, b"", ip) == "malformed"


def test_many_sessions_fit_and_more_turn_the_index_check_off() -> None:
    from fabric.protocols.wireguard.guard import MAX_BANNED, MAX_FILTER_INDEXES

    idx = list(range(1, MAX_FILTER_INDEXES + 1))
    banned = [v4_key(f"198.18.{i // 250}.{i % 250 + 1}") for i in range(MAX_BANNED)]
    prog = filter_program(idx, banned)
    assert len(prog) // 8 <= bpf.BPF_MAXINSNS
    interp = Interp(prog)
    ip = ipv4_header("198.18.9.9")
    assert verdict(interp, transport(MAX_FILTER_INDEXES), ip) == "pass"
    assert verdict(interp, transport(MAX_FILTER_INDEXES + 1), ip) == "unknown"
    init = b"\x01\x00\x00\x00" + bytes(INITIATION_SIZE - 4)
    assert verdict(interp, init, ipv4_header("198.18.0.1")) == "banned"
    assert verdict(interp, init, ipv4_header("198.18.0.0")) == "pass"


# --------------------------------------------------------------------------- in the kernel


def _pair() -> tuple[socket.socket, socket.socket, int]:
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # dual stack, as the edge's
    rx.bind(("::", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return rx, tx, rx.getsockname()[1]


def _drain(rx: socket.socket) -> list[bytes]:
    time.sleep(0.05)
    out = []
    while True:
        try:
            out.append(rx.recv(65535))
        except BlockingIOError:
            return out


def _send(tx: socket.socket, port: int, datagrams: Sequence[bytes]) -> None:
    for d in datagrams:
        tx.sendto(d, ("127.0.0.1", port))


def test_kernel_runs_the_program_as_the_interpreter_does() -> None:
    rx, tx, port = _pair()
    try:
        bpf.attach(rx, filter_program({7}, [v4_key("127.0.0.1")]))
        _send(tx, port, [transport(7)])
        assert _drain(rx) == [transport(7)]
        init = b"\x01\x00\x00\x00" + os.urandom(INITIATION_SIZE - 4)
        n = 64 * SAMPLE
        before = bpf.socket_drops(rx)
        _send(tx, port, [transport(8)] * n + [os.urandom(40)] * n + [init] * n)
        got = _drain(rx)
        samples = {len(d) for d in got}
        assert samples <= {SAMPLE_UNKNOWN_INDEX, SAMPLE_MALFORMED, INITIATION_SIZE}, samples
        # one in SAMPLE of each class comes through (random: a loose bound)
        for size in (SAMPLE_UNKNOWN_INDEX, SAMPLE_MALFORMED, INITIATION_SIZE):
            k = sum(1 for d in got if len(d) == size)
            assert 16 <= k <= 160, (size, k)
        after = bpf.socket_drops(rx)
        assert before is not None and after is not None and after - before == 3 * n - len(got)
        bpf.detach(rx)
        _send(tx, port, [transport(8)])
        assert _drain(rx) == [transport(8)]
    finally:
        rx.close()
        tx.close()


def test_kernel_bans_an_ipv6_source_by_its_64() -> None:
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        rx.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        rx.setblocking(False)
        port = rx.getsockname()[1]
        init = b"\x01\x00\x00\x00" + bytes(INITIATION_SIZE - 4)
        bpf.attach(rx, filter_program(None, [v6_key("::1")]))
        for _ in range(16 * SAMPLE):
            tx.sendto(init, ("::1", port))
        got = _drain(rx)
        assert 2 <= len(got) <= 40, len(got)  # one in SAMPLE of a banned source's handshakes
        bpf.attach(rx, filter_program(None, [v6_key("2001:db8::1")]))  # another /64
        tx.sendto(init, ("::1", port))
        tx.sendto(transport(9), ("::1", port))
        assert _drain(rx) == [init, transport(9)]
    finally:
        rx.close()
        tx.close()
