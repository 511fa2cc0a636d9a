"""The batch AEAD (fabric/dataplane/aead.py and its native twin fabric/dataplane/_native.c):
known-answer vectors arranged through a Layout, round trips in WireGuard's and
OpenVPN's layouts, tampering and short input, bad arguments, and the two
implementations byte for byte against each other.

Vectors:
* RFC 8439 section 2.8.2 (ChaCha20-Poly1305 AEAD, "Ladies and Gentlemen ...");
* McGrew and Viega, "The Galois/Counter Mode of Operation (GCM)" (the submission to
  NIST, reused by NIST's GCM validation), test case 4 (AES-128) and test case 16
  (AES-256): 96-bit IV, 20 bytes of AAD, a 60-byte plaintext.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.dataplane.aead import TAG, Layout, NativeBatchAead, PureBatchAead

REQUIRE = os.environ.get("FABRIC_REQUIRE_NATIVE") == "1"
IMPLS = [
    pytest.param(PureBatchAead, id="pure"),
    pytest.param(NativeBatchAead, id="native", marks=pytest.mark.skipif(
        NativeBatchAead is None and not REQUIRE,
        reason="fabric.dataplane._native is not built (needs gcc and libssl-dev; pip install -e .)")),
]
CIPHERS = ["CHACHA20-POLY1305", "AES-256-GCM", "AES-128-GCM"]
KEYS = {"CHACHA20-POLY1305": bytes(range(32)), "AES-256-GCM": bytes(range(1, 33)), "AES-128-GCM": bytes(range(16))}
PING = bytes.fromhex("2a187bf3641eb4cb07ed2d0a981fc748")  # OpenVPN's ping string (ping.c)

# the protocols' layouts, as fabric/protocols/*/datapath.py build them
WG = Layout(header=16, counter_at=8, counter_len=8, tag_first=False, aad_from=0, aad_to=0, pad=16)
OVPN_V2 = Layout(header=8, counter_at=4, counter_len=4, tag_first=True, aad_from=0, aad_to=8, pad=1, empty=PING)
OVPN_V1 = Layout(header=5, counter_at=1, counter_len=4, tag_first=True, aad_from=1, aad_to=5, pad=1, empty=PING)
IV = bytes.fromhex("0102030405060708")  # an OpenVPN implicit IV
# layout, nonce prefix, nonce suffix, a header template
PROTOCOLS = {
    "wireguard": (WG, bytes(4), b"", bytes.fromhex("04000000 44332211") + bytes(8)),
    "openvpn-v2": (OVPN_V2, b"", IV, bytes([9 << 3 | 3]) + bytes.fromhex("012345") + bytes(4)),
    "openvpn-v1": (OVPN_V1, b"", IV, bytes([6 << 3 | 3]) + bytes(4)),
}


def make(impl: Any, cipher: str, protocol: str) -> Any:  # Any: the tests pass bad arguments too
    layout, prefix, suffix, _ = PROTOCOLS[protocol]
    return impl(cipher, KEYS[cipher], layout, prefix, suffix)


# --- known answers ---------------------------------------------------------------------------

# RFC 8439 2.8.2: nonce = 07 00 00 00 || 40 41 .. 47, AAD = 50 51 52 53 c0 .. c7
RFC8439_KEY = bytes(range(0x80, 0xA0))
RFC8439_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC8439_PT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
              b"the future, sunscreen would be it.")
RFC8439_CT = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
    "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116")
RFC8439_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")

# McGrew-Viega GCM test cases 4 (AES-128) and 16 (AES-256): IV cafebabe facedbad decaf888
GCM_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
GCM_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
GCM_PT = bytes.fromhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf"
                       "0e2449a6b525b16aedf5aa0de657ba637b39")
GCM_CASES = {
    "AES-128-GCM": (GCM_KEY, bytes.fromhex(
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa05"
        "1ba30b396a0aac973d58e091"), bytes.fromhex("5bc94fbc3221a5db94fae95ae7121a47")),
    "AES-256-GCM": (GCM_KEY + GCM_KEY, bytes.fromhex(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838"
        "c5f61e6393ba7a0abcc9f662"), bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")),
}


@pytest.mark.parametrize("tag_first", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_rfc8439_chacha20_poly1305_vector(impl: Any, tag_first: bool) -> None:
    # header = AAD (12 bytes) || the nonce's last 8 bytes as a little-endian counter;
    # prefix = the 32-bit constant 07 00 00 00
    layout = Layout(header=20, counter_at=12, counter_len=8, tag_first=tag_first, aad_from=0, aad_to=12, pad=1)
    box = impl("CHACHA20-POLY1305", RFC8439_KEY, layout, bytes.fromhex("07000000"), b"")
    counter = int.from_bytes(bytes(range(0x40, 0x48)), "little")
    head = RFC8439_AAD + bytes(range(0x40, 0x48))
    want = head + (RFC8439_TAG + RFC8439_CT if tag_first else RFC8439_CT + RFC8439_TAG)
    assert box.seal(RFC8439_AAD + bytes(8), counter, [RFC8439_PT]) == [want]
    assert box.open([want]) == ([RFC8439_PT], [counter])


@pytest.mark.parametrize("cipher", sorted(GCM_CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_gcm_spec_vectors(impl: Any, cipher: str) -> None:
    key, ct, tag = GCM_CASES[cipher]
    # nonce = cafebabe (prefix) || facedbad (a big-endian counter) || decaf888 (suffix);
    # header = the AAD (20 bytes) || the counter
    layout = Layout(header=24, counter_at=20, counter_len=4, tag_first=False, aad_from=0, aad_to=20, pad=1)
    box = impl(cipher, key, layout, bytes.fromhex("cafebabe"), bytes.fromhex("decaf888"))
    want = GCM_AAD + bytes.fromhex("facedbad") + ct + tag
    assert box.seal(GCM_AAD + bytes(4), 0xFACEDBAD, [GCM_PT]) == [want]
    assert box.open([want]) == ([GCM_PT], [0xFACEDBAD])
    assert box.open([want[:-1] + bytes([want[-1] ^ 1])]) == ([None], [0xFACEDBAD])


# --- the protocols' layouts ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip(impl: Any, cipher: str, protocol: str) -> None:
    layout, _, _, header = PROTOCOLS[protocol]
    box = make(impl, cipher, protocol)
    packets = [os.urandom(n) for n in (1, 15, 16, 17, 100, 1420)]
    sealed = box.seal(header, 7, [b"", *packets])
    for i, d in enumerate(sealed):
        assert d[: layout.counter_at] == header[: layout.counter_at]
        assert d[layout.counter_at + layout.counter_len: layout.header] == \
            header[layout.counter_at + layout.counter_len:]
        order: Literal["little", "big"] = "little" if layout.counter_len == 8 else "big"
        assert int.from_bytes(d[layout.counter_at: layout.counter_at + layout.counter_len], order) == 7 + i
    plain, counters = box.open(sealed)
    assert counters == list(range(7, 7 + len(sealed)))
    # the empty packet: WireGuard's keepalive stays empty, OpenVPN sends the ping string
    assert plain[0] == layout.empty
    for want, got, d in zip(packets, plain[1:], sealed[1:], strict=True):
        fill = -len(want) % layout.pad
        assert got == want + bytes(fill)
        assert len(d) == layout.header + len(want) + fill + TAG


@pytest.mark.parametrize("impl", IMPLS)
def test_wireguard_pads_to_16_and_a_keepalive_is_32_bytes(impl: Any) -> None:
    box = make(impl, "CHACHA20-POLY1305", "wireguard")
    keepalive, one, sixteen = box.seal(PROTOCOLS["wireguard"][3], 0, [b"", b"x", bytes(16)])
    assert (len(keepalive), len(one), len(sixteen)) == (32, 48, 48)  # whitepaper 5.4.6
    assert box.open([keepalive, one]) == ([b"", b"x" + bytes(15)], [0, 1])


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("impl", IMPLS)
def test_memoryviews_in_and_out(impl: Any, protocol: str) -> None:
    _, _, _, header = PROTOCOLS[protocol]
    box = make(impl, "AES-256-GCM", protocol)
    buf = bytearray(b"..." + os.urandom(1000) + b"...")
    packets = [memoryview(buf)[3:-3], memoryview(b"abc"), b"plain"]
    sealed = box.seal(memoryview(header), 1, packets)
    assert sealed == box.seal(header, 1, [bytes(p) for p in packets])
    frame = bytearray(b"".join(sealed))  # a worker's frame: memoryviews into one buffer
    views, at = [], 0
    for d in sealed:
        views.append(memoryview(frame)[at: at + len(d)])
        at += len(d)
    plain, counters = box.open(views)
    for p, q in zip(plain, packets, strict=True):
        assert p is not None and p[:len(q)] == bytes(q)
    assert counters == [1, 2, 3]
    assert all(type(p) is bytes for p in plain)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("impl", IMPLS)
def test_counters_at_the_top_of_their_range(impl: Any, protocol: str) -> None:
    layout, _, _, header = PROTOCOLS[protocol]
    box = make(impl, "CHACHA20-POLY1305", protocol)
    top = (1 << (8 * layout.counter_len)) - 1  # 2**64 - 1 or 2**32 - 1
    sealed = box.seal(header, top - 1, [b"a", b"b"])
    plain, counters = box.open(sealed)
    assert counters == [top - 1, top]
    assert [p[:1] for p in plain if p] == [b"a", b"b"]
    with pytest.raises(ValueError):
        box.seal(header, top, [b"a", b"b"])  # the second would wrap
    with pytest.raises(ValueError):
        box.seal(header, top + 1, [])
    with pytest.raises(ValueError):
        box.seal(header, -1, [b"a"])
    assert box.seal(header, top, []) == []


def authenticated(layout: Layout, i: int) -> bool:
    """Whether byte i of a datagram is covered by the tag (AAD, counter, tag, ciphertext)."""
    return i >= layout.header or layout.aad_from <= i < layout.aad_to \
        or layout.counter_at <= i < layout.counter_at + layout.counter_len


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_every_authenticated_byte_is_checked(impl: Any, cipher: str, protocol: str) -> None:
    layout, _, _, header = PROTOCOLS[protocol]
    box = make(impl, cipher, protocol)
    (d,) = box.seal(header, 5, [b"0123456789abcdef"])
    good, _ = box.open([d])
    flipped = [d[:i] + bytes([d[i] ^ 0x80]) + d[i + 1:] for i in range(len(d))]
    # good ones between the bad: a failed tag leaves the context ready for the next
    batch = [x for f in flipped for x in (f, d)]
    plain, _ = box.open(batch)
    for i in range(len(d)):
        assert plain[2 * i] == (None if authenticated(layout, i) else good[0]), i
        assert plain[2 * i + 1] == good[0]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("impl", IMPLS)
def test_short_datagrams_are_none_with_counter_0(impl: Any, protocol: str) -> None:
    layout, _, _, header = PROTOCOLS[protocol]
    box = make(impl, "AES-128-GCM", protocol)
    (d,) = box.seal(header, 0x01020304, [b"x"])
    shorts = [d[:n] for n in range(layout.header + TAG)]
    plain, counters = box.open([*shorts, d, b""])
    assert plain[:-2] == [None] * len(shorts) and plain[-1] is None and plain[-2]
    assert counters == [0] * len(shorts) + [0x01020304, 0]
    # header + tag and no ciphertext: an empty plaintext's datagram, parsed and checked
    forged = d[: layout.header + TAG]
    assert box.open([forged]) == ([None], [0x01020304])


@pytest.mark.parametrize("impl", IMPLS)
def test_another_key_or_nonce_fails(impl: Any) -> None:
    a = make(impl, "AES-256-GCM", "openvpn-v2")
    b = impl("AES-256-GCM", KEYS["AES-256-GCM"], OVPN_V2, b"", bytes(8))  # another implicit IV
    c = impl("AES-256-GCM", bytes(32), OVPN_V2, b"", IV)  # another key
    sealed = a.seal(PROTOCOLS["openvpn-v2"][3], 1, [b"hello"])
    assert b.open(sealed)[0] == [None] and c.open(sealed)[0] == [None] and a.open(sealed)[0] == [b"hello"]


# --- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_constructor_arguments(impl: Any) -> None:
    with pytest.raises(ValueError):
        impl("AES-192-GCM", bytes(24), WG, bytes(4), b"")
    with pytest.raises(ValueError):
        impl("aes-256-gcm", bytes(32), WG, bytes(4), b"")
    for cipher, size in (("CHACHA20-POLY1305", 16), ("AES-256-GCM", 16), ("AES-128-GCM", 32), ("AES-128-GCM", 0)):
        with pytest.raises(ValueError):
            impl(cipher, bytes(size), WG, bytes(4), b"")
    for prefix, suffix in ((b"", b""), (bytes(4), b"x"), (b"", bytes(8))):  # not 12 bytes with LE64
        with pytest.raises(ValueError):
            impl("CHACHA20-POLY1305", bytes(32), WG, prefix, suffix)
    with pytest.raises(TypeError):
        impl("CHACHA20-POLY1305", "a str key", WG, bytes(4), b"")
    with pytest.raises(TypeError):
        impl(b"CHACHA20-POLY1305", bytes(32), WG, bytes(4), b"")


@pytest.mark.parametrize("kwargs", [
    {"counter_len": 2}, {"counter_at": 12}, {"counter_at": -1}, {"header": 4}, {"aad_from": 3, "aad_to": 2},
    {"aad_to": 17}, {"pad": 0}, {"pad": 257}, {"header": -1},
])
def test_bad_layouts(kwargs: dict[str, int]) -> None:
    fields = {"header": 16, "counter_at": 8, "counter_len": 8, "tag_first": False, "aad_from": 0, "aad_to": 0,
              "pad": 16} | kwargs
    with pytest.raises(ValueError):
        Layout(**fields)  # type: ignore[arg-type]


def test_a_layout_takes_ints_and_bytes() -> None:
    with pytest.raises(TypeError):
        Layout(header=16.0, counter_at=8, counter_len=8, tag_first=False, aad_from=0, aad_to=0, pad=16)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Layout(header=16, counter_at=8, counter_len=8, tag_first=False, aad_from=0, aad_to=0, pad=16, empty="")  # type: ignore[arg-type]


@pytest.mark.skipif(NativeBatchAead is None, reason="fabric.dataplane._native is not built")
def test_native_checks_a_layout_it_did_not_get_from_layout() -> None:
    class Duck:  # the C code reads the attributes itself and must check them itself
        header, counter_at, counter_len, tag_first, aad_from, aad_to, pad, empty = 16, 8, 8, False, 0, 0, 16, b""

    assert NativeBatchAead is not None
    assert NativeBatchAead("CHACHA20-POLY1305", bytes(32), Duck(), bytes(4), b"")  # type: ignore[arg-type]
    for name, value, error in (("counter_at", 9, ValueError), ("counter_len", 3, ValueError),
                               ("aad_to", 99, ValueError), ("pad", 0, ValueError), ("header", 1 << 70, ValueError),
                               ("empty", "str", TypeError), ("header", 1.5, TypeError), ("pad", None, TypeError)):
        bad = Duck()
        setattr(bad, name, value)
        with pytest.raises(error):
            NativeBatchAead("CHACHA20-POLY1305", bytes(32), bad, bytes(4), b"")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        NativeBatchAead("CHACHA20-POLY1305", bytes(32), object(), bytes(4), b"")  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_call_arguments(impl: Any) -> None:
    box = make(impl, "CHACHA20-POLY1305", "wireguard")
    header = PROTOCOLS["wireguard"][3]
    with pytest.raises(ValueError):
        box.seal(header[:-1], 0, [b"x"])
    with pytest.raises(TypeError):
        box.seal(header, 1.0, [b"x"])
    with pytest.raises(TypeError):
        box.seal(header, 0, [b"x", "a str"])
    with pytest.raises(TypeError):
        box.seal(header, 0, None)
    with pytest.raises(TypeError):
        box.open([b"x" * 64, 42])
    with pytest.raises(TypeError):
        box.open(None)
    assert box.open([]) == ([], []) and box.seal(header, 0, []) == []
    assert box.open(d for d in box.seal(header, 0, [b"y"]))[0] == [b"y" + bytes(15)]  # any iterable
    assert (box.cipher, box.layout) == ("CHACHA20-POLY1305", WG)


# --- native and pure agree -------------------------------------------------------------------

needs_native = pytest.mark.skipif(NativeBatchAead is None and not REQUIRE,
                                  reason="fabric.dataplane._native is not built (needs gcc and libssl-dev)")


@needs_native
@settings(max_examples=300, deadline=None)
@given(cipher=st.sampled_from(CIPHERS), protocol=st.sampled_from(sorted(PROTOCOLS)), data=st.data(),
       packets=st.lists(st.binary(max_size=80), max_size=6))
def test_native_and_pure_agree(cipher: str, protocol: str, data: st.DataObject, packets: list[bytes]) -> None:
    layout, _, _, _ = PROTOCOLS[protocol]
    key = data.draw(st.binary(min_size=len(KEYS[cipher]), max_size=len(KEYS[cipher])), "key")
    header = data.draw(st.binary(min_size=layout.header, max_size=layout.header), "header")
    top = 1 << (8 * layout.counter_len)
    counter0 = data.draw(st.integers(0, top - max(len(packets), 1)), "counter0")
    around = 12 - layout.counter_len  # the nonce's bytes around the counter, split anywhere
    fixed = data.draw(st.binary(min_size=around, max_size=around), "fixed")
    cut = data.draw(st.integers(0, around), "cut")
    native = NativeBatchAead(cipher, key, layout, fixed[:cut], fixed[cut:])  # type: ignore[misc]
    pure = PureBatchAead(cipher, key, layout, fixed[:cut], fixed[cut:])
    sealed = native.seal(header, counter0, packets)
    assert sealed == pure.seal(header, counter0, packets)
    # open the sealed ones, some cut short or with a byte flipped, and some garbage
    mangled = list(sealed)
    for i in data.draw(st.lists(st.integers(0, len(sealed) - 1), max_size=3), "which") if sealed else []:
        d = mangled[i]
        if not d:
            continue  # cut to nothing already
        at = data.draw(st.integers(0, len(d) - 1), "at")
        if data.draw(st.booleans(), "cut"):
            mangled[i] = d[:at]
        else:
            mangled[i] = d[:at] + bytes([d[at] ^ 1]) + d[at + 1:]
    mangled += data.draw(st.lists(st.binary(max_size=60), max_size=3), "garbage")
    assert native.open(mangled) == pure.open(mangled)
    assert native.open([memoryview(d) for d in mangled]) == pure.open(mangled)


# --- selection -------------------------------------------------------------------------------


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60)


def test_the_selection_follows_the_environment() -> None:
    show = "from fabric.dataplane import aead; print(aead.NATIVE, aead.BatchAead.__name__, aead.describe())"
    cp = run(show, FABRIC_NATIVE="0")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split(" ", 2) == ["False", "PureBatchAead", "pure Python (FABRIC_NATIVE=0)\n"]
    # a missing extension: the pure path, or an ImportError if the native one is required
    hide = "import sys; sys.modules['fabric.dataplane._native'] = None; "
    cp = run(hide + show)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("False PureBatchAead pure Python (the native extension did not import")
    cp = run(hide + show, FABRIC_REQUIRE_NATIVE="1")
    assert cp.returncode != 0 and "ImportError" in cp.stderr and "libssl-dev" in cp.stderr
    assert "pip install -e ." in cp.stderr
    if NativeBatchAead is not None:
        cp = run(show)
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.startswith("True BatchAead native (OpenSSL ")


def test_the_layouts_here_are_the_protocols_own() -> None:
    from fabric.protocols.openvpn import datapath as ovpn
    from fabric.protocols.wireguard import datapath as wg

    assert (wg.LAYOUT, ovpn.V2_LAYOUT, ovpn.V1_LAYOUT) == (WG, OVPN_V2, OVPN_V1)
