"""Issue 17, acceptance 4 (smoke version; benchmarks/backlog.py measures 1x, 10x and 40x the
start-up test's index): the uplink's claims, its acknowledgements and the status summary cost
the same on a backlog four times larger.

Two synthetic backlogs (0.05x and 0.2x the start-up test: 5,000 and 20,000 queued objects) are
open side by side and served in turns, so the machine's load falls on both alike. A cost that
grows with the backlog (a pass over the queued objects) makes the larger one about 4x slower;
one that grows as log n, a few percent.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from agent.store.store import Store
from tests.kits.backlog import AGING_S, CLASSES, Uplink, build

SMALL, LARGE = 0.05, 0.2
CLAIMS = 200
FLAT = 2.0  # the larger backlog's median over the smaller's; a scan would be ~4


def test_claims_acks_and_summary_do_not_grow_with_the_backlog(tmp_path: Path) -> None:
    small_backlog = build(tmp_path / "small", SMALL)
    large_backlog = build(tmp_path / "large", LARGE)
    small = Store(tmp_path / "small", CLASSES)
    large = Store(tmp_path / "large", CLASSES)
    try:
        assert large.pending_objects() == 4 * small.pending_objects() == 20_000
        assert large.used_bytes == large_backlog.stored_bytes
        assert small.used_bytes == small_backlog.stored_bytes
        uplinks = Uplink(small), Uplink(large)
        for _ in range(CLAIMS):
            for u in uplinks:
                assert u.step() is not None
        summary: tuple[list[float], list[float]] = ([], [])
        for _ in range(30):
            for store, times in zip((small, large), summary, strict=True):
                t = time.perf_counter()
                store.summary(time.time())
                times.append(time.perf_counter() - t)
        small_round, large_round = (u.round for u in uplinks)
        ratios = {
            "next_work": large_round.median_ms("next_work") / small_round.median_ms("next_work"),
            "mark_sent": large_round.median_ms("mark_sent") / small_round.median_ms("mark_sent"),
            "summary": statistics.median(summary[1]) / statistics.median(summary[0]),
        }
        print(f"\nmedian ms at {SMALL}x / {LARGE}x: next_work "
              f"{small_round.median_ms('next_work'):.3f} / "
              f"{large_round.median_ms('next_work'):.3f}, mark_sent "
              f"{small_round.median_ms('mark_sent'):.3f} / "
              f"{large_round.median_ms('mark_sent'):.3f}, summary "
              f"{statistics.median(summary[0]) * 1e3:.3f} / "
              f"{statistics.median(summary[1]) * 1e3:.3f}")
        assert all(r < FLAT for r in ratios.values()), ratios
        # The acceptance's absolute line, at a tenth of the benchmark's smallest size.
        assert large_round.median_ms("next_work") <= 5.0
        # The round went through the queue in order: the manifests of finished objects too.
        assert large_round.manifests > 0 and small_round.manifests > 0
        assert large.next_work(time.time(), AGING_S) is not None
    finally:
        small.close()
        large.close()
