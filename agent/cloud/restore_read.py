"""Reading what arrived in the cloud: list a site's manifests, fetch, decrypt and check them and
the chunks they name, within the memory budgets of agent/cloud/restore_io.py.

`Restorer` (agent/cloud/restore.py) builds on this to verify or write the objects.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backends.protocol import Backend, ObjectInfo
from agent.backends.retry import retrying
from agent.cloud import restore_io
from agent.cloud.history import History
from agent.cloud.restore_io import settled, workers
from agent.cloud.restore_progress import Progress
from agent.errors import (
    BackendError,
    FormatError,
    ObjectNotFoundError,
    RestoreError,
    SkyferryError,
    UnsafePathError,
)
from agent.format import crypto, layout, limits
from agent.format.manifest import ChunkRef, Manifest, check_name

SiteKeys = Callable[[str], Ed25519PublicKey]
# What a bad object, manifest or file can raise: reported per item, never a traceback.
ITEM_ERRORS = (SkyferryError, OSError)
# What a signed manifest from a compromised site can still make the JSON parser raise (nesting
# deeper than the interpreter's recursion limit, numbers beyond float range).
DECODE_ERRORS = (*ITEM_ERRORS, ValueError, TypeError, RecursionError, OverflowError)


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


class CloudReader:
    """A site's manifests and the chunks they name, fetched and checked within budgets."""

    def __init__(self, backend: Backend, recipient: X25519PrivateKey, site_keys: SiteKeys,
                 parallel: int = 8) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, not {parallel}")
        self.backend = backend
        self.recipient = recipient
        self.site_keys = site_keys
        self.parallel = parallel
        self._fetch_slots = asyncio.Semaphore(parallel)
        self._chunk_budget = restore_io.Budget(restore_io.CHUNK_BUDGET)
        self._manifest_budget = restore_io.Budget(restore_io.MANIFEST_BUDGET)
        self._blob_budget = restore_io.Budget(restore_io.SEALED_MANIFEST_BUDGET)
        self.history = History()  # gaps, replays (agent/cloud/history.py); anew for each `run`

    async def sites(self) -> list[str]:
        """Sites with manifests; the listing is scanned, not kept (it holds every chunk)."""

        async def scan() -> set[str]:
            seen: set[str] = set()
            async for info in self.backend.list(""):
                parts = info.key.split("/", 2)
                if len(parts) == 3 and parts[1] in ("manifests", "tips"):
                    seen.add(parts[0])
            return seen

        return sorted(await retrying(scan))

    async def _listing(self, prefix: str) -> list[ObjectInfo]:
        """Every object under prefix; a listing cut half-way is started again."""

        async def listing() -> list[ObjectInfo]:
            return [i async for i in self.backend.list(prefix)]

        return await retrying(listing)

    async def manifest_keys(self, site: str, since: datetime | None,
                            report: RestoreReport) -> list[ObjectInfo]:
        """The manifests of a site (by date folder from `since` on); none at all is a problem."""
        prefix = layout.manifests_prefix(site)
        infos = await self._listing(prefix)
        if not infos:
            report.problems.append(Problem(site, (
                f"no manifests under {prefix} in {self.backend.url}: check the site id "
                "(--site) and the backend URL and its prefix")))
        first_day = await self.history.load_tips(self.backend, self.recipient,
                                                 lambda: self.site_keys(site), site)
        if since is not None:
            # From the day of the site's last tip before `since`: its history is checked from
            # there (agent/cloud/history.py); what is older than `since` is checked, not restored.
            day = min(since.astimezone(UTC).strftime("%Y/%m/%d"), first_day or "")
            infos = [i for i in infos if _key_day(i.key) >= day]
        report.manifests += len(infos)
        return infos

    async def load_manifests(self, site: str, since: datetime | None,
                             report: RestoreReport) -> list[Manifest]:
        """Every valid manifest of a site, all held at once (for tools that want them; `run`
        holds one at a time); problems go in the report."""
        out: list[Manifest] = []

        async def one(info: ObjectInfo) -> None:
            async with self._manifest_or_problem(info, since, report) as m:
                if m is not None:
                    out.append(m)

        await workers(self.parallel, await self.manifest_keys(site, since, report), one)
        return out

    async def load_manifest(self, key: str, size: int | None = None) -> Manifest:
        """Fetch, decrypt, check the signature of and parse one manifest."""
        return self._decode_manifest(key, await self._manifest_blob(key, size))

    async def _manifest_blob(self, key: str, size: int | None) -> bytes:
        """The sealed manifest, refused unread when larger than the cap or than listed."""
        cap = limits.MAX_SEALED_MANIFEST
        if size is not None and size > cap:
            raise FormatError(f"{key} is {size} bytes, more than a manifest can be ({cap}): "
                              "not read")
        return await retrying(lambda: self.backend.get(key, max_size=size or cap))

    async def _load_counted(self, info: ObjectInfo) -> tuple[Manifest, int]:
        """A manifest and the share of the manifest budget it holds (give it back when done).

        Its sealed bytes are counted against a budget of their own while they are fetched and
        until they are parsed: a worker holding them waits for manifest budget, and one
        holding manifest budget never waits for them, so neither can wait for the other.
        """
        held = await self._blob_budget.take(info.size or limits.MAX_SEALED_MANIFEST)
        try:
            blob = await self._manifest_blob(info.key, info.size or None)
            cost = await self._manifest_budget.take(restore_io.manifest_cost(
                crypto.parse_header(blob).plaintext_len))
            try:
                return await asyncio.to_thread(self._decode_manifest, info.key, blob), cost
            except BaseException:
                self._manifest_budget.give(cost)
                raise
        finally:
            self._blob_budget.give(held)

    def _decode_manifest(self, key: str, blob: bytes) -> Manifest:
        signed = restore_io.open_manifest(blob, self.recipient)
        site = layout.site_of(key)
        body = crypto.verify_manifest(signed, self.site_keys(site))
        del signed
        restore_io.check_manifest_body(body)
        m = Manifest.from_json(body)
        if m.site != site or m.object_id != key.rsplit("/", 1)[-1]:
            raise FormatError(f"{key}: manifest of {m.site}/{m.object_id} was moved here")
        _safe_component(m.site, "site")
        _safe_component(m.source, "source")
        safe_relative(m.name)
        _created_at(m)
        for i, ref in enumerate(m.chunks):
            if ref.length > limits.MAX_CHUNK_PLAINTEXT:
                raise FormatError(
                    f"{m.site}/{m.source}/{m.name}: chunk #{i} declares {ref.length} bytes, "
                    f"more than the format's maximum chunk of {limits.MAX_CHUNK_PLAINTEXT}")
        return m

    @asynccontextmanager
    async def _manifest_or_problem(self, info: ObjectInfo, since: datetime | None,
                                   report: RestoreReport, observe: bool = True
                                   ) -> AsyncIterator[Manifest | None]:
        """The manifest under info.key, counted against the manifest budget while it is held;
        None (and a problem in the report) when it cannot be used, or is older than since.
        Each manifest is `observe`d once per run for the site's history (agent/cloud/history.py)."""
        cost = 0
        m: Manifest | None = None
        try:
            m, cost = await self._load_counted(info)
        except DECODE_ERRORS as e:
            report.problems.append(Problem(info.key, str(e)))
            if observe:
                self.history.unreadable(layout.site_of(info.key), info.key)
        replayed = None if m is None or not observe else self.history.observe(info.key, m)
        if replayed is not None:
            report.problems.append(Problem(info.key, replayed))
            m = None
        try:
            yield m if m is None or since is None or _created_at(m) >= since else None
        finally:
            self._manifest_budget.give(cost)

    async def fetch_chunk(self, m: Manifest, index: int) -> bytes | bytearray:
        ref = m.chunks[index]
        key = layout.chunk_key(m.site, ref.id)
        async with self._fetch_slots:
            try:
                try:
                    blob = await retrying(lambda: self.backend.get_buffer(
                        key, max_size=limits.sealed_max(ref.length)))
                except ObjectNotFoundError:
                    blob = await self._chunk_copy(m.site, ref)
            except ObjectNotFoundError:
                raise RestoreError(f"chunk {ref.id} (#{index}) is missing from the cloud") from None
            except BackendError as e:
                raise RestoreError(f"chunk {ref.id} (#{index}): {e}") from None
        return await asyncio.to_thread(self._open_chunk, blob, m, index)

    async def _chunk_copy(self, site: str, ref: ChunkRef) -> memoryview:
        """The newest copy a site sent again under its dedup horizon (docs/FORMAT.md,
        "Retention"), when the chunk's own key is gone; its hash is checked like the chunk's."""
        copies = await self._listing(layout.chunk_copies_prefix(site, ref.id))
        for info in sorted(copies, key=lambda i: i.key, reverse=True):
            try:
                return await retrying(lambda: self.backend.get_buffer(
                    info.key, max_size=limits.sealed_max(ref.length)))  # noqa: B023 (awaited at once)
            except ObjectNotFoundError:
                continue
        raise ObjectNotFoundError(f"no copy of chunk {ref.id}")

    def _open_chunk(self, blob: memoryview, m: Manifest, index: int) -> bytes | bytearray:
        ref = m.chunks[index]
        try:
            return restore_io.open_chunk(blob, self.recipient, ref)
        except SkyferryError as e:
            raise RestoreError(f"chunk {ref.id} (#{index}): {e}") from None

    async def stream_object(self, m: Manifest, sink: Callable[[bytes | bytearray], object],
                            progress: Progress | None = None) -> None:
        """Fetch chunks in parallel, hand them to `sink` in order, check the whole hash.

        Each chunk in flight holds its share of the chunk budget until `sink` has taken it;
        a new chunk waits for budget only when none of this object's is in flight, so objects
        streaming at the same time never wait on each other for good.
        """
        whole = blake3.blake3()
        budget = self._chunk_budget
        pending: deque[tuple[asyncio.Task[bytes | bytearray], int]] = deque()
        nxt = 0
        try:
            while nxt < len(m.chunks) or pending:
                while nxt < len(m.chunks) and len(pending) < self.parallel:
                    cost = restore_io.chunk_cost(m.chunks[nxt].length)
                    got = budget.try_take(cost) if pending else await budget.take(cost)
                    if got is None:
                        break
                    pending.append((asyncio.create_task(self.fetch_chunk(m, nxt)), got))
                    nxt += 1
                data = await pending[0][0]
                got = pending.popleft()[1]
                try:
                    whole.update(data)
                    await settled(sink, data)
                    if progress:
                        progress.advance(len(data))
                    del data
                finally:
                    budget.give(got)
        finally:
            for task, got in pending:
                task.cancel()
                budget.give(got)
        if whole.hexdigest() != m.hash:
            raise RestoreError("reassembled object does not match the manifest's hash")


def _created_at(m: Manifest) -> datetime:
    try:
        t = datetime.fromisoformat(m.created)
    except ValueError:
        raise FormatError(f"manifest {m.object_id}: created {m.created!r} is not an ISO-8601 "
                          "time") from None
    if t.tzinfo is None:
        raise FormatError(f"manifest {m.object_id}: created {m.created!r} has no time zone "
                          "(the format writes UTC with an offset)")
    try:  # the history's date-folder rule takes its UTC day and the day after
        (t.astimezone(UTC) + timedelta(days=1)).astimezone(UTC)
    except OverflowError:
        raise FormatError(f"manifest {m.object_id}: created {m.created!r} is at the end of "
                          "the calendar (no UTC date folder, or none after it)") from None
    return t


def _key_day(key: str) -> str:
    parts = key.split("/")
    return "/".join(parts[2:5]) if len(parts) >= 6 else ""
