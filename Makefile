# Set-up in one command each: `make serve` (install + run the service on embedded PostgreSQL)
# and `make test` (install + run the test suite). Everything lives in a local virtual env.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memory3-installed

.PHONY: install serve test test-fast bench protos clean

NODE_STAMP := tests/node/node_modules/.memory3-installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The tests' Node.js packages (the second-language client, buf): Node 20+ and npm.
$(NODE_STAMP): tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/memory3 serve

test: install $(NODE_STAMP)
	$(PY) -m pytest -q

test-fast: install $(NODE_STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/bench_service.py

protos: install
	bash scripts/regen_protos.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
