"""The fleet view: every site's newest trusted heartbeat and its landing figures.

The sites are those whose public keys the lander holds (`sites/<site>.pub` beside the recipient
key) and any the lander found in the sealed store: a site that has never been heard from is
listed too. For each, the heartbeats (agent/format/heartbeat.py) in its recent date folders are
listed; the newest that opens and verifies with the site's key is trusted, and every newer one
that does not is reported (never trusted). A site with nothing recent is looked for month by
month backwards, on a full refresh only (at start and every `backfill`), so a site silent for
weeks costs a few listings, not one per poll.

The landing figures are read from the lander's bookkeeping in the destination
(agent/cloud/land_book.py): landing records and quarantine reports per site, and when the last
landing record was written; they are listed on a full refresh only (they grow with the data).
`skyferry fleet` reads the stores once; the lander refreshes at every poll
(agent/cloud/land_serve.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backends.protocol import Backend, ObjectInfo
from agent.backends.retry import retrying
from agent.cloud import land_book
from agent.cloud.land_discover import listing
from agent.cloud.restore_read import DECODE_ERRORS, SiteKeys
from agent.errors import BackendError, KeyFileError, ObjectNotFoundError
from agent.format.heartbeat import (
    MAX_HEARTBEAT_BYTES,
    Heartbeat,
    heartbeats_prefix,
    open_heartbeat,
    parse_heartbeat_key,
)

RECENT_DAYS = 2  # date folders listed at each refresh: today and yesterday (UTC)
MONTHS_BACK = 24  # how far back a full refresh looks for a site's last heartbeat
MAX_OPENED = 8  # heartbeats tried per site and refresh, newest first
MAX_REPORTED = 5  # untrusted heartbeats kept per site
CLOCK_AHEAD_S = 300.0  # a heartbeat dated further ahead than this is reported


@dataclass(frozen=True)
class Landing:
    manifests: int  # landing records
    quarantined: int  # quarantine reports
    last_landed: float | None  # Unix time the newest landing record was written


@dataclass
class SiteView:
    site: str
    heartbeat: Heartbeat | None = None
    heartbeat_key: str | None = None
    untrusted: list[tuple[str, str]] = field(default_factory=list)  # (key, why), newest first
    key_problem: str | None = None  # the site's public key could not be loaded
    landing: Landing | None = None
    newest_seen: str = ""  # the newest heartbeat key examined

    def age(self, now: float) -> float | None:
        if self.heartbeat is None:
            return None
        return now - self.heartbeat.created_at.timestamp()

    def status(self, now: float, silent_after_s: float) -> str:
        """"silent" past `silent_after_s` without a trusted heartbeat, "never" without any."""
        age = self.age(now)
        if age is None:
            return "never"
        return "silent" if age > silent_after_s else "ok"

    def to_json(self, now: float, silent_after_s: float) -> dict[str, Any]:
        hb, age = self.heartbeat, self.age(now)
        out: dict[str, Any] = {
            "site": self.site, "status": self.status(now, silent_after_s),
            "trusted": not self.untrusted and self.key_problem is None,
            "untrusted": [{"key": k, "reason": why} for k, why in self.untrusted],
            "key_problem": self.key_problem,
            "last_contact": None if hb is None else hb.created,
            "last_contact_age_s": None if age is None else round(max(age, 0.0), 3),
            "clock_ahead_s": None if age is None or age > -CLOCK_AHEAD_S else round(-age, 3),
            "heartbeat_key": self.heartbeat_key,
        }
        if hb is not None:
            data = hb.to_dict()
            for name in ("type", "version", "site", "created"):
                del data[name]
            out.update(data, queued_objects=hb.queued_objects, queued_bytes=hb.queued_bytes)
        land = self.landing
        out["landed_manifests"] = None if land is None else land.manifests
        out["quarantined"] = None if land is None else land.quarantined
        out["last_landed"] = (None if land is None or land.last_landed is None
                              else _iso(land.last_landed))
        return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def key_folder_sites(key_dir: Path) -> list[str]:
    """The sites whose public keys are held: `<key_dir>/sites/<site>.pub`."""
    folder = key_dir / "sites"
    return sorted(p.name[:-4] for p in folder.glob("*.pub")) if folder.is_dir() else []


class FleetWatch:
    """Keeps one `SiteView` per site, refreshed from the stores (`refresh`)."""

    def __init__(self, source: Backend, dest: Backend | None, recipient: X25519PrivateKey,
                 site_keys: SiteKeys, key_dir: Path,
                 more_sites: Callable[[], list[str]] = list,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.source, self.dest, self.recipient = source, dest, recipient
        self.site_keys, self.key_dir, self.more_sites = site_keys, key_dir, more_sites
        self.clock = clock
        self.sites: dict[str, SiteView] = {}
        self.refreshed: datetime | None = None
        self.landing_refreshed: datetime | None = None

    async def refresh(self, full: bool = True) -> None:
        """Every site's heartbeats; on a full refresh also the older ones of sites not heard
        from lately, and the landing figures."""
        names = sorted(set(key_folder_sites(self.key_dir)) | set(self.more_sites()))
        for name in names:
            view = self.sites.setdefault(name, SiteView(name))
            await self._heartbeats(view, full)
            if full and self.dest is not None:
                view.landing = await landing_of(self.dest, name)
        self.refreshed = self.clock()
        if full and self.dest is not None:
            self.landing_refreshed = self.refreshed

    async def _heartbeats(self, view: SiteView, full: bool) -> None:
        """The newest trusted heartbeat: new keys in the recent date folders first; then, on a
        full refresh of a site with none trusted yet, month by month backwards."""
        try:
            site_key = self.site_keys(view.site)
            view.key_problem = None
        except KeyFileError as e:  # a site found in the store without a key: never trusted
            view.key_problem = str(e)
            return
        now = self.clock()
        days = [(now - timedelta(days=i)).strftime("%Y/%m/%d") for i in range(RECENT_DAYS)]
        recent = [i.key for d in days
                  for i in await listing(self.source, heartbeats_prefix(view.site, d))]
        new = sorted((k for k in recent if k > view.newest_seen), reverse=True)
        found: list[tuple[str, str]] = []
        budget = await self._examine(view, new, site_key, found, MAX_OPENED)
        month = now.replace(day=1)
        for _ in range(MONTHS_BACK if full and view.heartbeat is None else 0):
            if budget <= 0 or view.heartbeat is not None:
                break
            bad = {k for k, _ in found} | {k for k, _ in view.untrusted}
            infos = await listing(self.source, heartbeats_prefix(view.site, f"{month:%Y/%m}"))
            keys = sorted((i.key for i in infos if i.key not in bad), reverse=True)
            budget = await self._examine(view, keys, site_key, found, budget)
            month = (month - timedelta(days=1)).replace(day=1)
        # What did not verify and is newer than the trusted one stays reported.
        older = [u for u in view.untrusted if u[0] not in {k for k, _ in found}
                 and (view.heartbeat_key is None or u[0] > view.heartbeat_key)]
        view.untrusted = sorted(found + older, reverse=True)[:MAX_REPORTED]
        if new:
            view.newest_seen = new[0]

    async def _examine(self, view: SiteView, keys: list[str], site_key: Any,
                       found: list[tuple[str, str]], budget: int) -> int:
        """Open `keys` newest first until one is trusted (or `budget` objects were tried);
        what does not open goes to `found`. Returns the budget left."""
        for key in keys:
            if budget <= 0:
                break
            budget -= 1
            if parse_heartbeat_key(key) is None:
                found.append((key, "not a heartbeat key "
                                   "(<site>/heartbeats/YYYY/MM/DD/<HHMMSSffffff>-<seq>)"))
                continue
            hb = await self._open(key, site_key, found)
            if hb is not None:
                if view.heartbeat_key is None or key > view.heartbeat_key:
                    view.heartbeat, view.heartbeat_key = hb, key
                break
        return budget

    async def _open(self, key: str, site_key: Any, found: list[tuple[str, str]]
                    ) -> Heartbeat | None:
        try:
            blob = await retrying(lambda: self.source.get(key, max_size=MAX_HEARTBEAT_BYTES))
            return await asyncio.to_thread(open_heartbeat, key, blob, self.recipient, site_key)
        except ObjectNotFoundError:
            return None  # removed since the listing
        except BackendError:
            raise  # the store, not the heartbeat: tried again at the next refresh
        except DECODE_ERRORS as e:
            why = str(e)
            found.append((key, why[len(key) + 2:] if why.startswith(f"{key}: ") else why))
            return None

    def to_json(self, now: float, silent_after_s: float) -> dict[str, Any]:
        sites = [v.to_json(now, silent_after_s) for v in self.sites.values()]
        sites.sort(key=lambda s: (_rank(s), s["site"]))
        return {
            "generated": _iso(now), "silent_after_s": silent_after_s,
            "refreshed": None if self.refreshed is None else self.refreshed.isoformat(
                timespec="seconds"),
            "landing_refreshed": None if self.landing_refreshed is None
            else self.landing_refreshed.isoformat(timespec="seconds"),
            "summary": {"sites": len(sites),
                        "silent": sum(s["status"] == "silent" for s in sites),
                        "never": sum(s["status"] == "never" for s in sites),
                        "untrusted": sum(not s["trusted"] for s in sites)},
            "sites": sites,
        }


def _rank(site: dict[str, Any]) -> int:
    """Sites needing attention first: silent, untrusted, never heard from, then the rest."""
    if site["status"] == "silent":
        return 0
    if not site["trusted"]:
        return 1
    return 2 if site["status"] == "never" else 3


async def landing_of(dest: Backend, site: str) -> Landing:
    try:
        landed = await listing(dest, land_book.landed_prefix(site))
        quarantined = await listing(dest, land_book.quarantine_prefix(site))
    except ObjectNotFoundError:
        return Landing(0, 0, None)
    return Landing(len(landed), len(quarantined), _newest(landed))


def _newest(infos: list[ObjectInfo]) -> float | None:
    times = [i.last_modified for i in infos if i.last_modified is not None]
    return max(times) if times else None
