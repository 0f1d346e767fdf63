"""The design lives in the repository and no link in it points outside it (issue 15)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Text that names a place outside the checkout: the parent folder, or this machine's paths.
OUTSIDE = re.compile(r"\.\./shared/|(?<![\w.])/work/")


def tracked(*suffixes: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith(suffixes) and (ROOT / f).is_file()]


def test_design_is_in_the_repository_and_the_readme_links_to_it() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    for heading in ("## The flow", "## Rooms and what each may import", "## Invariants",
                    "## Threading model", "## How to add"):
        assert heading in design, f"docs/DESIGN.md lost its section {heading!r}"
    assert "](docs/DESIGN.md)" in (ROOT / "README.md").read_text()


def test_every_relative_markdown_link_resolves_inside_the_repository() -> None:
    broken = []
    for md in tracked(".md"):
        if "node_modules" in md.parts:
            continue
        for target in MD_LINK.findall(md.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links that leave the repository or lead nowhere:\n" + "\n".join(broken)


def test_no_file_names_a_place_outside_the_checkout() -> None:
    found = []
    for f in tracked(".md", ".py", ".toml", ".sh", ".service", ".txt", "Makefile", ".ci/run"):
        if "node_modules" in f.parts or f == Path(__file__).resolve():
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not found, "references outside the repository:\n" + "\n".join(found)


def test_the_outside_check_can_fail() -> None:
    assert OUTSIDE.search("See `../shared/DESIGN.md` for the architecture")
    assert OUTSIDE.search("cd /work/main && make")
    assert not OUTSIDE.search("see docs/DESIGN.md")
