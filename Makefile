# vsbench: `make demo` runs the embedded demo campaign, `make test` runs the tests.
# Both create ./.venv with a Python >= 3.12 found on this machine (override with
# `make demo PYTHON=/path/to/python3.12`) and install the package into it.

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vsbench-installed
CORES ?= all

.PHONY: demo test install lint clean-outputs

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	@echo "Report: $(CURDIR)/report/index.html"

test: $(STAMP)
	$(BIN)/pytest

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

$(STAMP): pyproject.toml
	@set -e; py="$(PYTHON)"; \
	if [ -z "$$py" ]; then py="$$(bash .ci/find-python)"; fi; \
	if [ ! -x "$(BIN)/python" ]; then \
	  echo "Creating $(VENV) with $$py"; "$$py" -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

clean-outputs:
	rm -rf datasets target report logs benchmarks report.html
