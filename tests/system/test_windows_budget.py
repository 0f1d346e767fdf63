"""Issue 4, acceptance 3: with a controllable clock and a schedule of short windows, nothing is
sent outside windows; inside one, sending starts within 1 s of AOS and no chunk is begun that
cannot finish by LOS at the measured rate; a window ends on committed objects when the budget
allows. Plus the budget arithmetic and stream sizing on their own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.uplink.budget import Admission, RateMeter
from agent.windows import Contact
from tests.kits.windows import JumpClock, RunningDaemon, site_settings, until

RATE = 1_000_000.0  # bytes/s: the windows' expected (and capped) rate
POST_PASS = 0.5


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


@pytest.mark.timing  # real 4 s windows at 1 MB/s: when sending begins, what fits in them
async def test_short_windows_are_spent_well(tmp_path: Path) -> None:
    t0 = float(int(datetime.now(UTC).timestamp()) // 60 * 60 + 3600)
    w1 = (t0 + 100, t0 + 104)  # budget (4 - 0.5) s x 0.9 x 1 MB/s: about 3.1 MB
    w2 = (t0 + 200, t0 + 205)  # room for the rest
    settings = site_settings(tmp_path, {
        "mode": "schedule", "post_pass": f"{POST_PASS}s", "pre_pass": "2s",
        "intervals": [{"start": iso(a), "end": iso(b), "rate": "1MB/s"} for a, b in (w1, w2)],
        "link": {"probe": "none"},
    }, uplink={"streams": 3})
    clock = JumpClock(t0)
    async with RunningDaemon(settings, clock) as run:
        ids = await run.ingest(tmp_path, count=8, size=600_000)  # ~4.8 MB sealed in total
        await asyncio.sleep(1.0)
        # Outside any window: nothing leaves.
        assert run.cloud_files() == []
        assert not run.log.named("upload_admitted")

        clock.jump_to(w1[0] - 0.3)
        await until(lambda: clock() > w1[1] + 0.5, 10, "the end of window 1")
        admitted_1 = [e for e in run.log.named("upload_admitted") if e.at < w1[1]]
        assert admitted_1, "nothing was sent in window 1"
        first = min(e.at for e in admitted_1)
        assert w1[0] <= first <= w1[0] + 1.0, f"sending began {first - w1[0]:.2f} s after AOS"
        _check_admissions(admitted_1, w1[1])
        db = run.index()
        queued = db.execute("SELECT COUNT(*) FROM objects WHERE state='queued'").fetchone()[0]
        waiting_commit = db.execute("SELECT COUNT(*) FROM objects WHERE state='queued' AND "
                                    "chunks_left=0").fetchone()[0]
        uploading = db.execute("SELECT COUNT(*) FROM chunks WHERE state='uploading'").fetchone()[0]
        assert 0 < queued < len(ids), "window 1 should carry some, not all, of the queue"
        assert waiting_commit == 0, "an object with every chunk up was left uncommitted"
        assert uploading == 0
        assert not run.log.named("upload_cut"), "a chunk was begun that could not finish"
        commits_1 = [e.at for e in run.log.named("object_committed")]
        assert commits_1 and all(w1[0] <= t < w1[1] for t in commits_1)

        # Between windows: still nothing.
        await asyncio.sleep(0.5)
        assert len(run.log.named("upload_admitted")) == len(admitted_1)

        clock.jump_to(w2[0] - 0.3)
        await until(lambda: clock() > w2[1] + 0.5, 12, "the end of window 2")
        admitted_2 = [e for e in run.log.named("upload_admitted") if e.at >= w2[0]]
        assert w2[0] <= min(e.at for e in admitted_2) <= w2[0] + 1.0
        _check_admissions(admitted_2, w2[1])
        assert any(e.fields["rate_source"] == "measured" for e in admitted_2)
        # The budget allowed everything: the window ends on committed objects only.
        left = db.execute("SELECT COUNT(*) FROM objects WHERE state='queued'").fetchone()[0]
        assert left == 0
        commits = [e.at for e in run.log.named("object_committed")]
        assert len(commits) == len(ids)
        assert all(w1[0] <= t < w1[1] or w2[0] <= t < w2[1] for t in commits)
        assert not run.log.named("upload_cut")
        sent = [e.at for e in run.log.named("chunk_sent")]
        assert all(w1[0] <= t < w1[1] or w2[0] <= t < w2[1] for t in sent)
        db.close()
        rates = [e.fields["rate_bps"] for e in admitted_1 + admitted_2
                 if e.fields["rate_source"] == "measured"]
        print(f"window 1: {len(admitted_1)} chunks, first {first - w1[0]:.3f} s after AOS, "
              f"{len(commits_1)} objects committed; window 2: {len(admitted_2)} chunks; "
              f"measured rate {min(rates):.0f}-{max(rates):.0f} B/s")


def _check_admissions(admitted: list, los: float) -> None:  # type: ignore[type-arg]
    """Each chunk, queued behind what was in flight when it began, finishes by LOS at the
    rate planned with (the measured one once there is a measurement)."""
    for e in admitted:
        f = e.fields
        assert f["window_end"] == los
        finish = f["at"] + (f["in_flight_bytes"] + f["bytes"] + f["manifest_bytes"]) / f["rate_bps"]
        assert finish <= los - POST_PASS + 1e-6, (f, finish - los)


# ---- the arithmetic, without a daemon --------------------------------------------------------


class _Meter(RateMeter):
    def __init__(self, rate: float | None) -> None:
        super().__init__()
        self.fixed = rate

    def rate(self) -> float | None:
        return self.fixed


def test_budget_uses_measured_rate_within_caps_and_keeps_the_post_pass() -> None:
    window = Contact(1000.0, 1100.0, 2e6, "interval")
    adm = Admission(lambda t: window if 1000 <= t < 1100 else None, lambda: 1050.0,
                    post_pass_s=10, uplink_rate_bps=5e6, meter=_Meter(None), rtt=lambda: 0.5)
    b = adm.budget()
    assert (b.rate_bps, b.rate_source, b.seconds_left) == (2e6, "window", 50.0)
    assert b.chunk_bytes == int((50 - 10 - 0.5) * 2e6 * 0.9)
    assert b.manifest_bytes == int((50 - 0.5) * 2e6 * 0.9)
    adm.meter = _Meter(1.5e6)
    assert adm.budget().rate_source == "measured" and adm.budget().rate_bps == 1.5e6
    adm.meter = _Meter(9e6)  # faster than the window allows: the window's cap wins
    assert adm.budget().rate_bps == 2e6
    assert adm.cap(1050) == 2e6
    outside = Admission(lambda t: None, lambda: 0.0)
    assert outside.budget().chunk_bytes is None  # no window: no budget (always, flush)
    always = Admission(lambda t: Contact(0, float("inf"), None, "always"), lambda: 5.0)
    assert always.budget().chunk_bytes is None


def test_streams_fill_the_bandwidth_delay_product() -> None:
    window = Contact(0.0, 1e9, 12.5e6, "interval")  # 100 Mbit/s
    adm = Admission(lambda t: window, lambda: 10.0, meter=_Meter(None), rtt=lambda: 0.6,
                    max_streams=16)
    # A stream idles ~3 round trips between chunks: 1.8 s x 12.5 MB/s = 22.5 MB to cover;
    # 4 MiB chunks: 6 in flight + 1 on the wire.
    assert adm.bdp_streams() == 7
    adm._avg_chunk = 1 << 20  # 1 MiB chunks: 22 + 1, more than configured
    assert adm.bdp_streams() == 16
    adm._avg_chunk = 256 << 10  # more than the configured streams: all of them
    assert adm.bdp_streams() == 16
    adm.rtt = lambda: 0.005  # a short path needs only one stream for 4 MiB chunks ...
    adm._avg_chunk = 4 << 20
    assert adm.bdp_streams() == 1
    adm._avg_chunk = 1 << 20  # ... but 1 MiB ones (84 ms each) would idle 18 % of the time
    assert adm.bdp_streams() == 2
    adm.rtt = lambda: None  # unknown RTT: all configured streams
    assert adm.bdp_streams() == 16
    # 40 ms (a LEO terminal), 15 Mbit/s, the small chunks of file packs: 64 KiB takes 35 ms
    # to send and its stream then idles ~120 ms, so 5 streams are needed; 160 KiB, 3; 4 MiB
    # chunks idle under a tenth of their time (the uplink keeps a second stream on long
    # paths anyway).
    leo = Contact(0.0, 1e9, 15e6 / 8, "interval")
    adm = Admission(lambda t: leo, lambda: 10.0, meter=_Meter(None), rtt=lambda: 0.04,
                    max_streams=8)
    adm._avg_chunk = 64 << 10
    assert adm.bdp_streams() == 5
    adm._avg_chunk = 160 << 10
    assert adm.bdp_streams() == 3
    adm._avg_chunk = 4 << 20
    assert adm.bdp_streams() == 1


def test_streams_climb_while_they_help_and_turn_back_when_not() -> None:
    window = Contact(0.0, 1e9, None, "interval")
    meter = _Meter(1e6)
    adm = Admission(lambda t: window, lambda: 10.0, meter=meter, rtt=lambda: 0.01,
                    max_streams=8)
    assert adm.streams_wanted() == 1
    seen = []
    for rate in (1e6, 1.5e6, 2e6, 2.02e6, 2.0e6):
        meter.fixed = rate
        adm._since_eval = 8
        seen.append(adm.streams_wanted())
    assert seen[:3] == [2, 3, 4]  # each step helped: keep adding
    assert seen[3] < seen[2] + 1  # +1% is no help: turned back
