"""iperf3 between two namespaces, one bounded run at a time, parsed from its JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fabric.testbed.netns import Topology, tail

# --------------------------------------------------------------------------- iperf3


class IperfError(RuntimeError):
    pass


@dataclass
class IperfResult:
    sent_mbps: float
    received_mbps: float
    retransmits: int | None
    reverse: bool
    raw: dict[str, Any]

    @property
    def mbps(self) -> float:
        """Goodput measured at the receiver."""
        return self.received_mbps


def parse_iperf(data: str, reverse: bool = False) -> IperfResult:
    try:
        j = json.loads(data)
    except ValueError as e:
        raise IperfError(f"iperf3 printed no JSON: {data[-500:]!r}") from e
    if j.get("error"):
        raise IperfError(f"iperf3: {j['error']}")
    end = j.get("end", {})
    sent, recv = end.get("sum_sent", {}), end.get("sum_received", {})
    if not sent and "sum" in end:  # UDP
        sent = recv = end["sum"]
    return IperfResult(
        sent_mbps=float(sent.get("bits_per_second", 0.0)) / 1e6,
        received_mbps=float(recv.get("bits_per_second", 0.0)) / 1e6,
        retransmits=sent.get("retransmits"),
        reverse=reverse,
        raw=j,
    )


def iperf3(
    topo: Topology,
    server_ns: str,
    client_ns: str,
    addr: str,
    seconds: float = 3.0,
    reverse: bool = False,
    port: int = 5201,
    parallel: int = 1,
    extra: Sequence[str] = (),
) -> IperfResult:
    """One bounded iperf3 TCP run: server (``-s -1 -B addr``) in server_ns,
    client (``-J``) in client_ns. ``reverse`` sends server -> client (``-R``)."""
    srv = topo.popen(
        server_ns, ["iperf3", "-s", "-1", "-B", addr, "-p", str(port)], label="iperf3-server"
    )
    try:
        deadline = time.monotonic() + 5.0
        while not topo.tcp_listening(server_ns, addr, port):
            if srv.poll() is not None or time.monotonic() >= deadline:
                raise IperfError(
                    f"iperf3 server did not listen on {addr}:{port}\n{tail(topo.log_path(srv))}"
                )
            time.sleep(0.05)
        argv = [
            "iperf3",
            "-c",
            addr,
            "-p",
            str(port),
            "-t",
            f"{seconds:g}",
            "-P",
            str(parallel),
            "-J",
            "--connect-timeout",
            "5000",
            *extra,
        ]
        if reverse:
            argv.append("-R")
        cp = topo.run(client_ns, argv, check=False, timeout=seconds + 30)
        return parse_iperf(cp.stdout or cp.stderr, reverse=reverse)
    finally:
        topo.stop(srv, timeout=3.0)
