# genrun: `make run` trains the default (digits, GeN-SGD); `make test` runs the suite.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench lint clean install

install: $(STAMP)

# torch/torchvision are pinned: this pair installs from local disk on the dev/CI machines,
# and an unpinned torch drags a multi-GB download or a torchvision that fails to import.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/genrun $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m genrun.bench $(ARGS)

lint: $(STAMP)
	$(PY) -m compileall -q genrun tests
	$(PY) -m ruff check genrun tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
