# skyferry: `make demo` to see it work end to end, `make test` to check everything.
# Every target builds its own virtualenv in .venv (from `$(PYTHON)`), reinstalled only when
# pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIP_Q  := --quiet --disable-pip-version-check

.DEFAULT_GOAL := help
.PHONY: help venv dev demo test test-deps lint bench clean install

help:
	@echo "make demo    run one site end to end (spool -> store -> cloud -> restore) and compare"
	@echo "make test    lint, then the whole test suite"
	@echo "make lint    ruff, mypy and the import contracts (lint-imports)"
	@echo "make bench   benchmarks"
	@echo "make clean   remove the venv, caches and demo output"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps: the venv is (re)installed only when pyproject.toml is newer than the stamp.
# --no-compile: Python compiles what is imported when it is first imported; compiling every
# installed file up front took a third of the install (63 s -> 43 s for the dev extra).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install $(PIP_Q) --no-compile -e .
	@touch $@

# The dev extra holds everything `.installed` does: one resolver pass, not two.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install $(PIP_Q) --no-compile -e '.[dev]'
	@touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

dev: $(VENV)/.installed-dev

# The demo is a script over the test suite's site harness (tests/kits/site.py), not part of
# the package; make runs it from the repository root, where `demo` and `tests` import.
demo: venv
	$(PY) -m demo

# What the suite needs beyond Python packages: Azurite (pinned by tests/emulators' lock file).
# moto comes with the dev extra. Independent of the venv, so `make test` runs both at once.
test-deps:
	@missing=""; for p in mosquitto systemd chromium fonts-dejavu-core iproute2 nftables \
	    restic rclone zstd time e2fsprogs; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	[ -z "$$missing" ] || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -q --no-install-recommends $$missing; }
	@[ -x tests/emulators/node_modules/.bin/azurite-blob ] || \
		(cd tests/emulators && npm ci --no-audit --no-fund --loglevel=error)

# Set-up: the venv and the system packages/emulators are made at the same time (-j2). Then lint
# runs beside the tests, and the tests run in $(TEST_WORKERS) processes (pytest-xdist, a file per
# worker at a time): most system tests spend their time waiting on daemons, links and
# emulators, so more workers than cores pays. The tests that assert a time, a rate or a delay
# (marker `timing`) run after that, alone, as they would on a quiet machine. In one process the
# suite took 14:31 of the 15 minutes it may take on 2 cores.
TEST_WORKERS ?= 4

test:
	@$(MAKE) --no-print-directory -j2 dev test-deps
	@mkdir -p test-artifacts
	@$(MAKE) --no-print-directory lint > test-artifacts/lint.log 2>&1 & lint=$$!; \
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile \
	  -m "not timing" tests; parallel=$$?; \
	wait $$lint; lint_rc=$$?; \
	echo "---- lint (ran beside the tests) ----"; cat test-artifacts/lint.log; \
	$(VENV)/bin/pytest -q -p no:cacheprovider -m timing tests; timing=$$?; \
	echo "tests exit $$parallel, lint exit $$lint_rc, timing tests exit $$timing"; \
	[ $$parallel -eq 0 ] && [ $$lint_rc -eq 0 ] && [ $$timing -eq 0 ]

lint: dev
	$(VENV)/bin/ruff check agent tests benchmarks demo
	$(VENV)/bin/mypy agent demo
	$(VENV)/bin/lint-imports --no-cache

bench: dev
	@if [ -f benchmarks/run.py ]; then $(PY) -m benchmarks.run; \
	else echo "no benchmarks yet (benchmarks/run.py is missing)"; fi

PREFIX ?= /opt/skyferry
install:
	PYTHON=$(PYTHON) PREFIX=$(PREFIX) sh scripts/install.sh

clean:
	rm -rf $(VENV) demo-run demo-run-landed test-artifacts build dist *.egg-info \
		.pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
