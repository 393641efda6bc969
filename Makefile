# hermetic: every target bootstraps its own virtual environment from requirements.lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all demo test lint bench lock clean

all: test

# System packages the emulator needs: bubblewrap builds every enclave's sandbox. Installed
# with apt when missing and we are root; otherwise `hermetic run` says what is missing.
# The PostgreSQL server the suite starts (Debian package `postgresql`) is installed the
# same way when no /usr/lib/postgresql/*/bin/initdb exists, where pg_bindir() in
# tests/test_translog_service_support.py looks; without it those tests are skipped, saying
# why.
SYSTEM_STAMP := $(VENV)/.system

$(SYSTEM_STAMP):
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the enclave sandbox)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else \
	    echo "warning: bubblewrap (bwrap) is missing: install the 'bubblewrap' package to run enclaves"; \
	  fi; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postgresql (the server the suite's PostgreSQL tests start)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
	      || echo "warning: installing 'postgresql' failed: the PostgreSQL tests will be skipped"; \
	  else \
	    echo "warning: no /usr/lib/postgresql/*/bin/initdb: install the 'postgresql' package to run the PostgreSQL tests"; \
	  fi; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): requirements.lock pyproject.toml $(SYSTEM_STAMP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hermetic demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check src tests bench services examples
	$(BIN)/ruff format --check src tests bench services examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

# Regenerate the lock file after changing dependencies in pyproject.toml.
lock:
	$(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet pip-tools
	.lockenv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --extra dev --strip-extras \
		-o requirements.lock pyproject.toml
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
