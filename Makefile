# gridstor: the two commands are `make up` and `make test`; each sets up all it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(CURDIR)/data
# Debian packages the suite runs on, and those only the tests use.
APT_RUN := redis-server rsync
APT_TEST := redis-server rsync openssh-client restic rclone curl wget ffmpeg chromium

.PHONY: up test gen gen-check lint typecheck pytest venv dev-venv node-deps clean

up: venv
	@$(PY) -m services.launcher --data "$(DATA)"

test: dev-venv
	@$(MAKE) --no-print-directory gen-check lint typecheck pytest

# --- environment -------------------------------------------------------------
# apt-get runs only when a listed command is missing, so repeated runs stay fast.
define apt_ensure
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi
endef

$(VENV)/.stamp-run: requirements.lock
	$(call apt_ensure,$(APT_RUN))
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq python3-venv python3-dev >/dev/null; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock > $(VENV)/pip.log 2>&1 \
	  || { grep -v '^WARNING: Location' $(VENV)/pip.log; exit 1; }
	@echo "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gridstor-src.pth
	@echo "$(CURDIR)/protos" >> $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gridstor-src.pth
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-run requirements-dev.lock
	$(call apt_ensure,$(APT_TEST))
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.lock > $(VENV)/pip.log 2>&1 \
	  || { grep -v '^WARNING: Location' $(VENV)/pip.log; exit 1; }
	@touch $@

venv: $(VENV)/.stamp-run $(VENV)/bin/gridstor

# `gridstor` == `python -m services.cli` (the venv's gridstor-src.pth puts the repo on sys.path).
$(VENV)/bin/gridstor: $(VENV)/.stamp-run
	@printf '#!/bin/sh\nexec "%s" -m services.cli "$$@"\n' "$(abspath $(PY))" > $@
	@chmod +x $@
dev-venv: venv $(VENV)/.stamp-dev

# --- generated code ------------------------------------------------------------
# Generated files are committed; `make gen` rewrites them after a .proto, compose config or setting change.
gen: dev-venv
	@$(PY) protos/gen.py

gen-check: dev-venv
	@$(PY) protos/gen.py --check

# --- checks --------------------------------------------------------------------
lint: dev-venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

typecheck: dev-venv
	@$(VENV)/bin/mypy

# The Node.js client test (tests/node) needs its npm packages; without npm it is skipped.
node-deps:
	@if command -v npm >/dev/null 2>&1; then \
	  if [ ! -f tests/node/node_modules/.package-lock.json ] || [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then \
	    npm ci --prefix tests/node --ignore-scripts --no-audit --no-fund --loglevel=error; fi; \
	else echo "npm not found: the Node.js client test (tests/node) is skipped"; fi

# pytest exit code 5 means it collected no test: that is a failure here too.
pytest: dev-venv node-deps
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
