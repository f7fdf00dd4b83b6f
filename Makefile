# The two commands of a fresh clone (Python >= 3.11 and make; everything else goes into .venv):
#   make demo    the miniature benchmark on the built-in tiny model (`distfair demo`; ARGS="--quick")
#   make test    the test suite (the test extra and the CPU build of torch for the parity tests;
#                TEST_EXTRAS=test,tpu adds libtpu, for the tests of `distfair plan --topology`, as CI does)
# Each installs what it needs first, once (again when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TEST_EXTRAS ?= test
# Test workers (pytest-xdist), each running whole files (`--dist loadfile`: a file's module fixtures,
# e.g. a converted real model, are built once); 1: one process, as `python -m pytest`.
JOBS ?= 2
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test install clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "distfair_jax needs Python >= 3.11, got " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(TEST_EXTRAS)]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/distfair demo $(ARGS)

test: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile) $(ARGS)

clean:
	rm -rf $(VENV)
