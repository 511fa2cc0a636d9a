"""A UDP flood for the test bed: what an attacker with an old client config sends.

``python -m fabric.testbed.flood DST PORT --kind KIND --rate PPS --seconds S`` sends
datagrams of one kind from ``--ports`` sockets (default 64, so SO_REUSEPORT
spreads them over every edge) at a paced rate, then prints one JSON line:
what it sent, at what rate, and what came back (cookie replies, other).

Kinds (WireGuard, whitepaper 5.4):

* ``initiation``: type 1, 148 bytes, random ephemeral, static, timestamp and
  sender fields with a *valid* mac1 (anyone who ever had a client config knows
  the server's public key) and mac2 zero: the costliest flood a stranger can
  make, since only a Diffie-Hellman tells it from a real one;
* ``bad-mac1``: the same with a wrong mac1;
* ``unknown-index``: type 4 transport datagrams to receiver indexes nobody holds;
* ``random``: random bytes of random lengths (1..1400);
* ``short``: truncated handshakes (type 1 with 4..147 bytes);
* ``oversized``: type 1 padded to 1400 bytes.

Kinds (OpenVPN, ../shared/openvpn-protocol.md):

* ``ovpn-reset``: P_CONTROL_HARD_RESET_CLIENT_V2 wrapped with the *valid*
  tls-crypt key of a client profile (``--ovpn-profile FILE``: anyone who had a
  profile has it), each with its own random session id and the current time: a
  server that kept state per first packet would grow with every one;
* ``ovpn-junk``: the hard-reset opcode followed by random bytes (a failed unwrap).

Bounded: at most ``--seconds`` (<= 600) and ``--max-packets``; destinations only
in 198.18.0.0/15 or loopback (the test network's rule), so it cannot be pointed
at anything but the namespaces a test built. Datagrams come from a pool built
before the clock starts. By default each goes out with its own ``sendto``, as a
simple attacker writes it: on this 2-core VM that is about 100,000 a second from
one process, which then takes a core (the veth's receive path runs on the
sender's CPU too). ``--burst`` sends bursts of 16 with one ``sendmmsg`` each
(ctypes) instead: the same rate costs the sender less, and the datagrams come in
bursts per source port.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import ipaddress
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence

KINDS = ("initiation", "bad-mac1", "unknown-index", "random", "short", "oversized", "ovpn-reset",
         "ovpn-junk")
ALLOWED_NETS = (
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
MAX_SECONDS = 600.0
MAX_RATE = 1_000_000
POOL = 4096  # distinct datagrams, sent round-robin
BURST = 16  # datagrams per sendmmsg call (all from one source port)


class FloodError(ValueError):
    """A flood we refuse to send (bad destination or bounds)."""


def check_destination(host: str) -> str:
    """`host` if it is an address the test network may flood, else FloodError."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise FloodError(f"{host!r} is not an IP address") from None
    if not any(addr in net for net in ALLOWED_NETS):
        raise FloodError(f"{host} is outside 198.18.0.0/15 and loopback: the flood only targets "
                         "the test namespaces")
    return host


# --------------------------------------------------------------------------- datagrams


def ovpn_resets(static_key: bytes, n: int, rand: Callable[[int], bytes] = os.urandom) -> list[bytes]:
    """`n` hard resets a client with this tls-crypt key could send, each from its own
    new session (the payload a 2.6 client sends: no TLVs, message id 0)."""
    from fabric.protocols.openvpn.constants import P_CONTROL_HARD_RESET_CLIENT_V2
    from fabric.protocols.openvpn.wire import ControlPacket
    from fabric.protocols.openvpn.wrap import TlsCrypt

    wrap = TlsCrypt(static_key, server=False)
    now = int(time.time())
    return [wrap.wrap(ControlPacket(P_CONTROL_HARD_RESET_CLIENT_V2, 0, rand(8), message_id=0).pack(),
                      i + 1, now) for i in range(n)]


def static_key_of_profile(text: str) -> bytes:
    """The tls-crypt key inside an inline profile (FloodError if it has none)."""
    from fabric.protocols.openvpn.wire import WireError
    from fabric.protocols.openvpn.wrap import parse_static_key

    start, end = text.find("<tls-crypt>"), text.find("</tls-crypt>")
    if start < 0 or end < start:
        raise FloodError("the profile has no <tls-crypt> block")
    try:
        return parse_static_key(text[start + len("<tls-crypt>"):end])
    except WireError as exc:
        raise FloodError(f"the profile's tls-crypt key: {exc}") from None


def make_pool(kind: str, server_public: bytes | None, n: int = POOL,
              rand: Callable[[int], bytes] = os.urandom, static_key: bytes | None = None) -> list[bytes]:
    """`n` distinct datagrams of one kind (see the module docstring)."""
    if kind not in KINDS:
        raise FloodError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    out: list[bytes] = []
    if kind == "ovpn-reset":
        if static_key is None:
            raise FloodError("--kind ovpn-reset needs a client profile with a tls-crypt key (--ovpn-profile)")
        return ovpn_resets(static_key, n, rand)
    if kind == "ovpn-junk":
        return [bytes((7 << 3,)) + rand(8 + int.from_bytes(rand(1), "little") % 200) for _ in range(n)]
    if kind in ("initiation", "bad-mac1"):
        if server_public is None or len(server_public) != 32:
            raise FloodError(f"--kind {kind} needs the server's public key (--server-key)")
        from fabric.protocols.wireguard.noise import compute_mac1, mac1_key_for

        key = mac1_key_for(server_public)
        for _ in range(n):
            body = bytearray(b"\x01\x00\x00\x00" + rand(112) + bytes(32))
            body[116:132] = compute_mac1(key, bytes(body)) if kind == "initiation" else rand(16)
            out.append(bytes(body))
    elif kind == "unknown-index":
        for _ in range(n):
            out.append(b"\x04\x00\x00\x00" + rand(4) + rand(8) + rand(112))  # 128 bytes, as a short packet
    elif kind == "random":
        sizes = rand(2 * n)
        for i in range(n):
            size = 1 + int.from_bytes(sizes[2 * i : 2 * i + 2], "little") % 1400
            out.append(rand(size))
    elif kind == "short":
        sizes = rand(n)
        for i in range(n):
            out.append(b"\x01\x00\x00\x00" + rand(sizes[i] % 144))
    else:  # oversized
        for _ in range(n):
            out.append(b"\x01\x00\x00\x00" + rand(1396))
    return out


# --------------------------------------------------------------------------- sending


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


MSG_DONTWAIT = 0x40


class MmsgSender:
    """Sends bursts of a fixed pool to one address with one sendmmsg each. The sockets
    are not connected: an ICMP port unreachable (the closed-port ceiling) must not turn
    the next send into an error."""

    def __init__(self, pool: Sequence[bytes], sockaddr: bytes) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._sendmmsg = libc.sendmmsg
        self._sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        self._sendmmsg.restype = ctypes.c_int
        # the pool twice over, so that any window of BURST entries is contiguous
        n = len(pool)
        self.n = n
        self._bufs = [ctypes.create_string_buffer(p, len(p)) for p in pool]
        self._iov = (_Iovec * n)()
        for i, b in enumerate(self._bufs):
            self._iov[i].iov_base = ctypes.addressof(b)
            self._iov[i].iov_len = len(pool[i])
        self._name = ctypes.create_string_buffer(sockaddr, len(sockaddr))
        self._msgs = (_Mmsghdr * (n + BURST))()
        for i in range(n + BURST):
            h = self._msgs[i].msg_hdr
            h.msg_name = ctypes.addressof(self._name)
            h.msg_namelen = len(sockaddr)
            h.msg_iov = ctypes.pointer(self._iov[i % n])
            h.msg_iovlen = 1
        self._base = ctypes.addressof(self._msgs)
        self._size = ctypes.sizeof(_Mmsghdr)

    def send(self, fd: int, start: int, count: int) -> int:
        """Send pool entries start..start+count-1 (count <= BURST); how many went."""
        got = self._sendmmsg(fd, self._base + (start % self.n) * self._size, count, MSG_DONTWAIT)
        return max(0, got)


class SendtoSender:
    """One sendto per datagram (the fallback, and --per-packet)."""

    def __init__(self, pool: Sequence[bytes], dst: tuple[str, int]) -> None:
        self.pool = list(pool)
        self.n = len(pool)
        self.dst = dst
        self.socks: dict[int, socket.socket] = {}

    def send(self, fd: int, start: int, count: int) -> int:
        sendto = self.socks[fd].sendto
        pool, n, dst = self.pool, self.n, self.dst
        sent = 0
        for i in range(start, start + count):
            try:
                sendto(pool[i % n], dst)
            except OSError:
                continue
            sent += 1
        return sent


def _sockaddr(family: int, host: str, port: int) -> bytes:
    """struct sockaddr_in / sockaddr_in6 for sendmmsg's msg_name."""
    if family == socket.AF_INET:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", 0))


def flood(dst: str, port: int, pool: Sequence[bytes], rate: float, seconds: float,
          max_packets: int, ports: int = 64, progress: Callable[[str], None] | None = None,
          burst: bool = False) -> dict[str, object]:
    """Send `pool` round-robin to dst:port at `rate` datagrams/s from `ports` sockets
    for `seconds` or `max_packets`, whichever ends first. Returns a summary."""
    check_destination(dst)
    if not 0 < seconds <= MAX_SECONDS:
        raise FloodError(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    if not 0 < rate <= MAX_RATE:
        raise FloodError(f"--rate must be in (0, {MAX_RATE}]")
    if not 1 <= ports <= 1024:
        raise FloodError("--ports must be in 1..1024")
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    socks = []
    for _ in range(ports):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        socks.append(s)
    sender: MmsgSender | SendtoSender
    try:
        if not burst:
            raise OSError("one sendto per datagram asked for")
        sender = MmsgSender(pool, _sockaddr(family, dst, port))
        mode = "sendmmsg"
    except (OSError, AttributeError):
        sender = SendtoSender(pool, (dst, port))
        sender.socks = {s.fileno(): s for s in socks}
        mode = "sendto"
    fds = [s.fileno() for s in socks]
    replies = {"cookie_replies": 0, "other_replies": 0}

    def drain() -> None:
        for s in socks:
            for _ in range(256):
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                if len(data) == 64 and data[:4] == b"\x03\x00\x00\x00":
                    replies["cookie_replies"] += 1
                else:
                    replies["other_replies"] += 1

    sent = attempted = 0
    k = 0
    start = time.monotonic()
    end = start + seconds
    next_drain = start + 0.05
    next_report = start + 1.0
    try:
        while attempted < max_packets:
            now = time.monotonic()
            if now >= end:
                break
            due = int((now - start) * rate)
            if attempted >= due:
                time.sleep(min(0.0005, (attempted + BURST - due) / rate))
                continue
            count = min(BURST, max_packets - attempted, due - attempted)
            sent += sender.send(fds[k % ports], attempted, count)
            attempted += count
            k += 1
            if now >= next_drain:
                drain()
                next_drain = now + 0.05
            if progress is not None and now >= next_report:
                progress(f"flood: {sent} sent in {now - start:.1f} s")
                next_report = now + 1.0
        elapsed = time.monotonic() - start
        time.sleep(0.1)
        drain()
    finally:
        for s in socks:
            s.close()
    return {
        "dst": f"{dst}:{port}", "kind": "", "mode": mode, "ports": ports,
        "attempted": attempted, "sent": sent, "seconds": round(elapsed, 3),
        "rate": round(sent / elapsed) if elapsed > 0 else 0, **replies,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fabric.testbed.flood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dst", help="destination address (198.18.0.0/15 or loopback only)")
    p.add_argument("port", type=int)
    p.add_argument("--kind", choices=KINDS, default="initiation")
    p.add_argument("--server-key", help="the server's public key, base64 (initiation, bad-mac1)")
    p.add_argument("--ovpn-profile", help="an OpenVPN client profile with <tls-crypt> (ovpn-reset)")
    p.add_argument("--rate", type=float, default=120_000.0, help="datagrams per second (default 120000)")
    p.add_argument("--seconds", type=float, default=10.0, help=f"at most this long (<= {MAX_SECONDS:g})")
    p.add_argument("--max-packets", type=int, default=None,
                   help="at most this many datagrams (default rate x seconds)")
    p.add_argument("--ports", type=int, default=64, help="source ports (sockets), default 64")
    p.add_argument("--burst", action="store_true",
                   help=f"bursts of {BURST} datagrams per sendmmsg instead of one sendto each")
    p.add_argument("-v", "--verbose", action="store_true", help="a progress line every second (stderr)")
    args = p.parse_args(argv)
    try:
        key = None
        if args.server_key:
            from fabric.protocols.wireguard.crypto import key_from_base64

            key = key_from_base64(args.server_key)
        static_key = None
        if args.ovpn_profile:
            try:
                text = open(args.ovpn_profile).read()
            except OSError as exc:
                raise FloodError(f"--ovpn-profile: {exc}") from None
            static_key = static_key_of_profile(text)
        pool = make_pool(args.kind, key, static_key=static_key)
        limit = args.max_packets if args.max_packets is not None else int(args.rate * args.seconds) + 1
        out = flood(args.dst, args.port, pool, args.rate, args.seconds, limit, args.ports,
                    progress=(lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None,
                    burst=args.burst)
    except (FloodError, ValueError) as exc:
        print(f"flood: {exc}", file=sys.stderr)
        return 2
    out["kind"] = args.kind
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
