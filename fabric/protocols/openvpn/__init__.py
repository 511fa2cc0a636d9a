"""OpenVPN 2.6 over UDP behind fabric.protocols.base, for stock clients and profiles.

Section references are to shared/openvpn-protocol.md and `file function` of
OpenVPN's source at tag v2.6.14.

    constants   specification and implementation constants
    wire        packet formats: control packets, data headers (1.1, 1.2, 3.1)
    wrap        tls-crypt, tls-auth, and the long-form replay window (1.4, 1.5, 3.3)
    reliable    the reliability layer under TLS (1.3)
    tls         TLS on memory BIOs with the RFC 5705 exporter (pyOpenSSL)
    keys        key method 2, the PRF and EKM derivations, NCP (2, 4.4)
    pki         the CA, server and client certificates, the inline .ovpn profile
    imported    an existing server's PKI files ([openvpn] ca, cert, key, ...), checked
    server      the server's settings as edges and workers see them; the reset cookie
    edgeside    classification, stateless hard-reset replies, affinity, ping policy
    control     one client connection's control channel, sans I/O (1.3, 2, 4, 5)
    workerside  the connections a worker holds, committed through the broker
    authority   the broker's rules: PKI, peer-ids, sessions, exits
    datapath    the AEAD of a session's batches (3.1, 3.2)
    client      a sans-I/O client: the peer in tests and benchmarks
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabric.control.records import SessionRecord
from fabric.protocols.base import CounterSpace, Protocol, WorkerHost
from fabric.protocols.openvpn.constants import PACKET_ID_WRAP_TRIGGER

# implementation: the receive window (the session table's, RFC 6479 style) is wider than
# OpenVPN's 64 (packet_id.h DEFAULT_SEQ_BACKTRACK): packets of one client may be opened
# by several workers and written in arrival order
REPLAY_WINDOW = 8128
MAX_SESSIONS_PER_PEER = 3  # the primary key, the lame duck, and one being negotiated
DEFAULT_LIFETIME = 3600.0 + 3600.0 + 60.0  # reneg-sec + tran-window + hand-window


class OpenVPN(Protocol):
    name = "openvpn"
    number = 1
    # packet_id.h: 32-bit packet ids from 1; a sender renegotiates before
    # PACKET_ID_WRAP_TRIGGER (packet_id_close_to_wrapping) and never wraps
    counters = CounterSpace(bits=32, first=1, limit=PACKET_ID_WRAP_TRIGGER, window=REPLAY_WINDOW)

    def __init__(self) -> None:
        self.lifetime = DEFAULT_LIFETIME
        self.keep_time = DEFAULT_LIFETIME + 60.0
        self.max_sessions_per_peer = MAX_SESSIONS_PER_PEER

    def expires(self, record: SessionRecord) -> float:
        """A session lives until its renegotiation plus the transition window, as the
        authority wrote into it (params lifetime, from reneg_sec)."""
        life = record.params.get("lifetime")
        return record.created + (float(life) if isinstance(life, int | float) and life > 0 else self.lifetime)

    def forget_at(self, record: SessionRecord) -> float:
        return self.expires(record) + 60.0

    def describe(self, record: SessionRecord) -> dict[str, Any]:
        p = record.params
        return {"cipher": p.get("cipher"), "key_id": p.get("key_id"), "peer_id": p.get("peer_id"),
                "key_derivation": "tls-ekm" if p.get("ekm") else "prf", "data_format": "v1" if p.get("v1") else "v2"}

    def edge(self, count: Callable[[str, int], None], shared_load: Any = None) -> Any:
        from fabric.protocols.openvpn.edgeside import OvpnEdge

        return OvpnEdge(self, count)

    def worker(self, host: WorkerHost) -> Any:
        from fabric.protocols.openvpn.workerside import OvpnWorker

        return OvpnWorker(self, host)

    def authority(self) -> Any:
        from fabric.protocols.openvpn.authority import OvpnAuthority

        return OvpnAuthority(self)

    def keys(self, record: SessionRecord) -> Any:
        from fabric.protocols.openvpn.datapath import OvpnKeys

        return OvpnKeys(record) if record.keys else None

    def client_profile(self, reply: dict[str, Any], endpoint: str) -> str:
        from fabric.protocols.openvpn.pki import inline_profile

        if "cert" not in reply:  # an existing client registered (--cn, --certificate): no new profile
            what = (f"certificates of the CA with CN {reply.get('cn')!r}" if reply.get("registered") == "cn"
                    else f"the certificate {reply.get('fingerprint', '')[:16]}... (CN {reply.get('cn')!r})")
            return (f"# fabric peer {reply['name']} (OpenVPN): {what}; its existing profile connects unchanged\n"
                    f"# tunnel address {', '.join(reply.get('allowed_ips') or ())}\n")
        host, _, port = endpoint.rpartition(":")
        profile = inline_profile(host, int(port), reply["ca"].encode(), reply["cert"].encode(),
                                 reply["key"].encode(), reply["static_key"], reply.get("wrap", "tls-crypt"),
                                 reply.get("extra") or (), reply.get("key_direction", 1))
        return f"# fabric peer {reply['name']} (OpenVPN)\n" + profile
