# sam3d-jobs: `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo

.PHONY: install install-dev web-page chromium nginx demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-installs only when the project or its pinned requirements change.
$(VENV)/.installed: $(BIN)/python pyproject.toml sdk/pyproject.toml requirements/base.txt requirements/api.txt requirements/worker.txt
	$(BIN)/pip install -q -r requirements/api.txt -r requirements/worker.txt -e ".[api,worker]" -e ./sdk
	touch $@

# Mesh compression (meshopt, Draco) runs the glTF Transform CLI under Node.js, pinned in
# worker/js/package-lock.json; without it only "compression": "none" works.
worker/js/node_modules/.installed: worker/js/package.json worker/js/package-lock.json
	@command -v npm >/dev/null || { echo "make: mesh compression needs Node.js 20+ and npm" >&2; exit 1; }
	cd worker/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements/dev.txt requirements/dev-torch.txt requirements/dev-nodeps.txt requirements/dev-upstream.txt
	$(BIN)/pip install -q -r requirements/dev.txt -r requirements/dev-torch.txt
	$(BIN)/pip install -q --no-deps -r requirements/dev-nodeps.txt
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/upstream -r requirements/dev-upstream.txt
	touch $@

# Blender's glTF importer for tests/test_blender.py: bpy (Blender as a Python module, PyPI,
# built for Python 3.11 only) in its own folder; elsewhere that test says it did not run.
$(VENV)/blender/.installed: $(BIN)/python requirements/dev-blender.txt
	@if $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
	  $(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/blender -r requirements/dev-blender.txt; \
	else echo "make: bpy 4.2 needs Python 3.11: tests/test_blender.py will not run" >&2; \
	  mkdir -p $(VENV)/blender; fi
	touch $@

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The web page (GET /): npm packages pinned in web/package-lock.json, bundled by esbuild into
# api/static/ (git-ignored), which the API serves. Rebuilt only when web/ changes.
WEB_SOURCES := web/build.mjs web/index.html $(wildcard web/src/*)

web/node_modules/.installed: web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo "make: the web page is built with npm: install Node.js 20+ and npm" >&2; exit 1; }
	cd web && npm ci --include=dev --no-audit --no-fund --loglevel=error
	touch $@

api/static/.built: web/node_modules/.installed $(WEB_SOURCES)
	cd web && npm run --silent build
	touch $@

web-page: api/static/.built

# The browser test drives Debian's Chromium through playwright-core; no browser is downloaded.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "make test: the browser test needs Chromium; as root run: apt-get install -y chromium" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "make test: the browser test needs Chromium on PATH (no apt-get here to install it)" >&2; exit 1; }; \
	  $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# The proxy test runs Debian's nginx in front of the API (deploy/base/nginx/).
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "make test: the proxy test needs nginx; as root run: apt-get install -y nginx-light" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "make test: the proxy test needs nginx on PATH (no apt-get here to install it)" >&2; exit 1; }; \
	  $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light; }

install: $(VENV)/.installed api/static/.built worker/js/node_modules/.installed

install-dev: $(VENV)/.installed-dev $(VENV)/blender/.installed tests/js/node_modules/.installed api/static/.built worker/js/node_modules/.installed

# The embedded stack (Redis, API, one inflate worker), the sample submitted over HTTP,
# every artifact downloaded by its signed URL into $(DEMO_OUT), then everything stopped.
demo: install
	$(BIN)/sam3d-jobs demo --out $(DEMO_OUT)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every suite, in TEST_WORKERS pytest-xdist processes; --dist loadfile keeps a module's tests
# (and the dev stack its fixture starts) in one process.
TEST_WORKERS ?= 2
test: install-dev lint chromium nginx
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: install-dev
	$(BIN)/python bench/assets.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/sync_response.py
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) tests/js/node_modules web/node_modules worker/js/node_modules api/static out .pytest_cache .hypothesis .import_linter_cache
