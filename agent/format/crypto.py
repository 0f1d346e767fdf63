"""Keys, sealing and opening of chunks and manifests, manifest signatures, keyed chunk ids.

The sealed format is specified in docs/FORMAT.md; keep the two in step.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import CryptoError, FormatError, KeyFileError

MAGIC = b"SKYF"
FORMAT_VERSION = 1
KIND_CHUNK = 1
KIND_MANIFEST = 2
KIND_TIP = 3  # a site's signed word on its manifest history (agent/format/tips.py)
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
SITE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


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
    if kind not in (KIND_CHUNK, KIND_MANIFEST, KIND_TIP):
        raise FormatError(f"unknown sealed object kind {kind}")
    return SealedHeader(kind, alg, compression, plen, eph, nonce)


def open_sealed(blob: bytes, recipient: X25519PrivateKey) -> tuple[SealedHeader, bytes]:
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


# ---- key files -------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class GeneratedKeys:
    edge_dir: Path
    cloud_dir: Path
    files: tuple[Path, ...]


def generate_keys(out_dir: Path, site: str) -> GeneratedKeys:
    """Create the recipient pair, the site signing key and the dedup key, split edge/cloud."""
    if not SITE_ID.fullmatch(site):
        raise KeyFileError(
            f"site id {site!r} is not valid: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit (it becomes part of cloud object keys)")
    edge, cloud = out_dir / "edge", out_dir / "cloud"
    targets = [
        edge / "recipient.pub", edge / "site.key", edge / "dedup.key",
        cloud / "recipient.key", cloud / "sites" / f"{site}.pub",
    ]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise KeyFileError(
            f"refusing to overwrite existing key files: {', '.join(existing)}; "
            "choose another --out folder or move them away first"
        )
    recipient = X25519PrivateKey.generate()
    signer = Ed25519PrivateKey.generate()
    pem = serialization.Encoding.PEM
    _write_private(
        cloud / "recipient.key",
        recipient.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()),
    )
    _write_public(
        edge / "recipient.pub",
        recipient.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    _write_private(
        edge / "site.key",
        signer.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()),
    )
    _write_public(
        cloud / "sites" / f"{site}.pub",
        signer.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    _write_private(edge / "dedup.key", secrets.token_hex(32).encode() + b"\n")
    return GeneratedKeys(edge, cloud, tuple(targets))


def check_private_permissions(path: Path) -> None:
    """Refuse a private key that other users can read, as ssh does."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"{what} {path} does not exist; create keys with `skyferry keygen --out DIR` "
            "and point the config at them"
        ) from None
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {path}: {e.strerror}") from None


def _load_pem(path: Path, what: str, expected: type, label: str, *, private: bool) -> object:
    """Read a PEM key that must be an instance of `expected`; private ones must be 0600."""
    data = _read_key_file(path, what)
    if private:
        check_private_permissions(path)
    try:
        key: object = (serialization.load_pem_private_key(data, password=None) if private
                       else serialization.load_pem_public_key(data))
    except (ValueError, TypeError):
        form = "an unencrypted PEM private key" if private else "a PEM public key"
        raise KeyFileError(f"{path} is not {form}") from None
    if not isinstance(key, expected):
        raise KeyFileError(f"{path} is not an {label} (wrong file?)")
    return key


def load_recipient_public(path: Path) -> X25519PublicKey:
    return cast(X25519PublicKey, _load_pem(path, "recipient public key", X25519PublicKey,
                                           "X25519 public key", private=False))


def load_recipient_private(path: Path) -> X25519PrivateKey:
    return cast(X25519PrivateKey, _load_pem(path, "recipient private key", X25519PrivateKey,
                                            "X25519 private key", private=True))


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    return cast(Ed25519PrivateKey, _load_pem(path, "site signing key", Ed25519PrivateKey,
                                             "Ed25519 private key", private=True))


def load_verify_key(path: Path) -> Ed25519PublicKey:
    return cast(Ed25519PublicKey, _load_pem(path, "site public key", Ed25519PublicKey,
                                            "Ed25519 public key", private=False))


def load_dedup_key(path: Path) -> bytes:
    data = _read_key_file(path, "dedup key")
    check_private_permissions(path)
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"{path} must hold 64 hex digits") from None
    if len(key) != 32:
        raise KeyFileError(f"{path} must hold 64 hex digits (32 bytes), found {len(key)} bytes")
    return key


def load_edge_keys(recipient_public: Path, signing_key: Path, dedup_key: Path) -> EdgeKeys:
    return EdgeKeys(
        load_recipient_public(recipient_public),
        load_signing_key(signing_key),
        load_dedup_key(dedup_key),
    )
