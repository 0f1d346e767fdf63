"""Property-based restore and verify (issue 14, acceptance 2).

Random sets of objects with names from a hostile alphabet, random damage to the cloud (bit
flips, truncation, deletion, garbage, oversize objects, swaps, replayed copies of manifests in
other date folders) and random symbolic links planted in the target (at folders, final and old
temp names, and at the restore journal's folder `.skyferry` or its SQLite files). Whatever
hypothesis draws, restore:

- never writes outside the target (every planted link, and what it points to, is untouched);
- never leaves a file whose bytes differ from the newest signed content for its name;
- restores every wanted file or names it, and names every manifest it could not use;
- reports failure (the CLI's non-zero exit) whenever anything was not restored, and whenever
  a manifest was deleted (the manifests are numbered and the site's tip says how many);
- restores everything and reports success when nothing was damaged, planted or in conflict.

Verify reports failure exactly when something it reads is damaged.

`SKYFERRY_PROPS_PROFILE=bench` (used by `make bench`) runs SKYFERRY_PROPS_EXAMPLES examples
(default 5000) per property instead of CI's 500.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cloud.restore_read import RestoreReport
from agent.errors import RestoreError
from agent.format import layout, tips
from agent.format.limits import MAX_SEALED_MANIFEST, sealed_max
from agent.format.manifest import KIND_FILE, KIND_MQTT_BATCH
from tests.kits import restore
from tests.kits.restore import SITE, Cloud, Keys, Published

# Fixtures shared by the restore tests (tests/kits/restore.py).
keys = restore.keys

settings.register_profile("ci", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("bench", max_examples=int(os.environ.get("SKYFERRY_PROPS_EXAMPLES",
                                                                   "5000")),
                          deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("SKYFERRY_PROPS_PROFILE", "ci"))

# Components an honest or hostile site might use. Some are refused by the name rules
# (".", "..", "", 256 bytes, restore's temp-name form), the others must come back intact.
COMPONENTS = [
    "a", "b", "x.bin", ".hidden", "..x", ".x.bin.skyferry-tmp", "a.skyferry-tmp",
    ".skyferry-tmp-" + "0a" * 16, "\u00e9", "e\u0301", "\u00e9" * 127, "a" * 255, "a" * 256,
    "ctl\x01\x1f\x7f", "new\nline", "sp ace", "back\\slash", ".", "..", "",
]
TEMP_FORM = re.compile(r"\.skyferry-tmp-[0-9a-f]{32}")
SOURCES = ["files", "mqtt", "t"]
STREAM = "5e" * 16  # the site's numbering stream
names = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3).map("/".join)
contents = st.binary(max_size=300)


def name_ok(name: str) -> bool:
    """The name rules, written out here rather than taken from the code under test."""
    parts = name.split("/")
    return all(p not in ("", ".", "..") and "\x00" not in p and len(p.encode()) <= 255
               and not TEMP_FORM.fullmatch(p) for p in parts)


@dataclass(frozen=True)
class FileSpec:
    source: str
    name: str
    data: bytes
    batch: bool = False


@dataclass(frozen=True)
class ObjSpec:
    files: tuple[FileSpec, ...]  # one: a file or batch object; more: a pack
    chunk_size: int


@dataclass(frozen=True)
class Damage:
    what: str  # "chunk" or "manifest"
    target: int  # drawn index, taken modulo the number of such objects
    op: str  # flip, truncate, delete, garbage, oversize, swap, replay (manifests: a copy)
    at: int


@st.composite
def objects(draw: st.DrawFn) -> ObjSpec:
    chunk_size = draw(st.sampled_from([64, 1 << 20]))
    if draw(st.booleans()):
        batch = draw(st.booleans())
        source = draw(st.sampled_from(SOURCES))
        return ObjSpec((FileSpec(source, draw(names), draw(contents), batch),), chunk_size)
    source = draw(st.sampled_from(SOURCES))
    pack = draw(st.lists(st.tuples(names, contents), min_size=1, max_size=4,
                         unique_by=lambda t: t[0]))
    return ObjSpec(tuple(FileSpec(source, n, d) for n, d in pack), chunk_size)


damages = st.lists(st.builds(
    Damage, st.sampled_from(["chunk", "manifest"]), st.integers(0, 99),
    st.sampled_from(["flip", "truncate", "delete", "garbage", "oversize", "swap", "replay"]),
    st.integers(0, 10**6)), max_size=3)
plants = st.lists(st.tuples(st.integers(0, 99), st.integers(0, 4), st.booleans()), max_size=3)
# Links planted in the restore journal's folder (`<to>/.skyferry/`, made beforehand by restore
# or anyone): at the folder itself, or at the journal's files.
JOURNAL_FILES = ["restored.sqlite", "restored.sqlite-wal", "restored.sqlite-shm",
                 "restored.sqlite-journal"]
journal_plants = st.lists(st.sampled_from([".skyferry", *JOURNAL_FILES]), max_size=2,
                          unique=True)


@dataclass
class World:
    """What was published, damaged and planted, and what restore may and must do with it."""

    cloud: Cloud
    target: Path
    outside: Path
    published: list[Published] = field(default_factory=list)
    specs: list[ObjSpec] = field(default_factory=list)
    damaged_manifests: set[str] = field(default_factory=set)
    deleted_manifests: set[str] = field(default_factory=set)
    damaged_chunks: set[str] = field(default_factory=set)
    replays: set[str] = field(default_factory=set)  # keys of manifests copied elsewhere
    links: dict[Path, str] = field(default_factory=dict)  # planted link -> what it points to
    journal_links: dict[Path, str] = field(default_factory=dict)  # the same, in `.skyferry`

    def publish(self, spec: ObjSpec) -> None:
        # Numbered as a site numbers them (version 2: seq 1, 2, ... in one stream).
        numbering = {"version": 2, "stream": STREAM, "seq": len(self.published) + 1}
        if len(spec.files) == 1:
            f = spec.files[0]
            p = self.cloud.publish(f.name, f.data, source=f.source, chunk_size=spec.chunk_size,
                                   kind=KIND_MQTT_BATCH if f.batch else KIND_FILE, **numbering)
        else:
            p = self.cloud.publish_pack([(f.name, f.data) for f in spec.files],
                                        source=spec.files[0].source,
                                        chunk_size=spec.chunk_size, **numbering)
        self.published.append(p)
        self.specs.append(spec)

    def chunk_keys(self) -> list[str]:
        return sorted({layout.chunk_key(SITE, c.id) for p in self.published
                       for c in p.manifest.chunks})

    def damage(self, d: Damage) -> None:
        keys = ([p.key for p in self.published] if d.what == "manifest"
                else self.chunk_keys())
        if not keys:
            return
        key = keys[d.target % len(keys)]
        path = self.cloud.root / key
        if not path.exists() or (key in self.damaged_chunks | self.damaged_manifests
                                 and d.op != "delete"):
            return  # damaged already (a second flip could undo the first)
        blob = path.read_bytes()
        if d.op == "replay":
            if d.what == "chunk":
                return
            # An older manifest put back where it never was: a later date folder than its
            # `created` allows (version 1: its own day or the next).
            parts = key.split("/")
            day = datetime(*map(int, parts[2:5])) + timedelta(days=2 + d.at % 300)
            copy = "/".join([*parts[:2], f"{day:%Y/%m/%d}", parts[5]])
            if copy not in self.replays:
                self.cloud.write(copy, blob)
                self.replays.add(copy)
            return
        if d.op == "swap":
            other = keys[(d.target + 1 + d.at) % len(keys)]
            if other == key or not (self.cloud.root / other).exists():
                return
            other_blob = (self.cloud.root / other).read_bytes()
            path.write_bytes(other_blob)
            (self.cloud.root / other).write_bytes(blob)
            self._mark(d.what, key)
            self._mark(d.what, other)
            return
        if d.op == "delete":
            path.unlink()
            if d.what == "manifest":
                self.deleted_manifests.add(key)
                self.damaged_manifests.discard(key)
                return
        elif d.op == "flip":
            pos = d.at % len(blob)
            path.write_bytes(blob[:pos] + bytes([blob[pos] ^ 1 << d.at % 8]) + blob[pos + 1:])
        elif d.op == "truncate":
            path.write_bytes(blob[:d.at % len(blob)])
        elif d.op == "garbage":
            path.write_bytes(os.urandom(d.at % 300))
        elif d.op == "oversize":
            cap = MAX_SEALED_MANIFEST if d.what == "manifest" else sealed_max(
                len(blob) - 76)
            with open(path, "r+b") as f:
                f.truncate(cap + 1)
        self._mark(d.what, key)

    def _mark(self, what: str, key: str) -> None:
        if what == "chunk":
            self.damaged_chunks.add(key)
        elif key not in self.deleted_manifests:
            self.damaged_manifests.add(key)

    def plant(self, obj: int, depth: int, to_file: bool) -> None:
        """A link at a folder, the final name or an old-style temp name of some file."""
        if not self.specs:
            return
        i = obj % len(self.specs)
        f = self.specs[i].files[obj % len(self.specs[i].files)]
        if not name_ok(f.name):
            return
        dest = dest_of(f)
        parts = dest[:min(depth + 1, len(dest))] if depth < 4 else (
            *dest[:-1], f".{dest[-1]}.skyferry-tmp")
        if len(parts[-1].encode()) > 255:
            return
        where = self.target.joinpath(*parts)
        for i in range(1, len(parts)):
            above = self.target.joinpath(*parts[:i])
            if above.is_symlink() or (above.exists() and not above.is_dir()):
                return
        if where.is_symlink() or where.exists():
            return
        where.parent.mkdir(parents=True, exist_ok=True)
        aim = self.outside / "victim" if to_file else self.outside
        where.symlink_to(aim)
        self.links[where] = str(aim)

    def plant_journal(self, name: str) -> None:
        where = self.target / ".skyferry"
        if where.is_symlink() or (name == ".skyferry" and where.exists()):
            return
        if name != ".skyferry":
            where.mkdir(mode=0o700, exist_ok=True)
            where = where / name
        aim = self.outside / "victim" if name != ".skyferry" else self.outside
        where.symlink_to(aim)
        self.journal_links[where] = str(aim)


def dest_of(f: FileSpec) -> tuple[str, ...]:
    if f.batch:
        return (SITE, "mqtt", f.source, *f.name.split("/"))
    return (SITE, f.source, *f.name.split("/"))


@dataclass(frozen=True)
class Wanted:
    file: FileSpec
    object_id: str


def wanted_files(w: World) -> list[Wanted]:
    """The newest version of every name among the manifests restore can use."""
    newest: dict[tuple[str, str, bool], Wanted] = {}
    for p, spec in zip(w.published, w.specs, strict=True):
        usable = p.key not in w.damaged_manifests | w.deleted_manifests
        if usable and all(name_ok(f.name) for f in spec.files):
            for f in spec.files:
                newest[(f.source, f.name, f.batch)] = Wanted(f, p.manifest.object_id)
    return list(newest.values())


def in_conflict(wanted: list[Wanted]) -> bool:
    dests = [dest_of(x.file) for x in wanted]
    full = set(dests)
    return len(full) < len(dests) or any(d[:i] in full for d in dests for i in range(1, len(d)))


def named(rep: RestoreReport, x: Wanted) -> bool:
    label = f"{SITE}/{x.file.source}/{x.file.name} (object {x.object_id}"
    return any(p.what.startswith(label) for p in rep.problems)


def build(keys: Keys, root: Path, objs: list[ObjSpec], dmg: list[Damage],
          links: list[tuple[int, int, bool]], journal: tuple[str, ...] = ()) -> World:
    w = World(Cloud(root / "cloud", keys), root / "target", root / "outside")
    w.outside.mkdir()
    (w.outside / "victim").write_bytes(b"outside")
    w.target.mkdir()
    for spec in objs:
        w.publish(spec)
    # The site's tip, signed after its manifests: a deleted one is a gap.
    tip = tips.Tip(SITE, STREAM, 1, w.cloud.tick(), len(w.published), (), ())
    w.cloud.write(tips.tip_key(SITE, STREAM, 1), tips.seal_tip(tip, keys.edge))
    for d in dmg:
        w.damage(d)
    for obj, depth, to_file in links:
        w.plant(obj, depth, to_file)
    for name in journal:
        w.plant_journal(name)
    return w


def check_restore(w: World, rep: RestoreReport) -> None:
    # Nothing outside the target changed; every planted link is still the same link.
    assert sorted(p.name for p in w.outside.iterdir()) == ["victim"]
    assert (w.outside / "victim").read_bytes() == b"outside"
    for link, aim in w.links.items():
        assert link.is_symlink() and os.readlink(link) == aim, link
    wanted = wanted_files(w)
    by_dest = {dest_of(x.file): x for x in wanted}
    written = {p.relative_to(w.target).parts: p for p in w.target.rglob("*")
               if p.is_file() and not p.is_symlink()
               and p.relative_to(w.target).parts[0] != ".skyferry"}  # the restore journal
    assert not [p for p in written.values() if ".skyferry-tmp-" in p.name]
    # No file holds anything but the newest signed content of its name.
    for parts, path in written.items():
        assert parts in by_dest, parts
        assert path.read_bytes() == by_dest[parts].file.data, parts
    missing = [x for x in wanted if dest_of(x.file) not in written]
    for x in missing:
        assert named(rep, x), (x, rep.problems)
    bad = w.damaged_manifests | w.replays | {
        p.key for p, s in zip(w.published, w.specs, strict=True)
        if not all(name_ok(f.name) for f in s.files) and p.key not in w.deleted_manifests}
    for key in bad:
        assert [p for p in rep.problems if p.what == key], (key, rep.problems)
    if missing or bad or w.deleted_manifests:  # a deleted manifest is a gap in the history
        assert not rep.ok
    assert rep.objects_ok == len(written)
    # SQLite may remove a link it finds at its WAL or journal name (in `.skyferry`, below the
    # target); what the link points to is untouched (checked above).
    if not (w.damaged_chunks or w.damaged_manifests or w.deleted_manifests or bad or w.links
            or w.journal_links or w.replays or in_conflict(wanted)):
        assert rep.ok and not missing, rep.problems


@PROFILE
@given(objs=st.lists(objects(), min_size=1, max_size=6), dmg=damages, links=plants,
       journal=journal_plants)
def test_restore_never_lies_and_never_escapes(keys: Keys, objs: list[ObjSpec],
                                              dmg: list[Damage],
                                              links: list[tuple[int, int, bool]],
                                              journal: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="props-"))
    try:
        w = build(keys, root, objs, dmg, links, tuple(journal))
        refused = {".skyferry", "restored.sqlite"} & {
            p.name for p in w.journal_links}  # a link at the journal: refused before anything
        if refused:
            with pytest.raises(RestoreError, match="symbolic link"):
                w.cloud.restore(w.target)
            assert [p.name for p in w.outside.iterdir()] == ["victim"]
            assert (w.outside / "victim").read_bytes() == b"outside"
            return
        check_restore(w, w.cloud.restore(w.target))
    finally:
        shutil.rmtree(root)


@PROFILE
@given(objs=st.lists(objects(), min_size=1, max_size=6), dmg=damages)
def test_verify_fails_exactly_when_something_read_is_damaged(
        keys: Keys, objs: list[ObjSpec], dmg: list[Damage]) -> None:
    root = Path(tempfile.mkdtemp(prefix="props-"))
    try:
        w = build(keys, root, objs, dmg, [])
        rep = w.cloud.restore(None)
        usable = [p for p, s in zip(w.published, w.specs, strict=True)
                  if p.key not in w.damaged_manifests | w.deleted_manifests
                  and all(name_ok(f.name) for f in s.files)]
        broken = [p for p in usable if any(layout.chunk_key(SITE, c.id) in w.damaged_chunks
                                           for c in p.manifest.chunks)]
        refused = len(w.published) - len(usable) - len(w.deleted_manifests) + len(w.replays)
        # A deleted manifest is a gap in the site's numbered history: never a clean verify.
        assert rep.ok == (not broken and not refused and not w.deleted_manifests), rep.problems
        # Files of a damaged pack that check out on their own are counted, the rest named.
        whole = sum(len(p.contents) for p in usable if p not in broken)
        assert whole <= rep.objects_ok <= sum(len(p.contents) for p in usable)
    finally:
        shutil.rmtree(root)
