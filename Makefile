# Two doors for a fresh machine: `make demo` (install + the main job on generated data) and
# `make test` (install + the default test suite). Both are idempotent: the install step is
# skipped while requirements.lock and pyproject.toml are unchanged.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: install demo test test-slow test-all lock clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: install
	$(PY) -m flows.demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

# The lock is compiled with uv (fast; pip's resolver backtracks on bentoml's opentelemetry pins).
lock:
	uv pip compile pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock

# The demo's outputs only: demo/ and .btc/. runs/ (btc train's default output folder) is the user's.
clean:
	rm -rf .btc demo
