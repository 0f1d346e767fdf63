"""Which files a restore writes: a compact index of every manifest's names, the newest version
of each name, and names that cannot all be written (a file where another needs a folder)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from agent.format.manifest import KIND_MQTT_BATCH, Manifest


class Ref(NamedTuple):
    """One file (or MQTT batch) a user gets back, as the index keeps it: no manifest held."""

    site: str
    source: str
    kind: str
    name: str
    created: str
    object_id: str
    key: str  # the manifest's cloud key, to load it again when restoring
    entry: int  # index of the entry in its pack; -1: the whole object
    size: int
    stream: str = ""  # the manifest's numbering (version 2; "" and 0 for version 1)
    seq: int = 0

    @property
    def dest(self) -> tuple[str, ...]:
        """Path components below the target: <site>/<source>/<name>, batches under mqtt/."""
        if self.kind == KIND_MQTT_BATCH:
            return (self.site, "mqtt", self.source, *self.name.split("/"))
        return (self.site, self.source, *self.name.split("/"))

    @property
    def label(self) -> str:
        pack = " in pack" if self.entry >= 0 else ""
        return f"{self.site}/{self.source}/{self.name} (object {self.object_id}{pack})"

    @property
    def order(self) -> tuple[str, str, int]:
        """Newer is later: by `created`, then object id, then place in the pack."""
        return (self.created, self.object_id, self.entry)


def refs_of(m: Manifest, key: str) -> list[Ref]:
    stream = sys.intern(m.stream)  # one string per stream, not one per file
    if not m.entries:
        return [Ref(m.site, m.source, m.kind, m.name, m.created, m.object_id, key, -1, m.size,
                    stream, m.seq)]
    return [Ref(m.site, m.source, m.kind, e.name, m.created, m.object_id, key, i, e.size,
                stream, m.seq) for i, e in enumerate(m.entries)]


Order = Callable[[Ref], Any]  # newer sorts later (`History.ref_order`: by seq)


def newest_per_name(refs: Iterable[Ref], order: Order = lambda r: r.order
                    ) -> tuple[list[Ref], int]:
    """A name dropped again is a new version: the newest wins; returns it and how many older
    versions were skipped."""
    newest: dict[tuple[str, str, str, bool], Ref] = {}
    superseded = 0
    for r in sorted(refs, key=order):
        k = (r.site, r.source, r.name, r.kind == KIND_MQTT_BATCH)
        if k in newest:
            superseded += 1
        newest[k] = r
    return list(newest.values()), superseded


def drop_conflicts(refs: list[Ref], order: Order = lambda r: r.order
                   ) -> tuple[list[Ref], list[tuple[Ref, str]]]:
    """Files that can all be written, and the others with why not.

    A file `a` and a file `a/b` cannot both exist, nor a file and an MQTT batch at the same
    path: the newer one is written, the older one is reported.
    """
    files: dict[tuple[str, ...], Ref] = {}
    folders: dict[tuple[str, ...], Ref] = {}  # a folder some accepted file needs -> that file
    keep: list[Ref] = []
    refused: list[tuple[Ref, str]] = []
    for r in sorted(refs, key=order, reverse=True):
        dest = r.dest
        other = files.get(dest) or folders.get(dest) or next(
            (files[dest[:i]] for i in range(1, len(dest)) if dest[:i] in files), None)
        if other is not None:
            refused.append((r, f"not restored: {'/'.join(dest)} conflicts with the newer "
                               f"{other.label} (a file and a folder, or two objects, at one "
                               "path)"))
            continue
        files[dest] = r
        for i in range(1, len(dest)):
            folders.setdefault(dest[:i], r)
        keep.append(r)
    return keep, refused


def by_manifest(refs: Iterable[Ref]) -> dict[str, list[Ref]]:
    """Chosen files grouped by the manifest that holds them (a pack is fetched once)."""
    out: dict[str, list[Ref]] = {}
    for r in refs:
        out.setdefault(r.key, []).append(r)
    return out
