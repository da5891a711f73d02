# Two commands matter: `make run` (install everything, run the mesh on its embedded defaults)
# and `make test` (install what the tests need, run every check CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check protos check-protos lint-protos fmt lint typecheck bench install system-deps clean

run: install
	$(BIN)/managed-agents demo

test: install
	scripts/check

install: system-deps $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed; set PYTHON=..."'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml examples/node/package-lock.json | $(BIN)/python system-deps
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	scripts/install-grpcurl $(BIN)
	cd examples/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

system-deps:
	@scripts/system-deps

# Regenerate managed_agents/v1 from protos/ (commit the result).
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

check-protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

lint-protos: $(STAMP)
	$(BIN)/buf format -d --exit-code
	$(BIN)/buf lint
	$(BIN)/buf breaking --against protos/baseline/managed_agents_v1.binpb

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/store_bench.py --backend both
	$(BIN)/python bench/hands_bench.py
	$(BIN)/python bench/brain_bench.py
	$(BIN)/python bench/brain_scaling_bench.py
	$(BIN)/python bench/tracing_bench.py
	$(BIN)/python bench/auth_bench.py
	$(BIN)/python bench/proxy_bench.py
	$(BIN)/python bench/egress_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
