"""`make demo`: one edge site, end to end, in a throw-away folder, with a verdict.

Generates a few hundred files into two spool folders, runs the daemon against a local-folder
"cloud" behind a simulated contact schedule (15 s open, 10 s closed), waits for the queue to
drain, restores with `skyferry restore` and compares every file byte for byte, mtimes included.
Exits 0 only when everything came back identical.

    python -m demo [--workdir DIR] [--files N] [--keep] [--seed S]   (from the repository root)

The site itself (keys, config, the daemon subprocess, its log, status, restore) is the test
suite's harness, tests/kits/site.py; this package adds the files, the story and the report.
It is not part of the installed package.
"""

SITE = "demo-site"
SPOOLS = {"telemetry": "normal", "alarms": "critical"}
CYCLE_OPEN = "15s"
CYCLE_CLOSED = "10s"
MiB = 1 << 20
KiB = 1 << 10
