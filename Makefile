# Two entry points on a fresh clone with only Python 3.11: `make demo` and `make test`.
# Each creates .venv and installs what it needs (torch comes from the pinned CPU wheel).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/m3: pyproject.toml
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/m3

.PHONY: setup demo test bench
setup: $(BIN)/m3

demo: setup
	$(BIN)/m3 demo --workdir runs/demo

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# `make bench` runs every benchmark into benchmarks/results.md; `make bench QUICK=1` a reduced set (minutes).
bench: setup
	$(BIN)/python -m benchmarks.run_all $(if $(QUICK),--quick,)
