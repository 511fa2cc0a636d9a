"""Framing of batches between edges and workers (the only code that knows the layout).

A frame is two or three ZeroMQ message parts:

    part 0  header: struct HEADER, then n x u32 packet lengths, then n x aux_per x u64
    part 1  body:   the n packets, concatenated
    part 2  extra:  optional; HANDSHAKE_OUT: msgpack session record;
                    TUN_WRITE: the n_counters x u64 transport counters the packets carry

Packets stay as one buffer end to end; there is no per-packet serialisation.
Every malformed frame raises FrameError (counted as a drop by the receiver).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from fabric.control import records

MAX_DATAGRAM = 65535  # largest UDP payload / TUN packet a frame carries

VERSION = 4
MAX_BATCH = 4096

# edge -> worker
DECRYPT = 1  # transport datagrams of one session from one source address
ENCRYPT = 2  # plaintext IP packets of one session; counters counter0, counter0+1, ...
HANDSHAKE = 3  # handshake datagrams from one source address
INITIATE = 4  # start a handshake to a peer (extra: {"peer": public key}) at address
# worker -> edge
# authenticated plaintexts, each with a virtio_net_hdr (fabric/dataplane/gro.py); one packet may carry
# several datagrams' segments: aux = (datagrams, their total length) per packet, and
# `counters` lists every datagram's counter in packet order
TUN_WRITE = 11
UDP_SEND = 12  # datagrams for one destination address
HANDSHAKE_OUT = 13  # datagrams to send (maybe none) and (extra) the session committed

KINDS = {DECRYPT, ENCRYPT, HANDSHAKE, INITIATE, TUN_WRITE, UDP_SEND, HANDSHAKE_OUT}
AUX_PER = {TUN_WRITE: 2}

# kind, version, aux_per, protocol, edge, n, session_id, counter0, address (16 bytes), port, seq
# protocol: the protocol's number (fabric.protocols) of HANDSHAKE, INITIATE and their results
# seq: the edge's order of data frames (0: unordered); workers echo it in the result
HEADER = struct.Struct("<BBBBHxxIQQ16sHI")

ADDR_SIZE, NO_ADDR = records.ADDR_SIZE, records.NO_ADDR  # packed addresses: pack_addr below


# libzmq's ZMQ_DONTWAIT and ZMQ_SNDMORE as plain ints: pyzmq's send_multipart and
# recv_multipart combine its enum.Flag values in Python, which costs 1.5-3 us per
# message on the data path (measured: 4.1 -> 2.5 us per two-part send, 6.2 -> 2.6 us
# per receive); send_parts/recv_parts below do the same with ints.
_DONTWAIT = 1
_SNDMORE = 2


def send_parts(sock: zmq.Socket, parts: Sequence[bytes]) -> None:
    """Send one frame's parts as one ZeroMQ message without blocking.

    Raises zmq.Again (nothing sent) when no peer can take it; ZeroMQ delivers all
    parts or none (it checks the high-water mark on the first part only).
    """
    last = len(parts) - 1
    send = sock.send
    for i in range(last):
        send(parts[i], _DONTWAIT | _SNDMORE)
    send(parts[last], _DONTWAIT)


def recv_parts(sock: zmq.Socket) -> list[memoryview] | None:
    """The parts of the next message on `sock` as buffers (no copy), or None if none waits."""
    try:
        f = sock.recv(_DONTWAIT, copy=False)
    except zmq.Again:
        return None
    parts = [f.buffer]
    while f.more:  # the rest of a multipart message is already here
        f = sock.recv(0, copy=False)
        parts.append(f.buffer)
    return parts


class FrameError(ValueError):
    """A malformed internal frame."""


def pack_addr(host: str, port: int) -> bytes:
    """Encode an IPv4 or IPv6 address and port as 18 bytes (IPv4 as v4-mapped IPv6)."""
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    else:
        raw = b"\x00" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host)
    return raw + struct.pack(">H", port)


def unpack_addr(addr: bytes) -> tuple[str, int]:
    """(host, port) of an 18-byte address; IPv4-mapped addresses come back as IPv4."""
    if len(addr) != ADDR_SIZE:
        raise FrameError("address must be 18 bytes")
    raw = addr[:16]
    (port,) = struct.unpack(">H", addr[16:])
    if raw[:12] == b"\x00" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:]), port
    return socket.inet_ntop(socket.AF_INET6, raw), port


def format_addr(addr: bytes) -> str:
    if addr == NO_ADDR:
        return ""
    host, port = unpack_addr(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class Frame:
    kind: int
    edge: int = 0
    session_id: int = 0
    counter0: int = 0
    addr: bytes = NO_ADDR
    packets: Sequence[bytes | memoryview] = ()
    aux: Sequence[int] = ()
    extra: bytes | None = None
    seq: int = 0
    counters: Sequence[int] = ()
    proto: int = 0  # the protocol (its number) of a control frame

    def encode(self) -> list[bytes]:
        """The ZeroMQ parts of this frame."""
        n = len(self.packets)
        aux_per = AUX_PER.get(self.kind, 0)
        if len(self.aux) != n * aux_per:
            raise FrameError(f"kind {self.kind} needs {aux_per} aux values per packet")
        lens = [len(p) for p in self.packets]
        head = HEADER.pack(
            self.kind,
            VERSION,
            aux_per,
            self.proto,
            self.edge,
            n,
            self.session_id,
            self.counter0,
            self.addr[:16],
            struct.unpack(">H", self.addr[16:18])[0],
            self.seq,
        )
        parts = [
            head + struct.pack(f"<{n}I", *lens) + struct.pack(f"<{n * aux_per}Q", *self.aux),
            b"".join(self.packets),
        ]
        if self.kind == TUN_WRITE:
            if sum(self.aux[0::2]) != len(self.counters):
                raise FrameError("TUN_WRITE: datagram counts do not add up to the counters")
            parts.append(struct.pack(f"<{len(self.counters)}Q", *self.counters))
        elif self.extra is not None:
            parts.append(self.extra)
        return parts


def decode(parts: Sequence[bytes | memoryview]) -> Frame:
    """Parse and validate the parts of a frame; raises FrameError."""
    if len(parts) not in (2, 3):
        raise FrameError(f"a frame has 2 or 3 parts, got {len(parts)}")
    head = parts[0]
    if len(head) < HEADER.size:
        raise FrameError("short header")
    kind, version, aux_per, proto, edge, n, sid, counter0, ip, port, seq = HEADER.unpack_from(head, 0)
    if version != VERSION:
        raise FrameError(f"frame version {version}, expected {VERSION}")
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if aux_per != AUX_PER.get(kind, 0):
        raise FrameError("aux count does not match kind")
    if n > MAX_BATCH:
        raise FrameError(f"batch of {n} packets is over {MAX_BATCH}")
    if len(head) != HEADER.size + 4 * n + 8 * n * aux_per:
        raise FrameError("header length does not match packet count")
    lens = struct.unpack_from(f"<{n}I", head, HEADER.size)
    aux = struct.unpack_from(f"<{n * aux_per}Q", head, HEADER.size + 4 * n)
    body = memoryview(parts[1])
    if sum(lens) != len(body):
        raise FrameError("body length does not match packet lengths")
    packets: list[memoryview] = []
    pos = 0
    for ln in lens:
        if ln > MAX_DATAGRAM:
            raise FrameError(f"packet of {ln} bytes")
        packets.append(body[pos : pos + ln])
        pos += ln
    extra = bytes(parts[2]) if len(parts) == 3 else None
    counters: Sequence[int] = ()
    if kind == TUN_WRITE:
        k = sum(aux[0::2])
        if extra is None or len(extra) != 8 * k or any(c == 0 for c in aux[0::2]):
            raise FrameError("TUN_WRITE: counters do not match the datagram counts")
        counters = struct.unpack(f"<{k}Q", extra)
        extra = None
    return Frame(kind, edge, sid, counter0, ip + struct.pack(">H", port), packets, aux, extra, seq, counters,
                 proto)
