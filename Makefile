# Every target creates or reuses the virtualenv in .venv; a second run installs nothing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp

.PHONY: install test demo lint bench clean-data

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
	$(BIN)/ruff check recsys tests benchmarks
	$(BIN)/lint-imports

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean-data:
	rm -rf data/raw data/processed mlflow/mlflow.db mlflow/artifacts
