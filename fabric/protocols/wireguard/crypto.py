"""Cryptographic primitives of the WireGuard protocol (whitepaper 5.4).

HASH and MAC are BLAKE2s (hashlib), HMAC is HMAC-BLAKE2s, KDF is HKDF over
HMAC-BLAKE2s, DH is X25519 and AEAD is ChaCha20-Poly1305 (cryptography),
XAEAD is XChaCha20-Poly1305 (PyNaCl, libsodium).
"""

from __future__ import annotations

import base64
import hashlib
import hmac as _hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as _NaclCryptoError

from fabric.protocols.wireguard.constants import KEY_SIZE

__all__ = [
    "CryptoError",
    "hash_",
    "mac",
    "hmac",
    "kdf",
    "dh",
    "generate_private_key",
    "public_key",
    "aead_encrypt",
    "aead_decrypt",
    "xaead_encrypt",
    "xaead_decrypt",
    "nonce_bytes",
    "tai64n",
    "key_to_base64",
    "key_from_base64",
]


class CryptoError(Exception):
    """An authentication or key-agreement failure (bad tag, low-order point)."""


def hash_(data: bytes) -> bytes:
    """HASH(input): BLAKE2s with a 32-byte digest (whitepaper 5.4)."""
    return hashlib.blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, input): keyed BLAKE2s with a 16-byte digest (whitepaper 5.4)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC(key, input): HMAC-BLAKE2s, 32-byte output (whitepaper 5.4)."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF_n(key, input): HKDF with HMAC-BLAKE2s, n outputs of 32 bytes (whitepaper 5.4)."""
    if not 1 <= n <= 3:
        raise ValueError("KDF yields 1 to 3 keys")
    t0 = hmac(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac(t0, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def generate_private_key() -> bytes:
    """DH-GENERATE(): a fresh, clamped X25519 private key."""
    raw = X25519PrivateKey.generate().private_bytes_raw()
    return clamp(raw)


def clamp(raw: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` does."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public_key(private: bytes) -> bytes:
    """DH-PUBKEY(private)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes:
    """DH(private, public): X25519; a low-order public key raises CryptoError."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as exc:  # all-zero shared secret
        raise CryptoError("invalid public key") from exc


_NONCE = struct.Struct("<4xQ")


def nonce_bytes(counter: int) -> bytes:
    """The 96-bit AEAD nonce: 32 zero bits then the 64-bit little-endian counter (5.4.6)."""
    return _NONCE.pack(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    """AEAD(key, counter, plain, auth): ChaCha20-Poly1305."""
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), ciphertext, aad)
    except InvalidTag as exc:
        raise CryptoError("bad AEAD tag") from exc


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XAEAD(key, nonce, plain, auth): XChaCha20-Poly1305, 24-byte nonce (cookie reply, 5.4.7)."""
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except _NaclCryptoError as exc:
        raise CryptoError("bad XAEAD tag") from exc


_TAI64_BASE = 2**62 + 10  # TAI64 label plus the TAI-UTC offset wireguard-go uses


def tai64n(now: float) -> bytes:
    """TAI64N(): 12-byte big-endian timestamp, seconds then nanoseconds (whitepaper 5.4.2)."""
    secs = int(now)
    nanos = int((now - secs) * 1e9)
    return struct.pack(">QI", _TAI64_BASE + secs, nanos)


def key_to_base64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def key_from_base64(text: str) -> bytes:
    """Parse a base64 WireGuard key; ValueError with a readable message if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except Exception as exc:
        raise ValueError(f"not a base64 key: {text!r}") from exc
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a key is {KEY_SIZE} bytes, this one decodes to {len(raw)}")
    return raw
