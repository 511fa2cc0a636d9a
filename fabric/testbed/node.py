"""A real Edge, Worker and Broker in one process, over in-memory UDP and TUN
(fabric/testbed/fakes.py): the processes' loops run in threads and talk over real
ZeroMQ sockets (ipc, in a temporary state directory). Protocol clients drive it in
memory (tests/test_node.py, tests/test_openvpn_node.py).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from brokers.broker import Broker
from fabric.dataplane.edge import Edge
from fabric.ops import admin
from fabric.ops.paths import StateDir
from fabric.protocols.base import Protocol
from fabric.testbed.fakes import FakeIO, FakeNet, FakeTun
from workers.worker import Worker

SERVER_UDP = ("198.18.0.1", 51820)
CLIENT_UDP = ("198.18.0.2", 40000)
SERVER_IP, CLIENT_IP = "198.19.100.1", "198.19.100.2"


def udp_packet(src: str, dst: str, payload: bytes) -> bytes:
    """An IPv4/UDP packet (checksums zero: nothing here checks them)."""
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + udp


class Node:
    """A broker, an edge and a worker of one fabric in this process (see the docstring)."""

    def __init__(self, root: Path, protocols: dict[str, Protocol], ports: dict[str, int], crypto: str,
                 options: dict[str, dict[str, Any]] | None = None) -> None:
        os.environ["FABRIC_NO_GRO"] = "1"  # every packet whole on the fake TUN
        self.sd = StateDir.at(root / "state").ensure()
        self.ctx = zmq.Context()
        self.broker = Broker(self.sd, [f"{SERVER_IP}/24"], 51820, None, [], protocols=protocols, ports=ports,
                             options=options)
        self.broker.bind(self.ctx)
        self.net, self.tun = FakeNet(), FakeTun()
        self.edge = Edge(self.sd, 0, tun_name="fake0", io=FakeIO(self.net, SERVER_UDP[0], self.tun),
                         crypto=crypto, protocols=protocols, ports=ports)
        self.worker = Worker(self.sd, 0, protocols=protocols)
        self.stop = [False]
        self.threads = [threading.Thread(target=srv.serve, args=(self.stop,), daemon=True)
                        for srv in (self.broker, self.edge, self.worker)]
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 15
        while not (self.edge.attached and self.worker.edges and self.edge.workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.edge.attached and self.worker.edges and self.edge.workers, "the edge or the worker never joined"

    def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        return admin.request(self.sd.admin, request, timeout=5.0)

    def close(self) -> None:
        self.stop[0] = True
        for t in self.threads:
            t.join(timeout=5)
        self.edge.close()
        self.edge.ctx.destroy(0)
        self.worker.ctx.destroy(0)
        self.ctx.destroy(0)
        self.tun.close()
        self.sd.session_table.unlink(missing_ok=True)
        os.environ.pop("FABRIC_NO_GRO", None)



def within(seconds: float, step: Callable[[], bool]) -> bool:
    """Run `step` until it returns True, for at most `seconds` (bounded loop)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if step():
            return True
    return False
