"""The seam between the protocol-neutral processes and the wire protocols.

Rules (after h11's `_state.py`):

1. A protocol package (`fabric/protocols/<name>/`) imports nothing from the edge,
   the worker, the broker, the control plane's sockets or the operator commands
   (`fabric.dataplane.edge`, `workers`, `brokers`, `fabric.control` but for its
   records, `fabric.ops`). It may use this module, the records, and the neutral
   libraries of the data plane (`fabric.dataplane.aead`, `ippacket`, `replay`,
   `ratelimit`, `sockfilter`). tests/test_layout.py checks it.
2. The edge, the worker and the broker know a protocol only through the classes
   below; they never parse a protocol's header, name its message types or run its
   timers. They own batching, the session table (counters and replay windows),
   the AEAD's placement, ZeroMQ and the sockets.
3. A protocol object has no I/O and no clock: bytes and `now` in, verdicts,
   datagrams and records out (the sans-I/O style of fabric.protocols.wireguard.noise
   and its endpoint, as aioquic's QuicConnection).

What varies between protocols, and where it goes:

| | WireGuard | OpenVPN |
| --- | --- | --- |
| data datagram names its session by | receiver index (u32) | peer-id (24 bits) + key id (3) |
| counters (`CounterSpace`) | 64 bits from 0 | 32-bit packet ids from 1, never wrap |
| control | 1-RTT Noise handshake, stateless per datagram | TLS over a reliability layer: stateful, pinned to one worker (affinity) |
| answered at the edge without state | cookie replies (5.4.7) | the HMAC-cookie reply to a hard reset |
| keepalive | empty transport packet | the ping string, as data |
| commit rules at the broker | TAI64N newer than the last, flood interval, unique index | free peer-id, key id order |

Roles, each an object per process: `EdgeSide` (classify datagrams, answer or
forward control datagrams, timer policy, the socket filter), `WorkerSide` (the
control protocol: handshakes, with commits to the broker), `Authority` (the
broker's rules for commits), and `SessionKeys` (the AEAD of one session, run by an
edge or a worker alike).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import typing
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fabric.control.records import PeerRecord, SessionRecord

# --- counters (invariants 1 and 2) ----------------------------------------------------------


@dataclass(frozen=True)
class CounterSpace:
    """How a protocol numbers the data packets of one session.

    The edge reserves send counters from `first` and never hands out `limit` or
    above (the session must be replaced first); the receive window refuses
    counters `window` or more behind the newest accepted (and `limit` or above).
    """

    bits: int
    first: int
    limit: int
    window: int


# --- the edge's receive path ------------------------------------------------------------------


@dataclass(slots=True)
class Split:
    """What a protocol made of a batch of datagrams from one socket, header only.

    `groups`: per (data key, source sockaddr), the data datagrams and their counters,
    in arrival order; `control`: the datagrams for the control path with their source;
    `drops`: counts by reason (the edge adds `drop_` to each)."""

    groups: dict[tuple[int, Any], tuple[list[bytes], list[int]]] = field(default_factory=dict)
    control: list[tuple[bytes, Any]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)


FORWARD = "forward"  # EdgeSide.control: hand the datagram to any worker


@dataclass(frozen=True, slots=True)
class Forward:
    """EdgeSide.control: hand the datagram to the one worker that `affinity` picks (the
    same on every edge: rendezvous hashing over the workers the broker lists), for a
    control protocol whose state lives in one worker (OpenVPN's TLS)."""

    affinity: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """EdgeSide.control: answer from the edge's socket, no worker involved."""

    datagram: bytes
    event: str  # the counter it adds to, e.g. cookie_replies


# --- the edge's timers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keepalive:
    """When the edge sends a keepalive on a peer's sending session, and what.

    `passive`: seconds after receiving with nothing sent back (0: never);
    `persistent`: seconds of silence in our direction (0: never); `payload`: the
    plaintext it seals (WireGuard: empty; OpenVPN: the ping string)."""

    passive: float
    persistent: float
    payload: bytes = b""


class EdgeSide:
    """A protocol at one edge (one object per edge and protocol)."""

    protocol: Protocol

    # --- state from the broker
    def on_record(self, key: bytes, value: dict[str, Any]) -> None:
        """A record other than peers and sessions (e.g. `server`)."""

    def on_session(self, record: SessionRecord) -> None:
        """A session of this protocol was installed (its public copy)."""

    def on_session_gone(self, sid: int) -> None:
        """A session of this protocol was removed."""

    # --- receive
    def split(self, datagrams: Sequence[bytes], sources: Sequence[Any], filtered: bool) -> Split:
        """Classify a batch by header. `filtered`: the socket filter is attached,
        so its samples (see `filter_program`) may be among them."""
        raise NotImplementedError

    def control(self, datagram: bytes, addr: bytes, now: float) -> str | Reply | Forward:
        """FORWARD, a Forward (to one worker), a Reply, or a drop reason for one control
        datagram from packed address `addr` (control.frames.pack_addr). Called once per
        batch's control datagrams, after its data."""
        return "unexpected_control"

    def begin(self, now: float) -> None:
        """Once per batch before `control` (e.g. read host-wide state)."""

    # --- the kernel's share
    def filter_program(self, data_keys: Collection[int]) -> bytes | None:
        """A classic BPF program for this protocol's socket (fabric.dataplane.sockfilter),
        or None for none. Rebuilt when sessions change or `filter_dirty` says so."""
        return None

    @property
    def filter_dirty(self) -> bool:
        return False

    def filter_built(self) -> None:
        """The program asked for last is attached."""

    # --- timers (whitepaper 6 for WireGuard); `now` is wall time
    def tick(self, now: float) -> None:
        """Once a second."""

    def keepalive(self, peer: PeerRecord) -> Keepalive:
        return Keepalive(0.0, float(peer.keepalive))

    def rekey_on_send(self, session: SessionRecord, now: float) -> bool:
        """True when sending on `session` should start a new handshake."""
        return False

    unanswered_after: float | None = None  # data unanswered this long: new handshake
    handshake_retry: float = 5.0  # at most one initiation per peer this often
    staged_max: int = 16  # packets kept per peer while its handshake runs

    def confirm_payload(self, session: SessionRecord) -> bytes | None:
        """Sealed and sent at once when a session the fabric initiated arrives
        (WireGuard: an empty keepalive, so the responder may send)."""
        return None

    def under_load(self, now: float) -> bool:
        return False

    def gauges(self, now: float) -> dict[str, int]:
        return {}


class WorkerHost(typing.Protocol):
    """What a worker offers the protocols it runs."""

    peers: dict[bytes, PeerRecord]  # public key -> peer, as the broker published them

    def commit(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the broker (its REQ socket); None if it is unavailable (counted)."""
        ...

    def count(self, name: str, n: int = 1) -> None: ...


class WorkerSide:
    """A protocol in one worker: its control protocol (handshakes)."""

    protocol: Protocol

    def on_record(self, key: bytes, value: dict[str, Any] | None) -> None:
        """A record other than peers and sessions (None: deleted)."""

    def on_session(self, record: SessionRecord) -> None:
        """A session of this protocol was published (with its keys)."""

    def on_session_gone(self, sid: int) -> None:
        """A session was deleted (replaced, expired, ended, or its peer removed)."""

    def control(self, datagram: bytes, addr: bytes, now: float, edge: int = 0) -> ControlResult:
        """A forwarded control datagram from `addr`, through edge `edge`."""
        raise NotImplementedError

    def tick(self, now: float) -> list[Outgoing]:
        """Called about every 0.1 s: datagrams due now (retransmissions, timeouts)."""
        return []

    def initiate(self, peer: bytes, addr: bytes, now: float) -> ControlResult:
        """Start a handshake to `peer` at `addr` (the edge has traffic for it)."""
        return ControlResult()

    def pending_count(self) -> int:
        """Handshakes this worker holds in progress (a gauge)."""
        return 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """WorkerSide.tick: datagrams to `addr`, sent through edge `edge` (any edge can: they
    share the port)."""

    edge: int
    addr: bytes
    datagrams: list[bytes]


@dataclass(slots=True)
class ControlResult:
    """What a worker's control step gives back to the edge: datagrams to send to the
    source and, once committed, the new session (its public copy goes to the edge)."""

    datagrams: list[bytes] = field(default_factory=list)
    session: SessionRecord | None = None


@dataclass(slots=True)
class NewSession:
    """Authority.commit: make this session (the broker adds id, slot, peer, protocol,
    created), then call `on_commit`; `unpublish`: a record to delete with it; `ends`:
    sessions it ends (e.g. an OpenVPN client's previous connection)."""

    data_key: int
    params: dict[str, Any]
    keys: dict[str, Any]
    initiator: bool
    endpoint: bytes
    on_commit: Callable[[], None] | None = None
    unpublish: bytes | None = None
    ends: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Admit:
    """Authority.admit: add this peer, which a valid handshake named before anyone added it
    (OpenVPN's `enroll = "cn"`: a client of the operator's CA, by its certificate's CN).
    The broker makes `name` unique, gives the peer the next free tunnel address(es),
    publishes and persists it, and counts `event`."""

    name: str
    public: bytes
    event: str = "peers_enrolled"


@dataclass(frozen=True, slots=True)
class Publish:
    """Authority.commit: publish this record (and count `event`); nothing else."""

    key: bytes
    value: dict[str, Any]
    event: str = ""


@dataclass(frozen=True)
class ServerSetup:
    """What Authority.start gets: the state directory, the server's tunnel addresses
    (the TUN's, one per family), this protocol's UDP port, and the protocol's own
    settings (its table in the TOML file, e.g. `[openvpn]`)."""

    root: Path
    interfaces: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    port: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndSessions:
    """Authority.commit: end these sessions (the peer said goodbye, e.g. OpenVPN's
    EXIT), and count `event`."""

    ids: tuple[int, ...]
    event: str = "sessions_ended"


class SetupError(ValueError):
    """The protocol's server identity in the state directory is unusable (what to do: the message)."""


@dataclass(frozen=True, slots=True)
class PeerProvision:
    """Authority.new_peer: the peer's identity key (and WireGuard's preshared key),
    and what the admin reply tells the operator once (e.g. a generated private key)."""

    public: bytes
    psk: bytes | None = None
    reply: dict[str, Any] = field(default_factory=dict)


class Authority:
    """A protocol's rules at the broker: what a worker may commit.

    `commit` returns a NewSession, a Publish, an EndSessions or a refusal reason; the
    broker assigns the session's id and slot, publishes and persists (a new session
    replaces one of the same protocol with the same data key). `state()` and
    `load()` carry the protocol's own persistent state in broker.state. `start`
    sets up the protocol's server identity (made on first start, kept in the
    state directory) and `new_peer` a peer's keys for `fabric peer add`."""

    protocol: Protocol

    def start(self, setup: ServerSetup) -> list[tuple[bytes, dict[str, Any]]]:
        """At broker start: records to publish (e.g. the server identity); SetupError."""
        return []

    def describe(self) -> dict[str, Any]:
        """Public facts for `fabric admin` (e.g. the server's public key)."""
        return {}

    def new_peer(self, req: dict[str, Any]) -> PeerProvision:
        """A new peer's identity from an admin peer_add request (ValueError if bad):
        by default the public key it names, else a random 32-byte identity."""
        given = req.get("public_key")
        if given:
            raw = base64.b64decode(str(given), validate=True)
            if len(raw) != 32:
                raise ValueError("public key must be 32 bytes of base64")
            return PeerProvision(raw)
        return PeerProvision(os.urandom(32))

    def commit(self, req: dict[str, Any], peer: PeerRecord, sessions: Iterable[SessionRecord],
               now: float) -> NewSession | Publish | EndSessions | str:
        return "bad_request"

    def admit(self, req: dict[str, Any], now: float) -> Admit | str:
        """A worker asks to add the peer its handshake named (a commit with `admit`: True
        for a peer the broker does not know): Admit, or a refusal reason."""
        return "unknown_peer"

    def tick(self, now: float) -> list[tuple[bytes, dict[str, Any] | None]]:
        """Once a second: records to publish (None: delete)."""
        return []

    def ended(self, record: SessionRecord, sessions: Iterable[SessionRecord]) -> tuple[int, ...]:
        """The peer said goodbye on `record` (END_SESSION): the sessions that end with it."""
        return (record.id,)

    def silence_limit(self) -> float | None:
        """A peer whose sessions received nothing this long is gone: the broker ends
        them (OpenVPN's ping-restart on the server side); None: never."""
        return None

    def forget_peer(self, public: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        """A peer was removed: what to unpublish."""
        return []

    def records(self) -> list[tuple[bytes, dict[str, Any]]]:
        """Records of the protocol's own to publish at start."""
        return []

    def pending_count(self) -> int:
        """Handshakes in progress (a gauge)."""
        return 0

    def state(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        """Restore `state()` (also from an older broker.state: fields may be missing)."""


END_SESSION = "end_session"  # SessionKeys.open's drop reason for a goodbye in the data


class SessionKeys:
    """The AEAD of one session, shared by edges (inline) and workers.

    `open` takes data datagrams of this session (all from one source) and returns the
    plaintexts that authenticated, their counters, the datagrams' sizes, and drop
    counts; an empty plaintext is a keepalive. The inner packet checks that do not
    depend on the protocol (IP length, the source against the peer's allowed IPs)
    happen in the same pass: `allowed(source_address) -> bool`. A datagram that ends
    the session (OpenVPN's OCC_EXIT) is counted as END_SESSION: the edge or worker
    reports the session and the broker ends it (Authority.ended).
    `seal` turns plaintexts into datagrams with counters counter0, counter0 + 1, ...
    """

    sid: int
    peer: bytes
    created: float

    def open(self, datagrams: Sequence[bytes | memoryview], allowed: Callable[[bytes], Any],
             drops: dict[str, int]) -> tuple[list[bytes], list[int], list[int]]:
        raise NotImplementedError

    def seal(self, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        raise NotImplementedError


class Protocol:
    """One wire protocol: its name, numbering, lifetimes and role objects."""

    name: ClassVar[str]
    number: ClassVar[int]  # in frames between edges and workers (control.frames)
    counters: ClassVar[CounterSpace]
    lifetime: float  # a session neither sends nor receives once this old (seconds)
    keep_time: float  # the broker forgets a session (and its keys) once this old
    max_sessions_per_peer: int  # the broker keeps at most this many per peer

    def expires(self, record: SessionRecord) -> float:
        """When a session stops sending and receiving (wall time): `lifetime` after it
        began, unless the protocol says otherwise per session."""
        return record.created + self.lifetime

    def forget_at(self, record: SessionRecord) -> float:
        """When the broker forgets a session and its keys."""
        return record.created + self.keep_time

    def describe(self, record: SessionRecord) -> dict[str, Any]:
        """Public facts of a session for `fabric admin` and the metrics (e.g. its cipher)."""
        return {}

    def edge(self, count: Callable[[str, int], None], shared_load: Any = None) -> EdgeSide:
        raise NotImplementedError

    def worker(self, host: WorkerHost) -> WorkerSide:
        raise NotImplementedError

    def authority(self) -> Authority:
        raise NotImplementedError

    def keys(self, record: SessionRecord) -> SessionKeys | None:
        """The AEAD of a session record; None for a public copy (no keys). Raises
        RecordError for keys that are not this protocol's."""
        raise NotImplementedError

    def client_profile(self, reply: dict[str, Any], endpoint: str) -> str:
        """The configuration a stock client takes, from the broker's peer_add reply."""
        raise NotImplementedError(f"{self.name}: no client profile")
