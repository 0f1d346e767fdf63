"""Write the deterministic benchmark corpus (tests/kits/edge_corpus.py) to a folder.

    python -m benchmarks.corpus OUT_DIR [--size 1GiB] [--seed 6]
    python -m benchmarks.corpus OUT_DIR --edit 1%   # edit an existing corpus in place
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.config.units import parse_size
from tests.kits.edge_corpus import describe, edit, generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="1GiB", help="total bytes (default 1GiB)")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--edit", help="edit this fraction of an existing corpus, e.g. 1%%")
    args = ap.parse_args(argv)
    if args.edit:
        frac = float(args.edit.rstrip("%")) / (100 if args.edit.endswith("%") else 1)
        r = edit(args.out, frac)
        print(f"edited {r.files} files, {r.bytes_changed} bytes of {r.corpus_bytes}")
        return 0
    specs = generate(args.out, parse_size(args.size), args.seed)
    print(describe(specs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
