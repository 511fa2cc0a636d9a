"""OpenVPN 2.6 protocol constants.

"Specification" values are OpenVPN's own (source file and name at tag v2.6.14
cited); changing them breaks interoperability with stock clients.
"Implementation" values are fabric's own choices.
"""

# --- specification -----------------------------------------------------------

# ssl_pkt.h: the first byte of every packet is opcode << P_OPCODE_SHIFT | key_id
P_KEY_ID_MASK = 0x07
P_OPCODE_SHIFT = 3

# ssl_pkt.h: opcodes (1 and 2 are key method 1, rejected by ssl.c tls_pre_decrypt)
P_CONTROL_HARD_RESET_CLIENT_V1 = 1
P_CONTROL_HARD_RESET_SERVER_V1 = 2
P_CONTROL_SOFT_RESET_V1 = 3
P_CONTROL_V1 = 4
P_ACK_V1 = 5
P_DATA_V1 = 6
P_CONTROL_HARD_RESET_CLIENT_V2 = 7
P_CONTROL_HARD_RESET_SERVER_V2 = 8
P_DATA_V2 = 9
P_CONTROL_HARD_RESET_CLIENT_V3 = 10  # tls-crypt-v2: reset with a wrapped client key
P_CONTROL_WKC_V1 = 11  # tls-crypt-v2: P_CONTROL_V1 with a wrapped client key
P_FIRST_OPCODE = 3  # ssl_pkt.h P_FIRST_OPCODE
P_LAST_OPCODE = 11  # ssl_pkt.h P_LAST_OPCODE

DATA_OPCODES = frozenset({P_DATA_V1, P_DATA_V2})
CONTROL_OPCODES = frozenset(range(P_FIRST_OPCODE, P_LAST_OPCODE + 1)) - DATA_OPCODES
# ssl.c is_hard_reset_method2
HARD_RESET_OPCODES = frozenset({P_CONTROL_HARD_RESET_CLIENT_V2, P_CONTROL_HARD_RESET_SERVER_V2,
                                P_CONTROL_HARD_RESET_CLIENT_V3})

OPCODE_NAMES = {  # ssl_pkt.h packet_opcode_name
    P_CONTROL_HARD_RESET_CLIENT_V1: "P_CONTROL_HARD_RESET_CLIENT_V1",
    P_CONTROL_HARD_RESET_SERVER_V1: "P_CONTROL_HARD_RESET_SERVER_V1",
    P_CONTROL_SOFT_RESET_V1: "P_CONTROL_SOFT_RESET_V1",
    P_CONTROL_V1: "P_CONTROL_V1",
    P_ACK_V1: "P_ACK_V1",
    P_DATA_V1: "P_DATA_V1",
    P_CONTROL_HARD_RESET_CLIENT_V2: "P_CONTROL_HARD_RESET_CLIENT_V2",
    P_CONTROL_HARD_RESET_SERVER_V2: "P_CONTROL_HARD_RESET_SERVER_V2",
    P_DATA_V2: "P_DATA_V2",
    P_CONTROL_HARD_RESET_CLIENT_V3: "P_CONTROL_HARD_RESET_CLIENT_V3",
    P_CONTROL_WKC_V1: "P_CONTROL_WKC_V1",
}

# ssl.c key_state_init: key ids go 0 (first key), then 1..7 and wrap to 1
KEY_ID_FIRST = 0
KEY_ID_MAX = 7

SID_SIZE = 8  # session_id.h SID_SIZE; an all-zero sid is "undefined" (session_id_defined)
PACKET_ID_SIZE = 4  # packet_id.h packet_id_type (u32)
NET_TIME_SIZE = 4  # packet_id.h net_time_t (u32, seconds)
PACKET_ID_LONG_SIZE = PACKET_ID_SIZE + NET_TIME_SIZE  # packet_id_size(true)
PACKET_ID_MAX = 0xFFFFFFFF  # packet_id.h PACKET_ID_MAX
PACKET_ID_WRAP_TRIGGER = 0xFF000000  # packet_id.h: renegotiate before the send id wraps

# reliable.h / ssl_pkt.h / ssl.h: the reliability layer
RELIABLE_ACK_SIZE = 8  # reliable.h: most acks in one packet (reliable_ack_parse refuses more)
RELIABLE_CAPACITY = 12  # reliable.h
N_ACK_RETRANSMIT = 3  # reliable.h: resend early once this many later ids were acked
TLS_RELIABLE_N_SEND_BUFFERS = 6  # ssl_pkt.h: send window
TLS_RELIABLE_N_REC_BUFFERS = 12  # ssl_pkt.h: receive window
CONTROL_SEND_ACK_MAX = 4  # ssl.h: acks piggy-backed on a P_CONTROL_V1 (ssl.c tls_process_state)
# ssl_pkt.c write_control_auth: a client without wrapping and without EKM caps all acks at 4
SOFTETHER_ACK_MAX = 4

# ssl_pkt.h: early protocol negotiation (tls-crypt-v2 only, ssl.c tls_session_init)
EARLY_NEG_MASK = 0xFF000000
EARLY_NEG_START = 0x0F000000  # initial tls-crypt packet id of a client that negotiates early
TLV_TYPE_EARLY_NEG_FLAGS = 0x0001  # ssl.c parse_early_negotiation_tlvs
EARLY_NEG_FLAG_RESEND_WKC = 0x0001

TLS_MTU_DEFAULT = 1250  # mtu.h TLS_MTU_DEFAULT: control packets fit this
TLS_CHANNEL_BUF_SIZE = 2048  # common.h
TLS_OPTIONS_LEN = 512  # ssl.h: options string in key method 2
KEY_METHOD_2 = 2  # ssl.h
KEY_EXPANSION_ID = b"OpenVPN"  # ssl.h

# options.c init_options: defaults
TLS_TIMEOUT_DEFAULT = 2.0  # --tls-timeout: reliable.c initial retransmit timeout (doubles, no cap)
HANDSHAKE_WINDOW_DEFAULT = 60.0  # --hand-window: the handshake must end within this
RENEGOTIATE_SECONDS_DEFAULT = 3600.0  # --reneg-sec
TRANSITION_WINDOW_DEFAULT = 3600.0  # --tran-window: the old key keeps working this long

# packet_id.h: the replay window of long-form packet ids (UDP backtrack mode)
DEFAULT_SEQ_BACKTRACK = 64
DEFAULT_TIME_BACKTRACK = 15
SEQ_REAP_INTERVAL = 5  # packet_id.h: how often OpenVPN expires old slots

# crypto.h struct key / struct key2; crypto_backend.h MAX_*_KEY_LENGTH
MAX_CIPHER_KEY_LENGTH = 64
MAX_HMAC_KEY_LENGTH = 64
STATIC_KEY_SIZE = MAX_CIPHER_KEY_LENGTH + MAX_HMAC_KEY_LENGTH  # one direction: cipher || hmac
STATIC_KEY2_SIZE = 2 * STATIC_KEY_SIZE  # a key file: key[0] || key[1] (256 bytes)
STATIC_KEY_HEAD = "-----BEGIN OpenVPN Static key V1-----"  # crypto.c static_key_head
STATIC_KEY_FOOT = "-----END OpenVPN Static key V1-----"  # crypto.c static_key_foot
STATIC_KEY_BYTES_PER_LINE = 16  # crypto.c write_key_file

# crypto.h: key directions (crypto.c key_direction_state_init)
KEY_DIRECTION_BIDIRECTIONAL = 0  # key[0] both ways (tls-auth without a direction)
KEY_DIRECTION_NORMAL = 1  # out key[0], in key[1]: "key-direction 0", a tls-crypt server
KEY_DIRECTION_INVERSE = 2  # out key[1], in key[0]: "key-direction 1", a tls-crypt client

# tls_crypt.h: tls-crypt v1 (AES-256-CTR + HMAC-SHA256, tls_crypt.c tls_crypt_kt)
TLS_CRYPT_KEY_SIZE = 32  # AES-256 and the HMAC-SHA256 key: the first 32 bytes of each half
TLS_CRYPT_TAG_SIZE = 32
TLS_CRYPT_PID_SIZE = PACKET_ID_LONG_SIZE
TLS_CRYPT_BLOCK_SIZE = 16
TLS_CRYPT_OFF_PID = 1 + SID_SIZE
TLS_CRYPT_OFF_TAG = TLS_CRYPT_OFF_PID + TLS_CRYPT_PID_SIZE
TLS_CRYPT_OFF_CT = TLS_CRYPT_OFF_TAG + TLS_CRYPT_TAG_SIZE
TLS_CRYPT_OVERHEAD = TLS_CRYPT_PID_SIZE + TLS_CRYPT_TAG_SIZE  # bytes it adds (CTR: no padding)

# tls-auth (--auth digest; options.c init_options default SHA1): HMAC size per digest
TLS_AUTH_DIGEST_DEFAULT = "SHA1"
TLS_AUTH_DIGEST_SIZES = {"SHA1": 20, "SHA224": 28, "SHA256": 32, "SHA384": 48, "SHA512": 64}

# data channel (ssl.c tls_prepend_opcode_v2; crypto.c openvpn_decrypt_aead)
MAX_PEER_ID = 0xFFFFFF  # openvpn.h: "no peer-id"; mudp.c then looks the peer up by address
PEER_ID_SIZE = 3
DATA_V2_HEADER_SIZE = 1 + PEER_ID_SIZE + PACKET_ID_SIZE  # also the AEAD's AAD for V2
DATA_V1_HEADER_SIZE = 1 + PACKET_ID_SIZE  # AAD for V1 is the packet id alone
AEAD_TAG_SIZE = 16  # crypto_backend.h OPENVPN_AEAD_TAG_LENGTH
# crypto.c openvpn_decrypt_aead: "missing payload" if no ciphertext byte follows the tag
DATA_V2_MIN_SIZE = DATA_V2_HEADER_SIZE + AEAD_TAG_SIZE + 1
DATA_V1_MIN_SIZE = DATA_V1_HEADER_SIZE + AEAD_TAG_SIZE + 1

# ping.c ping_string: a data payload equal to this is a keepalive
PING_STRING = bytes.fromhex("2a187bf3641eb4cb07ed2d0a981fc748")
# occ.c occ_magic, followed by a type byte (occ.h)
OCC_MAGIC = bytes.fromhex("287f346bd4ef7a812d56b8d3afc5459c")
OCC_REQUEST = 0
OCC_REPLY = 1
OCC_EXIT = 6

PUSH_REQUEST_INTERVAL = 5.0  # common.h: the client repeats PUSH_REQUEST this often
PUSH_BUNDLE_SIZE = 1024  # common.h: largest PUSH_REPLY before push-continuation
PRE_PULL_INITIAL_PING_RESTART = 120.0  # ping.h: the client's ping-restart before a push

# --- implementation ----------------------------------------------------------

# The first retransmit of an unacked control packet (reliable.c reliable_mark_active_outgoing
# starts at --tls-timeout): we use OpenVPN's default, doubling each time like reliable_send.
RETRANSMIT_INITIAL = TLS_TIMEOUT_DEFAULT
# Acks per packet we send: dedicated P_ACK_V1 up to RELIABLE_ACK_SIZE, piggy-backed on a
# P_CONTROL_V1 up to CONTROL_SEND_ACK_MAX (ssl.c tls_process, tls_process_state).
ACK_LIMIT_DEDICATED = RELIABLE_ACK_SIZE
ACK_LIMIT_PIGGYBACK = CONTROL_SEND_ACK_MAX
