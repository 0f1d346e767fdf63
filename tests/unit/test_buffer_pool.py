"""The ingest buffer pool: one buffer per object being sealed at once, whatever thread seals it."""

from __future__ import annotations

import threading

from agent.ingest.cutting import BufferPool

MiB = 1 << 20


def test_a_buffer_is_reused_across_threads_and_taken_only_when_asked_for() -> None:
    pool = BufferPool()
    seen: list[int] = []

    def ingest() -> None:
        with pool.lease(4 * MiB) as get:
            seen.append(id(get()))
            assert get() is get()  # one buffer for the whole object

    for _ in range(4):  # four threads one after another, as the daemon's I/O pool does
        t = threading.Thread(target=ingest)
        t.start()
        t.join()
    assert len(set(seen)) == 1
    with pool.lease(4 * MiB):
        pass  # never asked for: nothing taken, nothing allocated
    assert len(pool._free[4 * MiB]) == 1


def test_objects_sealed_at_once_get_buffers_of_their_own_and_few_are_kept() -> None:
    pool = BufferPool()
    size = 20 * MiB
    with pool.lease(size) as a, pool.lease(size) as b, pool.lease(size) as c:
        bufs = [a(), b(), c()]
        assert len({id(x) for x in bufs}) == 3
    # Kept: as many as fit in KEEP_BYTES (two of 20 MiB); the third is let go.
    assert len(pool._free[size]) == BufferPool.KEEP_BYTES // size == 2
