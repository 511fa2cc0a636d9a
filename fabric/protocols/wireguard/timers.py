"""WireGuard's timer rules (whitepaper 6), one copy for both users.

The sans-I/O endpoint (endpoint.py) keeps per-peer deadlines; the fabric's edges
keep the same state in the host-shared session table (last send, last receive,
"data unanswered since") and ask these rules once a second and upon sending
(edgeside.py). Both decide with the functions below.
"""

from __future__ import annotations

from fabric.protocols.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)

# 6.4: data sent and nothing received for this long: the peer may have lost the
# session (it restarted, say): start a new handshake
NEW_HANDSHAKE_AFTER = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
# 6.5: received data and sent nothing back for this long: a keepalive
PASSIVE_KEEPALIVE = KEEPALIVE_TIMEOUT
# 6.2: the initiator rekeys on receive when its session gets this old
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT


def rekey_on_send(initiator: bool, age: float, sent: int = 0) -> bool:
    """6.2: after sending, the initiator of a session starts a new handshake once
    it is REKEY_AFTER_TIME old; anyone after REKEY_AFTER_MESSAGES."""
    return sent > REKEY_AFTER_MESSAGES or (initiator and age >= REKEY_AFTER_TIME)


def rekey_on_receive(initiator: bool, age: float) -> bool:
    """6.2: on receiving, the initiator of a session near REJECT_AFTER_TIME rekeys
    (once: the caller remembers it did)."""
    return initiator and age >= REKEY_ON_RECEIVE_AGE


def usable(age: float) -> bool:
    """6.1 (6.2 in some revisions): nothing is sent or accepted after REJECT_AFTER_TIME."""
    return age < REJECT_AFTER_TIME
