# ruff: noqa: F811  (pytest fixtures are imported and then taken as parameters)
"""`skyferry land` against the restore work's adversarial inputs (issue 16, acceptance 4: RSS
stays ≤ 256 MiB whatever the input; acceptance 5: the bad ones are quarantined with a reason,
the rest of the site lands). Several manifests land at once, each holding its share of the
manifest budget until it is done: this is what bounds that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from agent.format import crypto, layout
from agent.format.limits import MAX_MANIFEST_PLAINTEXT
from agent.format.manifest import ChunkRef
from tests.kits.restore import (
    SITE,
    Cloud,
    forged_zstd,
    keys,  # noqa: F401 (fixture)
    put_raw_manifest,
    run_cli,
)
from tests.kits.site import render_toml

MIB = 1 << 20
RSS_LIMIT = 256 * MIB


def test_adversarial_objects_cost_bounded_memory_are_quarantined_and_the_rest_lands(
        keys: object, tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "sealed", keys)  # type: ignore[arg-type]
    good = [cloud.publish(f"good/{i}.bin", os.urandom(30_000 + i)) for i in range(6)]
    # Only recipient.pub needed: chunks and manifests declaring huge plaintexts ...
    victims = [cloud.publish(f"v{i}.bin", os.urandom(50_000)) for i in range(3)]
    for v in victims:
        cloud.write(layout.chunk_key(SITE, v.manifest.chunks[0].id),
                    forged_zstd(cloud, crypto.KIND_CHUNK, 128 * MIB))
    zipped = [f"{SITE}/manifests/2026/11/25/forged-{i}" for i in range(3)]
    for key in zipped:
        cloud.write(key, forged_zstd(cloud, crypto.KIND_MANIFEST, 256 * MIB))
    # ... and eight unsigned manifests at the size cap.
    plain = os.urandom(MAX_MANIFEST_PLAINTEXT)
    capped = [f"{SITE}/manifests/2026/11/25/big-{i}" for i in range(8)]
    blob = crypto.seal(plain, cloud.keys.edge.recipient_public, kind=crypto.KIND_MANIFEST,
                       compression=crypto.COMPRESSION_NONE, plaintext_len=len(plain))
    for key in capped:
        cloud.write(key, blob)
    # A compromised site: a signed 64 GiB chunk, three big legal manifests with missing chunks.
    huge = cloud.put_manifest(cloud.manifest(
        "huge.bin", b"", size=64 << 30, hash="0" * 64,
        chunks=(ChunkRef("ab" * 32, 0, 64 << 30, "0" * 64),)))
    legal = [put_raw_manifest(cloud, f"big{j}.bin", [
        f'{{"hash":"{"0" * 64}","id":"{j:02x}{i:062x}","length":1,"offset":{i}}}'
        for i in range(95_000)]) for j in range(3)]
    lake, work = tmp_path / "lake", tmp_path / "work"
    work.mkdir()
    cfg = tmp_path / "land.toml"
    cfg.write_text(render_toml({"source": {"url": cloud.url}, "dest": {"url": f"file://{lake}"},
                                "land": {"key": str(cloud.keys.recipient_key),
                                         "work_dir": str(work)}}))
    r = run_cli("land", "-c", str(cfg), "--once", "--json", "--no-progress", timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    print(f"land: peak RSS {r.peak_rss / MIB:.0f} MiB in {r.seconds:.1f} s")
    assert r.peak_rss <= RSS_LIMIT, r.peak_rss / MIB
    report = r.report
    reasons = {q["what"]: q["reason"] for q in report["quarantined"]}
    bad = {*(v.key for v in victims), *zipped, *capped, huge, *legal}
    assert set(reasons) == bad, sorted(set(reasons) ^ bad)
    assert all(reasons.values())
    assert report["files"] == len(good)
    for p in good:
        name = p.manifest.name
        assert (lake / SITE / "files" / name).read_bytes() == p.contents[name]
    landed = {json.loads(line)["key"] for f in (lake / "_skyferry" / "events").rglob("*.jsonl")
              for line in f.read_text().splitlines()}
    assert landed == {f"{SITE}/files/{p.manifest.name}" for p in good}
