# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# Both depend on `make install`, which is idempotent: it creates .venv once and reinstalls only
# when pyproject.toml or constraints.txt changed.
# Where Ray or servers start, run inside a loopback-only namespace here: ../shared/tools/loopback make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install bytecode lint demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (the range in pyproject admits others)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Bytecode for the project's own modules, written once: with PYTHONDONTWRITEBYTECODE set (as on
# this machine) every Ray worker process would otherwise compile them again (~0.25 s of CPU each).
bytecode:
	$(PY) -m compileall -q model datasets orchestrator

demo: install bytecode
	$(VENV)/bin/vis4mer demo

lint: install
	$(VENV)/bin/ruff check .

test: install bytecode lint
	timeout 2700 $(PY) -m pytest -q --durations=15

bench: install
	$(PY) benchmarks/model_efficiency.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache mlruns mlflow.db
