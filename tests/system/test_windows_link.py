"""Issue 4, acceptance 5: an unexpected link loss mid-window closes the gate within 2 probe
intervals; sending resumes when the link is back, re-sending only the chunks that were in
flight. The link monitor probes a local HTTP server the test starts, stops (connection
refused) and silences (a black hole: connections accepted, never answered)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config.settings import LinkSettings
from agent.format.layout import chunk_key
from agent.windows.linkmonitor import FolderProbe, TcpProbe, make_probe
from tests.kits.site import free_port
from tests.kits.windows import JumpClock, RunningDaemon, site_settings, until

INTERVAL = 1.0
TIMEOUT = 0.25


class Endpoint:
    """A tiny HTTP server standing in for the backend's endpoint."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.silent = False
        self.server: asyncio.Server | None = None
        self.probes = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readline()).strip():
                pass
            if self.silent:  # a black hole: the request is never answered
                await asyncio.sleep(30)
            self.probes += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self.silent = False
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.server = None


@pytest.mark.timing  # asserts how soon the gate closes (2 probe intervals)
async def test_link_loss_closes_the_gate_and_only_in_flight_chunks_are_resent(
        tmp_path: Path) -> None:
    port = free_port()
    endpoint = Endpoint(port)
    await endpoint.start()
    settings = site_settings(tmp_path, {
        "mode": "schedule",
        "link": {"probe": f"http://127.0.0.1:{port}/", "probe_interval": f"{INTERVAL}s",
                 "probe_timeout": f"{TIMEOUT}s", "down_after": 2, "up_after": 2},
        "intervals": [{"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}],
    }, uplink={"streams": 3, "rate": "1.5MB/s"})
    clock = JumpClock(datetime.now(UTC).timestamp())
    async with RunningDaemon(settings, clock) as run:
        gate = run.daemon.gate
        ids = await run.ingest(tmp_path, count=10, size=600_000)  # ~6 MB: about 4 s of sending
        assert gate.is_open()
        closes: list[float] = []
        cloud = Path(settings.backend.url.removeprefix("file://"))

        def chunk_files() -> list[Path]:
            return [p for p in (cloud / settings.site.id / "chunks").rglob("*") if p.is_file()]

        async def loss(cut: str) -> float:
            await until(lambda: len(run.log.named("chunk_sent")) >= 3 + len(closes) * 8, 15,
                        "uploads to be under way")
            if cut == "refused":
                await endpoint.stop()
            else:
                endpoint.silent = True
            lost = time.monotonic()
            await asyncio.wait_for(gate.wait_closed(), 5 * INTERVAL)
            closed_at = time.time()
            took = time.monotonic() - lost
            closes.append(took)
            acked_at_close = {e.fields["chunk"] for e in run.log.named("chunk_sent")}
            # While the link is down, nothing is sent. Puts under way at the close may still
            # end in the folder (a cut request to a folder has no wire to cut); after that,
            # no chunk reaches the cloud until the gate opens again.
            await asyncio.sleep(0.3)
            stored = set(chunk_files())
            await asyncio.sleep(0.7)
            assert not gate.is_open()
            assert set(chunk_files()) == stored, "chunks reached the cloud with the gate closed"
            # An acknowledgement recorded after the close (its index write is one executor
            # hop behind the read-back) is for a chunk stored before the gate closed.
            late = {e.fields["chunk"] for e in run.log.named("chunk_sent")} - acked_at_close
            for chunk in late:
                mtime = (cloud / chunk_key(settings.site.id, chunk)).stat().st_mtime
                assert mtime <= closed_at + 0.01, f"chunk {chunk} stored after the gate closed"
            if cut == "refused":
                await endpoint.start()
            else:
                endpoint.silent = False
            await asyncio.wait_for(gate.wait_open(), 5 * INTERVAL)
            return took

        took_refused = await loss("refused")
        took_silent = await loss("silent")
        await until(lambda: len(run.log.named("object_committed")) == len(ids), 30,
                    "every object committed")
        # Chunks cut at a loss (a manifest may be cut too: its chunk is None).
        cut = {e.fields["chunk"] for e in run.log.named("upload_cut")} - {None}
        db = run.index()
        attempts = dict(db.execute("SELECT id, attempts FROM chunks").fetchall())
        states = {s for (s,) in db.execute("SELECT DISTINCT state FROM chunks")}
        db.close()
    print(f"gate closed {took_refused:.2f} s after the endpoint went away, {took_silent:.2f} s "
          f"after it went silent (probe interval {INTERVAL} s); {len(cut)} chunks were in "
          f"flight and re-sent, {len(attempts) - len(cut)} sent once")
    assert took_refused <= 2 * INTERVAL
    assert took_silent <= 2 * INTERVAL
    assert cut, "the losses should have caught uploads in flight"
    # Re-sent: exactly the chunks that were in flight at a loss; every other chunk went once.
    assert {c for c, n in attempts.items() if n > 1} == cut
    assert all(n <= 3 for n in attempts.values())
    assert states == {"uploaded"}
    # Each chunk acknowledged once. A cut can land after the backend stored the chunk but
    # before the ack: the re-send then finds it there (sent=False) and writes nothing again.
    acked = [e.fields["chunk"] for e in run.log.named("chunk_sent")]
    assert len(acked) == len(set(acked)) == len(attempts)
    assert {e.fields["chunk"] for e in run.log.named("chunk_sent") if not e.fields["sent"]} <= cut
    downs = run.log.named("link_down")
    assert len(downs) == 2 and len(run.log.named("link_up")) == 2


async def test_probes_of_a_folder_and_of_tcp(tmp_path: Path) -> None:
    folder = FolderProbe(tmp_path)
    await folder(1.0)
    gone = FolderProbe(tmp_path / "missing")
    try:
        await gone(1.0)
        raise AssertionError("a missing folder must fail the probe")
    except OSError:
        pass
    except Exception as e:  # ProbeFailed
        assert "not a reachable folder" in str(e)
    port = free_port()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    await TcpProbe("127.0.0.1", port)(1.0)
    server.close()
    await server.wait_closed()
    try:
        await TcpProbe("127.0.0.1", port)(1.0)
        raise AssertionError("a closed port must fail the probe")
    except OSError:
        pass


def test_auto_probe_targets() -> None:
    """What "auto" probes is the backend's (tests/system/test_backends.py checks those)."""
    auto = make_probe(LinkSettings(probe="auto"), "file:///srv/cloud")
    assert isinstance(auto, FolderProbe)
    assert make_probe(LinkSettings(probe="auto"), None) is None
    assert make_probe(LinkSettings(probe="none"), "file:///x") is None
    probe = make_probe(LinkSettings(probe="tcp://10.0.0.1:443"), "https://s3.amazonaws.com/")
    assert isinstance(probe, TcpProbe) and probe.description == "tcp://10.0.0.1:443"


async def test_pre_pass_probes_and_warms_up_before_the_window(tmp_path: Path) -> None:
    from agent.windows.linkmonitor import pre_pass

    clock = JumpClock(10_000.0)
    window_start = 10_003.0
    warmed: list[float] = []

    async def warm_up() -> None:
        warmed.append(clock())

    class Monitor:
        def __init__(self) -> None:
            self.poked: list[float] = []

        def poke(self) -> None:
            self.poked.append(clock())

    monitor = Monitor()
    task = asyncio.create_task(pre_pass(
        lambda t: window_start if t < window_start else None, 2.0, clock,
        monitor, warm_up))  # type: ignore[arg-type]
    await until(lambda: bool(warmed), 5, "the warm-up")
    task.cancel()
    assert window_start - 2.0 <= warmed[0] < window_start - 1.5
    assert monitor.poked and monitor.poked[0] <= warmed[0]
