# Every target creates or reuses the virtualenv in .venv; a second run installs nothing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp

LAB_STAMP := $(VENV)/.lab-stamp
LAB_PORT ?= 8888
UI_FLAGS ?=

.PHONY: install test demo lint bench lab ui-check clean-data

install: $(STAMP)

# torchrec's metadata asks for the CUDA fbgemm-gpu and an old torchmetrics, both wrong on CPU:
# its real dependencies are in pyproject.toml, and torchrec itself is installed without them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps torchrec==1.9.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/recsys demo

# ruff, then import-linter: the layering contract of pyproject.toml ([tool.importlinter]).
lint: install
	$(BIN)/ruff check recsys tests benchmarks notebooks
	$(BIN)/lint-imports

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

# JupyterLab (the `lab` extra) on this machine only, in notebooks/, with the venv's python3 kernel.
$(LAB_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,lab]'
	touch $(LAB_STAMP)

lab: $(LAB_STAMP)
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --no-browser \
		--ServerApp.root_dir=notebooks --MappingKernelManager.default_kernel_name=python3 \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root)

# The MLflow UI in headless Chromium over the demo's store (run `make demo` first): DOM checks and
# the screenshots in docs/. Installs Debian's chromium when it is missing and apt-get may run.
ui-check: install
	@command -v chromium > /dev/null || command -v chromium-browser > /dev/null \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; } \
		|| { command -v sudo > /dev/null && sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; } \
		|| echo "ui-check: Chromium is not installed and could not be installed here (apt-get install chromium needs root): the check is skipped"
	$(BIN)/python benchmarks/ui.py $(UI_FLAGS)

clean-data:
	rm -rf data/raw data/processed mlflow/mlflow.db mlflow/artifacts
