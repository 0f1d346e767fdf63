"""The retention rule's edges (docs/FORMAT.md, "Retention"): exactly at the horizon, clock
offsets and steps, the promise a store never loosens, local copies kept for dedup hits, and the
settings that switch it on. The whole flow is tests/system/test_retention.py."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.backends.registry import open_backend
from agent.cloud.land_config import load_land_settings
from agent.cloud.land_retention import deletable, promise_kept
from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
from agent.daemon.site_config import validate
from agent.errors import ConfigError, FormatError
from agent.format import crypto
from agent.format.keys import generate_keys, load_edge_keys
from agent.format.manifest import Manifest, now_iso, uuid7
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest
from agent.store.horizon import CLOCK_TOLERANCE_S, expired
from agent.store.store import Store
from agent.uplink.horizon import Refresher

DAY = 86400.0
H = 30 * DAY
CHUNKING = ChunkingSettings(min_size=4 << 10, avg_size=16 << 10, max_size=64 << 10)


# --- the rule itself ------------------------------------------------------------------------


def test_exactly_at_the_horizon_a_copy_may_still_be_referenced_a_microsecond_later_not() -> None:
    t = 1_800_000_000.0
    assert not expired(t, t + H, H)
    assert expired(t, t + H + 1e-6, H)
    assert expired(None, t, H), "never confirmed (found already there): always sent again"


def test_the_cloud_deletes_exactly_at_the_grace_period_not_before() -> None:
    lm = 1_800_000_000.0
    assert deletable(lm, lm + 31 * DAY, 31 * DAY)
    assert not deletable(lm, lm + 31 * DAY - 1e-6, 31 * DAY)
    assert not deletable(None, lm + 365 * DAY, 31 * DAY), "no Last-Modified: never"


def test_a_site_may_be_deleted_from_only_if_its_horizon_plus_the_margin_fits() -> None:
    assert promise_kept(int(H), 31 * DAY, DAY)
    assert not promise_kept(int(H) + 1, 31 * DAY, DAY)
    assert not promise_kept(0, 31 * DAY, DAY) and not promise_kept(-5, 31 * DAY, DAY)


@pytest.mark.parametrize("offset", [0.0, 3 * DAY, -3 * DAY, 10 * 365 * DAY, -5 * 365 * DAY])
def test_a_constant_clock_offset_at_the_site_changes_no_decision(offset: float) -> None:
    """Both times the edge compares are its own; both the cloud compares are the storage's."""
    t = 1_800_000_000.0
    for elapsed in (0.0, H - 1, H, H + 1e-3, 40 * DAY):
        assert expired(t + offset, t + elapsed + offset, H) == expired(t, t + elapsed, H)


def test_a_confirmation_in_the_clock_s_future_counts_as_expired() -> None:
    """Made while the clock was fast, now set right: the elapsed time cannot be known."""
    t = 1_800_000_000.0
    assert not expired(t + CLOCK_TOLERANCE_S, t, H)
    assert expired(t + CLOCK_TOLERANCE_S + 1, t, H)


def test_the_horizon_field_is_in_the_body_only_when_declared() -> None:
    m = Manifest(object_id=uuid7(), site="s", source="files", kind="file", name="n", size=0,
                 mtime_ns=0, hash=crypto.content_hash(b""), priority="normal",
                 created=now_iso(), chunks=()).numbered("0f" * 16, 1, now_iso())
    assert "horizon" not in json.loads(m.to_json())
    declared = replace(m, horizon=int(H))
    assert json.loads(declared.to_json())["horizon"] == int(H)
    assert Manifest.from_json(declared.to_json()) == declared
    with pytest.raises(FormatError, match="horizon"):
        Manifest.from_json(declared.to_json().replace(b'"horizon":2592000', b'"horizon":"30d"'))


# --- the store's half -------------------------------------------------------------------------


class Edge:
    def __init__(self, root: Path) -> None:
        keys = generate_keys(root / "keys", "s")
        self.keys = load_edge_keys(keys.edge_dir / "recipient.pub", keys.edge_dir / "site.key",
                                   keys.edge_dir / "dedup.key")
        self.root = root
        self.store = Store(root / "state", DEFAULT_CLASSES)

    def pipeline(self, horizon: float | None) -> Pipeline:
        return Pipeline("s", self.keys, self.store, CHUNKING, CompressionSettings(),
                        dedup_horizon_s=horizon)

    def ingest(self, pipe: Pipeline, name: str, data: bytes) -> str:
        path = self.root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return pipe.ingest_file(IngestRequest(path, "files", name, "normal")).object_id

    def send(self, object_id: str) -> None:
        """What the uplink records when the cloud acknowledges everything of an object."""
        for cid in self.chunks(object_id):
            self.store.mark_chunk_uploaded(cid)
        self.store.mark_committed(object_id)

    def chunks(self, object_id: str) -> set[str]:
        return {c for (c,) in self.db().execute(
            "SELECT chunk_id FROM object_chunks WHERE object_id=?", (object_id,))}

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.root / "state" / "index.sqlite")


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    e = Edge(tmp_path)
    yield e
    e.store.close()


def test_under_a_horizon_a_dedup_hit_keeps_a_local_copy_to_send_again(edge: Edge) -> None:
    pipe = edge.pipeline(H)
    data = bytes(range(256)) * 1200
    a = edge.ingest(pipe, "a.bin", data)
    edge.send(a)
    assert not any(edge.store.chunk_path(c).exists() for c in edge.chunks(a)), "released"
    b = edge.ingest(pipe, "b.bin", data)
    assert edge.chunks(b) == edge.chunks(a)
    assert all(edge.store.chunk_path(c).exists() for c in edge.chunks(b)), "copies kept"
    states = {s for (s,) in edge.db().execute("SELECT DISTINCT state FROM chunks")}
    assert states == {"uploaded"}, "kept, not queued again: only re-sent past the horizon"


def test_without_a_horizon_a_dedup_hit_keeps_nothing(edge: Edge) -> None:
    pipe = edge.pipeline(None)
    data = bytes(range(256)) * 1200
    a = edge.ingest(pipe, "a.bin", data)
    edge.send(a)
    b = edge.ingest(pipe, "b.bin", data)
    assert not any(edge.store.chunk_path(c).exists() for c in edge.chunks(b))


def test_a_clock_that_steps_back_forgets_every_confirmation(edge: Edge) -> None:
    pipe = edge.pipeline(H)
    a = edge.ingest(pipe, "a.bin", b"x" * 100_000)
    t = 1_800_000_000.0
    for c in edge.chunks(a):
        edge.store.chunk_confirmed(c, t)
    assert edge.store.stale_chunks(a, t + 10, H) == []
    back = t - 2 * CLOCK_TOLERANCE_S  # still after nothing it confirmed: only the step tells
    assert {s.chunk_id for s in edge.store.stale_chunks(a, back, H)} == edge.chunks(a)
    assert {s.chunk_id for s in edge.store.stale_chunks(a, t + 10, H)} == edge.chunks(a)


def test_the_declared_horizon_is_never_loosened(edge: Edge) -> None:
    pipe = edge.pipeline(H)
    edge.ingest(pipe, "a.bin", b"a" * 5000)
    assert edge.store.horizon_to_declare() == int(H)
    assert edge.store.apply_dedup_horizon(None, 0).horizon_s == H, "removed: kept"
    promise = edge.store.apply_dedup_horizon(60 * DAY, 0)
    assert promise.horizon_s == H and promise.kept_from_config == 60 * DAY
    assert edge.store.apply_dedup_horizon(10 * DAY, 0).horizon_s == 10 * DAY, "tightened"
    assert edge.store.apply_dedup_horizon(None, 0).horizon_s == 10 * DAY


def test_nothing_is_declared_while_an_object_from_before_the_horizon_is_queued(
        edge: Edge) -> None:
    old = edge.ingest(edge.pipeline(None), "old.bin", b"o" * 5000)
    pipe = edge.pipeline(H)
    edge.ingest(pipe, "new.bin", b"n" * 5000)
    assert edge.store.horizon_to_declare() == 0, "old.bin deduped without local copies"
    edge.send(old)
    assert edge.store.horizon_to_declare() == int(H)


def site_config(**uplink: str) -> dict[str, object]:
    return {"site": {"id": "camp-alpha", "state_dir": "/var/lib/skyferry"},
            "keys": {"recipient_public": "keys/recipient.pub", "signing_key": "keys/site.key",
                     "dedup_key": "keys/dedup.key"},
            "backend": {"url": "file:///srv/cloud"}, "uplink": uplink}


def test_chunks_that_pass_the_horizon_while_others_are_re_sent_are_re_sent_too(
        edge: Edge, tmp_path: Path) -> None:
    """A slow link: re-sending one chunk takes two (simulated) days; the manifest goes only
    after a check that finds every chunk within the horizon."""
    pipe = edge.pipeline(H)
    a = edge.ingest(pipe, "a.bin", os.urandom(100_000))
    old, young, *rest = sorted(edge.chunks(a))
    t = 1_800_000_000.0
    edge.store.chunk_confirmed(old, t - 31 * DAY)
    edge.store.chunk_confirmed(young, t - 29 * DAY)
    for c in rest:
        edge.store.chunk_confirmed(c, t)
    times = iter([t, t + 2 * DAY, t + 2 * DAY, t + 4 * DAY, t + 4 * DAY])

    async def run_blocking(fn: Callable[..., object], *args: object) -> object:
        return fn(*args)

    cloud = tmp_path / "cloud"
    refresher = Refresher("s", edge.store, open_backend(f"file://{cloud}"), run_blocking,
                          lambda: next(times), H,
                          lambda c: edge.store.chunk_path(c.chunk_id).read_bytes())
    assert asyncio.run(refresher.refresh(a)) == 2
    copies = {p.parent.name.removesuffix(".copies") for p in cloud.rglob("*") if p.is_file()}
    assert copies == {old, young}


# --- settings -------------------------------------------------------------------------------


def test_dedup_horizon_is_validated_with_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        validate(site_config(dedup_horizon="30m"), Path("/etc/s.toml"))
    (line,) = info.value.problems
    assert line.startswith("uplink.dedup_horizon: must be at least 1h") and "30d" in line
    settings = validate(site_config(dedup_horizon="30d"), Path("/etc/s.toml"))
    assert settings.uplink.dedup_horizon_s == H
    assert validate(site_config(), Path("/etc/s.toml")).uplink.dedup_horizon_s is None


def test_delete_sealed_after_must_exceed_the_margin(tmp_path: Path) -> None:
    cfg = tmp_path / "land.toml"
    cfg.write_text('[land]\ndelete_sealed_after = "12h"\n')
    with pytest.raises(ConfigError) as info:
        load_land_settings(cfg)
    (line,) = info.value.problems
    assert line.startswith("land.delete_sealed_after: must be longer than retention_margin")
    cfg.write_text('[land]\ndelete_sealed_after = "31d"\n')
    s = load_land_settings(cfg)
    assert (s.delete_sealed_after_s, s.retention_margin_s) == (31 * DAY, DAY)
    assert load_land_settings(None).delete_sealed_after_s is None, "off by default"
