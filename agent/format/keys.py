"""Key files: generating a site's keys, reading them, and the one rule for private files.

Key files are read through agent/config/secrets.py `read_private`, the one rule for files that
hold a secret.
The keys themselves are used by agent/format/crypto.py (docs/FORMAT.md, "Keys").
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.config.secrets import read_private
from agent.errors import KeyFileError
from agent.format.crypto import EdgeKeys

SITE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
KEYGEN_HINT = "create keys with `skyferry keygen --out DIR` and point the config at them"


def write_private(path: Path, data: bytes) -> None:
    """Create (never replace) a file only its owner can read, durably."""
    _write_new(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Create (never replace) a world-readable file, durably."""
    _write_new(path, data, 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_pem(path: Path, what: str, expected: type, label: str, *, private: bool) -> object:
    """Read a PEM key that must be an instance of `expected`; private ones must be 0600."""
    data = read_private(path, what, private=private, missing=KEYGEN_HINT)
    try:
        key: object = (serialization.load_pem_private_key(data, password=None) if private
                       else serialization.load_pem_public_key(data))
    except (ValueError, TypeError):
        form = "an unencrypted PEM private key" if private else "a PEM public key"
        raise KeyFileError(f"{path} is not {form}") from None
    if not isinstance(key, expected):
        raise KeyFileError(f"{path} is not an {label} (wrong file?)")
    return key


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
    pkcs8, spki = serialization.PrivateFormat.PKCS8, serialization.PublicFormat.SubjectPublicKeyInfo
    write_private(cloud / "recipient.key",
                  recipient.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    write_public(edge / "recipient.pub", recipient.public_key().public_bytes(pem, spki))
    write_private(edge / "site.key", signer.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    write_public(cloud / "sites" / f"{site}.pub", signer.public_key().public_bytes(pem, spki))
    write_private(edge / "dedup.key", secrets.token_hex(32).encode() + b"\n")
    return GeneratedKeys(edge, cloud, tuple(targets))


def load_recipient_public(path: Path) -> X25519PublicKey:
    return cast(X25519PublicKey, load_pem(path, "recipient public key", X25519PublicKey,
                                          "X25519 public key", private=False))


def load_recipient_private(path: Path) -> X25519PrivateKey:
    return cast(X25519PrivateKey, load_pem(path, "recipient private key", X25519PrivateKey,
                                           "X25519 private key", private=True))


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    return cast(Ed25519PrivateKey, load_pem(path, "site signing key", Ed25519PrivateKey,
                                            "Ed25519 private key", private=True))


def load_verify_key(path: Path) -> Ed25519PublicKey:
    return cast(Ed25519PublicKey, load_pem(path, "site public key", Ed25519PublicKey,
                                           "Ed25519 public key", private=False))


def load_dedup_key(path: Path) -> bytes:
    data = read_private(path, "dedup key", missing=KEYGEN_HINT)
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
