# xmoe: every target that runs code sets up .venv first (quick when already done).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := test,dev,hf,plot,kernels

.PHONY: setup test demo bench reproduce lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/xmoe demo

bench: setup
	$(BIN)/python -m benchmarks.layer
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.sparse_decode
	$(BIN)/python -m benchmarks.sparsify_decode
	$(BIN)/python -m benchmarks.lm_train
	$(BIN)/python -m benchmarks.hf_experts
	$(BIN)/python -m benchmarks.distributed
	$(BIN)/python -m benchmarks.tuning

# every preset x 3 seeds + router ablations, 2M tokens each (hours on 2 cores, resumable) -> docs/results/lm.md
reproduce: setup
	$(BIN)/xmoe reproduce

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
