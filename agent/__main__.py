"""`python -m agent` runs the skyferry command line."""

from agent.cli import main

raise SystemExit(main())
