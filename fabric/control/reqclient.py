"""A request/reply client that survives a dead server (ZeroMQ Guide "Lazy Pirate")."""

from __future__ import annotations

from typing import Any

import msgpack
import zmq


class RequestTimeout(RuntimeError):
    pass


class ReqClient:
    """REQ socket with a timeout: on no answer the socket is rebuilt, so the next call works."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: dict[int, Any] | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.curve = curve or {}
        self.sock: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self.sock is None:
            s = self.ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            for opt, val in self.curve.items():
                s.setsockopt(opt, val)
            s.connect(self.endpoint)
            self.sock = s
        return self.sock

    def call(self, request: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        sock = self._connect()
        sock.send(msgpack.packb(request, use_bin_type=True))
        if sock.poll(int(timeout * 1000), zmq.POLLIN):
            reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
            if not isinstance(reply, dict):
                raise RequestTimeout("malformed reply")
            return reply
        sock.close(0)
        self.sock = None
        raise RequestTimeout(f"no answer from {self.endpoint} within {timeout:g}s")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
