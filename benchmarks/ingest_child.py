"""The skyferry side of benchmarks/ingest.py, run as its own process (its CPU and peak RSS
are what GNU time measures):

    python -m benchmarks.ingest_child CORPUS STATE KEYS SITE SOURCE WORKERS

It imports only what ingest needs (no benchmark harness, no daemon): the daemon imports once
and runs for months, so its start-up is not part of ingest speed. Prints the counts as JSON.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
from agent.format.keys import load_edge_keys
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest
from agent.sources.spool_scan import Candidate, plan, scan
from agent.store.store import Store


def seal_batch(pipeline: Pipeline, batch: list[Candidate], source: str
               ) -> tuple[int, int, int, int, int]:
    """Seal one planned batch as the spool does (a large file alone, small ones as a pack);
    returns (files, bytes, chunks, new chunks, stored bytes)."""
    reqs = [IngestRequest(c.path, source, c.name, "bulk") for c in batch]
    if len(reqs) == 1 and not pipeline.is_packed(batch[0].size):
        r = pipeline.ingest_file(reqs[0])
        return 1, r.size, r.chunks, r.new_chunks, r.stored_bytes
    p = pipeline.ingest_pack(reqs)
    if p.failed:
        raise RuntimeError(f"files not ingested: {p.failed}")
    return len(p.accepted), p.size, p.chunks, p.new_chunks, p.stored_bytes


def ingest_tree(root: Path, state_dir: Path, keys_dir: Path, site: str, source: str,
                workers: int) -> dict[str, int]:
    """Seal every file below root into the store at state_dir; return counts.

    Files are grouped the way a spool folder groups them (agent.sources.spool_scan.plan:
    large files alone, small ones in packs) and sealed by `workers` threads, as the daemon
    does.
    """
    keys = load_edge_keys(keys_dir / "recipient.pub", keys_dir / "site.key",
                          keys_dir / "dedup.key")
    store = Store(state_dir, DEFAULT_CLASSES)
    chunking = ChunkingSettings()
    # The daemon's second sealing thread (agent/host/blocking.py Executors.seal).
    seal = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyferry-seal")
    pipeline = Pipeline(site, keys, store, chunking, CompressionSettings(), seal_thread=seal)
    batches = plan(scan(root, None), chunking)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda b: seal_batch(pipeline, b, source), batches))
    finally:
        store.close()
    return {"files": sum(r[0] for r in results), "bytes": sum(r[1] for r in results),
            "chunks": sum(r[2] for r in results), "new_chunks": sum(r[3] for r in results),
            "stored": sum(r[4] for r in results), "objects": len(results)}


def main(argv: list[str]) -> int:
    root, state, keys, site, source, workers = argv
    print(json.dumps(ingest_tree(Path(root), Path(state), Path(keys), site, source,
                                 int(workers))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
