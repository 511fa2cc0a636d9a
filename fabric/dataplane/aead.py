"""The AEAD of a batch of data datagrams in one call, for any protocol that describes
its layout (a neutral library: fabric/protocols/base.py, rule 1).

A `Layout` says where one protocol puts the parts of a data datagram:

    WireGuard (whitepaper 5.4.6):  [type 4 | receiver | counter LE64] [ciphertext] [tag]
        Layout(header=16, counter_at=8, counter_len=8, tag_first=False, aad 0..0, pad=16)
        nonce = 0^32 || LE64(counter): prefix = 4 zero bytes, suffix = b""
    OpenVPN 2.6 (openvpn-protocol.md 3.1; crypto.c openvpn_encrypt_aead):
        P_DATA_V2: [op | peer-id] [packet id BE32] [tag] [ciphertext]
            Layout(header=8, counter_at=4, counter_len=4, tag_first=True, aad 0..8, pad=1)
        P_DATA_V1: [op] [packet id BE32] [tag] [ciphertext]
            Layout(header=5, counter_at=1, counter_len=4, tag_first=True, aad 1..5, pad=1)
        nonce = packet id || the 8-byte implicit IV: prefix = b"", suffix = the IV;
        an empty plaintext is sent as the ping string (ping.c): `empty`.

`BatchAead(cipher, key, layout, prefix, suffix)` opens and seals whole batches with
one key: ChaCha20-Poly1305 (RFC 8439 2.8) or AES-GCM (NIST SP 800-38D), 96-bit
nonces (prefix || the counter's bytes as on the wire || suffix), 128-bit tags.

Two implementations, one behaviour (tests/test_aead.py checks them byte for byte):
`NativeBatchAead` (fabric/dataplane/_native.c: OpenSSL's EVP API, contexts keyed
once, the whole batch in C) when the extension was built (`pip install -e .` with
gcc and libssl-dev), and `PureBatchAead` (`cryptography`'s one-shot API, a call per
datagram). `BatchAead` is the native one unless it is missing or FABRIC_NATIVE=0;
FABRIC_REQUIRE_NATIVE=1 makes a missing extension an ImportError (CI).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from fabric.dataplane import native

TAG = 16  # the Poly1305 tag (RFC 8439 2.5), the GCM tag (SP 800-38D 5.2.1.2: t = 128)
NONCE = 12  # RFC 8439 2.8 and SP 800-38D 8.2.1: 96-bit nonces
KEY_SIZES = {"CHACHA20-POLY1305": 32, "AES-256-GCM": 32, "AES-128-GCM": 16}
MAX_PAD = 256  # the native code's bound on Layout.pad
MAX_HEADER = 65535


@dataclass(frozen=True, slots=True)
class Layout:
    """How one protocol lays out a data datagram (see the module's docstring).

    header: bytes before the tag or ciphertext; counter_at, counter_len: where the
    counter is in the header, 8 bytes little-endian or 4 big-endian; tag_first: the
    tag right after the header (OpenVPN 2.6), else after the ciphertext (WireGuard);
    aad_from, aad_to: the AAD is datagram[aad_from:aad_to]; pad: seal pads the
    plaintext with zeros to a multiple of this; empty: seal sends this instead of an
    empty plaintext.
    """

    header: int
    counter_at: int
    counter_len: int
    tag_first: bool
    aad_from: int
    aad_to: int
    pad: int
    empty: bytes = b""

    def __post_init__(self) -> None:
        # the same checks as _native.c read_layout
        for name in ("header", "counter_at", "counter_len", "aad_from", "aad_to", "pad"):
            if not isinstance(getattr(self, name), int):
                raise TypeError(f"layout.{name} must be an int")
        if not 0 <= self.header <= MAX_HEADER:
            raise ValueError("layout.header must be 0..65535")
        if self.counter_len not in (4, 8):
            raise ValueError("layout.counter_len must be 4 or 8")
        if not 0 <= self.counter_at <= self.header - self.counter_len:
            raise ValueError("layout.counter_at: the counter must lie in the header")
        if not 0 <= self.aad_from <= self.aad_to <= self.header:
            raise ValueError("layout.aad_from..aad_to must lie in the header")
        if not 1 <= self.pad <= MAX_PAD:
            raise ValueError("layout.pad must be 1..256")
        if type(self.empty) is not bytes:
            raise TypeError("layout.empty must be bytes")


class Aead(Protocol):
    """What both implementations offer (for annotations)."""

    def __init__(self, cipher: str, key: bytes, layout: Layout, prefix: bytes, suffix: bytes) -> None:
        """ValueError for an unknown cipher, a key of the wrong size, or a prefix and
        suffix that do not make a 12-byte nonce with the layout's counter."""

    @property
    def cipher(self) -> str: ...

    @property
    def layout(self) -> Layout: ...

    def open(self, datagrams: Sequence[bytes | memoryview]) -> tuple[list[bytes | None], list[int]]:
        """Per datagram its plaintext, or None if shorter than header + 16 or the tag
        fails; and its counter (parsed also for failures, 0 for short ones)."""
        ...

    def seal(self, header: bytes, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        """Datagram i: `header` with counter0 + i at counter_at, then the sealed packet
        (layout.empty for an empty one) padded to layout.pad, tag where the layout says."""
        ...


_AEADS: dict[str, type[ChaCha20Poly1305] | type[AESGCM]] = {
    "CHACHA20-POLY1305": ChaCha20Poly1305, "AES-256-GCM": AESGCM, "AES-128-GCM": AESGCM,
}
_ZEROS = bytes(MAX_PAD)


class PureBatchAead:
    """BatchAead on `cryptography`'s one-shot API: the fallback, and the reference the
    native code is tested against."""

    __slots__ = ("cipher", "layout", "_encrypt", "_decrypt", "_prefix", "_suffix", "_counter", "_nonce",
                 "_header")

    def __init__(self, cipher: str, key: bytes, layout: Layout, prefix: bytes, suffix: bytes) -> None:
        if not isinstance(cipher, str):
            raise TypeError("cipher must be a str")
        if cipher not in KEY_SIZES:
            raise ValueError(f"unknown cipher {cipher!r} (CHACHA20-POLY1305, AES-256-GCM, AES-128-GCM)")
        # bytes-like only, as the native code's y* (bytes(32) would be 32 zero bytes)
        key, prefix, suffix = (memoryview(b).tobytes() for b in (key, prefix, suffix))
        if len(key) != KEY_SIZES[cipher]:
            raise ValueError(f"{cipher} takes a {KEY_SIZES[cipher]}-byte key, not {len(key)}")
        if len(prefix) + layout.counter_len + len(suffix) != NONCE:
            raise ValueError("the nonce prefix, counter and suffix must make 12 bytes")
        aead = _AEADS[cipher](key)
        self.cipher, self.layout = cipher, layout
        self._encrypt, self._decrypt = aead.encrypt, aead.decrypt
        self._prefix, self._suffix = prefix, suffix
        # one struct call each: the counter, the nonce around it, a header around it
        # (standard sizes, no alignment, with either byte order)
        word = "<Q" if layout.counter_len == 8 else ">I"
        self._counter = struct.Struct(word)
        self._nonce = struct.Struct(f"{word[0]}{len(prefix)}s{word[1]}{len(suffix)}s")
        self._header = struct.Struct(
            f"{word[0]}{layout.counter_at}s{word[1]}{layout.header - layout.counter_at - layout.counter_len}s")

    def open(self, datagrams: Sequence[bytes | memoryview]) -> tuple[list[bytes | None], list[int]]:
        """See `Aead.open`."""
        lay, decrypt, prefix, suffix = self.layout, self._decrypt, self._prefix, self._suffix
        head, at, aad_from, aad_to, tag_first = lay.header, lay.counter_at, lay.aad_from, lay.aad_to, lay.tag_first
        minimum, has_aad = head + TAG, aad_to > aad_from
        unpack, nonce = self._counter.unpack_from, self._nonce.pack
        plain: list[bytes | None] = []
        counters: list[int] = []
        for d in datagrams:
            if len(d) < minimum:
                plain.append(None)
                counters.append(0)
                continue
            (counter,) = unpack(d, at)
            counters.append(counter)
            # cryptography wants ciphertext || tag
            body = b"".join((d[minimum:], d[head:minimum])) if tag_first else d[head:]
            try:
                plain.append(decrypt(nonce(prefix, counter, suffix), body, d[aad_from:aad_to] if has_aad else None))
            except InvalidTag:
                plain.append(None)
        return plain, counters

    def seal(self, header: bytes, counter0: int, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        """See `Aead.seal`."""
        lay, encrypt, prefix, suffix = self.layout, self._encrypt, self._prefix, self._suffix
        header = memoryview(header).tobytes()
        if len(header) != lay.header:
            raise ValueError(f"the header template must be {lay.header} bytes, not {len(header)}")
        if not isinstance(counter0, int):
            raise TypeError("counter0 must be an int")
        n = len(packets)
        if counter0 < 0 or counter0 + max(n - 1, 0) >= 1 << (8 * lay.counter_len):
            raise ValueError("counter0 is out of the counter's range")
        before, after = header[:lay.counter_at], header[lay.counter_at + lay.counter_len:]
        aad_from, aad_to, has_aad = lay.aad_from, lay.aad_to, lay.aad_to > lay.aad_from
        pad, empty, tag_first = lay.pad, lay.empty, lay.tag_first
        make_header, nonce, join = self._header.pack, self._nonce.pack, b"".join
        out: list[bytes] = []
        for counter, pkt in enumerate(packets, counter0):
            hdr = make_header(before, counter, after)
            pt = pkt if len(pkt) else empty
            fill = -len(pt) % pad
            if fill:
                pt = join((pt, _ZEROS[:fill]))
            ct = encrypt(nonce(prefix, counter, suffix), pt, hdr[aad_from:aad_to] if has_aad else None)
            out.append(join((hdr, ct[-TAG:], ct[:-TAG])) if tag_first else hdr + ct)
        return out


# --- which one runs -------------------------------------------------------------------------

NativeBatchAead: type[Aead] | None = None
_OPENSSL = ""
_native, _WHY = native.load("_native")
if _native is not None:
    NativeBatchAead = _native.BatchAead
    _OPENSSL = " ".join(_native.OPENSSL_VERSION.split()[:2])  # "OpenSSL 3.0.19"
    _WHY = "FABRIC_NATIVE=0"

NATIVE = NativeBatchAead is not None and native.WANTED
BatchAead: type[Aead] = NativeBatchAead if NativeBatchAead is not None and NATIVE else PureBatchAead


def describe() -> str:
    """Which implementation runs, for logs: "native (OpenSSL 3.0.19)" or
    "pure Python (reason)"."""
    return f"native ({_OPENSSL})" if NATIVE else f"pure Python ({_WHY})"
