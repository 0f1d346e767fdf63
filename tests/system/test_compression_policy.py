"""`[compression] level = "auto"`: the policy (link-bound -> high, ingest-bound -> 1, no
flapping), the config, the compressor's levels, and a pipeline and a daemon that really seal
smaller once the link is the bottleneck. Real zstd, real stores, real keys."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
from agent.daemon.site_config import validate
from agent.errors import ConfigError
from agent.format import crypto
from agent.format.codec import decompress
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private
from agent.ingest.compression_policy import (
    FAST,
    HIGH,
    HORIZON_S,
    MID,
    TOP,
    AutoLevel,
    Choice,
    IngestLoad,
    Load,
    choose,
)
from agent.ingest.compressor import Compressor
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest
from agent.store.store import Store
from tests.kits import edge_corpus as corpus
from tests.kits.windows import JumpClock, RunningDaemon, site_settings, until

GB = 10**9
LEO = 15e6 / 8  # 15 Mbit/s in bytes/s
DAY = HORIZON_S


def load(backlog: float, budget: float | None, *, busy: float = 0.0, cpus: int = 2,
         waiting: float = 0) -> Load:
    return Load(int(backlog), None if budget is None else int(budget), int(waiting), busy, cpus)


def run(loads: list[Load], start: Choice | None = None) -> list[Choice]:
    """The choices a daemon would make, evaluating each load in turn."""
    out: list[Choice] = []
    prev = start
    for ld in loads:
        prev = choose(ld, prev)
        out.append(prev)
    return out


# ---- the rule -----------------------------------------------------------------------------------

def test_link_bound_compresses_hardest() -> None:
    # 30 GB queued, two 8-minute passes a day at 15 Mbit/s (~1.6 GB): it will not drain.
    c = choose(load(30 * GB, 2 * 480 * LEO * 0.9))
    assert (c.level, c.long_distance, c.regime) == (19, True, "link-bound")
    assert "link-bound" in c.reason and "19" in c.reason


def test_waiting_data_counts_towards_the_backlog() -> None:
    # Nothing queued yet, but 5 GB ready in a spool and 1 GB of link a day: compress now,
    # not after the first gigabytes went out at level 1.
    c = choose(load(0, GB, waiting=5 * GB))
    assert c.regime == "link-bound" and c.level == TOP.level


def test_ingest_bound_stays_fast() -> None:
    # An always-on 15 Mbit/s link carries ~146 GB a day: it keeps up, ingest is the limit.
    for busy in (0.0, 0.5, 1.0):
        c = choose(load(2 * GB, LEO * DAY * 0.9, busy=busy))
        assert (c.level, c.long_distance, c.regime) == (1, False, "fast")
    # In between, a saturated ingest wins over the intermediate level.
    c = choose(load(0.7 * GB, GB, busy=0.95))
    assert (c.level, c.regime) == (1, "ingest-bound")
    assert "ingest is the bottleneck" in c.reason
    c = choose(load(0.7 * GB, GB, busy=0.05))
    assert (c.level, c.regime) == (MID.level, "balanced")


def test_unknown_budget_or_nothing_to_send_stays_fast() -> None:
    assert choose(load(50 * GB, None)).level == 1
    assert "unknown" in choose(load(50 * GB, None)).reason
    assert choose(load(0, 0)).level == 1  # no window for a day, but nothing to send either
    assert choose(load(1, 0)).level == TOP.level  # something to send and no window at all


def test_the_level_must_still_outrun_the_link() -> None:
    # Always-on 15 Mbit/s with a huge backlog: one core at 19 would seal slower than the link
    # sends, so a lower rung is taken; with 8 cores, 19.
    ld = load(500 * GB, LEO * DAY * 0.9, cpus=1)
    one = choose(ld)
    assert one.regime == "link-bound" and one.level < TOP.level
    assert "would not outrun" in one.reason
    rung = next(r for r in (FAST, MID, HIGH, TOP) if r.level == one.level)
    assert TOP.wire_rate(1) < ld.link_rate <= rung.wire_rate(1) / 1.5
    assert choose(load(500 * GB, LEO * DAY * 0.9, cpus=8)).level == TOP.level


def test_pressure_hysteresis() -> None:
    budget = 10 * GB
    seq = [1.1, 0.9, 0.8, 0.7, 0.45, 0.4, 0.36, 0.3, 0.45, 0.49, 0.5]
    got = [c.regime for c in run([load(p * budget, budget) for p in seq])]
    assert got == ["link-bound", "link-bound", "link-bound", "balanced", "balanced",
                   "balanced", "balanced", "fast", "fast", "fast", "balanced"]


def test_noisy_pressure_around_a_threshold_does_not_flap() -> None:
    rng = random.Random(4)
    budget = 10 * GB
    loads = [load(rng.uniform(0.8, 1.2) * budget, budget * rng.uniform(0.95, 1.05),
                  busy=rng.random()) for _ in range(500)]
    levels = [c.level for c in run(loads)]
    changes = sum(1 for a, b in itertools.pairwise(levels) if a != b)
    assert changes <= 1, levels[:40]


def test_ingest_bound_returns_to_level_9_only_when_it_would_not_saturate() -> None:
    budget = 10 * GB
    start = choose(load(7 * GB, budget, busy=0.95))
    assert start.regime == "ingest-bound"
    # At level 1 the workers are 30 % busy: level 9 costs ~3x the CPU, so it would saturate.
    stay = choose(load(7 * GB, budget, busy=0.3), start)
    assert (stay.level, stay.regime) == (1, "ingest-bound")
    climb = choose(load(7 * GB, budget, busy=0.1), stay)
    assert (climb.level, climb.regime) == (MID.level, "balanced")
    # ... and at 9 it stays while the workers keep up.
    assert choose(load(7 * GB, budget, busy=0.8), climb).level == MID.level


def test_outrun_margin_has_hysteresis() -> None:
    # A link whose rate is 1.2x below what one core produces at 19: staying at 19 is fine,
    # climbing to 19 from 16 needs 1.5x.
    rate = TOP.wire_rate(1) / 1.2
    budget = rate * DAY
    at_top = Choice(TOP.level, True, "link-bound", "")
    at_high = Choice(HIGH.level, False, "link-bound", "")
    assert choose(load(10 * budget, budget, cpus=1), at_top).level == TOP.level
    assert choose(load(10 * budget, budget, cpus=1), at_high).level == HIGH.level


# ---- measuring busy-ness ------------------------------------------------------------------------

def test_ingest_load_is_a_weighted_share_of_capacity() -> None:
    now = [0.0]
    il = IngestLoad(capacity=2, tau_s=10.0, clock=lambda: now[0])
    assert il.busy() == 0.0
    with il.sealing(), il.sealing():  # both workers busy for 100 s: saturated
        now[0] = 100.0
        assert il.busy() == pytest.approx(1.0, abs=1e-3)
    with il.sealing():  # one of two for 5 s: weighted towards 0.5
        now[0] = 105.0
        busy = il.busy()
    assert 0.5 < busy < 1.0
    now[0] = 200.0  # idle for a long time
    assert il.busy() < 0.01


# ---- config -------------------------------------------------------------------------------------

MINIMAL: dict[str, Any] = {
    "site": {"id": "camp-alpha", "state_dir": "/var/lib/skyferry"},
    "keys": {"recipient_public": "k/r.pub", "signing_key": "k/s.key", "dedup_key": "k/d.key"},
    "backend": {"url": "file:///srv/cloud"},
}


def settings_with(level: object) -> Any:
    return validate({**MINIMAL, "compression": {"level": level}}, Path("/etc/skyferry.toml"))


def test_config_auto_is_accepted_and_the_default() -> None:
    assert settings_with("auto").compression.level == "auto"
    assert validate(MINIMAL, Path("/etc/skyferry.toml")).compression.level == "auto"
    assert CompressionSettings().level == "auto"
    for level in (1, 3, 19, 22):
        assert settings_with(level).compression.level == level


@pytest.mark.parametrize(("value", "what"), [
    ("fast", 'must be an integer from 1 to 22 or "auto"'),
    ("Auto", 'must be an integer from 1 to 22 or "auto"'),
    ("3", 'must be an integer from 1 to 22 or "auto"'),
    (True, 'must be an integer from 1 to 22 or "auto"'),
    (0, "must be between 1 and 22"),
    (23, "must be between 1 and 22"),
])
def test_config_bad_level_says_what_where_and_how(value: object, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_with(value)
    (problem,) = info.value.problems
    assert problem.startswith(f"compression.level: {what} (got {value!r}); ")
    assert '"auto"' in problem.split("; ", 1)[1] and "1 (fastest) to 22" in problem


# ---- the compressor -----------------------------------------------------------------------------

def csv_bytes(size: int, seed: int) -> bytes:
    return b"".join(corpus.content(corpus.FileSpec("x.csv", "csv", size, seed)))


def test_compressor_levels_per_call_and_current() -> None:
    comp = Compressor(CompressionSettings())
    assert (comp.level, comp.long_distance) == (1, False)  # "auto" starts fast
    data = csv_bytes(2 << 20, 1)
    kind, fast = comp.compress(data)
    assert kind == crypto.COMPRESSION_ZSTD
    _, high = comp.compress(data, level=19, long_distance=True)
    assert len(high) < 0.8 * len(fast)
    comp.set_level(19, True)
    kind, current = comp.payload(memoryview(data))
    current = b"".join(current)
    assert kind == crypto.COMPRESSION_ZSTD and len(current) < 0.8 * len(fast)
    for payload in (fast, high, current):
        assert decompress(crypto.COMPRESSION_ZSTD, bytes(payload), len(data)) == data
    with pytest.raises(ValueError):
        comp.set_level(0)
    # A thread keeps only level 1 (every chunk is judged at it) and the level in use.
    for level in (3, 9, 19):
        comp.set_level(level)
        comp.compress(data[:100_000])
    assert set(comp._local.zstd) == {(1, False), (19, False)}


def test_fixed_level_is_kept() -> None:
    assert Compressor(CompressionSettings(level=7)).level == 7


# ---- a pipeline and a daemon under a link-bound budget ------------------------------------------

def test_pipeline_with_auto_seals_smaller_when_link_bound(tmp_path: Path) -> None:
    gen = generate_keys(tmp_path / "keys", "auto-site")
    keys = load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")
    recipient = load_recipient_private(gen.cloud_dir / "recipient.key")
    src = tmp_path / "sensors.csv"
    data = csv_bytes(3 << 20, 7)
    src.write_bytes(data)
    sizes = {}
    for name, link_bound in (("fast", False), ("auto", True)):
        store = Store(tmp_path / name, DEFAULT_CLASSES)
        pipeline = Pipeline("auto-site", keys, store, ChunkingSettings(), CompressionSettings())
        auto = AutoLevel(pipeline.compressor, cpus=2)
        budget = GB if link_bound else 1000 * GB
        auto.update(queued_bytes=0, waiting_bytes=20 * GB, budget_bytes=budget)
        assert pipeline.compressor.level == (19 if link_bound else 1)
        r = pipeline.ingest_file(IngestRequest(src, "files", "sensors.csv", "normal"))
        sizes[name] = r.stored_bytes
        # Each chunk opens and decompresses to a piece of the file, like any other.
        for p in sorted(store.chunks_dir.rglob("*")):
            if p.is_file():
                header, payload = crypto.open_sealed(p.read_bytes(), recipient)
                plain = decompress(header.compression, payload, header.plaintext_len)
                assert plain in data
        store.close()
    assert sizes["auto"] < 0.8 * sizes["fast"], sizes


async def test_daemon_raises_the_level_once_the_link_is_the_bottleneck(tmp_path: Path) -> None:
    # One 1-minute pass a day at 10 kB/s: ~540 kB of budget, less than one sealed file.
    settings = site_settings(tmp_path, {
        "mode": "schedule", "daily": [{"start": "03:00", "end": "03:01", "rate": "10kB/s"}],
        "link": {"probe": "none"},
    })
    assert settings.compression.level == "auto"
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i in range(2):
        p = src / f"series-{i}.csv"
        p.write_bytes(csv_bytes(2 << 20, 100 + i))
        files.append(p)
    clock = JumpClock(time.time())
    async with RunningDaemon(settings, clock) as run_:
        d = run_.daemon
        await until(lambda: bool(run_.log.named("compression_level")), 5, "the first look")
        first = run_.log.named("compression_level")[0].fields
        assert (first["zstd_level"], first["regime"]) == (1, "fast")
        a = await d.ingest(IngestRequest(files[0], "test", files[0].name, "normal"))
        await until(lambda: len(run_.log.named("compression_level")) >= 2, 10,
                    "a new level once the backlog exceeds the day's budget")
        second = run_.log.named("compression_level")[1].fields
        assert (second["zstd_level"], second["long_distance"]) == (19, True)
        assert second["regime"] == "link-bound"
        gauge = d.metrics.registry.get_sample_value("skyferry_compression_level")
        assert gauge == 19
        assert d.metrics.registry.get_sample_value("skyferry_compression_long_distance") == 1
        b = await d.ingest(IngestRequest(files[1], "test", files[1].name, "normal"))
        await asyncio.sleep(0)
    assert b.stored_bytes < 0.8 * a.stored_bytes, (a.stored_bytes, b.stored_bytes)
    assert len(run_.log.named("compression_level")) == 2  # no flapping meanwhile
