# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv on first use: torch==2.13.0 first (the local CPU wheel), then the pinned rest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# mergekit 0.1.5 in its own venv (its pins are tight), for the cross-check test and the bench.
# torch==2.13.0 first, so the pinned rest (bench/mergekit-requirements.txt) never pulls another.
MK_VENV := .venv-mergekit
MK_STAMP := $(MK_VENV)/.installed

$(MK_STAMP): bench/mergekit-requirements.txt
	$(PYTHON) -m venv $(MK_VENV)
	$(MK_VENV)/bin/pip install --quiet --upgrade pip
	$(MK_VENV)/bin/pip install --quiet torch==2.13.0
	$(MK_VENV)/bin/pip install --quiet -r bench/mergekit-requirements.txt
	touch $(MK_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/dammerge demo $(if $(OUT),$(OUT),demo-output) $(if $(SIZE),--size $(SIZE)) $(if $(REGIME),--regime $(REGIME))

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)

test: $(STAMP) $(MK_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ruff check src tests $(wildcard bench)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP) $(MK_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/merge_speed.py

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v -E '^torch==' > requirements.lock

clean:
	rm -rf $(VENV) demo-output
