# Set-up and the entry points of the README: `make toy`, `make test` and, while editing, `make test-fast`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install toy test test-fast

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

toy: install
	$(PY) run_toy.py

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The unit tests alone: no test that starts a process or runs a whole pipeline (marked slow).
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests
