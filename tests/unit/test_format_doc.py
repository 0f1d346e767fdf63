"""docs/FORMAT.md is precise enough to re-implement.

Its tables must match agent.format.crypto, and a reader built only from the document and the
`cryptography` primitives (never agent.format.crypto.open_sealed) must open what
agent.format.crypto seals,
including the worked example printed in the document itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
import zstandard
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.config.settings import CompressionSettings
from agent.errors import CryptoError, FormatError
from agent.format import crypto, layout
from agent.format.manifest import KIND_FILE_PACK, ChunkRef, Manifest, PackEntry, now_iso, uuid7
from agent.ingest.compressor import Compressor

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


# ---- reading the document ----------------------------------------------------------------


@functools.cache
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def table(name: str) -> list[list[str]]:
    """Body rows of the markdown table right after `<!-- format:NAME -->`."""
    marker = f"<!-- format:{name} -->"
    text = doc_text()
    assert marker in text, f"docs/FORMAT.md lost its {marker} table"
    lines = text.split(marker, 1)[1].lstrip("\n").splitlines()
    rows: list[list[str]] = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip()[1:-1].split("|")])
    assert len(rows) > 2, f"{marker} is not followed by a table"
    return rows[2:]  # drop the header row and the --- row


def code(cell: str) -> str:
    """The first `backticked` token of a table cell."""
    m = re.search(r"`([^`]*)`", cell)
    assert m, f"no `code` in table cell {cell!r}"
    return m.group(1)


def vector(name: str) -> str:
    """The fenced block right after `<!-- vector:NAME -->` in the worked example."""
    marker = f"<!-- vector:{name} -->"
    text = doc_text()
    assert marker in text, f"docs/FORMAT.md lost its {marker} block"
    m = re.search(r"```[^\n]*\n(.*?)\n```", text.split(marker, 1)[1], re.DOTALL)
    assert m, f"{marker} is not followed by a fenced block"
    return m.group(1)


def hex_vector(name: str) -> bytes:
    return bytes.fromhex("".join(vector(name).split()))


# ---- an independent reader, built from the document -----------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int
    integer: bool


@dataclass(frozen=True)
class Opened:
    header: dict[str, int | bytes]
    plaintext: bytes


class FormatViolation(Exception):
    pass


class DocReader:
    """Opens sealed objects using only the layout, code points and strings in FORMAT.md."""

    def __init__(self) -> None:
        self.fields = [
            Field(code(name), int(off), int(size), typ.startswith("uint"))
            for off, size, name, typ, _notes in table("header")
        ]
        self.header_size = sum(f.size for f in self.fields)
        magic_notes = next(r[4] for r in table("header") if code(r[2]) == "magic")
        self.magic = code(magic_notes).encode("ascii")
        self.codes = {code(const): int(value) for _f, const, value, _m in table("code-points")}
        self.sizes = {code(const): int(n) for const, n, _m in table("sizes")}
        self.strings = {label: bytes.fromhex(code(hx)) for label, _t, hx in table("strings")}

    def parse_header(self, blob: bytes) -> dict[str, int | bytes]:
        if len(blob) < self.header_size + self.sizes["TAG_SIZE"]:
            raise FormatViolation("truncated")
        out: dict[str, int | bytes] = {}
        for f in self.fields:
            raw = blob[f.offset:f.offset + f.size]
            out[f.name] = int.from_bytes(raw, "big") if f.integer else raw
        c = self.codes
        if out["magic"] != self.magic:
            raise FormatViolation("bad magic")
        if out["version"] != c["FORMAT_VERSION"]:
            raise FormatViolation("unknown version")
        if out["algorithm"] != c["ALG_AES256GCM"]:
            raise FormatViolation("unknown algorithm")
        if out["compression"] not in (c["COMPRESSION_NONE"], c["COMPRESSION_ZSTD"]):
            raise FormatViolation("unknown compression")
        if out["kind"] not in (c["KIND_CHUNK"], c["KIND_MANIFEST"], c["KIND_TIP"],
                               c["KIND_HEARTBEAT"]):
            raise FormatViolation("unknown kind")
        return out

    def open(self, blob: bytes, recipient: X25519PrivateKey) -> Opened:
        header = self.parse_header(blob)
        eph = header["ephemeral_public"]
        nonce = header["nonce"]
        plen = header["plaintext_len"]
        assert isinstance(eph, bytes) and isinstance(nonce, bytes) and isinstance(plen, int)
        shared = recipient.exchange(X25519PublicKey.from_public_bytes(eph))
        if shared == bytes(len(shared)):
            raise InvalidTag
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=self.sizes["AEAD_KEY_SIZE"],
            salt=eph + recipient.public_key().public_bytes(*RAW),
            info=self.strings["HKDF info"],
        ).derive(shared)
        hs = self.header_size
        payload = AESGCM(key).decrypt(nonce, blob[hs:], blob[:hs])
        if header["compression"] == self.codes["COMPRESSION_ZSTD"]:
            declared = zstandard.get_frame_parameters(payload).content_size
            if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > plen:
                raise FormatViolation("zstd frame declares more than plaintext_len")
            plaintext = zstandard.ZstdDecompressor().decompress(payload, max_output_size=plen)
        else:
            plaintext = payload
        if len(plaintext) != plen:
            raise FormatViolation("plaintext_len does not match")
        return Opened(header, plaintext)

    def open_manifest(self, blob: bytes, recipient: X25519PrivateKey,
                      site_key: Ed25519PublicKey) -> bytes:
        """Decrypt, check kind and signature; return the body bytes."""
        opened = self.open(blob, recipient)
        if opened.header["kind"] != self.codes["KIND_MANIFEST"]:
            raise FormatViolation("not a manifest")
        n = self.sizes["SIGNATURE_SIZE"]
        signature, body = opened.plaintext[:n], opened.plaintext[n:]
        site_key.verify(signature, self.strings["signature context"] + body)
        return body


@pytest.fixture(scope="module")
def reader() -> DocReader:
    return DocReader()


@pytest.fixture
def recipient() -> X25519PrivateKey:
    return X25519PrivateKey.generate()



# ---- the tables match agent.format.crypto --------------------------------------------------------


def test_header_table_is_contiguous_and_has_the_header_size(reader: DocReader) -> None:
    offset = 0
    for f in reader.fields:
        assert f.offset == offset, f"{f.name} documented at {f.offset}, expected {offset}"
        offset += f.size
    assert offset == crypto.HEADER_SIZE
    assert reader.header_size == crypto.HEADER_SIZE
    assert reader.sizes["HEADER_SIZE"] == crypto.HEADER_SIZE


def test_header_fields_are_the_sealed_header_fields(reader: DocReader) -> None:
    documented = [f.name for f in reader.fields]
    assert documented[:2] == ["magic", "version"]
    assert set(documented[2:]) == {f.name for f in dataclasses.fields(crypto.SealedHeader)}


def test_magic_is_documented(reader: DocReader) -> None:
    assert reader.magic == crypto.MAGIC
    notes = next(r[4] for r in table("header") if code(r[2]) == "magic")
    assert crypto.MAGIC.hex() in notes


def test_code_points_match_constants(reader: DocReader) -> None:
    for name, value in reader.codes.items():
        assert getattr(crypto, name) == value, f"{name} is documented as {value}"
    constants = {n for n in vars(crypto) if n.startswith(("KIND_", "COMPRESSION_", "ALG_"))}
    assert constants | {"FORMAT_VERSION"} == set(reader.codes)


def test_sizes_match_constants(reader: DocReader) -> None:
    for name in ("HEADER_SIZE", "TAG_SIZE", "SIGNATURE_SIZE"):
        assert reader.sizes[name] == getattr(crypto, name), name
    nonce = next(f for f in reader.fields if f.name == "nonce")
    eph = next(f for f in reader.fields if f.name == "ephemeral_public")
    assert nonce.size == reader.sizes["NONCE_SIZE"]
    assert eph.size == reader.sizes["X25519_KEY_SIZE"]


def test_documented_offsets_find_the_fields_of_a_real_header(
    reader: DocReader, recipient: X25519PrivateKey
) -> None:
    blob = crypto.seal(b"x" * 40, recipient.public_key(), kind=crypto.KIND_MANIFEST,
                       compression=crypto.COMPRESSION_ZSTD, plaintext_len=0x0102030405060708)
    ours = reader.parse_header(blob)
    theirs = crypto.parse_header(blob)
    for f in dataclasses.fields(theirs):
        assert ours[f.name] == getattr(theirs, f.name), f.name
    assert ours["plaintext_len"] == 0x0102030405060708
    assert len(blob) == reader.header_size + 40 + reader.sizes["TAG_SIZE"]



# ---- the independent reader opens what agent.format.crypto seals ---------------------------------


@pytest.mark.parametrize(
    ("data", "expected_compression"),
    [
        (b"telemetry 0042 nominal\n" * 4000, "COMPRESSION_ZSTD"),
        (os.urandom(200_000), "COMPRESSION_NONE"),
        (b"short", "COMPRESSION_NONE"),
    ],
    ids=["compressible", "random", "short"],
)
def test_independent_reader_opens_a_sealed_chunk(
    reader: DocReader, recipient: X25519PrivateKey, data: bytes, expected_compression: str
) -> None:
    compression, payload = Compressor(CompressionSettings()).compress(data)
    blob = crypto.seal(payload, recipient.public_key(), kind=crypto.KIND_CHUNK,
                       compression=compression, plaintext_len=len(data))
    opened = reader.open(blob, recipient)
    assert opened.plaintext == data
    assert opened.header["kind"] == reader.codes["KIND_CHUNK"]
    assert opened.header["compression"] == reader.codes[expected_compression]


def test_independent_reader_refuses_tampering(
    reader: DocReader, recipient: X25519PrivateKey
) -> None:
    blob = crypto.seal(b"payload", recipient.public_key(), kind=crypto.KIND_CHUNK,
                       compression=crypto.COMPRESSION_NONE, plaintext_len=7)
    length = next(f for f in reader.fields if f.name == "plaintext_len")
    nonce = next(f for f in reader.fields if f.name == "nonce")
    # The header is associated data: even plaintext_len cannot be changed unnoticed.
    for pos in (length.offset + length.size - 1, nonce.offset, reader.header_size, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(InvalidTag):
            reader.open(bytes(bad), recipient)
    with pytest.raises(InvalidTag):
        reader.open(blob, X25519PrivateKey.generate())
    with pytest.raises(FormatViolation):
        reader.open(blob[: reader.header_size + reader.sizes["TAG_SIZE"] - 1], recipient)
    newer = bytearray(blob)
    newer[next(f.offset for f in reader.fields if f.name == "version")] = 2
    with pytest.raises(FormatViolation):
        reader.open(bytes(newer), recipient)


def test_independent_reader_opens_a_signed_manifest(
    reader: DocReader, recipient: X25519PrivateKey
) -> None:
    data = b"x" * 1000
    manifest = Manifest(
        object_id=uuid7(), site="camp-alpha", source="files", kind="file",
        name="dir/ünïcode.bin", size=len(data), mtime_ns=1_700_000_000_123_456_789,
        hash=crypto.content_hash(data), priority="normal", created=now_iso(),
        chunks=(ChunkRef(crypto.chunk_id(bytes(32), data), 0, len(data),
                         crypto.content_hash(data)),),
        meta={"camera": "north"},
    )
    signer = Ed25519PrivateKey.generate()
    signed = crypto.sign_manifest(manifest.to_json(), signer)
    compression, payload = Compressor(CompressionSettings()).compress(signed)
    blob = crypto.seal(payload, recipient.public_key(), kind=crypto.KIND_MANIFEST,
                       compression=compression, plaintext_len=len(signed))

    body = reader.open_manifest(blob, recipient, signer.public_key())
    assert body == manifest.to_json()
    fields = json.loads(body)
    # `entries` appears only in a file pack (below).
    assert set(fields) == {code(r[0]) for r in table("manifest-fields")} - {"entries"}
    assert set(fields["chunks"][0]) == {code(r[0]) for r in table("chunkref-fields")}
    assert fields["version"] == 1
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        fields["object_id"])


def test_a_file_pack_manifest_has_the_documented_fields() -> None:
    files = [b"first file\n", b"", b"third"]
    data = b"".join(files)
    entries, at = [], 0
    for i, f in enumerate(files):
        entries.append(PackEntry(f"d/{i}.txt", at, len(f), 1_700_000_000_000_000_000 + i,
                                 crypto.content_hash(f)))
        at += len(f)
    manifest = Manifest(
        object_id=uuid7(), site="s", source="files", kind=KIND_FILE_PACK, name="x.pack",
        size=len(data), mtime_ns=1, hash=crypto.content_hash(data), priority="normal",
        created=now_iso(), chunks=(ChunkRef("ab" * 32, 0, len(data),
                                            crypto.content_hash(data)),),
        entries=tuple(entries),
    )
    fields = json.loads(manifest.to_json())
    assert set(fields) == {code(r[0]) for r in table("manifest-fields")}
    assert set(fields["entries"][0]) == {code(r[0]) for r in table("packentry-fields")}
    assert Manifest.from_json(manifest.to_json()) == manifest
    # The structural rules are enforced: entries must tile the object.
    broken = json.loads(manifest.to_json())
    broken["entries"][1]["offset"] += 1
    with pytest.raises(FormatError, match="does not continue"):
        Manifest.from_json(json.dumps(broken).encode())
    broken = json.loads(manifest.to_json())
    broken["entries"][0]["name"] = "../up"
    with pytest.raises(FormatError, match="unsafe path"):
        Manifest.from_json(json.dumps(broken).encode())


def test_canonical_body_encoding_is_as_documented() -> None:
    manifest = Manifest(
        object_id="01a212b9-4f8b-71ad-95fb-09bf8595d473", site="s", source="files",
        kind="file", name="a/é\n.txt", size=0, mtime_ns=0, hash=crypto.content_hash(b""),
        priority="normal", created="2026-11-25T12:41:04.161414+00:00", chunks=(),
        meta={"b": "1", "a": "2"},
    )
    body = manifest.to_json().decode("utf-8")
    assert '"name":"a/é\\n.txt"' in body
    assert '"meta":{"a":"2","b":"1"}' in body
    assert " " not in body
    assert manifest.hash in doc_text()  # the empty-object hash is printed in the document


def test_a_version_2_manifest_has_the_documented_fields() -> None:
    data = b"numbered"
    v1 = Manifest(
        object_id=uuid7(), site="s", source="files", kind="file", name="n.txt",
        size=len(data), mtime_ns=1, hash=crypto.content_hash(data), priority="normal",
        created=now_iso(), chunks=(ChunkRef("ab" * 32, 0, len(data), crypto.content_hash(data)),),
    )
    m = v1.numbered("0f" * 16, 1041, now_iso())
    fields = json.loads(m.to_json())
    v2_rows = {code(r[0]) for r in table("manifest-v2-fields")}
    assert set(fields) == {code(r[0]) for r in table("manifest-fields")} - {"entries"} | v2_rows
    assert (fields["version"], fields["stream"], fields["seq"]) == (2, "0f" * 16, 1041)
    assert Manifest.from_json(m.to_json()) == m
    assert set(json.loads(v1.to_json())) & v2_rows == set(), "version 1 has no numbering"
    for bad in ({"seq": 0}, {"seq": "1"}, {"stream": "XY" * 16}, {"seq": None}):
        broken = {**fields, **bad}
        with pytest.raises(FormatError, match="version 2 needs"):
            Manifest.from_json(json.dumps(broken).encode())
    with pytest.raises(FormatError, match="not supported"):
        Manifest.from_json(json.dumps({**fields, "version": 3}).encode())


def test_independent_reader_opens_a_tip(reader: DocReader, recipient: X25519PrivateKey) -> None:
    from agent.format.tips import Tip, seal_tip, tip_key

    signer = Ed25519PrivateKey.generate()
    edge = crypto.EdgeKeys(recipient.public_key(), signer, bytes(32))
    tip = Tip("camp-alpha", "0f" * 16, 7, now_iso(), 1043, ((1042, 1043),), ((5, 6), (9, 9)))
    opened = reader.open(seal_tip(tip, edge), recipient)
    assert opened.header["kind"] == reader.codes["KIND_TIP"]
    n = reader.sizes["SIGNATURE_SIZE"]
    signature, body = opened.plaintext[:n], opened.plaintext[n:]
    signer.public_key().verify(signature, reader.strings["tip signature context"] + body)
    fields = json.loads(body)
    assert set(fields) == {code(r[0]) for r in table("tip-fields")}
    assert fields["queued"] == [[1042, 1043]] and fields["type"] == "tip"
    assert tip_key("camp-alpha", "0f" * 16, 7) == f"camp-alpha/tips/{'0f' * 16}/{7:020d}"
    assert Tip.from_json(body) == tip
    # A tip's signature is not a manifest's: the contexts differ.
    with pytest.raises(InvalidSignature):
        signer.public_key().verify(signature, reader.strings["signature context"] + body)


def test_independent_reader_opens_a_heartbeat(reader: DocReader,
                                              recipient: X25519PrivateKey) -> None:
    from agent.format.heartbeat import (
        ClassQueue,
        Forecast,
        Heartbeat,
        open_heartbeat,
        seal_heartbeat,
    )

    signer = Ed25519PrivateKey.generate()
    edge = crypto.EdgeKeys(recipient.public_key(), signer, bytes(32))
    hb = Heartbeat("camp-alpha", 12, "2026-11-25T12:00:01.000002+00:00", "0.1.0",
                   {"bulk": ClassQueue(3, 4096, 7200.5)}, 7200.5, 10**9, 5000, 2,
                   {"backend_timeout": 2}, Forecast(0.75, "windows", 4, 3), 600.0, None)
    blob = seal_heartbeat(hb, edge)
    opened = reader.open(blob, recipient)
    assert opened.header["kind"] == reader.codes["KIND_HEARTBEAT"]
    n = reader.sizes["SIGNATURE_SIZE"]
    signature, body = opened.plaintext[:n], opened.plaintext[n:]
    signer.public_key().verify(signature, reader.strings["heartbeat signature context"] + body)
    fields = json.loads(body)
    assert set(fields) == {code(r[0]) for r in table("heartbeat-fields")}
    assert hb.key == "camp-alpha/heartbeats/2026/11/25/120001000002-12"
    assert open_heartbeat(hb.key, blob, recipient, signer.public_key()) == hb
    with pytest.raises(CryptoError, match="moved here"):  # an old one under a newer name
        open_heartbeat("camp-alpha/heartbeats/2026/11/26/120001000002-13", blob, recipient,
                       signer.public_key())
    with pytest.raises(CryptoError, match="does not verify"):
        open_heartbeat(hb.key, blob, recipient, Ed25519PrivateKey.generate().public_key())
    for context in ("signature context", "tip signature context"):
        with pytest.raises(InvalidSignature):  # never a manifest's or a tip's signature
            signer.public_key().verify(signature, reader.strings[context] + body)


# ---- the worked example in the document is real --------------------------------------------


def test_worked_example_opens_with_the_independent_reader(reader: DocReader) -> None:
    recipient = serialization.load_pem_private_key(vector("recipient.key").encode(), None)
    site_key = serialization.load_pem_public_key(vector("site.pub").encode())
    assert isinstance(recipient, X25519PrivateKey)
    assert isinstance(site_key, Ed25519PublicKey)
    dedup_key = bytes.fromhex(vector("dedup.key").strip())
    chunk_key, manifest_key = vector("cloud-keys").split()

    chunk = reader.open(hex_vector("chunk.sealed"), recipient)
    assert chunk.header["kind"] == reader.codes["KIND_CHUNK"]
    assert chunk.header["compression"] == reader.codes["COMPRESSION_ZSTD"]
    assert chunk.plaintext == vector("chunk.plaintext").encode() + b"\n"
    chunk_id = blake3.blake3(blake3.blake3(chunk.plaintext).digest(), key=dedup_key).hexdigest()

    body = reader.open_manifest(hex_vector("manifest.sealed"), recipient, site_key)
    assert body == vector("manifest.body").encode("utf-8")
    m = json.loads(body)
    site, object_id = manifest_key.split("/")[0], manifest_key.split("/")[-1]
    assert (m["site"], m["object_id"]) == (site, object_id)
    assert m["chunks"] == [{"hash": blake3.blake3(chunk.plaintext).hexdigest(), "id": chunk_id,
                            "length": len(chunk.plaintext), "offset": 0}]
    assert m["hash"] == blake3.blake3(chunk.plaintext).hexdigest()
    assert chunk_key == layout.chunk_key(site, chunk_id)


def test_worked_example_agrees_with_agent_crypto() -> None:
    recipient = serialization.load_pem_private_key(vector("recipient.key").encode(), None)
    assert isinstance(recipient, X25519PrivateKey)
    _, payload = crypto.open_sealed(hex_vector("chunk.sealed"), recipient)
    assert payload.hex() in "".join(doc_text().split())
    header, _ = crypto.open_sealed(hex_vector("manifest.sealed"), recipient)
    assert header.kind == crypto.KIND_MANIFEST
    m = Manifest.from_json(vector("manifest.body").encode("utf-8"))
    assert m.chunks[0].length == m.size


def test_version_2_worked_example_opens_with_the_independent_reader(reader: DocReader) -> None:
    recipient = serialization.load_pem_private_key(vector("v2.recipient.key").encode(), None)
    site_key = serialization.load_pem_public_key(vector("v2.site.pub").encode())
    assert isinstance(recipient, X25519PrivateKey)
    assert isinstance(site_key, Ed25519PublicKey)
    manifest_key, tip_key = vector("v2.cloud-keys").split()

    body = reader.open_manifest(hex_vector("v2.manifest.sealed"), recipient, site_key)
    assert body == vector("v2.manifest.body").encode("utf-8")
    m = json.loads(body)
    assert (m["version"], m["seq"]) == (2, 1)
    assert manifest_key.split("/")[-1] == m["object_id"]
    assert "/".join(manifest_key.split("/")[2:5]) == m["created"][:10].replace("-", "/")
    assert Manifest.from_json(body).seq == 1

    tip = reader.open(hex_vector("v2.tip.sealed"), recipient)
    assert tip.header["kind"] == reader.codes["KIND_TIP"]
    n = reader.sizes["SIGNATURE_SIZE"]
    tip_body = tip.plaintext[n:]
    site_key.verify(tip.plaintext[:n], reader.strings["tip signature context"] + tip_body)
    assert tip_body == vector("v2.tip.body").encode("utf-8")
    t = json.loads(tip_body)
    assert tip_key == f"{t['site']}/tips/{t['stream']}/{t['n']:020d}"
    assert (t["stream"], t["highest"], t["queued"]) == (m["stream"], 1, [[1, 1]])
