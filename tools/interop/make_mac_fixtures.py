#!/usr/bin/env python3
"""MAC fixtures made by an independent implementation.

Writes ``fixtures/mac/interop-macs.json``: cases of (algorithm, key, message, mac),
(algorithm, key, kcv), and whole ISO 8583 messages carrying their MAC in field 64 or 128 computed here with Python's ``cryptography`` package (OpenSSL's DES and
AES, not RustCrypto), so that the Rust tests (``src/mac.rs``, ``tests/mac.rs``) can check that
pingate's MACs and key check values are byte for byte those of another implementation.

Made with cryptography 48.0.0 (``pip install cryptography==48.0.0``) on Python 3.11, run as

    python3 tools/interop/make_mac_fixtures.py

The algorithms, written out here by the book from block operations only:

- ``retail-des``: ISO/IEC 9797-1 MAC algorithm 3 (ANSI X9.19 retail MAC) with a double-length
  DES key K = KL || KR: the message right-padded with zero bytes to a positive multiple of 8
  (padding method 1; the empty message is one block of zeros), CBC-DES under KL with a zero IV,
  then the last block decrypted under KR and encrypted again under KL. 8 bytes.
- ``aes-cmac``: NIST SP 800-38B / RFC 4493 CMAC with AES (128, 192 or 256-bit key), the
  leftmost 8 bytes (the full 16-byte tag is kept too, as ``full``).
- key check values: ``retail-des`` the leftmost 3 bytes of the double-length key (two-key
  TDES, EDE) encrypting a zero block; ``aes-cmac`` the leftmost 3 bytes of the AES-CMAC of a
  16-byte zero block (ANSI X9.24-1:2017's method for AES keys).

Single DES is TDES with the same key three times (EDE with K1 = K2 = K3 is one DES
encryption): ``cryptography`` keeps DES only as ``TripleDES`` in its ``decrepit`` module.
Keys and messages come from a seeded generator, so a run writes the same file every time.
"""

import json
import pathlib
import random

import cryptography
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

assert cryptography.__version__ == "48.0.0", cryptography.__version__

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "mac" / "interop-macs.json"


def des_encrypt(k8: bytes, block: bytes) -> bytes:
    e = Cipher(TripleDES(k8 * 3), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def des_decrypt(k8: bytes, block: bytes) -> bytes:
    d = Cipher(TripleDES(k8 * 3), modes.ECB()).decryptor()
    return d.update(block) + d.finalize()


def retail_mac(key: bytes, msg: bytes) -> bytes:
    assert len(key) == 16
    kl, kr = key[:8], key[8:]
    padded = msg + bytes(-len(msg) % 8) if msg else bytes(8)
    state = bytes(8)
    for i in range(0, len(padded), 8):
        state = des_encrypt(kl, bytes(a ^ b for a, b in zip(state, padded[i:i + 8])))
    return des_encrypt(kl, des_decrypt(kr, state))


def aes_cmac(key: bytes, msg: bytes) -> bytes:
    c = cmac.CMAC(algorithms.AES(key))
    c.update(msg)
    return c.finalize()


def kcv(algorithm: str, key: bytes) -> bytes:
    if algorithm == "retail-des":
        e = Cipher(TripleDES(key + key[:8]), modes.ECB()).encryptor()  # two-key TDES: K1 K2 K1
        return (e.update(bytes(8)) + e.finalize())[:3]
    return aes_cmac(key, bytes(16))[:3]


# The published vectors this implementation must give too (checked before anything is written).
# ISO/IEC 9797-1:2011 annex B.4 (as quoted by RustCrypto's retail-mac), BouncyCastle's
# ISO9797Alg3MacTest, pyemv's test of mac_iso9797_3 (padding method 1), RFC 4493 section 4.
PUBLISHED = [
    ("retail-des", "0123456789ABCDEFFEDCBA9876543210", b"Now is the time for all ", "A1C72E74EA3FA9B6"),
    ("retail-des", "0123456789ABCDEFFEDCBA9876543210", b"Now is the time for it", "2E2B1428CC78254F"),
    ("retail-des", "7CA110454A1A6E570131D9619DC1376E", b"Hello World !!!!", "F09B856213BAB83B"),
    ("retail-des", "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBB", b"hello world", "78DA3D3DEB48FD4D"),
    ("aes-cmac", "2B7E151628AED2A6ABF7158809CF4F3C", b"", "BB1D6929E95937287FA37D129B756746"),
    ("aes-cmac", "2B7E151628AED2A6ABF7158809CF4F3C", bytes.fromhex("6BC1BEE22E409F96E93D7E117393172A"),
     "070A16B46B4D4144F79BDD9DD04A287C"),
]
for algorithm, key, msg, mac in PUBLISHED:
    f = retail_mac if algorithm == "retail-des" else aes_cmac
    got = f(bytes.fromhex(key), msg).hex().upper()
    assert got == mac, (algorithm, key, msg, got, mac)

rng = random.Random(20)
# Message lengths around block edges (8 for DES, 16 for AES), then message-sized ones.
LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 48, 63, 64, 65, 100, 127, 128, 129, 255, 256, 1000]
KEYS = [("retail-des", 16)] * 4 + [("aes-cmac", 16)] * 3 + [("aes-cmac", 24), ("aes-cmac", 32)]

macs = []
kcvs = []
for algorithm, size in KEYS:
    key = rng.randbytes(size)
    kcvs.append({"algorithm": algorithm, "key": key.hex().upper(), "kcv": kcv(algorithm, key).hex().upper()})
    for n in LENGTHS:
        msg = rng.randbytes(n)
        if algorithm == "retail-des":
            case = {"mac": retail_mac(key, msg).hex().upper()}
        else:
            full = aes_cmac(key, msg)
            case = {"mac": full[:8].hex().upper(), "full": full.hex().upper()}
        macs.append({"algorithm": algorithm, "key": key.hex().upper(), "message": msg.hex().upper(), **case})

# Whole messages with their MAC, from the codec's interop fixtures (encoded by pyiso8583, see
# make_pyiso8583_fixtures.py): the MAC field placed here by the book, independently of pingate.
# It is field 64, or field 128 when the secondary bitmap is present (its bit 1 set); it is the
# message's last field, so it is appended (its bit set in the bitmap first) or, when the message
# already has one, its bytes are replaced. The MAC covers every byte from the MTI to the last byte
# before the MAC field, bitmaps as sent (the MAC's bit set). Binary fields are 8 raw bytes in
# iso87-bcd and 16 uppercase hex characters in the ASCII dialects.
DIALECTS = {  # MTI bytes, bitmap written as hex characters, MAC written as hex characters
    "iso87-ascii": (4, True, True),
    "iso87-ascii-binbitmap": (4, False, True),
    "iso87-bcd": (2, False, False),
}
SCENARIOS = ["sale-0200", "sale-0210", "echo-0800", "reversal-0400-secondary-bitmap"]


def with_mac(dialect: str, message: bytes, mac_of) -> tuple[int, bytes]:
    mti_len, hex_bitmap, hex_mac = DIALECTS[dialect]
    primary = bytes.fromhex(message[mti_len:mti_len + 16].decode()) if hex_bitmap else message[mti_len:mti_len + 8]
    secondary = primary[0] & 0x80 != 0
    field = 128 if secondary else 64
    # Where the last byte of the MAC's bitmap is, and whether the MAC field is there already.
    last = mti_len + (16 if hex_bitmap else 8) * (2 if secondary else 1) - (2 if hex_bitmap else 1)
    wire = 16 if hex_mac else 8
    if hex_bitmap:
        nibble = int(chr(message[last + 1]), 16)
        present = nibble & 1
        body = message[:last + 1] + b"%X" % (nibble | 1) + message[last + 2:]
    else:
        present = message[last] & 1
        body = message[:last] + bytes([message[last] | 1]) + message[last + 1:]
    if present:
        body = body[:-wire]
    mac = mac_of(body)[:8]
    return field, body + (mac.hex().upper().encode() if hex_mac else mac)


messages = []
for algorithm, size in (("retail-des", 16), ("aes-cmac", 16)):
    key = rng.randbytes(size)
    f = retail_mac if algorithm == "retail-des" else aes_cmac
    for dialect in DIALECTS:
        for scenario in SCENARIOS:
            plain = bytes.fromhex((ROOT / f"fixtures/iso8583/interop/{dialect}--{scenario}.hex").read_text())
            field, signed = with_mac(dialect, plain, lambda body: f(key, body))
            messages.append({"algorithm": algorithm, "key": key.hex().upper(), "dialect": dialect,
                             "scenario": scenario, "field": field, "hex": signed.hex().upper()})

OUT.parent.mkdir(parents=True, exist_ok=True)
doc = {
    "made_by": f"tools/interop/make_mac_fixtures.py with cryptography {cryptography.__version__}",
    "macs": macs,
    "kcvs": kcvs,
    "messages": messages,
}
OUT.write_text(json.dumps(doc, indent=1) + "\n")
print(f"{OUT.relative_to(ROOT)}: {len(macs)} MACs, {len(kcvs)} KCVs, {len(messages)} messages")
