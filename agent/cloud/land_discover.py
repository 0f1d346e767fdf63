"""Listing discovery: which sealed manifests are new.

A full backfill listing (at start and every `backfill`) finds every site and every manifest not
yet landed or quarantined (the bookkeeping in the destination says which). Between backfills a
`poll` lists the store's top-level folders (one delimiter listing: a site that starts sending
is found within a poll, and all of its manifests are listed then) and only the recent date
folders of the known sites; a cursor per site and date folder (the keys already seen there)
keeps a manifest from being handed out twice. Keys within a
folder are not in arrival order (a site sends by priority), so the cursor is the set of keys seen,
kept only for the recent folders.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from agent.backends.protocol import Backend, ObjectInfo
from agent.backends.retry import retrying
from agent.cloud import land_book
from agent.format import layout

MANIFESTS = layout.manifests_prefix("").strip("/")  # a site's folder of manifests
RECENT_DAYS = 2  # date folders a poll lists: today and yesterday (UTC)


async def listing(backend: Backend, prefix: str) -> list[ObjectInfo]:
    """Every object under prefix; a listing cut half-way is started again."""

    async def once() -> list[ObjectInfo]:
        return [i async for i in backend.list(prefix)]

    return await retrying(once)


def recent_days(now: datetime, days: int = RECENT_DAYS) -> list[str]:
    return [(now - timedelta(days=i)).strftime("%Y/%m/%d") for i in range(days)]


class Discovery:
    """New manifests in `source`, as (site, its manifests) batches."""

    def __init__(self, source: Backend, dest: Backend,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.source, self.dest, self.clock = source, dest, clock
        self.sites: list[str] = []
        self._seen: dict[tuple[str, str], set[str]] = {}  # (site, day folder) -> keys

    async def _sites(self) -> list[str]:
        """Sites with manifests: top-level folders holding a manifests folder (delimiter
        listings only, never every chunk)."""
        out = []
        for name in await retrying(lambda: self.source.list_folders("")):
            if not name.startswith(("_", ".")) and MANIFESTS in await self._folders(name):
                out.append(name)
        return out

    async def _folders(self, site: str) -> tuple[str, ...]:
        return await retrying(lambda: self.source.list_folders(f"{site}/"))

    async def _done(self, site: str) -> set[str]:
        """This site's landed object ids and quarantine report keys."""
        landed = await listing(self.dest, land_book.landed_prefix(site))
        quarantined = await listing(self.dest, land_book.quarantine_prefix(site))
        return {i.key.rsplit("/", 1)[-1] for i in landed} | {i.key for i in quarantined}

    @staticmethod
    def _is_done(info: ObjectInfo, done: set[str]) -> bool:
        return (info.key.rsplit("/", 1)[-1] in done
                or land_book.quarantine_key(info.key) in done)

    async def backfill(self) -> list[tuple[str, list[ObjectInfo]]]:
        """Every site's manifests that are neither landed nor quarantined."""
        self.sites = await self._sites()
        self._seen.clear()
        days = set(recent_days(self.clock()))
        out = []
        for site in self.sites:
            done = await self._done(site)
            infos = await listing(self.source, layout.manifests_prefix(site))
            for info in infos:
                day = _day(info.key)
                if day in days:
                    self._seen.setdefault((site, day), set()).add(info.key)
            new = [i for i in infos if not self._is_done(i, done)]
            if new:
                out.append((site, new))
        return out

    async def _new_sites(self) -> list[tuple[str, list[ObjectInfo]]]:
        """Sites that appeared since the last listing, with all their manifests not yet done."""
        known, days = set(self.sites), set(recent_days(self.clock()))
        fresh = [s for s in await retrying(lambda: self.source.list_folders(""))
                 if s not in known and not s.startswith(("_", "."))]
        out = []
        for site in fresh:
            infos = await listing(self.source, layout.manifests_prefix(site))
            if not infos:
                continue  # not a site (yet): looked at again at the next poll
            self.sites.append(site)
            done = await self._done(site)
            for info in infos:
                if _day(info.key) in days:
                    self._seen.setdefault((site, _day(info.key)), set()).add(info.key)
            out.append((site, [i for i in infos if not self._is_done(i, done)]))
        return out

    async def poll(self) -> list[tuple[str, list[ObjectInfo]]]:
        """Manifests that appeared in the recent date folders since they were last listed, and
        those of sites seen for the first time."""
        days = recent_days(self.clock())
        self._seen = {k: v for k, v in self._seen.items() if k[1] in days}
        out = await self._new_sites()
        for site in self.sites:
            new: list[ObjectInfo] = []
            for day in days:
                seen = self._seen.setdefault((site, day), set())
                for info in await listing(self.source, f"{layout.manifests_prefix(site)}{day}/"):
                    if info.key not in seen:
                        seen.add(info.key)
                        new.append(info)
            if new:
                out.append((site, new))
        return out


def _day(key: str) -> str:
    parts = key.split("/")
    return "/".join(parts[2:5]) if len(parts) >= 6 else ""
