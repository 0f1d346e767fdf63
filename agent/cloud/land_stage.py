"""Staging: a manifest's files verified into a private temporary folder, ready to be put.

The restore path does the reading and checking (`CloudReader.stream_object`: signatures, each
chunk's hash, the whole object's hash; `PackSplitter`: each packed file's hash) and writes
through `TargetDir`, so memory stays bounded whatever the object's size. Nothing reaches the
destination before a file is whole here and its SHA-256 is known.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agent.cloud.land_book import dest_parts
from agent.cloud.restore_fs import TargetDir
from agent.cloud.restore_io import settled
from agent.cloud.restore_pack import PackSplitter
from agent.cloud.restore_progress import Progress
from agent.cloud.restore_read import ITEM_ERRORS, CloudReader
from agent.format.manifest import Manifest

HASH_BLOCK = 1 << 20


@dataclass
class Staged:
    """A file ready to land: its place in the destination, where its bytes are, its facts."""

    entry: int  # -1: the whole object
    parts: tuple[str, ...]
    path: Path
    size: int
    mtime_ns: int
    sha256: str = ""


@dataclass
class Stage:
    """The files of one manifest that verified, and why the others did not."""

    folder: Path
    files: list[Staged] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # name -> why
    failure: str = ""  # the object as a whole did not verify

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


async def stage(reader: CloudReader, m: Manifest, wanted: set[int], work_dir: Path,
                progress: Progress | None = None) -> Stage:
    """Verify and write the `wanted` files of `m` (entry indexes; -1 the whole object) below a
    new folder in `work_dir`; the caller removes it with `Stage.cleanup`."""
    out = Stage(Path(tempfile.mkdtemp(prefix="land-", dir=work_dir)))
    try:
        target = TargetDir(out.folder)
        try:
            if m.entries:
                await _stage_pack(reader, m, wanted, target, out, progress)
            else:
                await _stage_whole(reader, m, target, out, progress)
        finally:
            target.close()
        for f in out.files:
            f.sha256 = await settled(sha256_of, f.path)
    except BaseException:
        out.cleanup()
        raise
    return out


async def _stage_whole(reader: CloudReader, m: Manifest, target: TargetDir, out: Stage,
                       progress: Progress | None) -> None:
    parts = dest_parts(m, m.name)
    new = target.new_file(parts)
    try:
        await reader.stream_object(m, new.write, progress)
        await settled(new.commit, m.mtime_ns)
    except ITEM_ERRORS as e:
        out.failure = str(e)
        return
    finally:
        new.discard()
    out.files.append(Staged(-1, parts, out.folder.joinpath(*parts), m.size, m.mtime_ns))


async def _stage_pack(reader: CloudReader, m: Manifest, wanted: set[int], target: TargetDir,
                      out: Stage, progress: Progress | None) -> None:
    splitter = PackSplitter(m, target, wanted)
    try:
        await reader.stream_object(m, splitter.write, progress)
    except ITEM_ERRORS as e:
        out.failure = str(e)
    finally:
        splitter.abort()
    for i in sorted(wanted):
        entry = m.entries[i]
        if i in splitter.ok:
            parts = dest_parts(m, entry.name)
            out.files.append(Staged(i, parts, out.folder.joinpath(*parts), entry.size,
                                    entry.mtime_ns))
        else:
            out.bad[entry.name] = splitter.bad.get(i) or out.failure or "did not verify"
