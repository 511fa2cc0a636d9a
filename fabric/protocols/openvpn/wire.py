"""OpenVPN packet formats (shared/openvpn-protocol.md sections 1.1, 1.2, 3.1), sans-I/O, no crypto.

Every parser here takes untrusted bytes and either returns a value or raises
WireError whose `reason` is a short token used as a drop-counter label.

Control packets are handled in their unwrapped layout (what ssl.c tls_pre_decrypt sees
after ssl_pkt.c read_control_auth, with the opcode and the sender's session id in front):

    op|kid (1) | own session_id (8) | n_acks (1) | n_acks x message id (4)
    | [peer session_id (8) if n_acks > 0] | message id (4, absent in P_ACK_V1) | payload

fabric.protocols.openvpn.wrap turns it into and out of what goes on the wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fabric.protocols.openvpn.constants import (
    CONTROL_OPCODES,
    DATA_V1_HEADER_SIZE,
    DATA_V1_MIN_SIZE,
    DATA_V2_HEADER_SIZE,
    DATA_V2_MIN_SIZE,
    HARD_RESET_OPCODES,
    KEY_ID_FIRST,
    MAX_PEER_ID,
    P_ACK_V1,
    P_DATA_V1,
    P_DATA_V2,
    P_KEY_ID_MASK,
    P_OPCODE_SHIFT,
    PACKET_ID_MAX,
    PACKET_ID_SIZE,
    RELIABLE_ACK_SIZE,
    SID_SIZE,
)


class WireError(ValueError):
    """Bytes that are not a well-formed OpenVPN packet (or a bad key file)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_ZERO_SID = bytes(SID_SIZE)


def opcode_key_id(first_byte: int) -> tuple[int, int]:
    """(opcode, key_id) of a packet's first byte (ssl_pkt.h P_OPCODE_SHIFT, P_KEY_ID_MASK)."""
    return (first_byte & 0xFF) >> P_OPCODE_SHIFT, first_byte & P_KEY_ID_MASK


def first_byte(opcode: int, key_id: int) -> int:
    """opcode << P_OPCODE_SHIFT | key_id (ssl_pkt.c write_control_auth)."""
    if not 0 <= opcode <= 0x1F:
        raise ValueError(f"opcode {opcode} outside 0..31")
    if not 0 <= key_id <= P_KEY_ID_MASK:
        raise ValueError(f"key id {key_id} outside 0..7")
    return opcode << P_OPCODE_SHIFT | key_id


def parse_tlvs(payload: bytes) -> list[tuple[int, bytes]]:
    """The (type, value) list of a hard reset's payload (ssl.c parse_early_negotiation_tlvs:
    u16 type, u16 length, value; a truncated one fails the session). Raises WireError("bad_tlv")."""
    out: list[tuple[int, bytes]] = []
    pos, n = 0, len(payload)
    while pos < n:
        if n - pos < 4:
            raise WireError("bad_tlv", f"{n - pos} bytes left for a TLV header")
        (kind,) = _U16.unpack_from(payload, pos)
        (length,) = _U16.unpack_from(payload, pos + 2)
        pos += 4
        if n - pos < length:
            raise WireError("bad_tlv", f"TLV {kind:#x} of {length} bytes, {n - pos} left")
        out.append((kind, bytes(payload[pos:pos + length])))
        pos += length
    return out


def pack_tlvs(tlvs: list[tuple[int, bytes]]) -> bytes:
    """The inverse of parse_tlvs (ssl_pkt.c tls_reset_standalone writes one)."""
    return b"".join(_U16.pack(kind) + _U16.pack(len(value)) + value for kind, value in tlvs)


@dataclass(frozen=True, slots=True)
class ControlPacket:
    """A control packet in the unwrapped layout (module docstring).

    `session_id` is the sender's own; `acks` are message ids of the receiver's packets
    and `remote_session_id` (the receiver's sid) is present iff `acks` is non-empty
    (reliable.c reliable_ack_write); `message_id` is None exactly for P_ACK_V1.
    """

    opcode: int
    key_id: int
    session_id: bytes
    acks: tuple[int, ...] = ()
    remote_session_id: bytes | None = None
    message_id: int | None = None
    payload: bytes = b""

    def pack(self) -> bytes:
        """The unwrapped bytes; ValueError if the fields do not make a valid packet."""
        if self.opcode not in CONTROL_OPCODES:
            raise ValueError(f"opcode {self.opcode} is not a control opcode")
        if len(self.session_id) != SID_SIZE:
            raise ValueError("session id must be 8 bytes")
        if len(self.acks) > RELIABLE_ACK_SIZE:
            raise ValueError(f"at most {RELIABLE_ACK_SIZE} acks per packet (reliable.h RELIABLE_ACK_SIZE)")
        if bool(self.acks) != (self.remote_session_id is not None):
            raise ValueError("remote session id goes with acks, and only with them")
        if self.remote_session_id is not None and len(self.remote_session_id) != SID_SIZE:
            raise ValueError("remote session id must be 8 bytes")
        if (self.message_id is None) != (self.opcode == P_ACK_V1):
            raise ValueError("P_ACK_V1, and only it, has no message id")
        if self.opcode == P_ACK_V1 and self.payload:
            raise ValueError("P_ACK_V1 carries no payload")
        ids = self.acks if self.message_id is None else (*self.acks, self.message_id)
        if any(not 0 <= i <= PACKET_ID_MAX for i in ids):
            raise ValueError("message ids are u32")
        parts = [bytes((first_byte(self.opcode, self.key_id),)), self.session_id,
                 bytes((len(self.acks),))]
        parts.extend(_U32.pack(a) for a in self.acks)
        if self.remote_session_id is not None:
            parts.append(self.remote_session_id)
        if self.message_id is not None:
            parts.append(_U32.pack(self.message_id))
        parts.append(self.payload)
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> ControlPacket:
        """Parse the unwrapped layout. Raises WireError: short, bad_opcode, bad_key_id,
        bad_session_id, too_many_acks, empty_ack, ack_payload, bad_tlv."""
        data = bytes(data)
        n = len(data)
        if n < 1 + SID_SIZE + 1:
            raise WireError("short", f"{n} bytes")
        opcode, key_id = opcode_key_id(data[0])
        # ssl.c tls_pre_decrypt: P_FIRST_OPCODE..P_LAST_OPCODE; data opcodes go elsewhere
        if opcode not in CONTROL_OPCODES:
            raise WireError("bad_opcode", f"opcode {opcode}")
        # ssl.c key_state_init: a hard reset starts key id 0 (ssl_pkt.c tls_pre_decrypt_lite)
        if opcode in HARD_RESET_OPCODES and key_id != KEY_ID_FIRST:
            raise WireError("bad_key_id", f"hard reset with key id {key_id}")
        session_id = data[1:1 + SID_SIZE]
        if session_id == _ZERO_SID:  # ssl.c tls_pre_decrypt: session_id_defined
            raise WireError("bad_session_id", "zero session id")
        pos = 1 + SID_SIZE
        count = data[pos]
        pos += 1
        if count > RELIABLE_ACK_SIZE:  # reliable.c reliable_ack_parse
            raise WireError("too_many_acks", f"{count} acks")
        if n < pos + PACKET_ID_SIZE * count:
            raise WireError("short", f"{count} acks in {n} bytes")
        acks = tuple(_U32.unpack_from(data, pos + PACKET_ID_SIZE * i)[0] for i in range(count))
        pos += PACKET_ID_SIZE * count
        remote: bytes | None = None
        if count:
            if n < pos + SID_SIZE:
                raise WireError("short", "no remote session id after the acks")
            remote = data[pos:pos + SID_SIZE]
            pos += SID_SIZE
            if remote == _ZERO_SID:  # reliable.c reliable_ack_read: session_id_defined
                raise WireError("bad_session_id", "zero remote session id")
        message_id: int | None = None
        if opcode == P_ACK_V1:
            # ssl.c tls_pre_decrypt ignores what follows the acks of a P_ACK_V1, and an ack
            # without acks does nothing: stock peers send neither, so both are refused here
            if not count:
                raise WireError("empty_ack", "P_ACK_V1 without acks")
            if pos != n:
                raise WireError("ack_payload", f"{n - pos} bytes after the acks")
            payload = b""
        else:
            if n < pos + PACKET_ID_SIZE:
                raise WireError("short", "no message id")
            (message_id,) = _U32.unpack_from(data, pos)
            pos += PACKET_ID_SIZE
            payload = data[pos:]
            # ssl.c tls_process_state: message 0 of a hard reset holds TLVs, not TLS
            if opcode in HARD_RESET_OPCODES and message_id == 0:
                parse_tlvs(payload)
        return cls(opcode, key_id, session_id, acks, remote, message_id, payload)

    @property
    def opcode_byte(self) -> int:
        return first_byte(self.opcode, self.key_id)


# --- data channel -------------------------------------------------------------------


def parse_data(data: bytes | memoryview) -> tuple[int, int, int | None, int]:
    """(opcode, key_id, peer_id, packet_id) of an AEAD data packet.

    P_DATA_V2: op|kid (1), peer-id (3), packet id (4), tag (16), ciphertext;
    P_DATA_V1: op|kid (1), packet id (4), tag (16), ciphertext (crypto.c
    openvpn_decrypt_aead; at least one ciphertext byte). peer_id is None for P_DATA_V1
    and for the "undefined" peer-id MAX_PEER_ID (0xFFFFFF): then, as in mudp.c
    multi_get_create_instance_udp, the session is found by the source address.
    Raises WireError: short, bad_opcode, zero_packet_id (packet_id.c packet_id_test).
    """
    n = len(data)
    if n < 1:
        raise WireError("short", "empty")
    opcode, key_id = opcode_key_id(data[0])
    peer_id: int | None
    if opcode == P_DATA_V2:
        if n < DATA_V2_MIN_SIZE:
            raise WireError("short", f"P_DATA_V2 of {n} bytes")
        (word,) = _U32.unpack_from(data, 0)
        peer_id = word & MAX_PEER_ID
        if peer_id == MAX_PEER_ID:
            peer_id = None
        (packet_id,) = _U32.unpack_from(data, 4)
    elif opcode == P_DATA_V1:
        if n < DATA_V1_MIN_SIZE:
            raise WireError("short", f"P_DATA_V1 of {n} bytes")
        peer_id = None
        (packet_id,) = _U32.unpack_from(data, 1)
    else:
        raise WireError("bad_opcode", f"opcode {opcode} is not data")
    if packet_id == 0:
        raise WireError("zero_packet_id")
    return opcode, key_id, peer_id, packet_id


def data_v2_header(key_id: int, peer_id: int, packet_id: int) -> bytes:
    """The 8 bytes before the tag of a P_DATA_V2 packet, also its AAD
    (ssl.c tls_prepend_opcode_v2; crypto.c openvpn_encrypt_aead)."""
    if not 0 <= peer_id <= MAX_PEER_ID:
        raise ValueError(f"peer id {peer_id} outside 0..0xFFFFFF")
    if not 0 <= packet_id <= PACKET_ID_MAX:
        raise ValueError(f"packet id {packet_id} outside u32")
    return _U32.pack(first_byte(P_DATA_V2, key_id) << 24 | peer_id) + _U32.pack(packet_id)


def data_v1_header(key_id: int, packet_id: int) -> bytes:
    """The 5 bytes before the tag of a P_DATA_V1 packet (ssl.c tls_prepend_opcode_v1);
    its AAD is the packet id alone (the last 4)."""
    if not 0 <= packet_id <= PACKET_ID_MAX:
        raise ValueError(f"packet id {packet_id} outside u32")
    return bytes((first_byte(P_DATA_V1, key_id),)) + _U32.pack(packet_id)


DATA_HEADER_SIZES = {P_DATA_V1: DATA_V1_HEADER_SIZE, P_DATA_V2: DATA_V2_HEADER_SIZE}
