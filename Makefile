# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist

.PHONY: install test lint format demo fmnist-source gpu-check clean

install: $(STAMP)

# Idempotent: re-runs only when setup.py changes or the venv is missing.
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Debian's Fashion-MNIST, the offline dataset of the demo.
fmnist-source:
	@test -f $(FMNIST_SRC)/train-images-idx3-ubyte.gz || { \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

demo: install fmnist-source
	$(PY) scripts/demo.py

# On a GPU machine: sampling, training and evaluator throughput against the original's
# (under 8 minutes; `bash benchmarks/gpu_check.sh --dry-run` is the CPU rehearsal).
gpu-check: install
	bash benchmarks/gpu_check.sh

clean:
	rm -rf demo_out .pytest_cache
