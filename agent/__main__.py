"""`python -m agent` runs the skyferry command line."""

from agent.cli import run

run()
