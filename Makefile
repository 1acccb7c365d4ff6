# edgefleet: `make demo` runs the fleet demo, `make test` runs lint, types and tests.
# Both work on a fresh Debian machine: they create the venv and install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PLATFORM_DIR ?= $(abspath ../shared/platform)
export EDGEFLEET_PLATFORM_DIR ?= $(PLATFORM_DIR)

# Debian packages the tests use (installed only when missing, only as root).
APT_PACKAGES := mosquitto mosquitto-clients chromium zstd postgresql-client systemd skopeo docker-registry
# A plain `make test` skips tests marked slow; CI (CI=true) and `make test-all` run everything.
PYTEST_SELECT := $(if $(filter true 1,$(CI)),,-m "not slow")
PYTEST_ARGS ?=

.PHONY: all venv sysdeps services lint typecheck test test-all demo bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[hub,demo,dev]'
	@touch $(STAMP)

venv: $(STAMP)

sysdeps:
	@./scripts/sysdeps.sh $(APT_PACKAGES)

services: sysdeps
	@./scripts/services.sh

lint: venv
	$(VENV)/bin/ruff check bundles agent hub sim tests bench
	$(VENV)/bin/mypy

typecheck: venv
	$(VENV)/bin/mypy

test: venv services lint
	$(VENV)/bin/pytest $(PYTEST_SELECT) $(PYTEST_ARGS)

test-all: venv services lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv sysdeps
	$(PY) -m hub.demo --platform-dir "$(EDGEFLEET_PLATFORM_DIR)"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache artifacts .demo
