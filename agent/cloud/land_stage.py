"""Staging: a manifest's files verified into this process's staging folder, ready to be put.

The restore path does the reading and checking (`CloudReader.stream_object`: signatures, each
chunk's hash, the whole object's hash; `PackSplitter`: each packed file's hash) and writes
through `TargetDir`, so memory stays bounded whatever the object's size. Nothing reaches the
destination before a file is whole here and its SHA-256 is known.

One staging folder per process (`StagingArea`), each manifest's files under a prefix of their
own, not a folder per manifest: on ext4 without a journal every inode freed in the last few
seconds is skipped, one lookup each, by every file created after it, so a folder made and
removed per manifest made each later file's creation slower (measured: 12% of a landing
pass's CPU samples, in `recently_deleted`). A crashed process's folder is removed by the next
one to start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.cloud.land_book import dest_parts
from agent.cloud.restore_fs import TargetDir
from agent.cloud.restore_io import settled
from agent.cloud.restore_pack import PackSplitter
from agent.cloud.restore_progress import Progress
from agent.cloud.restore_read import ITEM_ERRORS, CloudReader
from agent.errors import TransientBackendError
from agent.format.manifest import Manifest


@dataclass
class Staged:
    """A file ready to land: its place in the destination, where its bytes are, its facts."""

    entry: int  # -1: the whole object
    parts: tuple[str, ...]
    path: Path
    size: int
    mtime_ns: int
    sha256: str = ""


class StagingArea:
    """This process's staging folder below `work_dir` (made at first use) and the prefixes of
    the stages in it."""

    PREFIX = "land-"

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._folder: Path | None = None
        self._stages = 0

    def new_stage(self) -> Stage:
        if self._folder is None or not self._folder.is_dir():
            _remove_orphans(self.work_dir, self.PREFIX)
            folder = self.work_dir / f"{self.PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            folder.mkdir(mode=0o700)
            self._folder = folder
        self._stages += 1
        return Stage(self._folder, f"s{self._stages}-")

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _remove_orphans(work_dir: Path, prefix: str) -> None:
    """Staging folders of processes that are gone (crashed or killed): <prefix><pid>-<hex>."""
    for entry in os.scandir(work_dir):
        name = entry.name
        if not name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@dataclass
class Stage:
    """The files of one manifest that verified, and why the others did not: in the shared
    staging `folder`, each named `prefix` + its place in the manifest."""

    folder: Path
    prefix: str
    files: list[Staged] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # name -> why
    failure: str = ""  # the object as a whole did not verify

    def place(self, entry: int) -> tuple[str]:
        """Where entry `entry` (-1: the whole object) is staged."""
        return (self.prefix + ("object" if entry < 0 else f"entry-{entry}"),)

    def cleanup(self) -> None:
        """Remove this stage's files: once staging has finished, every file it put in the
        folder is in `files` (a file that did not verify never got a name there)."""
        for f in self.files:
            with contextlib.suppress(FileNotFoundError):
                f.path.unlink()

    def abandon(self) -> None:
        """Staging stopped part-way (cancelled, the source stopped answering): files named
        before they were listed in `files` are found by this stage's prefix."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self.folder) as it:
            for entry in it:
                if entry.name.startswith(self.prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    async def remove(self) -> None:
        """`cleanup` in a thread: a pack's files are dozens of unlinks, not for the event loop."""
        await settled(self.cleanup)


async def stage(reader: CloudReader, m: Manifest, wanted: set[int], area: StagingArea,
                progress: Progress | None = None) -> Stage:
    """Verify and write the `wanted` files of `m` (entry indexes; -1 the whole object) in the
    staging area; the caller removes them with `Stage.remove`."""
    out = area.new_stage()
    try:
        # Scratch: what makes a landed file durable is the destination's put, not this.
        target = TargetDir(out.folder, durable=False)
        try:
            if m.entries:
                await _stage_pack(reader, m, wanted, target, out, progress)
            else:
                await _stage_whole(reader, m, target, out, progress)
        finally:
            target.close()
    except BaseException:
        out.abandon()
        raise
    return out


async def _stage_whole(reader: CloudReader, m: Manifest, target: TargetDir, out: Stage,
                       progress: Progress | None) -> None:
    parts = dest_parts(m, m.name)
    new = target.new_file(out.place(-1))
    digest = hashlib.sha256()  # as it is written (in the sink's thread): not read again

    def sink(data: bytes | bytearray | memoryview) -> None:
        digest.update(data)
        new.write(data)

    try:
        await reader.stream_object(m, sink, progress)
        await settled(new.commit, m.mtime_ns)
    except TransientBackendError:
        raise  # the source did not answer: landed again later, not quarantined
    except ITEM_ERRORS as e:
        out.failure = str(e)
        return
    finally:
        new.discard()
    out.files.append(Staged(-1, parts, out.folder.joinpath(*out.place(-1)), m.size, m.mtime_ns,
                            digest.hexdigest()))


async def _stage_pack(reader: CloudReader, m: Manifest, wanted: set[int], target: TargetDir,
                      out: Stage, progress: Progress | None) -> None:
    # Staged flat, one file per entry index (`Stage.place`): no folders to make and remove
    # per name (the name is the destination's business).
    splitter = PackSplitter(m, target, wanted, sha256=True, place=out.place)
    try:
        await reader.stream_object(m, splitter.write, progress)
    except TransientBackendError:
        raise  # the source did not answer: landed again later, not quarantined
    except ITEM_ERRORS as e:
        out.failure = str(e)
    finally:
        splitter.abort()
    for i in sorted(wanted):
        entry = m.entries[i]
        if i in splitter.ok:
            parts = dest_parts(m, entry.name)
            out.files.append(Staged(i, parts, out.folder.joinpath(*out.place(i)), entry.size,
                                    entry.mtime_ns, splitter.digests[i]))
        else:
            out.bad[entry.name] = splitter.bad.get(i) or out.failure or "did not verify"

