# skyferry: `make demo` to see it work end to end, `make test` to check everything.
# Every target builds its own virtualenv in .venv (from `$(PYTHON)`), reinstalled only when
# pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIP_Q  := --quiet --disable-pip-version-check

.DEFAULT_GOAL := help
.PHONY: help venv dev demo test test-deps lint bench clean

help:
	@echo "make demo    run one site end to end (spool -> store -> cloud -> restore) and compare"
	@echo "make test    lint, then the whole test suite"
	@echo "make lint    ruff and mypy"
	@echo "make bench   benchmarks"
	@echo "make clean   remove the venv, caches and demo output"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps: the venv is (re)installed only when pyproject.toml is newer than the stamp.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install $(PIP_Q) -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install $(PIP_Q) -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

dev: $(VENV)/.installed-dev

demo: venv
	$(PY) -m agent.demo

# Hook for what the suite needs beyond Python packages (e.g. object-store emulators);
# nothing yet.
test-deps: dev
	@:

test: dev test-deps lint
	$(VENV)/bin/pytest -q

lint: dev
	$(VENV)/bin/ruff check agent tests benchmarks
	$(VENV)/bin/mypy agent

bench: dev
	@if [ -f benchmarks/run.py ]; then $(PY) -m benchmarks.run; \
	else echo "no benchmarks yet (benchmarks/run.py is missing)"; fi

clean:
	rm -rf $(VENV) demo-run test-artifacts build dist *.egg-info \
		.pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
