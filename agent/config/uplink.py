"""The [uplink] section: how many streams carry the queue to the cloud, retries and a rate cap."""

from __future__ import annotations

from agent.config import units
from agent.config.settings import UplinkSettings
from agent.config.table import Table

MIN_DEDUP_HORIZON_S = 3600.0


def read_uplink(root: Table) -> UplinkSettings:
    t = root.table("uplink", ("streams", "aging", "retry_initial", "retry_max", "rate",
                                     "dedup_horizon", "heartbeat"))
    defaults = UplinkSettings()
    streams = t.integer("streams", defaults.streams)
    t.ensure("streams", 1 <= streams <= 64, "must be between 1 and 64", "4 suits most links")
    aging = t.duration("aging", defaults.aging_s)
    t.positive("aging", aging, 'give a duration such as "6h"')
    initial = t.duration("retry_initial", defaults.retry_initial_s)
    t.positive("retry_initial", initial, 'give a duration such as "1s"')
    most = t.duration("retry_max", defaults.retry_max_s)
    t.ensure(
        "retry_max",
        most >= initial,
        f"must not be shorter than retry_initial ({units.format_duration(initial)})",
        "raise retry_max or lower retry_initial",
    )
    rate = t.rate("rate", None)
    t.positive("rate", rate, 'give a rate such as "15Mbit/s", or leave it out for no cap')
    horizon = t.duration("dedup_horizon", None)
    t.ensure("dedup_horizon", horizon is None or horizon >= MIN_DEDUP_HORIZON_S,
             "must be at least 1h (a chunk older than it is sent again before a manifest "
             "references it)", 'dedup_horizon = "30d", or leave it out when the cloud deletes '
             "nothing")
    heartbeat = t.duration("heartbeat", defaults.heartbeat_s)
    t.positive("heartbeat", heartbeat, 'give a duration such as "10m"')
    return UplinkSettings(
        streams=streams, aging_s=aging, retry_initial_s=initial, retry_max_s=most, rate_bps=rate,
        dedup_horizon_s=horizon, heartbeat_s=heartbeat,
    )
