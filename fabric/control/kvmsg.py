"""Clone-pattern key-value messages between the broker and its subscribers.

After the ZeroMQ Guide's kvmsg.py: this class owns the framing of one message
type. A message is four parts (a ROUTER reply has the peer identity before them):

    key      bytes, e.g. b"session/42"; the reserved keys below
    seq      u64 big-endian: the broker's sequence number of this change
    epoch    u64 big-endian: identifies one broker run; a new epoch means resync
    value    msgpack map, or empty for "deleted"
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

ICANHAZ = b"ICANHAZ?"  # snapshot request (client -> broker)
KTHXBAI = b"KTHXBAI"  # end of snapshot; seq is the snapshot's sequence number
HUGZ = b"HUGZ"  # heartbeat; seq is the broker's current sequence number

_U64 = struct.Struct(">Q")
MAX_KEY = 256


class KVError(ValueError):
    """A malformed key-value message."""


@dataclass(slots=True)
class KVMsg:
    key: bytes
    seq: int
    epoch: int
    value: dict[str, Any] | None = None

    def parts(self) -> list[bytes]:
        body = b"" if self.value is None else msgpack.packb(self.value, use_bin_type=True)
        return [self.key, _U64.pack(self.seq), _U64.pack(self.epoch), body]

    def send(self, sock: zmq.Socket, identity: bytes | None = None) -> None:
        parts = self.parts()
        if identity is not None:
            parts = [identity, *parts]
        sock.send_multipart(parts, flags=zmq.NOBLOCK)

    @classmethod
    def from_parts(cls, parts: list[bytes]) -> KVMsg:
        if len(parts) != 4:
            raise KVError(f"a kv message has 4 parts, got {len(parts)}")
        key, seq, epoch, body = parts
        if not key or len(key) > MAX_KEY:
            raise KVError("bad key length")
        if len(seq) != 8 or len(epoch) != 8:
            raise KVError("seq and epoch are 8 bytes")
        value = None
        if body:
            try:
                value = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except Exception as exc:
                raise KVError(f"value is not msgpack: {exc}") from exc
            if not isinstance(value, dict):
                raise KVError("value is not a map")
        return cls(bytes(key), _U64.unpack(seq)[0], _U64.unpack(epoch)[0], value)

    @classmethod
    def recv(cls, sock: zmq.Socket) -> KVMsg:
        return cls.from_parts(sock.recv_multipart(flags=zmq.NOBLOCK))
