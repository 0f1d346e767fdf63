"""Loss of link from the uplink's own connections (agent/uplink/link_watch.py): which kernel
readings count as a silent link, and the link monitor taking the uplink's word for a loss
while its probes decide when the link is back. The netns test (tests/system/
test_link_silence.py) shows the whole path under a real black hole."""

from __future__ import annotations

import asyncio

from agent.backends.connections import Connection
from agent.config.settings import LinkSettings
from agent.uplink.link_watch import _unanswered
from agent.windows.linkmonitor import LinkMonitor, TcpProbe


def conn(queued: int = 1000, retransmits: int = 0, since_ack_s: float | None = None,
         connecting: bool = False) -> Connection:
    return Connection(queued, retransmits, 0.0, connecting, 1, since_ack_s)


def test_which_connections_count_as_unanswered() -> None:
    patience = 0.8
    # Nothing under way: nothing owed, however long the quiet.
    assert not _unanswered(conn(queued=0, retransmits=3, since_ack_s=9.0), patience)
    # Acknowledged lately: moving.
    assert not _unanswered(conn(retransmits=1, since_ack_s=0.3), patience)
    # Silent past patience with a retransmission timeout: gone.
    assert _unanswered(conn(retransmits=1, since_ack_s=0.9), patience)
    # Silent but no timeout: a receiver that stopped reading (zero-window probes are
    # answered)... until the silence lasts twice as long.
    assert not _unanswered(conn(retransmits=0, since_ack_s=1.2), patience)
    assert _unanswered(conn(retransmits=0, since_ack_s=1.7), patience)
    # /proc only (no time of the last acknowledgement): a retransmission timeout says it.
    assert _unanswered(conn(retransmits=1), patience)
    assert not _unanswered(conn(retransmits=0), patience)
    # A handshake: its SYN retransmitted.
    assert not _unanswered(conn(queued=0, connecting=True, since_ack_s=50.0), patience)
    assert _unanswered(conn(queued=0, connecting=True, retransmits=1), patience)


def test_monitor_takes_the_uplinks_word_and_probes_bring_the_link_back() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        changes: list[bool] = []
        mon = LinkMonitor(TcpProbe("127.0.0.1", port), LinkSettings(learn=False),
                          lambda: 0.0, on_change=changes.append)
        mon.suspect("the uplink's connections went unanswered")
        assert (mon.up, changes) == (False, [False])
        assert mon.last_error == "the uplink's connections went unanswered"
        mon.suspect("again")  # already down: no second change
        assert changes == [False]
        assert await mon.probe_once() and not mon.up, "one good probe is not enough"
        assert await mon.probe_once() and mon.up
        assert changes == [False, True]
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
