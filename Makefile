# The one entry point. `make run` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the dependency list changed.
STAMP := $(VENV)/.installed-stamp

HOST ?= 127.0.0.1
PORT ?= 8080
DATA_DIR ?= .hatchway

.PHONY: install run test lint format typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/hatchway serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest

# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
test: lint typecheck pytest

bench: install
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
