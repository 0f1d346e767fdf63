"""Putting a manifest's staged files under their names, newest version winning per name.

Per file: claim the name record for this version (agent/cloud/land_names.py), put the object
(`put_plain`: whole or nothing, never partly visible), check what the destination holds, then
settle the name. A name whose record holds a newer version is skipped, and settled too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from agent.backends.protocol import Backend, GuardedPut, PlainPut
from agent.backends.retry import retrying
from agent.cloud import land_book as book
from agent.cloud import land_names as names
from agent.cloud.land_names import LandError, NameRecord
from agent.cloud.land_stage import Staged, StagingArea, stage
from agent.cloud.restore_read import CloudReader
from agent.format.manifest import Manifest

log = logging.getLogger("skyferry.land")
T = TypeVar("T")
MAX_REPAIRS = 8  # a name whose record keeps moving while it is settled: retried later


class Putter:
    """What `Lander` does in the destination for one manifest's files."""

    def __init__(self, reader: CloudReader, dest: Backend, staging: StagingArea) -> None:
        self.reader, self.dest, self.staging = reader, dest, staging
        # A folder (agent/backends/folder.py): a put judged and made in one step. Looked up
        # once: isinstance against a runtime protocol inspects every attribute.
        self.guarded = dest if isinstance(dest, GuardedPut) else None

    async def newer_than_landed(self, m: Manifest) -> tuple[dict[int, names.Read], list[str]]:
        """The files of `m` newer than the version landed under their names (entry indexes,
        -1 for the whole object, each with its name record as read: `put_all` claims from
        it), and the names an already landed newer version keeps (each settled: it holds that
        version's content). The names are looked at `parallel` at a time: a pack holds
        hundreds, each one request."""

        async def look(i: int, name: str) -> names.Read | None:
            path = "/".join(book.dest_parts(m, name))
            found = await names.read(self.dest, book.name_key(m.site, path.split("/", 1)[1]))
            # The same version again (a run that stopped before its landing record) lands
            # again.
            held = found[0]
            if held is not None and held.version.newer_than(book.Version.of(m, i)):
                await self.settle(path)
                return None
            return found

        todo = [(i, e.name) for i, e in enumerate(m.entries)] or [(-1, m.name)]
        if self.guarded is not None:
            # Its put judges what the name holds, under the file's folder lock
            # (`_put_guarded`): nothing to read first. A version that arrives after a newer
            # one (rare) is staged for nothing, and not landed.
            return {i: (None, None) for i, _ in todo}, []
        looked = await self.each([look(i, name) for i, name in todo])
        wanted = {i: r for (i, _), r in zip(todo, looked, strict=True) if r is not None}
        return wanted, [name for (_, name), r in zip(todo, looked, strict=True) if r is None]

    async def put_all(self, sealed_key: str, m: Manifest, files: list[Staged],
                      looked: dict[int, names.Read] | None = None
                      ) -> tuple[list[book.Landed], list[str]]:
        """Land each file unless a newer version of its name got there first: what landed,
        and the names skipped as superseded. On a folder, one batch (`_put_guarded`);
        elsewhere files are put `parallel` at a time (names are independent: each has its own
        record, claimed by compare-and-swap). `looked`: the name records `newer_than_landed`
        read, by entry."""
        looked = looked or {}
        landed = [book.Landed("/".join(f.parts), f.size, f.sha256, f.mtime_ns, m.site,
                              m.source, m.object_id, m.created) for f in files]
        if self.guarded is not None:
            put = await self._put_guarded(self.guarded, m, files, landed)
        else:
            put = await self.each([self._claim_and_put(sealed_key, m, f, lf, looked)
                                   for f, lf in zip(files, landed, strict=True)])
        superseded = [m.entries[f.entry].name if f.entry >= 0 else m.name
                      for f, ok in zip(files, put, strict=True) if not ok]
        return [lf for lf, ok in zip(landed, put, strict=True) if ok], superseded

    async def _claim_and_put(self, sealed_key: str, m: Manifest, f: Staged,
                             landed: book.Landed, looked: dict[int, names.Read]) -> bool:
        """Claim the name record, put, settle (object stores): whether it landed."""
        mine = NameRecord(book.Version.of(m, f.entry), sealed_key, f.sha256)
        newer = await names.claim(self.dest, _name_key(landed.key), mine, looked.get(f.entry))
        if newer is None:
            await self.put_file(f, landed)
        await self.settle(landed.key, mine if newer is None else None)
        return newer is None

    async def each(self, work: list[Coroutine[Any, Any, T]], at_once: int = 0) -> list[T]:
        """Run `work` `at_once` (default `parallel`) at a time, results in order; the first
        failure cancels the rest (what it was landing is landed again later: every step is
        idempotent)."""
        slots = asyncio.Semaphore(at_once or self.reader.parallel)

        async def bounded(c: Coroutine[Any, Any, T]) -> T:
            async with slots:
                return await c

        tasks = [asyncio.ensure_future(bounded(c)) for c in work]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # the failure itself, not a group: callers sort errors by type
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _put_guarded(self, dest: GuardedPut, m: Manifest, files: list[Staged],
                           landed: list[book.Landed]) -> list[bool]:
        """Judge and put in one step where the destination offers it (a folder,
        `GuardedPut`), the manifest's files in one batch, durable when it returns: the
        version is each object's own `version` metadata, compared under its folder's lock, so
        there is no name record to claim, nothing to check or settle after (docs/FORMAT.md,
        "Landing bookkeeping")."""
        versions = {f.path: book.Version.of(m, f.entry) for f in files}
        puts = [PlainPut(lf.key, f.path, {**lf.metadata(),
                                           "version": versions[f.path].to_json().decode()},
                         f.mtime_ns) for f, lf in zip(files, landed, strict=True)]

        def admit(put: PlainPut, held: Mapping[str, str] | None) -> bool:
            found = book.Version.from_json(held.get("version", "").encode()) \
                if held is not None else None
            return found is None or not found.newer_than(versions[put.source])

        return await retrying(lambda: dest.put_plain_guarded(puts, admit))

    async def put_file(self, f: Staged, landed: book.Landed) -> None:
        """Put the file, then check what the destination holds."""
        # The staged file is this manifest's alone and only removed after: a folder
        # destination on the same file system takes it in place.
        await retrying(lambda: self.dest.put_plain(landed.key, f.path,
                                                   metadata=landed.metadata(),
                                                   mtime_ns=f.mtime_ns, consume=True))
        held = await retrying(lambda: self.dest.head(landed.key))
        if held is not None and held[1].get("object_id") != landed.object_id:
            return  # another version's put came after this one: `settle` sorts it out
        if held is None or held[0] != f.size or held[1].get("sha256") != f.sha256:
            raise LandError(f"{self.dest.url}: {landed.key} does not hold what was put "
                            f"({held!r}, expected {f.size} bytes, sha256 {f.sha256})")

    async def settle(self, key: str, put: NameRecord | None = None) -> None:
        """Make the object under `key` hold the version its name record names: an older
        version's put may have finished after a newer version's claim (the module's doc).

        `put`: the version this worker has just put. While the record still names it, the
        object is not looked at: a put of an older version that finished later is settled
        (repaired) by its own worker, or, if that one stopped, when its manifest comes again.
        """
        for _ in range(MAX_REPAIRS):
            record, _ = await names.read(self.dest, _name_key(key))
            if record is None or (put is not None and record.version == put.version):
                return
            if await names.holds(self.dest, key, record):
                return
            log.info("%s holds an older version than its record: landing %s again", key,
                     record.manifest, extra={"event": "land_name_repair", "object": key})
            await self._repair(key, record)
        raise LandError(f"{self.dest.url}: {key}: its name record kept moving while it was "
                        "settled; will retry")

    async def _repair(self, key: str, record: NameRecord) -> None:
        """Land the version `record` names under `key` again, from its sealed manifest."""
        m = await self.reader.load_manifest(record.manifest)
        staged = await stage(self.reader, m, {record.version.entry}, self.staging)
        try:
            if not staged.files:
                raise LandError(f"{key}: the version its name record names ({record.manifest})"
                                f" no longer verifies: {staged.failure or staged.bad}")
            f = staged.files[0]
            await self.put_file(f, book.Landed("/".join(f.parts), f.size, f.sha256, f.mtime_ns,
                                               m.site, m.source, m.object_id, m.created))
        finally:
            await staged.remove()


def _name_key(key: str) -> str:
    """The name record of the object under `key` (<site>/<path below the site's folder>)."""
    site, path = key.split("/", 1)
    return book.name_key(site, path)
