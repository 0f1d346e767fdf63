"""The cloud side: list, fetch, verify, decrypt and reassemble what arrived."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TextIO

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import crypto, layout
from agent.backends import Backend, retrying
from agent.errors import (
    BackendError,
    CryptoError,
    FormatError,
    KeyFileError,
    ObjectNotFoundError,
    RestoreError,
    UnsafePathError,
)
from agent.history import History, RestoreJournal, journal_name
from agent.manifest import KIND_MQTT_BATCH, Manifest, PackEntry, check_name
from agent.pipeline import decompress
from agent.units import format_size

SiteKeys = Callable[[str], Ed25519PublicKey]
MAX_MANIFEST_BYTES = 256 << 20  # ~2 million chunk entries; anything larger is forged


@dataclass
class Problem:
    what: str  # manifest key or object id / name
    reason: str


@dataclass
class RestoreReport:
    manifests: int = 0
    objects_ok: int = 0
    bytes_ok: int = 0
    superseded: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def site_key_loader(key_dir: Path) -> SiteKeys:
    """Site public keys live beside the recipient key: <dir>/sites/<site>.pub."""
    from agent.crypto import load_verify_key

    cache: dict[str, Ed25519PublicKey] = {}

    def load(site: str) -> Ed25519PublicKey:
        if site not in cache:
            cache[site] = load_verify_key(key_dir / "sites" / f"{site}.pub")
        return cache[site]

    return load


def safe_relative(name: str) -> PurePosixPath:
    """Refuse names that could escape the restore target."""
    try:
        return check_name(name)
    except UnsafePathError as e:
        raise UnsafePathError(f"{e} (in manifest): restore only writes below its target") from None


def _safe_component(value: str, what: str) -> str:
    if not value or "/" in value or value in (".", "..") or "\x00" in value:
        raise UnsafePathError(f"unsafe {what} {value!r} in manifest")
    return value


class Progress:
    """One self-rewriting status line on a terminal; silent otherwise."""

    def __init__(self, total_objects: int, total_bytes: int, stream: TextIO = sys.stderr,
                 enabled: bool | None = None) -> None:
        self.total_objects, self.total_bytes = total_objects, total_bytes
        self.objects = self.bytes = 0
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, nbytes: int, objects: int = 0) -> None:
        self.bytes += nbytes
        self.objects += objects
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.objects == self.total_objects):
            self._last = now
            rate = self.bytes / max(1e-6, now - self._start)
            self.stream.write(
                f"\r{self.objects}/{self.total_objects} objects  "
                f"{format_size(self.bytes)}/{format_size(self.total_bytes)}  "
                f"{format_size(int(rate))}/s   ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


@dataclass(frozen=True)
class _Item:
    """One thing a user gets back: a whole object, or one file of a pack."""

    m: Manifest
    entry: PackEntry | None = None
    index: int = 0  # of the entry in its pack

    @property
    def name(self) -> str:
        return self.m.name if self.entry is None else self.entry.name

    @property
    def size(self) -> int:
        return self.m.size if self.entry is None else self.entry.size

    @property
    def label(self) -> str:
        pack = "" if self.entry is None else " in pack"
        return f"{self.m.site}/{self.m.source}/{self.name} (object {self.m.object_id}{pack})"


def _items(manifests: list[Manifest]) -> list[_Item]:
    out: list[_Item] = []
    for m in manifests:
        out += [_Item(m, e, i) for i, e in enumerate(m.entries)] if m.entries else [_Item(m)]
    return out


class _PackSplitter:
    """Cuts a pack's content stream back into its files, checking each file's own hash.

    With a target, wanted files are written to a temporary name and renamed into place only
    once whole and verified; the others (superseded by a newer version) are only checked.
    """

    def __init__(self, m: Manifest, target: Path | None, wanted: set[int]) -> None:
        self.m, self.target, self.wanted = m, target, wanted
        self.ok: list[int] = []  # entries restored (or checked), by index
        self.bad: list[tuple[int, str]] = []
        self._i = -1
        self._left = 0
        self._hash = blake3.blake3()
        self._out: BinaryIO | None = None
        self._tmp: Path | None = None
        self._next()

    def _next(self) -> None:
        """Finish the current file (if any), then open the next ones (empty ones at once)."""
        while True:
            if self._i >= 0:
                self._finish(self._i)
            self._i += 1
            if self._i >= len(self.m.entries):
                return
            e = self.m.entries[self._i]
            self._left, self._hash = e.size, blake3.blake3()
            if self.target is not None and self._i in self.wanted:
                dest = _entry_path(self.target, self.m, e)
                _check_inside(self.target, dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _check_inside(self.target, dest)
                self._tmp = dest.with_name(f".{dest.name}.skyferry-tmp")
                self._out = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish/abort
            if e.size:
                return

    def _finish(self, i: int) -> None:
        e = self.m.entries[i]
        out, tmp = self._out, self._tmp
        self._out = self._tmp = None
        if self._hash.hexdigest() != e.hash:
            if out is not None and tmp is not None:
                out.close()
                tmp.unlink(missing_ok=True)
            self.bad.append((i, "does not match its hash in the pack's manifest"))
            return
        if out is not None and tmp is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))
            os.replace(tmp, _entry_path(self.target or Path(), self.m, e))
        self.ok.append(i)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            take = view[:self._left]
            self._hash.update(take)
            if self._out is not None:
                self._out.write(take)
            self._left -= len(take)
            view = view[len(take):]
            if not self._left:
                self._next()

    def abort(self) -> None:
        if self._out is not None and self._tmp is not None:
            self._out.close()
            self._tmp.unlink(missing_ok=True)
        self._out = self._tmp = None


def _entry_path(target: Path, m: Manifest, e: PackEntry) -> Path:
    return target / m.site / m.source / safe_relative(e.name)


class Restorer:
    def __init__(self, backend: Backend, recipient: X25519PrivateKey, site_keys: SiteKeys,
                 parallel: int = 8) -> None:
        self.backend = backend
        self.recipient = recipient
        self.site_keys = site_keys
        self._fetch_slots = asyncio.Semaphore(parallel)
        self.parallel = parallel
        self.history = History()  # gaps, replays (agent/history.py); anew for each `run`

    async def sites(self) -> list[str]:
        seen: set[str] = set()
        for key in await self._keys(""):
            parts = key.split("/")
            if len(parts) >= 3 and parts[1] in ("manifests", "tips"):
                seen.add(parts[0])
        return sorted(seen)

    async def load_manifests(self, site: str, since: datetime | None,
                             report: RestoreReport) -> list[Manifest]:
        """Fetch, decrypt and verify every manifest of a site; problems go in the report."""
        keys = await self._keys(layout.manifests_prefix(site))
        first_day = await self.history.load_tips(self.backend, self.recipient,
                                                 lambda: self.site_keys(site), site)
        if since is not None:
            # From the day of the site's last tip before `since`: its history is checked from
            # there (agent/history.py); what is older than `since` is checked, not restored.
            day = min(since.astimezone(UTC).strftime("%Y/%m/%d"), first_day or "")
            keys = [k for k in keys if _key_day(k) >= day]
        out: list[Manifest] = []

        async def one(key: str) -> None:
            try:
                m = await self.load_manifest(key)
            except (CryptoError, FormatError, UnsafePathError, KeyFileError, BackendError) as e:
                report.problems.append(Problem(key, str(e)))
                self.history.unreadable(site)
                return
            replayed = self.history.observe(key, m)
            if replayed is not None:
                report.problems.append(Problem(key, replayed))
                return
            if since is None or m.created_at >= since:
                out.append(m)

        await _bounded(self.parallel, [one(k) for k in keys])
        report.manifests += len(keys)
        return out

    async def _keys(self, prefix: str) -> list[str]:
        """Every key under prefix; a listing cut half-way is started again."""

        async def listing() -> list[str]:
            return [i.key async for i in self.backend.list(prefix)]

        return await retrying(listing)

    async def load_manifest(self, key: str) -> Manifest:
        blob = await retrying(lambda: self.backend.get(key))
        header, payload = await asyncio.to_thread(crypto.open_sealed, blob, self.recipient)
        if header.kind != crypto.KIND_MANIFEST:
            raise FormatError(f"{key} holds a chunk, not a manifest")
        if header.plaintext_len > MAX_MANIFEST_BYTES:
            raise FormatError(f"{key} claims a {header.plaintext_len}-byte manifest: forged")
        signed = decompress(header.compression, payload, header.plaintext_len)
        site = layout.site_of(key)
        body = crypto.verify_manifest(signed, self.site_keys(site))
        m = Manifest.from_json(body)
        if m.site != site or m.object_id != key.rsplit("/", 1)[-1]:
            raise CryptoError(f"{key}: manifest of {m.site}/{m.object_id} was moved here")
        _safe_component(m.site, "site")
        _safe_component(m.source, "source")
        safe_relative(m.name)
        return m

    async def fetch_chunk(self, m: Manifest, index: int) -> bytes:
        ref = m.chunks[index]
        async with self._fetch_slots:
            try:
                blob = await retrying(lambda: self.backend.get(layout.chunk_key(m.site, ref.id)))
            except ObjectNotFoundError:
                raise RestoreError(f"chunk {ref.id} (#{index}) is missing from the cloud") from None
        return await asyncio.to_thread(self._open_chunk, blob, m, index)

    def _open_chunk(self, blob: bytes, m: Manifest, index: int) -> bytes:
        ref = m.chunks[index]
        try:
            header, payload = crypto.open_sealed(blob, self.recipient)
            # Check the authenticated header before decompressing, so a forged frame cannot
            # make us allocate more than the manifest says the chunk holds.
            if header.kind != crypto.KIND_CHUNK or header.plaintext_len != ref.length:
                raise FormatError("header does not match the manifest's kind and length")
            data = decompress(header.compression, payload, header.plaintext_len)
        except (CryptoError, FormatError) as e:
            raise RestoreError(f"chunk {ref.id} (#{index}): {e}") from None
        if crypto.content_hash(data) != ref.hash:
            raise RestoreError(f"chunk {ref.id} (#{index}) does not match the manifest's hash")
        return data

    async def stream_object(self, m: Manifest, sink: Callable[[bytes], object],
                            progress: Progress | None = None) -> None:
        """Fetch chunks in parallel, hand them to `sink` in order, check the whole hash."""
        whole = blake3.blake3()
        window = max(1, self.parallel)
        pending: list[asyncio.Task[bytes]] = []
        nxt = 0
        try:
            while nxt < len(m.chunks) or pending:
                while nxt < len(m.chunks) and len(pending) < window:
                    pending.append(asyncio.create_task(self.fetch_chunk(m, nxt)))
                    nxt += 1
                data = await pending.pop(0)
                whole.update(data)
                await asyncio.to_thread(sink, data)
                if progress:
                    progress.advance(len(data))
        finally:
            for t in pending:
                t.cancel()
        if whole.hexdigest() != m.hash:
            raise RestoreError("reassembled object does not match the manifest's hash")

    async def restore_object(self, m: Manifest, target: Path, progress: Progress | None) -> None:
        dest = restore_path(target, m)
        _check_inside(target, dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _check_inside(target, dest)
        tmp = dest.with_name(f".{dest.name}.skyferry-tmp")
        with open(tmp, "wb") as f:
            try:
                await self.stream_object(m, f.write, progress)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                f.close()
                tmp.unlink(missing_ok=True)
                raise
        os.utime(tmp, ns=(m.mtime_ns, m.mtime_ns))
        os.replace(tmp, dest)

    async def restore_pack(self, m: Manifest, target: Path | None, wanted: set[int],
                           progress: Progress | None) -> _PackSplitter:
        """Stream a pack once, writing its wanted files below target (or only checking)."""
        splitter = _PackSplitter(m, target, wanted)
        try:
            await self.stream_object(m, splitter.write, progress)
        finally:
            splitter.abort()
        return splitter

    async def run(self, target: Path | None, sites: list[str] | None = None,
                  since: datetime | None = None, show_progress: bool | None = None
                  ) -> RestoreReport:
        """Restore into `target`, or only verify everything when target is None.

        The report counts files and MQTT batches (the files of a pack one by one).
        """
        report = RestoreReport()
        self.history = History(since)
        journal = None if target is None else RestoreJournal(target)
        manifests: list[Manifest] = []
        for site in sites or await self.sites():
            manifests.extend(await self.load_manifests(site, since, report))
        items = _items(manifests)
        chosen = (items if target is None
                  else _newest_per_name(items, report, self.history.version_key))
        report.problems += [Problem(what, why) for what, why in self.history.finish()]
        wanted: dict[str, set[int]] = {}
        for it in chosen:
            if it.entry is not None:
                wanted.setdefault(it.m.object_id, set()).add(it.index)
        # A pack is fetched once, for all its files that are wanted.
        objects = [m for m in manifests if m.entries and m.object_id in wanted]
        objects += [it.m for it in chosen if it.entry is None]
        progress = Progress(len(chosen), sum(m.size for m in objects), enabled=show_progress)

        async def one(m: Manifest) -> None:
            if m.entries:
                await pack(m)
                return
            label = _Item(m).label
            rollback = journal and journal.refuse(journal_name(m, m.name), m)
            if rollback:
                report.problems.append(Problem(label, rollback))
                return
            try:
                if target is None:
                    await self.stream_object(m, lambda _b: None, progress)
                else:
                    await self.restore_object(m, target, progress)
            except (RestoreError, BackendError, OSError) as e:
                report.problems.append(Problem(label, str(e)))
                return
            unrecorded = journal and journal.record(journal_name(m, m.name), m)
            if unrecorded:
                report.problems.append(Problem(label, unrecorded))
            report.objects_ok += 1
            report.bytes_ok += m.size
            progress.advance(0, 1)

        async def pack(m: Manifest) -> None:
            await self._pack_files(m, target, wanted[m.object_id], progress, report, journal)

        try:
            await _bounded(4, [one(m) for m in objects])
        finally:
            if journal:
                journal.close()
        progress.close()
        return report

    async def _pack_files(self, m: Manifest, target: Path | None, mine: set[int],
                          progress: Progress, report: RestoreReport,
                          journal: RestoreJournal | None) -> None:
        """Restore (or check) the wanted files of one pack; each problem named per file."""
        refused = _refused_entries(journal, m, mine)  # older than what was restored before
        mine -= set(refused)
        report.problems += [Problem(_Item(m, m.entries[i], i).label, why)
                            for i, why in refused.items()]
        splitter: _PackSplitter | None = None
        try:
            splitter = await self.restore_pack(m, target, mine, progress)
        except (RestoreError, BackendError, OSError) as e:
            report.problems.append(Problem(
                f"{m.site}/{m.source} pack {m.object_id} ({len(m.entries)} files)", str(e)))
        if splitter is None:
            return
        for i, why in splitter.bad:
            report.problems.append(Problem(_Item(m, m.entries[i], i).label, why))
        done = [i for i in splitter.ok if i in mine]
        if journal is not None:  # each file restored is remembered (`RestoreJournal`)
            for i in done:
                unrecorded = journal.record(journal_name(m, m.entries[i].name), m)
                if unrecorded:
                    report.problems.append(Problem(_Item(m, m.entries[i], i).label, unrecorded))
        report.objects_ok += len(done)
        report.bytes_ok += sum(m.entries[i].size for i in done)
        progress.advance(0, len(done))


def restore_path(target: Path, m: Manifest) -> Path:
    """Files go to <site>/<source>/<name>; MQTT batches to <site>/mqtt/<source>/<name>.

    Batch names start with the UTC receive time of their first message, so listing a folder
    in name order gives the messages of each topic in the order they arrived.
    """
    if m.kind == KIND_MQTT_BATCH:
        return target / m.site / "mqtt" / m.source / safe_relative(m.name)
    return target / m.site / m.source / safe_relative(m.name)


def _newest_per_name(items: list[_Item], report: RestoreReport,
                     version: Callable[[Manifest], tuple[int, str, str, int, str]]
                     ) -> list[_Item]:
    """A name dropped again is a new version: the newest (by seq, `History.version_key`)
    wins, older ones are counted."""
    newest: dict[tuple[str, str, str, bool], _Item] = {}
    for it in sorted(items, key=lambda it: version(it.m)):
        k = (it.m.site, it.m.source, it.name, it.m.kind == KIND_MQTT_BATCH)
        if k in newest:
            report.superseded += 1
        newest[k] = it
    return list(newest.values())


def _refused_entries(journal: RestoreJournal | None, m: Manifest,
                     wanted: set[int]) -> dict[int, str]:
    """Entries of a pack the restore journal refuses (`RestoreJournal.refuse`), with why."""
    out: dict[int, str] = {}
    if journal is None:
        return out
    for i in sorted(wanted):
        why = journal.refuse(journal_name(m, m.entries[i].name), m)
        if why:
            out[i] = why
    return out


def _check_inside(target: Path, dest: Path) -> None:
    """No symlink along the way may lead outside the target."""
    real_target = os.path.realpath(target)
    real_parent = os.path.realpath(dest.parent)
    if os.path.commonpath([real_target, real_parent]) != real_target or dest.is_symlink():
        raise UnsafePathError(f"{dest} would be written outside {target} (through a link)")


def _key_day(key: str) -> str:
    parts = key.split("/")
    return "/".join(parts[2:5]) if len(parts) >= 6 else ""


async def _bounded(limit: int, coros: list[object]) -> None:
    sem = asyncio.Semaphore(limit)

    async def run(c: object) -> None:
        async with sem:
            await c  # type: ignore[misc]

    async with asyncio.TaskGroup() as tg:
        for c in coros:
            tg.create_task(run(c))
