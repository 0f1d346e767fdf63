"""What `skyferry put` queues: the files named on its command line and every regular file below
a folder named there, read with the caller's own rights (the client side of sources/put.py).

A link named on the command line is followed (the caller chose it); below a folder, links are
not followed and, like a spool's FIFOs, sockets and devices, are named as not queued. A file is
opened only when its batch is sent, and must then still be the file that was listed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import SourceError
from agent.sources.spool_scan import Candidate, is_utf8, printable, special_entry

_OPEN = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not hang us


@dataclass
class Walked:
    """The files to queue, each with the argument it came from, and what will not be."""

    files: list[Candidate] = field(default_factory=list)
    origin: dict[str, Path] = field(default_factory=dict)  # name -> argument (a folder or file)
    folders: set[Path] = field(default_factory=set)  # the arguments that are folders
    problems: list[str] = field(default_factory=list)  # one line each: what, where, why


def walk(args: list[Path], name: str | None = None) -> Walked:
    """Every regular file the arguments name. `name`: with one file, the name it is kept under;
    with one folder, a folder its files go under (else they are named relative to it)."""
    out = Walked()
    for arg in args:
        try:
            st = os.stat(arg)
        except OSError as e:
            out.problems.append(f"{printable(str(arg))}: cannot be read: {e.strerror}")
            continue
        if stat.S_ISDIR(st.st_mode):
            out.folders.add(arg)
            _walk_folder(arg, f"{name.strip('/')}/" if name else "", out)
        elif stat.S_ISREG(st.st_mode):
            _add(out, arg, name or arg.resolve().name, st, arg)
        else:
            out.problems.append(f"{printable(str(arg))}: not a regular file or a folder; "
                                "only regular files are queued")
    return out


def _add(out: Walked, path: Path, name: str, st: os.stat_result, origin: Path) -> None:
    if not is_utf8(name):
        out.problems.append(f"{printable(str(path))}: name is not valid UTF-8 and could never "
                            "be restored; rename the file")
        return
    out.files.append(Candidate(path.absolute(), name, st.st_size, st.st_mtime_ns, st))
    out.origin.setdefault(name, origin)


def _walk_folder(root: Path, prefix: str, out: Walked) -> None:
    """Depth first, names in order; links are not followed."""
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.problems.append(f"{printable(str(folder))}: folder cannot be listed: "
                                f"{e.strerror}")
            continue
        below: list[tuple[Path, str]] = []
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                out.problems.append(f"{printable(entry.path)}: cannot be examined: {e.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                below.append((path, f"{rel}{entry.name}/"))
            elif stat.S_ISREG(st.st_mode):
                _add(out, path, prefix + rel + entry.name, st, root)
            else:
                out.problems.append(f"{printable(entry.path)}: {special_entry(st)}")
        stack.extend(reversed(below))


def open_listed(c: Candidate) -> int:
    """A descriptor of the file `c` lists, opened with the caller's rights; SourceError (why,
    without the path) if it cannot be read or is no longer that file."""
    try:
        fd = os.open(c.path, _OPEN)
    except OSError as e:
        raise SourceError(f"cannot be read: {e.strerror}") from None
    try:
        now = os.fstat(fd)
        assert c.st is not None
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (c.st.st_dev,
                                                                         c.st.st_ino):
            raise SourceError("was replaced by another file while put ran; put it again")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_limit() -> int:
    """The soft descriptor limit, raised to the hard one first: a batch of small files is
    sent as one descriptor each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft
