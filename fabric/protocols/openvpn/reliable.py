"""The control channel's reliability layer (reliable.c, reliable.h), sans-I/O.

One key state has a send side (ReliableSend: message ids, retransmits, acks received)
and a receive side (ReliableReceive: ordering, acks to send). No sockets, no clock:
`now` (seconds, any monotonic clock) is passed in, as in aioquic's recovery.py.
Names follow reliable.c; message ids are the reliability layer's "packet ids".

Timing, as OpenVPN does it (reliable.c reliable_mark_active_outgoing, reliable_send):
a packet is sent at once, then again after `initial_timeout` (--tls-timeout, 2 s),
the timeout doubling after each send (2, 4, 8, ... s: reliable.c has no cap; the
handshake window, 60 s, ends it). A packet is also resent early once
N_ACK_RETRANSMIT (3) acks for later message ids arrived (reliable_send_purge).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fabric.protocols.openvpn.constants import (
    ACK_LIMIT_DEDICATED,
    ACK_LIMIT_PIGGYBACK,
    N_ACK_RETRANSMIT,
    P_CONTROL_V1,
    PACKET_ID_MAX,
    RELIABLE_ACK_SIZE,
    RETRANSMIT_INITIAL,
    TLS_RELIABLE_N_REC_BUFFERS,
    TLS_RELIABLE_N_SEND_BUFFERS,
)


class SendWindowFull(ValueError):
    """ReliableSend.queue with TLS_RELIABLE_N_SEND_BUFFERS messages unacked."""


@dataclass(slots=True)
class _Entry:
    """reliable.h struct reliable_entry (an active outgoing one)."""

    packet_id: int
    opcode: int
    payload: bytes
    next_try: float  # 0: send at once (reliable_mark_active_outgoing)
    timeout: float
    n_acks: int = 0  # acks received for later ids (fast retransmit)
    sends: int = 0


class ReliableSend:
    """The send side of one key state (ks->send_reliable).

    `first_id`: the first message id (0 for a fresh key state; 1 when message 0, the
    server's hard reset, went out statelessly, as ssl.c session_skip_to_pre_start does).
    """

    def __init__(self, first_id: int = 0, initial_timeout: float = RETRANSMIT_INITIAL,
                 size: int = TLS_RELIABLE_N_SEND_BUFFERS) -> None:
        if not 0 <= first_id <= PACKET_ID_MAX:
            raise ValueError("message ids are u32")
        self.first_id = first_id
        self.packet_id = first_id  # the next id to assign (reliable.h struct reliable)
        self.initial_timeout = initial_timeout
        self.size = size
        self._entries: dict[int, _Entry] = {}  # active entries by message id

    # --- queueing (reliable_get_buf_output_sequenced, reliable_mark_active_outgoing)

    @property
    def available(self) -> int:
        """How many more messages may be queued now
        (reliable.c reliable_get_num_output_sequenced_available): the window counts
        from the lowest unacked id, so one lost message holds up the ones after it."""
        if not self._entries:
            return self.size
        return max(0, self.size - (self.packet_id - min(self._entries)))

    def queue(self, payload: bytes, opcode: int = P_CONTROL_V1) -> int:
        """Assign the next message id to `payload` (sent by the next `due`); raises
        SendWindowFull when `available` is 0."""
        if self.available <= 0:
            raise SendWindowFull(f"{len(self._entries)} messages unacked")
        if self.packet_id > PACKET_ID_MAX:
            raise SendWindowFull("message ids exhausted")
        pid = self.packet_id
        self._entries[pid] = _Entry(pid, opcode, bytes(payload), 0.0, self.initial_timeout)
        self.packet_id += 1
        return pid

    # --- acks received (reliable_send_purge)

    def on_acks(self, ids: Iterable[int]) -> list[int]:
        """Process the acks of a received packet; returns the ids newly acked. Ids not
        held are ignored (the peer re-acks old ids from its MRU list); each ack counts
        towards a fast retransmit of every lower id still unacked (reliable_send_purge)."""
        done: list[int] = []
        for pid in ids:
            entry = self._entries.pop(pid, None)
            if entry is not None:
                done.append(pid)
            for e in self._entries.values():
                if e.packet_id < pid:
                    e.n_acks += 1
        return done

    def acked(self, message_id: int) -> bool:
        """Was `message_id` queued (or before `first_id`) and acked since?"""
        return message_id < self.packet_id and message_id not in self._entries

    @property
    def all_acked(self) -> bool:
        """Nothing in flight (reliable.c reliable_empty)."""
        return not self._entries

    @property
    def in_flight(self) -> list[int]:
        return sorted(self._entries)

    def opcode(self, message_id: int) -> int:
        """The opcode a message in flight was queued with (KeyError if none)."""
        return self._entries[message_id].opcode

    def sends(self, message_id: int) -> int:
        """How often a message in flight was sent so far (KeyError if none)."""
        return self._entries[message_id].sends

    # --- sending (reliable_can_send, reliable_send, reliable_send_timeout)

    def due(self, now: float) -> list[tuple[int, bytes]]:
        """(message id, payload) of what to (re)send now, lowest id first; each is
        rescheduled: next try after the current timeout, which then doubles
        (reliable.c reliable_send: "exponential backoff"), and its ack count reset."""
        out: list[tuple[int, bytes]] = []
        for pid in sorted(self._entries):
            e = self._entries[pid]
            if e.n_acks >= N_ACK_RETRANSMIT or now >= e.next_try:
                e.next_try = now + e.timeout
                e.timeout *= 2
                e.n_acks = 0
                e.sends += 1
                out.append((pid, e.payload))
        return out

    def next_timer(self) -> float | None:
        """When `due` next has something (0.0: at once), or None if nothing is in flight."""
        if not self._entries:
            return None
        return min(0.0 if e.n_acks >= N_ACK_RETRANSMIT else e.next_try
                   for e in self._entries.values())

    def schedule_now(self, now: float) -> None:
        """Resend everything at once with the initial timeout (reliable.c
        reliable_schedule_now: ssl.c tls_pre_decrypt's "burst" on a new link)."""
        for e in self._entries.values():
            e.next_try = now
            e.timeout = self.initial_timeout


class ReliableReceive:
    """The receive side of one key state (ks->rec_reliable, ks->rec_ack, ks->lru_acks).

    `first_id`: the first message id expected (0; 1 when message 0 was consumed
    statelessly, as ssl.c session_skip_to_pre_start sets rec_reliable->packet_id).
    """

    dedicated_ack_limit = ACK_LIMIT_DEDICATED  # P_ACK_V1 (ssl.c tls_process)
    piggyback_ack_limit = ACK_LIMIT_PIGGYBACK  # on P_CONTROL_V1 (ssl.c tls_process_state)

    def __init__(self, first_id: int = 0, size: int = TLS_RELIABLE_N_REC_BUFFERS) -> None:
        self.packet_id = first_id  # next id to deliver (reliable.h struct reliable)
        self.size = size
        self._held: dict[int, bytes] = {}  # out-of-order (or not yet read) payloads
        self._rec_ack: list[int] = []  # ids to ack, oldest first (ks->rec_ack)
        self._mru: list[int] = []  # ids acked lately, newest first (ks->lru_acks)
        self.dropped_full = 0  # no free receive buffer (reliable_can_get)
        self.dropped_window = 0  # beyond the window (reliable_wont_break_sequentiality)
        self.duplicates = 0

    def on_packet(self, message_id: int, payload: bytes) -> bool:
        """A message from an authenticated control packet (not P_ACK_V1). True if it is
        new and stored; a duplicate is acked again but not stored (ssl.c tls_pre_decrypt:
        "... even if it's a replay"); ids at or past packet_id + size are dropped
        unacked (reliable_wont_break_sequentiality), as is everything while all
        receive buffers hold out-of-order messages (reliable_can_get)."""
        if len(self._held) >= self.size:
            self.dropped_full += 1
            return False
        if not message_id < self.packet_id + self.size:
            self.dropped_window += 1
            return False
        stored = False
        if message_id >= self.packet_id and message_id not in self._held:  # reliable_not_replay
            self._held[message_id] = bytes(payload)
            stored = True
        else:
            self.duplicates += 1
        # reliable.c reliable_ack_acknowledge_packet_id: once, and at most RELIABLE_ACK_SIZE
        if message_id not in self._rec_ack and len(self._rec_ack) < RELIABLE_ACK_SIZE:
            self._rec_ack.append(message_id)
        return stored

    def read(self) -> list[bytes]:
        """The payloads that are next in order (reliable_get_entry_sequenced,
        reliable_mark_deleted), removed from the window."""
        out: list[bytes] = []
        while self.packet_id in self._held:
            out.append(self._held.pop(self.packet_id))
            self.packet_id += 1
        return out

    @property
    def has_pending_acks(self) -> bool:
        """Acks not sent yet: send a P_ACK_V1 if no control packet goes out
        (ssl.c tls_process: "Send 1 or more ACKs")."""
        return bool(self._rec_ack)

    @property
    def pending_acks(self) -> list[int]:
        return list(self._rec_ack)

    def acks_to_send(self, limit: int = ACK_LIMIT_DEDICATED) -> list[int]:
        """The acks to put in the packet being sent (reliable.c reliable_ack_write):
        up to `limit` pending acks move to the front of the MRU list (copy_acks_to_mru)
        and the packet carries the first `limit` of that list, so recent acks are
        repeated while there is room. Use dedicated_ack_limit for a P_ACK_V1 and
        piggyback_ack_limit otherwise. Empty: no ack block (and no remote session id)."""
        limit = max(0, min(limit, RELIABLE_ACK_SIZE))
        n = min(len(self._rec_ack), limit)
        self.copy_acks_to_mru(self._rec_ack[:n])
        del self._rec_ack[:n]
        return self._mru[:limit]

    def copy_acks_to_mru(self, ids: list[int]) -> None:
        """Move `ids` to the front of the MRU list, in their order, without duplicates,
        keeping at most RELIABLE_ACK_SIZE (reliable.c copy_acks_to_mru)."""
        for pid in reversed(ids):
            if pid in self._mru:
                self._mru.remove(pid)
            self._mru.insert(0, pid)
        del self._mru[RELIABLE_ACK_SIZE:]

    @property
    def mru(self) -> list[int]:
        return list(self._mru)
