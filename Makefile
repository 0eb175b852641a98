# sigmax-fl: `make run` trains on the bundled data, `make test` runs the suite.
# Every target sets up .venv first if it is missing or older than pyproject.toml.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Simulated instances for `make run`: one per entry of data-sources.
ARGS ?=
# The suite mostly waits on real processes (SuperNodes poll every 3 s), so three workers
# overlap those waits on two cores; a test module stays on one worker (its fixtures are shared).
TEST_WORKERS ?= -n 3 --dist loadfile
USE_CASE ?= multi-market

.PHONY: setup run test lint bench compare dp-utility doctor deploy-local attacks clean

# torch is installed first and pinned: 2.13.0 is the CPU wheel this machine carries;
# a looser requirement lets pip pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m sigmax_fl.simulate $(ARGS)

# The real deployment on loopback: TLS, authenticated SuperNodes, one per bundled instance.
deploy-local: $(STAMP)
	$(PY) -m sigmax_fl.deploy.local $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check sigmax_fl tests bench
	$(PY) -m pytest -q $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) -m bench.run

# `make compare USE_CASE=risk`: multi-market (default), multi-strategy or risk.
compare: $(STAMP)
	$(PY) -m sigmax_fl.cli compare --use-case $(USE_CASE) --out outputs/compare/$(USE_CASE)

attacks: $(STAMP)
	$(PY) -m sigmax_fl.attacks $(ARGS)

dp-utility: $(STAMP)
	$(PY) -m sigmax_fl.cli dp-utility --out outputs/dp-utility

doctor: $(STAMP)
	$(PY) -m sigmax_fl.cli doctor

lint: $(STAMP)
	$(PY) -m ruff check sigmax_fl tests bench
	$(PY) -m ruff format --check sigmax_fl tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
