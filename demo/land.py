"""The demo's last step: `skyferry land --once` puts the cloud's sealed objects into a plain
folder, where anyone can use them, and the landed files are compared with the originals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from demo.files import DemoFile
from tests.kits.site import Site

BOOK = "_skyferry"  # the lander's bookkeeping and event objects, not files that were sent
MARKER = ".skyferry-demo-landed"  # only a folder carrying it is wiped


def landed_folder(work: Path) -> Path:
    """Beside the work folder (which a PASS removes): what landed stays to be looked at."""
    return work.with_name(f"{work.name}-landed")


def prepare(folder: Path) -> str | None:
    """Empty the landing folder if a previous demo made it; why not, if it cannot be used."""
    if folder.exists():
        if not folder.is_dir() or (any(folder.iterdir()) and not (folder / MARKER).exists()):
            return (f"{folder} exists and was not made by the demo; not landing there "
                    "(remove it to see the landing step)")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("made by `python -m demo`; wiped by its next run\n")
    return None


def land(site: Site, folder: Path) -> tuple[dict[str, Any], list[str]]:
    """Run `skyferry land --once` from the site's cloud into `folder`: its report, problems."""
    r = site.cli("land", "--source", site.backend_url, "--dest", f"file://{folder}",
                 "--key", str(site.recipient_key), "--once", "--json", check=False)
    try:
        out: dict[str, Any] = json.loads(r.stdout)
    except ValueError:
        return {}, [f"land exited {r.returncode} without a JSON report: {r.stderr.strip()}"]
    problems = [f"land: {q['what']}: {q['reason']}" for q in out.get("quarantined", [])]
    if r.returncode != 0:
        problems.append(f"land exited {r.returncode}: {r.stderr.strip()}")
    return out, problems


def events(folder: Path) -> int:
    return sum(len(p.read_text().splitlines())
               for p in (folder / BOOK / "events").rglob("*.jsonl"))


def without_bookkeeping(problems: list[str]) -> list[str]:
    """`compare`'s findings but for the lander's own objects under _skyferry/ and its marker."""
    return [p for p in problems if not p.startswith((f"{BOOK}/", f"{MARKER}:"))]


def summary(files: list[DemoFile], folder: Path, out: dict[str, Any]) -> str:
    return (f"  landed {out.get('files', 0)} plain files ({out.get('bytes', 0)} bytes) in "
            f"{folder}, {events(folder)} events for {len(files)} files sent")
