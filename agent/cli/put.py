"""`skyferry put FILE|DIR...`: queue files now, through the daemon's socket or, when no daemon
runs, straight into the store (the daemon uploads them when it starts).

A folder is queued with every regular file below it, named relative to it. Files are grouped
as a spool groups them (agent/sources/spool_scan.py `plan`): each large file alone, small ones
together, one request and one sealed pack (one commit, one set of fsyncs) per group; a few
groups are sent at once. The command returns once every file is durable.

A put that finds a daemon stays light: it reads only the config sections it needs
(agent.config.intake.read_put_view) and talks through agent/sources/put_client.py, loading no
pipeline or store; the whole config is read, and the store written directly (put_direct.py),
only when no daemon answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.common import add_config_argument, load_settings
from agent.cli.put_direct import PutSender
from agent.cli.put_progress import PutProgress

if TYPE_CHECKING:
    from agent.config.settings import ChunkingSettings
    from agent.sources.put_walk import Walked
    from agent.sources.spool_scan import Candidate

NAME = "put"
HELP = "queue files and folders now (through the daemon, or directly)"

STREAMS = 2  # groups sent at once: the daemon seals two objects at once per spool, too
PUT_MAX_FILES = 1000  # as agent/sources/put.py accepts (not imported: it loads the pipeline)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("files", metavar="FILE|DIR", type=Path, nargs="+",
                   help="files to queue, and folders whose files are queued (all below them; "
                        "links below a folder are not followed)")
    p.add_argument("--priority", help="priority class (default: [put] priority)")
    p.add_argument("--name", help="name to restore the file as (one file); with one folder, "
                                  "the folder its files are restored under (default: their "
                                  "names relative to the folder)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress line (default: when stderr is a terminal)")


def main(args: argparse.Namespace) -> int:
    from agent.config.intake import read_put_view
    from agent.sources.put_walk import walk

    view = read_put_view(args.config)  # all of the config only if no daemon answers
    priority = args.priority or view.put.priority
    if priority not in view.classes:
        print(f"skyferry put: error: unknown class {priority!r}; use one of: "
              f"{', '.join(view.classes)}", file=sys.stderr)
        return 2
    if args.name and len(args.files) != 1:
        print("skyferry put: error: --name needs exactly one file or folder", file=sys.stderr)
        return 2
    walked = walk(args.files, args.name)
    for problem in walked.problems:
        print(f"skyferry put: {problem}", file=sys.stderr)
    sender = PutSender(view.put.socket, lambda: load_settings(args))
    try:
        answers = _send_all(sender, walked, view.chunking, priority, args.progress)
    finally:
        sender.close()
    failed = _report(walked, answers)
    return 1 if failed or walked.problems else 0


def _batches(files: list[Candidate], chunking: ChunkingSettings) -> list[list[Candidate]]:
    from agent.sources.put_walk import open_file_limit
    from agent.sources.spool_scan import plan

    if len(files) <= 1:  # nothing to group (nor descriptors to count)
        return [files]
    # Each file of a group is one open descriptor while it is sent, here and in the daemon.
    per_group = max(1, min(PUT_MAX_FILES, open_file_limit() // (2 * STREAMS + 2)))
    chunking = dataclasses.replace(chunking, pack_files=min(chunking.pack_files, per_group))
    return plan(files, chunking)


def _send_all(sender: PutSender, walked: Walked, chunking: ChunkingSettings, priority: str,
              progress: bool | None) -> dict[str, dict[str, Any]]:
    """Every file's answer by name: {"object", "duplicate"} or {"error"}."""
    batches = _batches(walked.files, chunking)
    answers: dict[str, dict[str, Any]] = {}
    if len(batches) == 1:  # one file or one group: no threads to start
        answers.update(sender.send(batches[0], priority))
        return answers
    from concurrent.futures import ThreadPoolExecutor

    shown = PutProgress(len(walked.files), sum(c.size for c in walked.files),
                        enabled=progress)
    lock = threading.Lock()

    def one(batch: list[Candidate]) -> None:
        got = sender.send(batch, priority)
        with lock:
            answers.update(got)
            shown.advance(len(batch), sum(c.size for c in batch))

    try:
        with ThreadPoolExecutor(max_workers=STREAMS, thread_name_prefix="put") as pool:
            futures = [pool.submit(one, b) for b in batches]
            try:
                for f in futures:
                    f.result()
            except BaseException:  # a key, config or store problem: the rest is not sent
                for f in futures:
                    f.cancel()
                raise
    finally:
        shown.close()
    return answers


def _report(walked: Walked, answers: dict[str, dict[str, Any]]) -> int:
    """A line per file named on the command line, one per folder; errors on stderr. Returns
    how many files were not queued."""
    failed = 0
    folders: dict[Path, list[dict[str, Any]]] = {}
    for c in walked.files:
        a = answers.get(c.name) or {"error": "no answer"}
        origin = walked.origin[c.name]
        if "error" in a:
            failed += 1
            print(f"skyferry put: {_shown(c.path)}: {a['error']}", file=sys.stderr)
        elif origin not in walked.folders:
            note = " (already queued)" if a.get("duplicate") else ""
            print(f"{origin}: accepted as object {a['object']}{note}")
        else:
            folders.setdefault(origin, []).append({**a, "size": c.size})
    for folder, done in folders.items():
        objects = {a["object"] for a in done}
        again = sum(1 for a in done if a.get("duplicate"))
        note = f", {again} of them already queued" if again else ""
        files = "1 file" if len(done) == 1 else f"{len(done)} files"
        objs = "1 object" if len(objects) == 1 else f"{len(objects)} objects"
        print(f"{folder}: {files} accepted ({_size(sum(a['size'] for a in done))}) in "
              f"{objs}{note}")
    return failed


def _shown(path: Path) -> str:
    from agent.sources.spool_scan import printable

    return printable(str(path))


def _size(n: int) -> str:
    from agent.config.units import format_size

    return format_size(n)
