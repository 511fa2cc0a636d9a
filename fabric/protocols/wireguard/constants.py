"""Protocol constants.

FABRIC_TIME_SCALE (tests only): divides the session timers below (REKEY_*,
REJECT_AFTER_TIME, KEEPALIVE_TIMEOUT and what derives from them) so tests of
expiry and rekeying take seconds. A stock peer keeps real time, so only use
it to test the fabric's own side of a timer.

"Specification" values come from the WireGuard whitepaper (section cited); changing
them breaks interoperability. "Implementation" values are fabric's own choices.
"""

import os as _os


def _time_scale() -> float:
    raw = _os.environ.get("FABRIC_TIME_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise SystemExit(f"FABRIC_TIME_SCALE={raw!r} is not a number; unset it (it is for tests)") from None
    if not 1.0 <= scale <= 1000.0:
        raise SystemExit(f"FABRIC_TIME_SCALE={raw} is outside 1..1000; unset it (it is for tests)")
    return scale


TIME_SCALE = _time_scale()

# --- specification -----------------------------------------------------------

# whitepaper 5.4: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# whitepaper 5.4: message types
MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_SIZE = 148  # whitepaper 5.4.2
RESPONSE_SIZE = 92  # whitepaper 5.4.3
COOKIE_REPLY_SIZE = 64  # whitepaper 5.4.7
TRANSPORT_HEADER_SIZE = 16  # whitepaper 5.4.6: type(4) receiver(4) counter(8)
AEAD_TAG_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE  # a keepalive
PADDING_MULTIPLE = 16  # whitepaper 5.4.6: plaintext padded to a multiple of 16

KEY_SIZE = 32
TIMESTAMP_SIZE = 12  # TAI64N

# whitepaper 6.1: timers and limits
REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0 / TIME_SCALE
REJECT_AFTER_TIME = 180.0 / TIME_SCALE
REKEY_ATTEMPT_TIME = 90.0 / TIME_SCALE
REKEY_TIMEOUT = 5.0 / TIME_SCALE
KEEPALIVE_TIMEOUT = 10.0 / TIME_SCALE
COOKIE_REFRESH_TIME = 120.0  # whitepaper 5.4.7: cookie secret lifetime

# --- implementation ----------------------------------------------------------

# Replay window (RFC 6479): 8192 bits, of which one 64-bit block is always being
# recycled, so 8128 counters behind the newest are accepted (as wireguard-go).
REPLAY_WINDOW_BITS = 8192
REPLAY_BLOCK_BITS = 64
REPLAY_WINDOW_SIZE = REPLAY_WINDOW_BITS - REPLAY_BLOCK_BITS

MAX_DATAGRAM = 65535  # largest UDP payload / TUN packet we accept
INITIATION_FLOOD_INTERVAL = 0.020  # wireguard-go device/noise-protocol.go HandshakeInitationRate
HANDSHAKE_RATE_PER_SECOND = 20  # wireguard-go ratelimiter: per source IP
HANDSHAKE_RATE_BURST = 5
UNDER_LOAD_HANDSHAKES_PER_SECOND = 64  # above this (per host) edges answer bad-mac2 with cookies
UNDER_LOAD_HOLD = 1.0  # stay "under load" this long after the rate drops
# Under load, cookie replies are bounded (fabric/protocols/wireguard/guard.py): a client waiting for one
# sends an initiation every REKEY_TIMEOUT, so 20 a second per source address serves a
# NAT of a hundred clients; an edge makes at most COOKIE_REPLIES_PER_SECOND in all.
COOKIE_REPLIES_PER_SOURCE = 20
COOKIE_REPLIES_PER_SOURCE_BURST = 5
COOKIE_REPLIES_PER_SECOND = 1000
# Handshakes an edge hands to workers per second, in all (each costs a worker four
# X25519 operations, ~0.3 ms in Python): a bounded queue, its overflow counted
# (`handshake_budget`); a refused client retries after REKEY_TIMEOUT.
HANDSHAKES_PER_SECOND = 250
SESSION_KEEP_TIME = 3 * REJECT_AFTER_TIME  # whitepaper 6.3: keys erased after this
MAX_SESSIONS_PER_PEER = 3  # previous, current, next
