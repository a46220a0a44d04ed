# The commands a newcomer needs (see README):
#   make serve   set up the service alone and run it on the embedded TIW emulator
#   make test    set up everything and run every check and the whole test suite (what CI runs)
# and the fast inner loop for whoever changes the code:
#   make lint    stubs, ruff (lint and format), mypy: seconds
#   make check   lint, then the tests not marked slow
VENV ?= .venv
PYTHON ?= python3

.PHONY: serve test tools lint check bench stubs format

# The service and its runtime dependencies only: what `make serve` needs, quick on a fresh machine.
$(VENV)/.service: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e .
	touch $@

# Everything the linters, the tests and the benchmarks need besides.
$(VENV)/.dev: $(VENV)/.service
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

serve: $(VENV)/.service
	$(VENV)/bin/tiw-facade serve --emulator

tools:
	bash scripts/install-tools

test: $(VENV)/.dev tools
	bash scripts/check

lint: $(VENV)/.dev
	bash scripts/check --lint

check: $(VENV)/.dev
	bash scripts/check --quick

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: $(VENV)/.dev
	$(VENV)/bin/python -m bench

stubs: $(VENV)/.dev
	$(VENV)/bin/python scripts/gen_protos.py
