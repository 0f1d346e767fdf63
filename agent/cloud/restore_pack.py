"""Cutting a file pack's content stream back into its files, each checked against its own hash
and written (or not) on its own: one file that cannot be written never takes its neighbours
down."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import blake3

from agent.cloud.restore_fs import NewFile, TargetDir
from agent.errors import RestoreError
from agent.format.manifest import Manifest


class PackSplitter:
    """Feeds a pack's bytes, in order, to one file after another.

    With a target, wanted files are written to a temporary file that is put in place only once
    whole and verified; the others (superseded by a newer version, or only verified) are only
    checked (`place`: where in the target an entry is written, by default <site>/<source>/<its
    name>). `ok` and `bad` say what became of each entry, by index. With `sha256`, each written
    file's SHA-256 is taken as it is written (`digests`, by index: `skyferry land` puts it in the
    landed object's metadata), so nobody reads the file again for it.
    """

    def __init__(self, m: Manifest, target: TargetDir | None, wanted: set[int],
                 sha256: bool = False,
                 place: Callable[[int], tuple[str, ...]] | None = None) -> None:
        self.m, self.target, self.wanted = m, target, wanted
        self._place = place or self._dest  # where in the target entry i is written
        self.ok: list[int] = []
        self.bad: dict[int, str] = {}
        self.digests: dict[int, str] = {}
        self._sha256 = sha256
        self._i = -1
        self._left = 0
        self._hash = blake3.blake3()
        self._sha: hashlib._Hash | None = None
        self._out: NewFile | None = None
        self._next()

    def _dest(self, i: int) -> tuple[str, ...]:
        return (self.m.site, self.m.source, *self.m.entries[i].name.split("/"))

    def _next(self) -> None:
        """Finish the current file (if any), then start the next ones (empty ones at once)."""
        while True:
            if self._i >= 0:
                self._finish(self._i)
            self._i += 1
            if self._i >= len(self.m.entries):
                return
            e = self.m.entries[self._i]
            self._left, self._hash = e.size, blake3.blake3()
            self._sha = None
            if self.target is not None and self._i in self.wanted:
                try:
                    self._out = self.target.new_file(self._place(self._i))
                except (RestoreError, OSError) as err:
                    self.bad[self._i] = str(err)
                if self._out is not None and self._sha256:
                    self._sha = hashlib.sha256()
            if e.size:
                return

    def _finish(self, i: int) -> None:
        e = self.m.entries[i]
        out, self._out = self._out, None
        if self._hash.hexdigest() != e.hash:
            if out is not None:
                out.discard()
            self.bad[i] = "does not match its hash in the pack's manifest"
            return
        if i in self.bad:
            return
        if out is not None:
            try:
                out.commit(e.mtime_ns)
            except (RestoreError, OSError) as err:
                self.bad[i] = str(err)
                return
            if self._sha is not None:
                self.digests[i] = self._sha.hexdigest()
        self.ok.append(i)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            take = view[:self._left]
            self._hash.update(take)
            if self._out is not None:
                if self._sha is not None:
                    self._sha.update(take)
                try:
                    self._out.write(take)
                except OSError as err:
                    self._out.discard()
                    self._out = None
                    self.bad[self._i] = str(err)
            self._left -= len(take)
            view = view[len(take):]
            if not self._left:
                self._next()

    def abort(self) -> None:
        """Remove the file being written, if any (the stream failed or was cancelled)."""
        if self._out is not None:
            self._out.discard()
        self._out = None
