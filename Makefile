# The two commands a new user needs: `make run` and `make test`. Both start from a clean clone.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch is pinned and installed *before* the project so pip never pulls a CUDA
# build by accident. GPU users: `make setup TORCH_SPEC="torch --index-url <your CUDA wheel index>"` (the
# words of TORCH_SPEC are pip arguments, so a requirement and its --index-url both pass).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.sparsepilot-installed

export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

## Set up, run the main job on embedded defaults for the sample use cases, then serve the dashboard.
run: setup
	$(BIN)/sparsepilot init
	$(BIN)/sparsepilot run --serve

## Set up and run the whole test suite (lint + import contracts + tests). The tests run in one worker
## process per core (pytest-xdist, at most 4; TEST_WORKERS=0 runs them in this process), each worker's
## torch on one thread (tests/conftest.py); the tests marked slow run first. On 2 idle cores, 1,945 tests
## (2026-12-08, session 51, a clean clone): pytest 14.2 min, the whole `bash .ci/run` 15.4 min, after the
## costliest tests shared their processes and set-ups and the gate's simulators stopped re-simulating
## (1,928 tests in session 50 took 17.7 / 18.3 / 19.2 / 19.8 min, over budget on the harness's machine:
## 22.5 min); 1,851 tests in session 49: 14.7 / 16.0 min (setup
## included; 1,744 tests in session 48 took 15.6-17.9 / 16.9-19.3 min, before Great Expectations' batch
## definitions were kept per process and AppTest's package scan and a migrated PostgreSQL database per test
## session; 1,610 in session 47 took 19.1 / 20.9 min, before slow-first ordering, a state DB copied per test
## and cheap test hashes). When the suite was smaller, one process took 1.6-1.8x as long as
## two workers. The log ends with the 30 slowest test phases (--durations=30), so a run that nears the
## 20-minute budget names its cause.
TEST_WORKERS ?= auto
test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal --durations=30

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .sparsepilot .pytest_cache .ruff_cache
