"""The sealed format: sealing and opening of chunks, manifests, tips and heartbeats, manifest
signatures, keyed chunk ids and content hashes, and the keys these take (`EdgeKeys`).

Specified in docs/FORMAT.md; keep the two in step. Key files on disk (reading, permission
checks, generation) are agent/format/keys.py's.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import CryptoError, FormatError

MAGIC = b"SKYF"
FORMAT_VERSION = 1
KIND_CHUNK = 1
KIND_MANIFEST = 2
KIND_TIP = 3  # a site's signed word on its manifest history (agent/format/tips.py)
KIND_HEARTBEAT = 4  # a site's signed word on its health (agent/format/heartbeat.py)
ALG_AES256GCM = 1
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
# magic, version, kind, alg, compression, plaintext length, ephemeral X25519 key, nonce
_HEADER = struct.Struct(">4sBBBBQ32s12s")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 16
_HKDF_INFO = b"skyferry/v1/seal"
_SIGN_CONTEXT = b"skyferry/v1/manifest\x00"
SIGNATURE_SIZE = 64


@dataclass(frozen=True)
class SealedHeader:
    kind: int
    algorithm: int
    compression: int
    plaintext_len: int
    ephemeral_public: bytes
    nonce: bytes


@dataclass(frozen=True)
class EdgeKeys:
    """What the edge site holds: it can seal and sign but never open."""

    recipient_public: X25519PublicKey
    signing_key: Ed25519PrivateKey
    dedup_key: bytes


def _derive_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral_public + recipient_public,
        info=_HKDF_INFO,
    )
    return hkdf.derive(shared)


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(
    payload: bytes | memoryview,
    recipient: X25519PublicKey,
    *,
    kind: int,
    compression: int,
    plaintext_len: int,
) -> bytes:
    """Encrypt `payload` (already compressed if `compression` says so) to `recipient`."""
    header, body = seal_parts(payload, recipient, kind=kind, compression=compression,
                              plaintext_len=plaintext_len)
    return header + body


def seal_parts(
    payload: bytes | memoryview,
    recipient: X25519PublicKey,
    *,
    kind: int,
    compression: int,
    plaintext_len: int,
) -> tuple[bytes, bytes]:
    """`seal` as (header, ciphertext and tag): a writer that takes both spares a 16 MiB join."""
    key = SealingKey.new(recipient)
    nonce = os.urandom(12)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, kind, ALG_AES256GCM, compression, plaintext_len,
        key.ephemeral_public, nonce,
    )
    return header, AESGCM(key.key).encrypt(nonce, payload, header)


@dataclass(frozen=True)
class SealingKey:
    """An ephemeral X25519 key pair's public half and the AEAD key it gives with a recipient.

    Fresh for each object: every chunk sealed for the object shares it (each with its own
    random nonce), so an object of 128 chunks costs one X25519 exchange, not 128. Readers
    derive the key from each header as always (docs/FORMAT.md, "Sealing").
    """

    ephemeral_public: bytes
    key: bytes

    @classmethod
    def new(cls, recipient: X25519PublicKey) -> SealingKey:
        ephemeral = X25519PrivateKey.generate()
        ephemeral_public = _raw_public(ephemeral.public_key())
        return cls(ephemeral_public, _derive_key(ephemeral.exchange(recipient), ephemeral_public,
                                                 _raw_public(recipient)))


class Sealer:
    """`seal` as a stream: the header, then ciphertext piece by piece, then the tag.

    The same bytes as `seal` (AES-256-GCM with the header as associated data), without ever
    holding the whole payload or ciphertext: a 16 MiB chunk is compressed, encrypted and written
    1 MiB at a time. `update_into` writes into the caller's buffer (no allocation per piece).
    With `key`, the ephemeral key pair of that SealingKey is used instead of a fresh one.
    """

    def __init__(self, recipient: X25519PublicKey, *, kind: int, compression: int,
                 plaintext_len: int, key: SealingKey | None = None) -> None:
        if key is None:
            key = SealingKey.new(recipient)
        nonce = os.urandom(12)
        self.header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, kind, ALG_AES256GCM, compression, plaintext_len,
            key.ephemeral_public, nonce,
        )
        self._enc = Cipher(algorithms.AES(key.key), modes.GCM(nonce)).encryptor()
        self._enc.authenticate_additional_data(self.header)

    def update_into(self, data: bytes | memoryview, out: bytearray) -> int:
        """Encrypt `data` into `out` (at least len(data) + 15 bytes); returns bytes written."""
        return self._enc.update_into(data, out)

    def finalize(self) -> bytes:
        """The 16-byte tag that ends the sealed object."""
        self._enc.finalize()
        return self._enc.tag


def parse_header(blob: bytes | memoryview) -> SealedHeader:
    """Read and check the fixed header of a sealed object; raise FormatError if it is not one."""
    if len(blob) < HEADER_SIZE + TAG_SIZE:
        raise FormatError(
            f"sealed object is {len(blob)} bytes, shorter than the minimum "
            f"{HEADER_SIZE + TAG_SIZE}: truncated"
        )
    magic, version, kind, alg, compression, plen, eph, nonce = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise FormatError("not a skyferry sealed object (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"sealed object has format version {version}; this skyferry reads version "
            f"{FORMAT_VERSION}: upgrade skyferry"
        )
    if alg != ALG_AES256GCM:
        raise FormatError(f"unknown sealing algorithm {alg}")
    if compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD):
        raise FormatError(f"unknown compression {compression}")
    if kind not in (KIND_CHUNK, KIND_MANIFEST, KIND_TIP, KIND_HEARTBEAT):
        raise FormatError(f"unknown sealed object kind {kind}")
    return SealedHeader(kind, alg, compression, plen, eph, nonce)


def open_sealed(blob: bytes | memoryview,
                recipient: X25519PrivateKey) -> tuple[SealedHeader, bytes]:
    """Decrypt a sealed object; raise CryptoError when it was tampered with or the key is wrong."""
    header = parse_header(blob)
    try:
        shared = recipient.exchange(X25519PublicKey.from_public_bytes(header.ephemeral_public))
    except ValueError:  # a low-order point (e.g. all zeros): forged, never made by seal()
        raise CryptoError("sealed object carries an invalid ephemeral key: forged") from None
    key = _derive_key(shared, header.ephemeral_public, _raw_public(recipient.public_key()))
    try:
        view = memoryview(blob)  # no copy of a 16 MiB ciphertext just to skip the header
        payload = AESGCM(key).decrypt(header.nonce, view[HEADER_SIZE:], view[:HEADER_SIZE])
    except InvalidTag:
        raise CryptoError(
            "authentication failed: the object was modified or sealed to another recipient key"
        ) from None
    return header, payload


def sign_manifest(body: bytes, key: Ed25519PrivateKey) -> bytes:
    """Return signature || body, the plaintext that gets sealed as a manifest."""
    return key.sign(_SIGN_CONTEXT + body) + body


def verify_manifest(signed: bytes | bytearray, key: Ed25519PublicKey) -> bytes:
    """Check the site's signature and return the manifest body."""
    if len(signed) < SIGNATURE_SIZE:
        raise CryptoError("manifest too short to carry a signature")
    signature, body = signed[:SIGNATURE_SIZE], signed[SIGNATURE_SIZE:]
    try:
        key.verify(signature, _SIGN_CONTEXT + body)
    except InvalidSignature:
        raise CryptoError("manifest signature does not verify with the site's public key") from None
    return bytes(body)


def chunk_id(dedup_key: bytes, data: bytes | memoryview) -> str:
    """Keyed BLAKE3 of the plaintext's BLAKE3 digest: equal data gives equal ids, outsiders
    learn nothing (docs/FORMAT.md, "Chunk id and content hash")."""
    return chunk_id_of(dedup_key, blake3.blake3(data, max_threads=1).digest())


def chunk_id_of(dedup_key: bytes, digest: bytes) -> str:
    """`chunk_id` from the chunk's BLAKE3 digest (its content hash, 32 bytes): the writer hashes
    each chunk once for both."""
    return keyed_hash(dedup_key, digest)


def keyed_hash(key: bytes, data: bytes | memoryview) -> str:
    """Keyed BLAKE3, hex: identities (source keys) that must reveal nothing without the key."""
    return blake3.blake3(data, key=key, max_threads=1).hexdigest()


def content_hash(*parts: bytes | bytearray | memoryview) -> str:
    """Unkeyed BLAKE3 (of the parts joined), recorded inside manifests for end-to-end checks."""
    h = blake3.blake3()
    for part in parts:
        h.update(part)
    return h.hexdigest()
