"""The spool folder itself: its descriptor for one pass, the done/ folder, what is fenced off.

The root is opened without following a link only where it must be a folder the operator named;
everything below it is reached through descriptors (spool_scan.py, spool_files.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from agent.config.settings import SpoolSettings
from agent.obs.logs import log_event
from agent.sources.spool_files import DoneDir, Hold, Kept, dispose, open_done, take_back
from agent.sources.spool_report import SpoolReport, log
from agent.sources.spool_scan import Candidate, Fence, Ident, ident, printable

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _on_pseudo_fs(fd: int) -> bool:
    dev = os.fstat(fd).st_dev
    for pseudo in ("/proc", "/sys"):
        with contextlib.suppress(OSError):
            if os.stat(pseudo).st_dev == dev:
                return True
    return False


class Pass:
    """What one scan pass works with: the spool's descriptor and where files go after."""

    def __init__(self, root_fd: int, move: bool, done: DoneDir | None) -> None:
        self.root_fd = root_fd
        self.move = move
        self.done = done

    def dispose(self, c: Candidate, hold: Hold) -> None:
        if self.move and self.done is None:
            raise Kept("not_moved", "cannot be moved: done/ is not usable (see the line about "
                       "it); it stays in the spool")
        if not hold.opened:  # accepted before, so not read now: take its lease all the same
            try:
                os.close(hold.open())
            except BlockingIOError:
                raise Kept("busy", "is open for writing; it stays and is looked at again once "
                           "it settles") from None
        dispose(self.root_fd, c, hold, self.done)

    def close(self) -> None:
        if self.done is not None:
            self.done.close()
        os.close(self.root_fd)


class SpoolRoot:
    """Opens the spool for each pass; reports a folder that cannot be used once, until it can."""

    def __init__(self, settings: SpoolSettings, protected: tuple[Path, ...],
                 state_dir: Path | None, report: SpoolReport) -> None:
        self.settings = settings
        # The state_dir and the keys: never entered nor read, even if a spool holds them; a
        # spool inside the state_dir is refused whole.
        self.state_dir = state_dir
        self.protected = (*protected, state_dir) if state_dir is not None else protected
        self.report = report
        self._root_trouble: str | None = None

    def open_pass(self) -> Pass | None:
        root = self._open_root()
        if root is None:
            return None
        move = self.settings.after == "move"
        done: DoneDir | None = None
        if move:
            try:
                done = open_done(root, self.settings.path, self.settings.effective_done_dir)
            except OSError as e:
                self.report.tell(self.done_name(), "done_refused",
                                 f"done folder {self.settings.effective_done_dir} cannot be "
                                 f"used ({e.strerror}): a link or a file named like it is never "
                                 "followed nor overwritten; accepted files stay in the spool "
                                 "until it is a folder", logging.ERROR)
            else:
                self.report.told.pop(self.done_name(), None)
        return Pass(root, move, done)

    def done_name(self) -> str:
        done = self.settings.effective_done_dir
        try:
            return done.relative_to(self.settings.path).as_posix()
        except ValueError:
            return str(done)

    def _open_root(self) -> int | None:
        path = self.settings.path
        try:
            if self._inside_protected(path):
                raise OSError(errno.EPERM, "it is inside the daemon's state_dir or is its key "
                              "folder; choose another spool path")
            if self.settings.create:
                path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, _ROOT_FLAGS)
            if _on_pseudo_fs(fd):
                os.close(fd)
                raise OSError(errno.EPERM, "it is on /proc or /sys, which hold no producer files")
        except OSError as e:
            how = ("does not exist: create it, or set create = true in its [[spool]] section"
                   if e.errno == errno.ENOENT else f"cannot be used: {e.strerror}")
            if self._root_trouble != how:
                self._root_trouble = how
                self.report.count("spool_unusable")
                log_event(log, logging.ERROR, "spool_unusable",
                          f"spool {self.settings.name}: folder {printable(str(path))} {how}; "
                          f"looked at again every {self.settings.scan_interval_s:g}s",
                          source=self.settings.name, path=printable(str(path)))
            return None
        if self._root_trouble is not None:
            self._root_trouble = None
            log_event(log, logging.INFO, "spool_usable",
                      f"spool {self.settings.name}: folder {printable(str(path))} is usable",
                      source=self.settings.name)
        return fd

    def _inside_protected(self, path: Path) -> bool:
        """The spool is one of the protected paths, or inside the state_dir."""
        real = Path(os.path.realpath(path))
        if any(real == Path(os.path.realpath(q)) for q in self.protected):
            return True
        return self.state_dir is not None and real.is_relative_to(
            os.path.realpath(self.state_dir))

    def fence(self, p: Pass) -> Fence:
        protected: set[Ident] = set()
        for q in self.protected:
            with contextlib.suppress(OSError):
                protected.add(ident(os.stat(q)))
        skip = frozenset({ident(os.fstat(p.done.fd))}) if p.done is not None else frozenset()
        names = frozenset({self.done_name()}) if p.move else frozenset()
        return Fence(skip_names=names, skip=skip, protected=frozenset(protected))

    def take_back(self, p: Pass, asides: list[str]) -> None:
        """Accepted files a kill left renamed aside: back under their names, so the next
        pass deletes them (already stored: recognised, not stored again)."""
        for rel in asides:
            try:
                take_back(p.root_fd, rel)
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) else str(e)
                if isinstance(e, FileExistsError):
                    why = "a new file has its name"
                self.report.tell(rel, "aside_left", "an accepted file left aside by an "
                                 f"interrupted delete, already stored; it stays ({why}): delete "
                                 "it once the file under its name is taken", logging.INFO)
            else:
                log_event(log, logging.INFO, "spool_aside_back",
                          f"spool {self.settings.name}: {printable(rel)}: an accepted file "
                          "left aside by an interrupted delete is looked at again",
                          source=self.settings.name, file=printable(rel))
