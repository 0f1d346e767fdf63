"""An edge store and pipeline with the keys to read back what they seal, the way restore does."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
from agent.format import crypto
from agent.format.codec import decompress
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private, load_verify_key
from agent.format.manifest import ChunkRef, Manifest
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, IngestResult
from agent.store.store import Store


@dataclass(frozen=True)
class Keys:
    edge: crypto.EdgeKeys
    recipient: X25519PrivateKey
    verify: Ed25519PublicKey


def site_keys(root: Path, site: str) -> Keys:
    """A site's keys, generated under `root`: the edge's, and the cloud's to read them back."""
    gen = generate_keys(root, site)
    edge = load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")
    return Keys(edge, load_recipient_private(gen.cloud_dir / "recipient.key"),
                load_verify_key(gen.cloud_dir / "sites" / f"{site}.pub"))


@contextmanager
def pipeline_env(root: Path, site: str, keys: Keys, chunking: ChunkingSettings) -> Iterator[Env]:
    """A store under `root`/state and a pipeline sealing into it (one seal thread)."""
    store = Store(root / "state", DEFAULT_CLASSES)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyferry-seal") as seal:
            pipeline = Pipeline(site, keys.edge, store, chunking, CompressionSettings(),
                                seal_thread=seal)
            yield Env(store, pipeline, keys, root / "src")
    finally:
        store.close()


@dataclass
class Env:
    store: Store
    pipeline: Pipeline
    keys: Keys
    src: Path

    def write(self, name: str, data: bytes) -> Path:
        path = self.src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def ingest(self, name: str, data: bytes | None = None, priority: str = "normal",
               **meta: str) -> IngestResult:
        path = self.write(name, data) if data is not None else self.src / name
        return self.pipeline.ingest_file(IngestRequest(path, "files", name, priority, meta))

    def manifest(self, object_id: str) -> Manifest:
        """Open, verify and parse a queued manifest the way restore does."""
        blob = self.store.manifest_path(object_id).read_bytes()
        header, payload = crypto.open_sealed(blob, self.keys.recipient)
        assert header.kind == crypto.KIND_MANIFEST
        signed = decompress(header.compression, payload, header.plaintext_len)
        assert len(signed) == header.plaintext_len
        return Manifest.from_json(crypto.verify_manifest(signed, self.keys.verify))

    def chunk(self, ref: ChunkRef) -> bytes:
        blob = self.store.chunk_path(ref.id).read_bytes()
        header, payload = crypto.open_sealed(blob, self.keys.recipient)
        assert header.kind == crypto.KIND_CHUNK
        data = decompress(header.compression, payload, header.plaintext_len)
        assert len(data) == header.plaintext_len == ref.length
        assert crypto.content_hash(data) == ref.hash
        assert crypto.chunk_id(self.keys.edge.dedup_key, data) == ref.id
        return data

    def restore(self, object_id: str) -> bytes:
        m = self.manifest(object_id)
        data = b"".join(self.chunk(ref) for ref in m.chunks)
        assert blake3.blake3(data).hexdigest() == m.hash
        return data
