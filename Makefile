# The two commands a newcomer needs (see README):
#   make serve   set up and run the facade on the embedded TIW emulator
#   make test    set up everything and run every check and the whole test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3

.PHONY: serve test tools check bench stubs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/tiw-facade serve --emulator

tools:
	bash scripts/install-tools

test: $(VENV)/.installed tools
	bash scripts/check

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench

stubs: $(VENV)/.installed
	$(VENV)/bin/python scripts/gen_protos.py
