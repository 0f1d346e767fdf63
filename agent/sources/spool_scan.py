"""What a spool folder holds that is ready for ingest, and how it is grouped into objects.

Apart from the spool source (agent/sources/spool.py) so a one-shot ingest (the ingest
benchmark's child) does not import the daemon's asyncio machinery to use them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.settings import ChunkingSettings

_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")


def is_temporary(name: str) -> bool:
    """Names producers use while writing; such files are ingested only after the rename."""
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


@dataclass(frozen=True)
class Candidate:
    path: Path
    name: str  # relative to the spool root, POSIX separators
    size: int
    mtime_ns: int


def scan(root: Path, skip: Path | None) -> list[Candidate]:
    """Regular, non-temporary files below root, oldest first.

    Folders whose name starts with "." and `skip` are not entered; symbolic links are neither
    followed nor taken. One lstat per file (scandir's entry caches it): a spool of many small
    files is scanned every few seconds.
    """
    found: list[Candidate] = []
    skip_at = os.path.normpath(skip) if skip is not None else None
    folders = [(os.fspath(root), "")]
    while folders:
        folder, prefix = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:  # vanished, or not readable: as os.walk, pass over it
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith(".") and os.path.normpath(e.path) != skip_at:
                        folders.append((e.path, f"{prefix}{e.name}/"))
                    continue
                if is_temporary(e.name):
                    continue
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(Candidate(Path(e.path), prefix + e.name, st.st_size,
                                       st.st_mtime_ns))
    found.sort(key=lambda c: (c.mtime_ns, c.name))
    return found


def plan(ready: list[Candidate], chunking: ChunkingSettings | None) -> list[list[Candidate]]:
    """Group files for ingest, oldest first: each large file alone, small ones in packs.

    A pack closes at `pack_size` bytes or `pack_files` files; without chunking settings (or
    with pack_below 0) every file goes alone.
    """
    batches: list[list[Candidate]] = []
    pack: list[Candidate] = []
    pack_bytes = 0
    for c in ready:
        if chunking is None or c.size >= chunking.pack_below:
            batches.append([c])
            continue
        if pack and (pack_bytes + c.size > chunking.pack_size
                     or len(pack) >= chunking.pack_files):
            pack, pack_bytes = [], 0
        if not pack:
            batches.append(pack)  # takes its place in the order now, filled as files come
        pack.append(c)
        pack_bytes += c.size
    return batches
