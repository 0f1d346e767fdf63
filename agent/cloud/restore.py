"""The cloud side: verify what arrived, or restore it into a folder.

Reading and checking is `CloudReader`'s (agent/cloud/restore_read.py); this chooses what to write
(newest version per name, never rolled back behind the restore journal) and writes it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backends.protocol import Backend, ObjectInfo
from agent.cloud.history import History, RestoreJournal
from agent.cloud.restore_fs import TargetDir
from agent.cloud.restore_io import settled, workers
from agent.cloud.restore_pack import PackSplitter
from agent.cloud.restore_plan import Ref, by_manifest, drop_conflicts, newest_per_name, refs_of
from agent.cloud.restore_progress import Progress
from agent.cloud.restore_read import (
    ITEM_ERRORS,
    CloudReader,
    Problem,
    RestoreReport,
    SiteKeys,
    safe_relative,
)
from agent.format.keys import load_verify_key
from agent.format.manifest import KIND_MQTT_BATCH, Manifest

OBJECTS_AT_ONCE = 4  # objects restored at the same time (their chunks: `parallel` at most)


def site_key_loader(key_dir: Path) -> SiteKeys:
    """Site public keys live beside the recipient key: <dir>/sites/<site>.pub."""
    cache: dict[str, Ed25519PublicKey] = {}

    def load(site: str) -> Ed25519PublicKey:
        if site not in cache:
            cache[site] = load_verify_key(key_dir / "sites" / f"{site}.pub")
        return cache[site]

    return load


class Restorer(CloudReader):
    """Verify everything a site sent, or restore the newest version of each file into a folder."""

    def __init__(self, backend: Backend, recipient: X25519PrivateKey, site_keys: SiteKeys,
                 parallel: int = 8) -> None:
        super().__init__(backend, recipient, site_keys, parallel)
        self._journal: RestoreJournal | None = None  # while `run` restores into a folder

    async def restore_object(self, m: Manifest, target: TargetDir,
                             progress: Progress | None) -> None:
        """Write one whole object below target; on any failure nothing is left of it."""
        out = target.new_file(_dest(m))
        try:
            await self.stream_object(m, out.write, progress)
            await settled(out.commit, m.mtime_ns)
        finally:
            out.discard()

    async def run(self, target: Path | None, sites: list[str] | None = None,
                  since: datetime | None = None, show_progress: bool | None = None
                  ) -> RestoreReport:
        """Restore into `target`, or only verify everything when target is None.

        The report counts files and MQTT batches (the files of a pack one by one); every file
        that was not written (or did not verify) is a problem of its own.
        """
        report = RestoreReport()
        self.history = History(since)
        # A site given twice is read once: twice, each of its seqs would be seen twice.
        names = list(dict.fromkeys(sites)) if sites else await self.sites()
        if not names:
            report.problems.append(Problem(self.backend.url, (
                "no site has any manifest here (nothing under <site>/manifests/): check the "
                "backend URL and its prefix")))
        if target is None:
            await self._verify(names, since, report, show_progress)
        else:
            with TargetDir(target) as dir_:
                try:
                    self._journal = RestoreJournal(target, dir_.fd)  # opened through dir_
                    await self._restore(dir_, names, since, report, show_progress)
                finally:
                    if self._journal is not None:
                        self._journal.close()
                    self._journal = None
        report.problems += [Problem(what, why) for what, why in self.history.finish()]
        for p in report.problems:  # gaps an unreadable manifest may account for
            p.reason += self.history.note(p.what)
        return report

    async def _verify(self, sites: list[str], since: datetime | None, report: RestoreReport,
                      show_progress: bool | None) -> None:
        """Every manifest and every chunk, one manifest held at a time per worker."""
        infos = [i for site in sites for i in await self.manifest_keys(site, since, report)]
        progress = Progress(0, 0, enabled=show_progress)

        async def one(info: ObjectInfo) -> None:
            async with self._manifest_or_problem(info, since, report) as m:
                if m is not None:
                    refs = refs_of(m, info.key)
                    progress.total_objects += len(refs)
                    progress.total_bytes += m.size
                    await self._write_refs(m, refs, None, report, progress)

        await workers(OBJECTS_AT_ONCE, infos, one)
        progress.close()

    async def _restore(self, target: TargetDir, sites: list[str], since: datetime | None,
                       report: RestoreReport, show_progress: bool | None) -> None:
        """Site by site: paths never meet across sites, and only one site's index is held."""
        for site in sites:
            await self._restore_site(target, site, since, report, show_progress)

    async def _restore_site(self, target: TargetDir, site: str, since: datetime | None,
                            report: RestoreReport, show_progress: bool | None) -> None:
        """Index every name, choose what to write, then write it manifest by manifest."""
        sizes: dict[str, int] = {}  # manifest key -> its size in the listing
        order = self.history.ref_order  # by seq (agent/cloud/history.py), once the site is indexed
        chosen, superseded = newest_per_name(await self._index(site, since, report, sizes),
                                             order)
        report.superseded += superseded
        chosen, refused = drop_conflicts(chosen, order)
        report.problems += [Problem(r.label, why) for r, why in refused]
        progress = Progress(len(chosen), sum(r.size for r in chosen), enabled=show_progress)
        groups = by_manifest(chosen)
        del chosen  # the index shrinks as manifests are done (groups.pop)

        async def one(key: str) -> None:
            info = ObjectInfo(key, sizes[key])
            await self._restore_manifest(info, groups.pop(key), target, report, progress)

        await workers(OBJECTS_AT_ONCE, list(groups), one)
        progress.close()

    async def _index(self, site: str, since: datetime | None, report: RestoreReport,
                     sizes: dict[str, int]) -> list[Ref]:
        refs: list[Ref] = []

        async def one(info: ObjectInfo) -> None:
            async with self._manifest_or_problem(info, since, report) as m:
                if m is not None:
                    refs.extend(refs_of(m, info.key))
                    sizes[info.key] = info.size

        await workers(self.parallel, await self.manifest_keys(site, since, report), one)
        return refs

    async def _restore_manifest(self, info: ObjectInfo, refs: list[Ref], target: TargetDir,
                                report: RestoreReport, progress: Progress) -> None:
        """Load a chosen manifest again (only its index entry was kept) and write its files."""
        async with self._manifest_or_problem(info, None, report, observe=False) as m:
            if m is None or m.created != refs[0].created:
                why = ("its manifest could not be read again (see above)" if m is None else
                       "its manifest changed while restore was running")
                report.problems += [Problem(r.label, why) for r in refs]
                return
            await self._write_refs(m, refs, target, report, progress)

    async def _write_refs(self, m: Manifest, refs: list[Ref], target: TargetDir | None,
                          report: RestoreReport, progress: Progress) -> None:
        """Write (or only verify) the files `refs` names of one manifest; count or report each."""
        if target is not None:
            refs = self._not_rolled_back(refs, m, report)
            if not refs:
                return
        if not m.entries:
            try:
                if target is None:
                    await self.stream_object(m, lambda _b: None, progress)
                else:
                    await self.restore_object(m, target, progress)
            except ITEM_ERRORS as e:
                report.problems.append(Problem(refs[0].label, str(e)))
                return
            report.objects_ok += 1
            report.bytes_ok += m.size
            progress.advance(0, 1)
            self._restored(refs, m, report)
            return
        wanted = {r.entry for r in refs}
        failure = ""
        splitter = PackSplitter(m, target, wanted)
        try:
            await self.stream_object(m, splitter.write, progress)
        except ITEM_ERRORS as e:
            failure = str(e)
        finally:
            splitter.abort()
        for r in refs:
            if r.entry in splitter.ok:
                report.objects_ok += 1
                report.bytes_ok += r.size
                progress.advance(0, 1)
            else:
                why = splitter.bad.get(r.entry) or failure or "not restored"
                report.problems.append(Problem(r.label, why))
        if target is not None:
            self._restored([r for r in refs if r.entry in splitter.ok], m, report)

    def _not_rolled_back(self, refs: list[Ref], m: Manifest, report: RestoreReport) -> list[Ref]:
        """The files the restore journal lets `m` write: not one restored before from a newer
        version (`RestoreJournal.refuse`); the others are problems."""
        if self._journal is None:
            return refs
        keep: list[Ref] = []
        for r in refs:
            why = self._journal.refuse("/".join(r.dest), m)
            if why:
                report.problems.append(Problem(r.label, why))
            else:
                keep.append(r)
        return keep

    def _restored(self, refs: list[Ref], m: Manifest, report: RestoreReport) -> None:
        """Remember in the restore journal which version each file was written from."""
        journal = self._journal
        if journal is None:
            return
        for r in refs:
            unrecorded = journal.record("/".join(r.dest), m)
            if unrecorded:
                report.problems.append(Problem(r.label, unrecorded))


def restore_path(target: Path, m: Manifest) -> Path:
    """Files go to <site>/<source>/<name>; MQTT batches to <site>/mqtt/<source>/<name>.

    Batch names start with the UTC receive time of their first message, so listing a folder
    in name order gives the messages of each topic in the order they arrived.
    """
    return target.joinpath(*_dest(m))


def _dest(m: Manifest) -> tuple[str, ...]:
    if m.kind == KIND_MQTT_BATCH:
        return (m.site, "mqtt", m.source, *safe_relative(m.name).parts)
    return (m.site, m.source, *safe_relative(m.name).parts)
