# Set-up and the two entry points of the README: `make toy` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install toy test

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

toy: install
	$(PY) run_toy.py

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests
