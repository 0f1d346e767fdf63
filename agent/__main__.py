"""`python -m agent` runs the skyferry command line."""

from agent.cli.main import run

run()
