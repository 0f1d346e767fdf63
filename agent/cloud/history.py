"""The cloud side's check of each site's history (docs/FORMAT.md, "History checks").

Version 2 manifests are numbered: `seq` 1, 2, 3, ... within a `stream` (agent/store/seqbook.py), and
the site's tips (agent/format/tips.py) say how far the numbering went and which seqs are still
queued
at the site or void. From these, `verify` and `restore` name what the bucket lost or had put
back: gaps (`camp-alpha: manifests 1041–1043 missing`), replays (one seq on two manifests, a
manifest in a date folder its `created` does not match) and rollbacks (an older version than
one a previous restore wrote, `RestoreJournal`).

Memory: 8 bytes per numbered manifest seen, plus one tip per stream (its ranges 16 bytes
each, at most MAX_RANGES_HELD in all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import itertools
import os
import sqlite3
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backends.protocol import Backend
from agent.backends.retry import retrying
from agent.errors import BackendError, CryptoError, FormatError, KeyFileError, RestoreError
from agent.format.manifest import KIND_MQTT_BATCH, Manifest
from agent.format.tips import MAX_TIP_BYTES, Tip, open_tip, parse_tip_key, tips_prefix

Finding = tuple[str, str]  # (what, why): a problem line of the report
MAX_GAP_LINES = 100  # per stream, gaps (and repeated seqs) named one by one; then a sum
MAX_RANGES_HELD = 4_000_000  # queued and void ranges of all tips kept at once: 64 MB


class Version(Protocol):
    """What orders versions of a name: a Manifest, or restore's index entry of one."""

    @property
    def site(self) -> str: ...
    @property
    def stream(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def created(self) -> str: ...
    @property
    def object_id(self) -> str: ...


JOURNAL_DIR = ".skyferry"  # in the restore target; no site id can have this name
JOURNAL_FILE = "restored.sqlite"
_COLUMNS = ("path", "stream", "seq", "created", "object_id")
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def key_day(key: str) -> str:
    """`YYYY/MM/DD` of `<site>/manifests/YYYY/MM/DD/<id>`, "" for any other key."""
    parts = key.split("/")
    return "/".join(parts[2:5]) if len(parts) == 6 and parts[1] == "manifests" else ""


def utc_day(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y/%m/%d")


def _created(m: Manifest) -> datetime | None:
    try:
        when = m.created_at
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _span(first: int, last: int) -> str:
    return f"manifest {first}" if first == last else f"manifests {first}–{last}"


@dataclass
class _Stream:
    site: str
    stream: str
    seqs: array[int] = field(default_factory=lambda: array("q"))
    first_created: str = ""  # of its oldest manifest seen: orders streams (`version_key`)
    tip: Tip | None = None  # the newest tip that opened, its ranges in `covered`
    base: int = 0  # with --since: seqs up to here are before the range checked
    # The tip's queued and void ranges, merged, as first, last, first, last, ...: 16 bytes a
    # range, where a tuple of tuples costs about 100 (a signed tip may hold 500,000 ranges).
    covered: array[int] = field(default_factory=lambda: array("q"))

    def keep(self, tip: Tip) -> None:
        for first, last in heapq.merge(tip.queued, tip.void):
            self.covered.extend((first, last))
        self.tip = dataclasses.replace(tip, queued=(), void=())


class History:
    """Collects what `verify`/`restore` saw of each site's numbered history."""

    def __init__(self, since: datetime | None = None) -> None:
        self.since = since
        self._streams: dict[tuple[str, str], _Stream] = {}
        self.findings: list[Finding] = []
        self._unreadable: dict[str, int] = {}
        self._key_errors: dict[str, Finding] = {}  # per site: its public key did not load
        self._ranges_held = 0  # in the tips kept (`_Stream.covered`)
        self._unreadable_keys: set[str] = set()
        self._masked: dict[str, str] = {}  # site -> its gaps, when its unreadable ones may be them

    def _stream(self, site: str, stream: str) -> _Stream:
        s = self._streams.get((site, stream))
        if s is None:
            s = self._streams[(site, stream)] = _Stream(site, stream)
        return s

    def observe(self, key: str, m: Manifest) -> str | None:
        """Record a manifest that opened; returns why it must not be used (a replay), if so.

        Its key's date folder must be the UTC day of its `created` (version 1: that day or the
        next, as version 1 sites dated folders by their commit time).
        """
        created = _created(m)
        if created is None:
            return f"manifest 'created' {m.created!r} is not an ISO-8601 time with a zone"
        day, folder = utc_day(created), key_day(key)
        allowed = {day} if m.version >= 2 else {day, utc_day(created + timedelta(days=1))}
        if folder not in allowed:
            return (f"replayed or moved: the manifest was created {m.created} but sits in date "
                    f"folder {folder or '(none)'}; not used")
        if m.version >= 2:
            s = self._stream(m.site, m.stream)
            s.seqs.append(m.seq)
            if not s.first_created or m.created < s.first_created:
                s.first_created = m.created
        return None

    def version_key(self, m: Version) -> tuple[int, str, str, int, str]:
        """Orders versions of one name: by seq within a stream, streams by their first
        manifest, version 1 (no seq) by `created` and before any version 2."""
        if not m.seq:
            return (0, m.created, "", 0, m.object_id)
        s = self._streams.get((m.site, m.stream))
        return (1, s.first_created if s else m.created, m.stream, m.seq, m.object_id)

    def ref_order(self, r: Version) -> tuple[tuple[int, str, str, int, str], int]:
        """`version_key` of one file of a manifest (a pack's files by their place in it)."""
        return self.version_key(r), getattr(r, "entry", -1)

    async def load_tips(self, backend: Backend, recipient: X25519PrivateKey,
                        site_key: Callable[[], Ed25519PublicKey], site: str) -> str | None:
        """Read the site's newest tip of each stream (and, with `since`, the tip before it).

        Returns the first date folder to read with `since` so the history above that tip can
        be checked ("" for all of them), or None without `since`.
        """
        listed: dict[str, list[tuple[int, str]]] = {}
        keys = await retrying(lambda: _listing(backend, tips_prefix(site)))
        for key in keys:
            where = parse_tip_key(key)
            if where is None or where[0] != site:
                self.findings.append((key, "not a tip key (<site>/tips/<stream>/<number>)"))
                continue
            listed.setdefault(where[1], []).append((where[2], key))
        first_day = None if self.since is None else utc_day(self.since)
        for stream, tips in listed.items():
            tips.sort()
            self._tip_gaps(site, stream, [n for n, _ in tips])
            s = self._stream(site, stream)
            newest = len(tips) - 1
            while newest >= 0 and s.tip is None:
                tip = await self._open(backend, recipient, site_key, tips[newest][1])
                if tip is not None and self._held(tips[newest][1], tip):
                    s.keep(tip)
                del tip
                newest -= 1
            if self.since is not None and s.tip is not None:
                day = await self._since_base(backend, recipient, site_key, s, tips[:newest + 2])
                assert first_day is not None
                first_day = min(first_day, day)  # "" (every folder) sorts first
        return first_day

    def _held(self, key: str, tip: Tip) -> bool:
        """Whether the ranges of one more stream's tip fit in the memory kept for tips."""
        self._ranges_held += len(tip.queued) + len(tip.void)
        if self._ranges_held <= MAX_RANGES_HELD:
            return True
        self.findings.append((key, f"not used: the tips of {len(self._streams)} streams hold "
                              f"more than {MAX_RANGES_HELD} ranges in all (a site has a few "
                              "streams of at most 200,000 each); this stream's gaps are not "
                              "checked"))
        return False

    def _tip_gaps(self, site: str, stream: str, numbers: list[int]) -> None:
        """Tip numbers are 1, 2, 3, ...: a missing one was deleted from the bucket."""
        expect = 1
        for n in numbers:
            if n > expect:
                self.findings.append((f"{site} stream {stream[:8]}", f"tips {expect}–{n - 1} "
                                      "missing: deleted from the bucket"))
            expect = n + 1

    async def _since_base(self, backend: Backend, recipient: X25519PrivateKey,
                          site_key: Callable[[], Ed25519PublicKey], s: _Stream,
                          tips: list[tuple[int, str]]) -> str:
        """Find (by bisection over tip numbers) the newest tip created before `since`: seqs up
        to its `highest` are before the range. Returns its day folder ("" if none)."""
        assert self.since is not None and s.tip is not None
        newest = _created_of(s.tip)
        if newest is not None and newest < self.since:
            s.base = s.tip.highest  # nothing of this stream is in the range
            return utc_day(self.since)
        lo, hi, found = 0, len(tips) - 1, None
        while lo < hi:  # the answer is in tips[:hi]; a tip that does not open counts as late
            mid = (lo + hi) // 2
            tip = await self._open(backend, recipient, site_key, tips[mid][1])
            when = None if tip is None else _created_of(tip)
            if tip is not None and when is not None and when < self.since:
                found, lo = tip, mid + 1
            else:
                hi = mid
        if found is None:
            return ""
        s.base = found.highest
        return utc_day(_created_of(found) or self.since)

    async def _open(self, backend: Backend, recipient: X25519PrivateKey,
                    site_key: Callable[[], Ed25519PublicKey], key: str) -> Tip | None:
        try:
            # Refused unread beyond the cap: a bucket can hold anything at a tip key.
            blob = await retrying(lambda: backend.get(key, max_size=MAX_TIP_BYTES))
            return open_tip(key, blob, recipient, site_key())
        except KeyFileError as e:  # said by each of the site's manifests too (`finish`)
            self._key_errors.setdefault(key.split("/", 1)[0], (key, str(e)))
        except (CryptoError, FormatError, BackendError) as e:
            self.findings.append((key, str(e)))
        return None

    def unreadable(self, site: str, key: str = "") -> None:
        """A manifest key of `site` that did not open (already a problem of its own)."""
        self._unreadable[site] = self._unreadable.get(site, 0) + 1
        if key:
            self._unreadable_keys.add(key)

    def note(self, key: str) -> str:
        """What to add to the problem of an unreadable manifest `key` once `finish` ran: the
        gaps of its site it may account for (they are not named on lines of their own)."""
        if key not in self._unreadable_keys:
            return ""
        return self._masked.get(key.split("/", 1)[0], "")

    def finish(self) -> list[Finding]:
        """Every finding: gaps and repeated seqs per stream, after all manifests were seen.

        Seqs whose manifest may be one of the site's manifests that did not open are not named
        on lines of their own: while a site's missing seqs are no more than its unreadable
        manifests, those (each a problem already) may be them, and each such problem names
        them (`note`): garbage planted beside a deletion never hides it. One more, and every
        gap is named on its own line.
        """
        out = list(self.findings)
        out += [f for site, f in self._key_errors.items() if not self._unreadable.get(site)]
        gaps: dict[str, list[Finding]] = {}
        missing: dict[str, int] = {}
        for s in self._streams.values():
            out += _repeats(s)
            if s.tip is None:
                continue
            what = f"{s.site}: stream {s.stream[:8]}"
            lines = gaps.setdefault(s.site, [])
            ranges = seqs = 0
            for a, b in _missing(s):
                ranges, seqs = ranges + 1, seqs + b - a + 1
                if ranges <= MAX_GAP_LINES:  # a signed tip can claim a gap at every other seq
                    lines.append((what, f"{_span(a, b)} missing (the site's tip {s.tip.n} "
                                        "says they were uploaded)"))
            if ranges > MAX_GAP_LINES:
                lines.append((what, f"{ranges} gaps, {seqs} manifests missing in all (the "
                                    f"first {MAX_GAP_LINES} gaps are named)"))
            missing[s.site] = missing.get(s.site, 0) + seqs
        for site, site_lines in gaps.items():
            if missing[site] > self._unreadable.get(site, 0):
                out += site_lines
            elif site_lines:
                said = "; ".join(f"{what}: {why}" for what, why in site_lines[:3])
                more = f" and {len(site_lines) - 3} more gaps" if len(site_lines) > 3 else ""
                self._masked[site] = (f"; the site's history misses {missing[site]} "
                                      f"manifest(s), which may be this one or another that "
                                      f"did not open: {said}{more}")
        return out


def _created_of(tip: Tip) -> datetime | None:
    try:
        when = datetime.fromisoformat(tip.created)
        when.astimezone(UTC)  # its date folder (`utc_day`) must exist
    except (ValueError, OverflowError):
        return None
    return when if when.tzinfo is not None else None


async def _listing(backend: Backend, prefix: str) -> list[str]:
    return [i.key async for i in backend.list(prefix)]


def _repeats(s: _Stream) -> Iterator[Finding]:
    seqs = sorted(s.seqs)
    what, named = f"{s.site}: stream {s.stream[:8]}", 0
    for a, b in itertools.pairwise(seqs):
        if a == b:
            named += 1
            if named <= MAX_GAP_LINES:
                yield (what, f"manifest seq {a} appears more than once: replayed or forged")
    if named > MAX_GAP_LINES:
        yield (what, f"{named} repeated seqs in all (the first {MAX_GAP_LINES} are named)")


def _runs(seqs: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs of ascending seqs, as (first, last)."""
    run: list[int] = []
    for q in seqs:
        if run and q <= run[1] + 1:
            run[1] = max(run[1], q)
            continue
        if run:
            yield run[0], run[1]
        run = [q, q]
    if run:
        yield run[0], run[1]


def _missing(s: _Stream) -> Iterator[tuple[int, int]]:
    """Seqs in (base, tip.highest] neither seen, queued at the site, nor void, as ranges."""
    assert s.tip is not None
    tip_ranges = zip(s.covered[::2], s.covered[1::2], strict=True)
    covered = heapq.merge(_runs(sorted(s.seqs)), tip_ranges)
    at = s.base + 1  # the first seq not yet known to be accounted for
    for first, last in covered:
        if at > s.tip.highest:
            return
        if first > at:
            yield at, min(first - 1, s.tip.highest)
        at = max(at, last + 1)
    if at <= s.tip.highest:
        yield at, s.tip.highest


def journal_name(m: Manifest, name: str) -> str:
    """A restored file's path below the target, as `restore_path` lays it out."""
    if m.kind == KIND_MQTT_BATCH:
        return f"{m.site}/mqtt/{m.source}/{name}"
    return f"{m.site}/{m.source}/{name}"


class RestoreJournal:
    """`<to>/.skyferry/restored.sqlite`: which version each restored file was written from.

    A later restore into the same folder never replaces a file with an older version than the
    one written there before (a rollback: the newer manifest was deleted or hidden since); it
    names the file as a problem instead. Made with the first file restored: a restore that
    writes nothing leaves nothing.

    Anyone who can write the target can swap `.skyferry` for a link at any moment, so the
    folder is opened through the target's descriptor (`dir_fd`, restore_fs.TargetDir) with
    O_NOFOLLOW each time the journal is opened, and SQLite is given it as
    /proc/self/fd/<folder>: SQLite opens the journal and its WAL files (themselves with
    O_NOFOLLOW) at once, by the path the kernel gives for that checked folder.
    """

    def __init__(self, target: Path, dir_fd: int | None = None) -> None:
        self.path = target / JOURNAL_DIR / JOURNAL_FILE
        self._dir_fd = dir_fd
        self._db: sqlite3.Connection | None = None
        for p in (self.path.parent, self.path):
            if p.is_symlink():
                raise RestoreError(f"{p} is a symbolic link; the restore journal is not written "
                                   "through links: remove it")
        if self.path.exists():
            self._open()

    def _folder(self) -> int:
        """A descriptor of `.skyferry`, created if missing, never reached through a link."""
        if self._dir_fd is None:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            return os.open(self.path.parent, _FOLDER_FLAGS)
        with contextlib.suppress(FileExistsError):
            os.mkdir(JOURNAL_DIR, 0o700, dir_fd=self._dir_fd)
        try:
            return os.open(JOURNAL_DIR, _FOLDER_FLAGS, dir_fd=self._dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(self.path.parent):
                raise RestoreError(f"{self.path.parent} is a symbolic link; the restore journal "
                                   "is not written through links: remove it") from None
            raise

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            folder = self._folder()
            try:
                st = os.fstat(folder)
                if st.st_mode & 0o022 or st.st_uid not in (os.geteuid(), 0):
                    raise RestoreError(
                        f"{self.path.parent} is writable by other users or owned by another "
                        f"user (uid {st.st_uid}, mode {st.st_mode & 0o777:o}), who could swap "
                        "the restore journal: remove it, or make it yours with mode 700")
                os.close(os.open(JOURNAL_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=folder))
                where = (f"/proc/self/fd/{folder}" if os.path.isdir("/proc/self/fd")
                         else str(self.path.parent))
                db = sqlite3.connect(f"{where}/{JOURNAL_FILE}", isolation_level=None)
                try:
                    # One small write per restored file: WAL without an fsync per file (a crash
                    # may lose the last records, so a file restored just then is not protected
                    # by them).
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.execute("CREATE TABLE IF NOT EXISTS restored (path TEXT PRIMARY KEY, "
                               "stream TEXT NOT NULL, seq INTEGER NOT NULL, created TEXT NOT "
                               "NULL, object_id TEXT NOT NULL) WITHOUT ROWID")
                    columns = [r[1] for r in db.execute("PRAGMA table_info(restored)")]
                    if columns != list(_COLUMNS):
                        raise RestoreError(f"its table 'restored' has the columns {columns}, "
                                           f"not {list(_COLUMNS)}")
                except BaseException:
                    db.close()
                    raise
            finally:
                os.close(folder)
        except (OSError, sqlite3.Error, RestoreError) as e:
            raise RestoreError(f"cannot open the restore journal {self.path}: {e}; restore "
                               "keeps it so as never to roll a file back: make the target "
                               "writable, or move a damaged journal away (it then forgets what "
                               "was restored)") from None
        self._db = db
        return db

    def refuse(self, path: str, m: Manifest) -> str | None:
        """Why `m` must not be written at `path` (an older version than the one there), or
        None."""
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT stream, seq, created, object_id FROM restored "
                                   "WHERE path=?", (path,)).fetchone()
        except sqlite3.Error as e:
            return f"not restored: the restore journal {self.path} cannot be read ({e})"
        if row is None:
            return None
        if [type(v) for v in row] != [str, int, str, str]:
            return (f"not restored: the restore journal {self.path} holds a damaged record "
                    f"of this file ({row!r}): move the journal away to restore it anyway")
        stream, seq, created, object_id = row
        if m.version >= 2 and stream == m.stream:
            older = m.seq < seq
        else:
            older = (m.created, m.object_id) < (created, object_id)
        if not older:
            return None
        was = f"seq {seq}" if seq else f"created {created}"
        now = f"seq {m.seq}" if m.version >= 2 else f"created {m.created}"
        return (f"rollback: the newest version in the cloud ({now}, object {m.object_id}) is "
                f"older than the one restored here before ({was}, object {object_id}); the "
                "file is left as it is")

    def record(self, path: str, m: Manifest) -> str | None:
        """Remember that `path` now holds `m`'s version; returns why it could not, if so."""
        try:
            self._open().execute("INSERT OR REPLACE INTO restored VALUES (?, ?, ?, ?, ?)",
                                 (path, m.stream, m.seq, m.created, m.object_id))
        except (RestoreError, sqlite3.Error) as e:
            return f"restored, but not recorded in the restore journal: {e}"
        return None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
