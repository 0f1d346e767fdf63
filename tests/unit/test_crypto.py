"""agent.format.crypto and agent.format.keys: sealing, opening, signatures, key files and keyed
chunk ids."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import CryptoError, FormatError, KeyFileError
from agent.format import crypto
from agent.format.keys import (
    GeneratedKeys,
    generate_keys,
    load_dedup_key,
    load_edge_keys,
    load_recipient_private,
    load_recipient_public,
    load_signing_key,
    load_verify_key,
)

SITE = "unit-site"


@dataclass(frozen=True)
class Keys:
    edge: crypto.EdgeKeys
    recipient: X25519PrivateKey
    verify: Ed25519PublicKey
    generated: GeneratedKeys


def load_keys(out: Path, site: str = SITE) -> Keys:
    gen = generate_keys(out, site)
    edge = load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")
    return Keys(edge, load_recipient_private(gen.cloud_dir / "recipient.key"),
                load_verify_key(gen.cloud_dir / "sites" / f"{site}.pub"), gen)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return load_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return load_keys(tmp_path_factory.mktemp("other-keys"))


PAYLOAD = b"telemetry frame \x00\x01\x02" * 100


def seal_chunk(keys: Keys, payload: bytes = PAYLOAD) -> bytes:
    return crypto.seal(payload, keys.edge.recipient_public, kind=crypto.KIND_CHUNK,
                       compression=crypto.COMPRESSION_NONE, plaintext_len=len(payload))


def flipped(blob: bytes, position: int, mask: int = 0x01) -> bytes:
    b = bytearray(blob)
    b[position] ^= mask
    return bytes(b)


def test_seal_open_round_trip(keys: Keys) -> None:
    blob = crypto.seal(b"packed", keys.edge.recipient_public, kind=crypto.KIND_MANIFEST,
                       compression=crypto.COMPRESSION_ZSTD, plaintext_len=1234)
    assert blob[:4] == crypto.MAGIC
    assert len(blob) == crypto.HEADER_SIZE + len(b"packed") + crypto.TAG_SIZE
    header, payload = crypto.open_sealed(blob, keys.recipient)
    assert payload == b"packed"
    assert header.kind == crypto.KIND_MANIFEST
    assert header.compression == crypto.COMPRESSION_ZSTD
    assert header.plaintext_len == 1234
    assert header.algorithm == crypto.ALG_AES256GCM
    assert crypto.parse_header(blob) == header


def test_sealing_is_randomised(keys: Keys) -> None:
    """Fresh ephemeral key and nonce each time: equal plaintexts give unrelated ciphertexts."""
    a, b = seal_chunk(keys), seal_chunk(keys)
    assert a != b
    assert crypto.parse_header(a).ephemeral_public != crypto.parse_header(b).ephemeral_public
    assert crypto.parse_header(a).nonce != crypto.parse_header(b).nonce
    assert PAYLOAD[:32] not in a


def test_empty_payload_round_trips(keys: Keys) -> None:
    blob = seal_chunk(keys, b"")
    assert crypto.open_sealed(blob, keys.recipient)[1] == b""


def test_wrong_recipient_key_fails(keys: Keys, other_keys: Keys) -> None:
    with pytest.raises(CryptoError, match="another recipient key"):
        crypto.open_sealed(seal_chunk(keys), other_keys.recipient)


# Offsets in the fixed header: magic 0-3, version 4, kind 5, alg 6, compression 7,
# plaintext length 8-15, ephemeral key 16-47, nonce 48-59.
@pytest.mark.parametrize(("position", "mask"), [
    (5, 0x03),   # kind chunk <-> manifest: still parses, but is authenticated data
    (7, 0x01),   # compression none <-> zstd
    (15, 0x01),  # plaintext length
    (20, 0x01),  # ephemeral public key
    (47, 0x80),  # last byte of the ephemeral key
    (50, 0x01),  # nonce
    (59, 0x01),  # last nonce byte
])
def test_flipped_header_field_fails_authentication(keys: Keys, position: int, mask: int) -> None:
    blob = flipped(seal_chunk(keys), position, mask)
    crypto.parse_header(blob)  # the header still looks well formed ...
    with pytest.raises(CryptoError):  # ... but it is bound to the ciphertext
        crypto.open_sealed(blob, keys.recipient)


@pytest.mark.parametrize(("position", "message"), [
    (0, "bad magic"), (4, "format version"), (6, "algorithm"),
])
def test_flipped_structural_header_byte_is_format_error(keys: Keys, position: int,
                                                        message: str) -> None:
    with pytest.raises(FormatError, match=message):
        crypto.open_sealed(flipped(seal_chunk(keys), position), keys.recipient)


def test_unknown_compression_or_kind_is_format_error(keys: Keys) -> None:
    with pytest.raises(FormatError, match="compression"):
        crypto.parse_header(flipped(seal_chunk(keys), 7, 0x02))
    with pytest.raises(FormatError, match="kind"):
        crypto.parse_header(flipped(seal_chunk(keys), 5, 0x04))


@pytest.mark.parametrize("where", ["ciphertext-first", "ciphertext-middle", "tag-first",
                                   "tag-last"])
def test_flipped_ciphertext_or_tag_fails(keys: Keys, where: str) -> None:
    blob = seal_chunk(keys)
    position = {
        "ciphertext-first": crypto.HEADER_SIZE,
        "ciphertext-middle": crypto.HEADER_SIZE + len(PAYLOAD) // 2,
        "tag-first": len(blob) - crypto.TAG_SIZE,
        "tag-last": len(blob) - 1,
    }[where]
    with pytest.raises(CryptoError):
        crypto.open_sealed(flipped(blob, position), keys.recipient)


@pytest.mark.parametrize("keep", [0, 3, crypto.HEADER_SIZE - 1, crypto.HEADER_SIZE,
                                  crypto.HEADER_SIZE + crypto.TAG_SIZE - 1])
def test_truncated_blob_is_format_error(keys: Keys, keep: int) -> None:
    with pytest.raises(FormatError, match="truncated"):
        crypto.open_sealed(seal_chunk(keys)[:keep], keys.recipient)


def test_blob_missing_its_last_bytes_fails_authentication(keys: Keys) -> None:
    blob = seal_chunk(keys)
    with pytest.raises(CryptoError):
        crypto.open_sealed(blob[:-1], keys.recipient)
    with pytest.raises(CryptoError):
        crypto.open_sealed(blob + b"\x00", keys.recipient)


def test_signature_round_trip_and_rejections(keys: Keys, other_keys: Keys) -> None:
    body = b'{"object_id":"x","size":3}'
    signed = crypto.sign_manifest(body, keys.edge.signing_key)
    assert len(signed) == crypto.SIGNATURE_SIZE + len(body)
    assert crypto.verify_manifest(signed, keys.verify) == body

    modified_body = signed[:-2] + b"4}"
    with pytest.raises(CryptoError, match="signature does not verify"):
        crypto.verify_manifest(modified_body, keys.verify)
    with pytest.raises(CryptoError):
        crypto.verify_manifest(flipped(signed, 10), keys.verify)  # inside the signature
    with pytest.raises(CryptoError):
        crypto.verify_manifest(signed + b" ", keys.verify)  # appended byte
    with pytest.raises(CryptoError):
        crypto.verify_manifest(signed, other_keys.verify)  # another site's key
    with pytest.raises(CryptoError, match="too short"):
        crypto.verify_manifest(signed[:10], keys.verify)
    # A plain Ed25519 signature of the body (no skyferry context) is not a manifest signature.
    bare = keys.edge.signing_key.sign(body) + body
    with pytest.raises(CryptoError):
        crypto.verify_manifest(bare, keys.verify)


def test_keygen_layout_and_private_modes(keys: Keys) -> None:
    gen = keys.generated
    for p in gen.files:
        assert p.is_file(), p
    for private in (gen.edge_dir / "site.key", gen.edge_dir / "dedup.key",
                    gen.cloud_dir / "recipient.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    # The edge never holds the recipient private key.
    assert not (gen.edge_dir / "recipient.key").exists()
    assert len(keys.edge.dedup_key) == 32


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    gen = generate_keys(tmp_path, SITE)
    before = {p: p.read_bytes() for p in gen.files}
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keys(tmp_path, SITE)
    assert {p: p.read_bytes() for p in gen.files} == before


def test_keygen_refuses_when_any_one_target_exists(tmp_path: Path) -> None:
    (tmp_path / "cloud" / "sites").mkdir(parents=True)
    (tmp_path / "cloud" / "sites" / f"{SITE}.pub").write_text("keep me")
    with pytest.raises(KeyFileError, match=f"{SITE}.pub"):
        generate_keys(tmp_path, SITE)
    assert (tmp_path / "cloud" / "sites" / f"{SITE}.pub").read_text() == "keep me"
    assert not (tmp_path / "edge").exists()


@pytest.mark.parametrize(("name", "loader"), [
    ("edge/site.key", load_signing_key),
    ("edge/dedup.key", load_dedup_key),
    ("cloud/recipient.key", load_recipient_private),
])
def test_readable_private_key_is_refused(tmp_path: Path, name: str,
                                         loader: Callable[[Path], object]) -> None:
    generate_keys(tmp_path, SITE)
    path = tmp_path / name
    for mode in (0o644, 0o640, 0o604, 0o700):
        os.chmod(path, mode)
        if mode == 0o700:  # only the owner's bits: accepted, as ssh does
            loader(path)
            continue
        with pytest.raises(KeyFileError, match="chmod 600") as err:
            loader(path)
        assert str(path) in str(err.value) and f"{mode:o}" in str(err.value)
    os.chmod(path, 0o600)
    loader(path)


def test_missing_and_wrong_key_files_are_named(keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="skyferry keygen"):
        load_signing_key(tmp_path / "nope.key")
    gen = keys.generated
    with pytest.raises(KeyFileError, match="not an X25519 public key"):
        load_recipient_public(gen.cloud_dir / "sites" / f"{SITE}.pub")
    bad = tmp_path / "dedup.key"
    bad.write_text("abcd\n")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="64 hex digits"):
        load_dedup_key(bad)


def test_chunk_id_is_keyed(keys: Keys, other_keys: Keys) -> None:
    data = b"the same bytes at two sites"
    a = crypto.chunk_id(keys.edge.dedup_key, data)
    assert a == crypto.chunk_id(keys.edge.dedup_key, memoryview(data))
    assert len(a) == 64 and int(a, 16) >= 0
    assert crypto.chunk_id(other_keys.edge.dedup_key, data) != a
    assert crypto.chunk_id(keys.edge.dedup_key, data + b"!") != a
    assert a != crypto.content_hash(data)  # the unkeyed hash would reveal the content
    assert crypto.content_hash(data) == crypto.content_hash(memoryview(data))
