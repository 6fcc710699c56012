# The one place that knows the commands. `make demo` and `make test` install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torch/torchvision first, pinned to the wheels this machine ships (see DEVELOPERS.md)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test test-fast lint format demo science bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PINS)
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# two tiers, the whole suite: the quick tests on TEST_WORKERS pytest-xdist workers (one file per worker, so
# module fixtures stay shared), then the slow/integration tests (verl's loop, Ray clusters, servers) one at
# a time: they use both cores each. Exit 5 ("no test selected", e.g. a -k that matches one tier only) is fine.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -m "not slow and not integration" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m "slow or integration" $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: install
	$(PY) -m pytest -m "not slow and not integration" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

DEMO_OUT ?= runs/demo

# the demo starts fresh each time (vlcal train refuses to mix runs in one folder; --resume continues one)
demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/vlcal train --config recipes/tiny_cpu.yaml --out $(DEMO_OUT)

SCIENCE_OUT ?= runs/science
SCIENCE_ARGS ?=

# the science run (README "Does it work?"): a fresh folder, or SCIENCE_ARGS=--resume to continue one;
# SCIENCE_ARGS="--seeds 3" repeats the RL runs over three seeds
science: install
	$(VENV)/bin/vlcal train --config recipes/tiny_science.yaml --out $(SCIENCE_OUT) $(SCIENCE_ARGS)

clean:
	rm -rf runs .pytest_cache
