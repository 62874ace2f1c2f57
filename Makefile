# sam3d-jobs: `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo

.PHONY: install install-dev demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-installs only when the project or its pinned requirements change.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements/base.txt requirements/api.txt requirements/worker.txt
	$(BIN)/pip install -q -r requirements/api.txt -r requirements/worker.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements/dev.txt requirements/dev-torch.txt
	$(BIN)/pip install -q -r requirements/dev.txt -r requirements/dev-torch.txt
	touch $@

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev tests/js/node_modules/.installed

# The embedded stack (Redis, API, one inflate worker), the sample submitted over HTTP,
# every artifact downloaded by its signed URL into $(DEMO_OUT), then everything stopped.
demo: install
	$(BIN)/sam3d-jobs demo --out $(DEMO_OUT)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install-dev lint
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python bench/assets.py
	$(BIN)/python bench/service.py

clean:
	rm -rf $(VENV) tests/js/node_modules out .pytest_cache .hypothesis
