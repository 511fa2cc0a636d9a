"""Classic BPF socket filters: drop a flood in the kernel, before it costs a system call.

A datagram that userspace would only count and drop still costs an edge a
`recvfrom` and a few microseconds of Python; at 60,000 a second that is a core.
A socket filter (SO_ATTACH_FILTER, `Documentation/networking/filter.rst`) runs on
every datagram before it is queued to the socket; a datagram it refuses costs
about what a datagram to a closed port costs. Classic BPF needs no privilege and
no maps: the program is rebuilt and swapped (atomically) whenever what it knows
changes.

On a UDP socket the program sees the datagram from its UDP header on: payload
byte i is at offset 8 + i, the length (BPF_LEN) includes the 8-byte header, and
the IP header is reachable through SKF_NET_OFF. Its return value is the number
of bytes to keep: 0 drops, a small number truncates (the samples below).

`Program` is a small assembler with labels; a conditional jump whose target is
more than 255 instructions away gets a trampoline (`ja` takes 32-bit offsets).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

# linux/filter.h, linux/bpf_common.h
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_MEM, BPF_LEN = 0x00, 0x20, 0x60, 0x80
BPF_AND, BPF_RSH = 0x50, 0x70
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_A = 0x00, 0x10
BPF_MAXINSNS = 4096
SKF_AD_OFF = -0x1000
SKF_AD_RANDOM = 56
SKF_NET_OFF = -0x100000
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
PASS_ALL = 0xFFFFFFFF

_INSN = struct.Struct("=HBBI")


class FilterError(ValueError):
    """A program that cannot be assembled (too long, unknown label)."""


@dataclass
class _Insn:
    code: int
    k: int = 0
    jt: str | None = None  # label names for conditional jumps (None: the next instruction)
    jf: str | None = None
    target: str | None = None  # for `ja`


@dataclass
class Program:
    """A classic BPF program under construction: instructions and labels."""

    insns: list[_Insn | str] = field(default_factory=list)  # a str is a label

    def label(self, name: str) -> None:
        self.insns.append(name)

    def ld_len(self) -> None:
        self.insns.append(_Insn(BPF_LD | BPF_W | BPF_LEN))

    def ld(self, size: int, offset: int) -> None:
        """A = the size-byte big-endian value at `offset` (negative: SKF_* areas)."""
        self.insns.append(_Insn(BPF_LD | size | BPF_ABS, offset & 0xFFFFFFFF))

    def ld_random(self) -> None:
        self.ld(BPF_W, SKF_AD_OFF + SKF_AD_RANDOM)

    def ld_mem(self, slot: int) -> None:
        self.insns.append(_Insn(BPF_LD | BPF_MEM, slot))

    def st(self, slot: int) -> None:
        self.insns.append(_Insn(BPF_ST, slot))

    def and_(self, k: int) -> None:
        self.insns.append(_Insn(BPF_ALU | BPF_AND | BPF_K, k))

    def rsh(self, k: int) -> None:
        self.insns.append(_Insn(BPF_ALU | BPF_RSH | BPF_K, k))

    def jump(self, op: int, k: int, jt: str | None, jf: str | None) -> None:
        """if A <op> k goto jt else goto jf (None: fall through)."""
        self.insns.append(_Insn(BPF_JMP | op | BPF_K, k & 0xFFFFFFFF, jt, jf))

    def ja(self, target: str) -> None:
        self.insns.append(_Insn(BPF_JMP | BPF_JA, 0, target=target))

    def ret(self, k: int) -> None:
        self.insns.append(_Insn(BPF_RET | BPF_K, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        """The program as `struct sock_filter[]`; raises FilterError."""
        # pass 1: which conditional jumps need trampolines (grow until stable)
        far: set[tuple[int, int]] = set()  # (index in self.insns, 0 for jt / 1 for jf)
        while True:
            pos, labels = self._layout(far)
            grew = False
            for i, ins in enumerate(self.insns):
                if isinstance(ins, str) or ins.code & 0x07 != BPF_JMP or ins.code & 0xF0 == BPF_JA:
                    continue
                for which, name in ((0, ins.jt), (1, ins.jf)):
                    if name is None or (i, which) in far:
                        continue
                    if name not in labels:
                        raise FilterError(f"unknown label {name!r}")
                    if labels[name] - (pos[i] + 1) > 255:
                        far.add((i, which))
                        grew = True
            if not grew:
                break
        out: list[bytes] = []
        for i, ins in enumerate(self.insns):
            if isinstance(ins, str):
                continue
            here = pos[i]
            if ins.code & 0x07 == BPF_JMP and ins.code & 0xF0 == BPF_JA:
                assert ins.target is not None
                if ins.target not in labels:
                    raise FilterError(f"unknown label {ins.target!r}")
                if labels[ins.target] <= here:
                    raise FilterError(f"jump back to {ins.target!r}: BPF jumps go forward only")
                out.append(_INSN.pack(ins.code, 0, 0, labels[ins.target] - (here + 1)))
            elif ins.code & 0x07 == BPF_JMP:
                tramps = [w for w in (0, 1) if (i, w) in far]
                offs = []
                for which, name in ((0, ins.jt), (1, ins.jf)):
                    if name is None:
                        offs.append(len(tramps))  # the instruction after the trampolines
                    elif (i, which) in far:
                        offs.append(tramps.index(which))
                    else:
                        off = labels[name] - (here + 1)
                        if off < 0:
                            raise FilterError(f"jump back to {name!r}: BPF jumps go forward only")
                        offs.append(off)
                out.append(_INSN.pack(ins.code, offs[0], offs[1], ins.k))
                for t, which in enumerate(tramps):
                    name = ins.jt if which == 0 else ins.jf
                    assert name is not None
                    out.append(_INSN.pack(BPF_JMP | BPF_JA, 0, 0, labels[name] - (here + 2 + t)))
            else:
                out.append(_INSN.pack(ins.code, 0, 0, ins.k))
        if len(out) > BPF_MAXINSNS:
            raise FilterError(f"program of {len(out)} instructions; the kernel takes {BPF_MAXINSNS}")
        return b"".join(out)

    def _layout(self, far: set[tuple[int, int]]) -> tuple[dict[int, int], dict[str, int]]:
        pos: dict[int, int] = {}
        labels: dict[str, int] = {}
        n = 0
        for i, ins in enumerate(self.insns):
            if isinstance(ins, str):
                if ins in labels:
                    raise FilterError(f"label {ins!r} defined twice")
                labels[ins] = n
                continue
            pos[i] = n
            n += 1 + sum(1 for w in (0, 1) if (i, w) in far)
        return pos, labels


def search(prog: Program, values: Sequence[int], hit: str, miss: str, tag: str) -> None:
    """Append a binary search of A in sorted, distinct `values`: goto hit or miss."""
    def node(lo: int, hi: int, name: str) -> None:
        prog.label(name)
        if lo >= hi:
            prog.ja(miss)
            return
        mid = (lo + hi) // 2
        prog.jump(BPF_JEQ, values[mid], hit, None)
        if hi - lo == 1:
            prog.ja(miss)
            return
        right, left = f"{name}r", f"{name}l"
        prog.jump(BPF_JGT, values[mid], right, left)
        node(lo, mid, left)
        node(mid + 1, hi, right)

    node(0, len(values), f"_{tag}")


# --------------------------------------------------------------------------- attaching


def attach(sock: socket.socket, program: bytes) -> None:
    """Swap `program` in as the socket's filter (the kernel copies it)."""
    n = len(program) // _INSN.size
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HxxxxxxP" if struct.calcsize("P") == 8 else "HxxP", n, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass  # none attached


SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8


def socket_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for this socket since it was opened: those a
    filter refused and those a full receive buffer had no room for (SO_MEMINFO)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * 9)
    except OSError:
        return None
    if len(raw) < 4 * (SK_MEMINFO_DROPS + 1):
        return None
    return int(struct.unpack_from("=I", raw, 4 * SK_MEMINFO_DROPS)[0])
