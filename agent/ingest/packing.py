"""Reading the small files of a pack as one stream (`Pipeline.ingest_pack` seals it)."""

from __future__ import annotations

import io
import os

import blake3

from agent.errors import SourceError
from agent.ingest.opening import open_source, same_content
from agent.ingest.requests import IngestRequest

Member = tuple[IngestRequest, os.stat_result]


class MemberChanged(Exception):
    """A file of a pack changed, shrank or vanished while it was read."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(why)
        self.index = index


class PackReader:
    """The files of a pack read one after another as one stream, each hashed on the way.

    Reads stop at each file's size as it was when the pack was planned, and the file is checked
    afterwards: one that changed is reported, so the pack is sealed again without it.
    """

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self.hashes: list[str] = []
        self._i = 0
        self._f: io.FileIO | None = None
        self._left = 0
        self._hash = blake3.blake3()

    def readinto(self, view: memoryview, /) -> int:
        while self._i < len(self.members):
            req, st = self.members[self._i]
            if self._f is None:
                try:
                    self._f = io.FileIO(open_source(req, st), "rb")
                except SourceError as e:
                    raise MemberChanged(self._i, str(e)) from None
                self._left, self._hash = st.st_size, blake3.blake3()
            n = self._f.readinto(view[:self._left]) if self._left else 0
            if n:
                self._hash.update(view[:n])
                self._left -= n
                return n
            self._finish_member(st)
        return 0

    def _finish_member(self, st: os.stat_result) -> None:
        assert self._f is not None
        try:
            after = os.fstat(self._f.fileno())
        finally:
            self._f.close()
            self._f = None
        if self._left or not same_content(after, st):
            raise MemberChanged(self._i, "changed while it was being read")
        self.hashes.append(self._hash.hexdigest())
        self._i += 1

    def finish(self) -> None:
        """After the last byte: check the files not yet checked (the last, empty ones)."""
        if self.readinto(memoryview(bytearray(1))):
            raise MemberChanged(self._i, "grew while it was being read")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
