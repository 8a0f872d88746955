# The two commands a newcomer runs: `make demo` and `make test`. Each sets up .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test demo demo-clean lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/uniremoval demo $(DEMO_ARGS)

demo-clean: $(STAMP)
	$(VENV)/bin/uniremoval demo --clean $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check uniremoval tests bench

clean:
	rm -rf $(VENV) .pytest_cache
