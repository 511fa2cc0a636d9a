"""tcpdump in a namespace and the pcap reader for checks after the fact (nonces, handshakes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fabric.testbed.netns import Topology, TopologyError, tail

# --------------------------------------------------------------------------- captures

_NO_UDP_GSO = """
import sys
from pyroute2 import Ethtool
e = Ethtool()
f = e.get_features(sys.argv[1])
f.features["tx-udp-segmentation"].enable = False
e.set_features(sys.argv[1], f)
if e.get_features(sys.argv[1]).features["tx-udp-segmentation"].enable:
    sys.exit("tx-udp-segmentation stays on")
"""


class Capture:
    """tcpdump of UDP on one interface of a namespace, for checks after the fact.

    Only the first `snaplen` bytes of each frame are kept: enough for the
    WireGuard header (type, receiver index, counter) or OpenVPN's (opcode, peer-id,
    packet id).

    A sender with UDP GSO (the fabric's edges) hands a batch of datagrams to the
    interface as one buffer, and tcpdump would see only the first datagram's header.
    With `segments=True` the interface's UDP segmentation offload is switched off
    first (ethtool's tx-udp-segmentation, through pyroute2), so the kernel splits
    every batch before the capture point and each datagram shows on its own.
    """

    def __init__(self, topo: Topology, ns: str, iface: str, bpf: str = "udp", snaplen: int = 128,
                 segments: bool = False) -> None:
        self.topo = topo
        self.iface, self.segments = iface, segments
        self.path = topo.workdir / f"capture-{iface}-{time.monotonic_ns()}.pcap"
        self.argv = ["tcpdump", "-i", iface, "-n", "-U", "-B", "16384", "-s", str(snaplen),
                     "-w", str(self.path), bpf]
        self.ns = ns
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        if self.segments:
            self.topo.run(self.ns, [sys.executable, "-c", _NO_UDP_GSO, self.iface])
        self.proc = self.topo.popen(self.ns, self.argv, label="tcpdump")
        log = self.topo.log_path(self.proc)
        for _ in range(100):  # tcpdump says "listening on ..." once it captures
            if "listening on" in log.read_text(errors="replace") or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if self.proc.poll() is not None:
            raise TopologyError(f"tcpdump failed: {tail(log)}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.topo.stop(self.proc, sig=signal.SIGINT)

    def packets(self) -> list[UdpPacket]:
        return read_pcap(self.path)


@dataclass(frozen=True)
class UdpPacket:
    src: str
    sport: int
    dst: str
    dport: int
    length: int  # UDP payload length on the wire
    head: bytes  # the captured start of the payload


def read_pcap(path: str | Path) -> list[UdpPacket]:
    """UDP packets of a classic pcap file (Ethernet or Linux cooked link types)."""
    return list(iter_pcap(path))


def iter_pcap(path: str | Path) -> Iterator[UdpPacket]:
    """UDP packets of a classic pcap file, read as a stream (captures can be large)."""
    import ipaddress as _ip
    import struct as _st

    names: dict[bytes, str] = {}

    def name(raw: bytes) -> str:
        text = names.get(raw)
        if text is None:
            text = names[raw] = str(_ip.ip_address(raw))
        return text

    with open(path, "rb") as f:
        ghdr = f.read(24)
        if len(ghdr) < 24:
            return
        magic = ghdr[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            end = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            end = ">"
        else:
            raise ValueError(f"{path}: not a pcap file")
        (linktype,) = _st.unpack_from(end + "I", ghdr, 20)
        link_len = {1: 14, 113: 16, 276: 20}.get(linktype)
        if link_len is None:
            raise ValueError(f"{path}: unsupported link type {linktype}")
        rec = _st.Struct(end + "IIII")
        while True:  # ends with the file
            h = f.read(16)
            if len(h) < 16:
                return
            incl = rec.unpack(h)[2]
            frame = f.read(incl)
            if len(frame) < incl:
                return
            if linktype == 276:
                ethertype = _st.unpack_from(">H", frame, 0)[0] if len(frame) >= 2 else 0
            else:
                ethertype = _st.unpack_from(">H", frame, link_len - 2)[0] if len(frame) >= link_len else 0
            ip = frame[link_len:]
            if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 17:
                ihl = (ip[0] & 15) * 4
                src, dst = ip[12:16], ip[16:20]
            elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 17:
                ihl = 40
                src, dst = ip[8:24], ip[24:40]
            else:
                continue
            udp = ip[ihl:]
            if len(udp) < 8:
                continue
            sport, dport, ulen = _st.unpack_from(">HHH", udp, 0)
            yield UdpPacket(name(src), sport, name(dst), dport, ulen - 8, bytes(udp[8:]))


def transport_nonces(packets: Sequence[UdpPacket]) -> list[tuple[int, int]]:
    """(receiver index, counter) of every WireGuard transport message captured."""
    from fabric.protocols.wireguard.messages import TRANSPORT

    out = []
    for p in packets:
        if len(p.head) >= 16 and p.head[:4] == b"\x04\x00\x00\x00":
            _, receiver, counter = TRANSPORT.unpack_from(p.head, 0)
            out.append((receiver, counter))
    return out
