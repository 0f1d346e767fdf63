"""Packs of small files: which offered files go into one (`plan_pack`), and reading them as one
stream (`PackReader`); `Pipeline.ingest_pack` seals it."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from agent.errors import SourceError
from agent.ingest.opening import open_source, same_content, stat_source
from agent.ingest.requests import IngestRequest, IngestResult

Member = tuple[IngestRequest, os.stat_result]


@dataclass
class PackPlan:
    """The files to seal into a pack (by name, each once, with its source key), and the
    offered files that are not: accepted before, or left at their source with the reason."""

    members: list[Member] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # name -> source key
    accepted: dict[str, IngestResult] = field(default_factory=dict)
    failed: dict[str, SourceError] = field(default_factory=dict)


def plan_pack(reqs: list[IngestRequest], source_key: Callable[[IngestRequest, os.stat_result], str],
              accepted_keys: Callable[[list[str]], dict[str, str]]) -> PackPlan:
    """Sort the offered files: unusable ones fail, ones accepted before are answered with
    their object, the rest become members in name order (the same files give the same content
    and cuts)."""
    plan = PackPlan()
    offered: list[tuple[IngestRequest, os.stat_result, str]] = []
    for req in reqs:
        try:
            st = stat_source(req)
        except SourceError as e:
            plan.failed[req.name] = e
            continue
        offered.append((req, st, source_key(req, st)))
    known = accepted_keys([k for _, _, k in offered])
    for req, st, key in offered:
        previous = known.get(key)
        if previous is not None:
            plan.accepted[req.name] = IngestResult(previous, st.st_size, 0, 0, 0,
                                                   duplicate_of=previous)
        elif req.name not in plan.keys:
            plan.keys[req.name] = key
            plan.members.append((req, st))
    if len({(r.source, r.priority) for r, _ in plan.members}) > 1:
        raise ValueError("a pack holds files of one source and one class")
    plan.members.sort(key=lambda m: m[0].name)
    return plan


class MemberChanged(Exception):
    """A file of a pack changed, shrank or vanished while it was read; `error`: why it could
    not be opened, when that is what happened (it names the file and says what to do)."""

    def __init__(self, index: int, why: str, error: SourceError | None = None) -> None:
        super().__init__(why)
        self.index = index
        self.error = error


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
                    raise MemberChanged(self._i, str(e), e) from None
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
