# Set-up in one command each: `make serve` (install + run the service on embedded PostgreSQL)
# and `make test` (install + run the test suite). Everything lives in a local virtual env.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memory3-installed

.PHONY: install serve test test-fast bench protos clean

$(STAMP): pyproject.toml tests/node/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error  # the Node.js client test (Node 20+)
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/memory3 serve

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/bench_service.py

protos: install
	bash scripts/regen_protos.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
