# `make test` and `make demo` work on a fresh clone: they create .venv and install the project first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_out

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

# Until the end-to-end recipe lands: generate the synthetic slides, build their shards, verify, inspect.
demo: $(STAMP)
	$(PYTHON) -m hipt_e2e.data.synthetic --out $(DEMO_DIR)/slides
	$(VENV)/bin/hipt-shards build images $(DEMO_DIR)/slides --out $(DEMO_DIR)/shards \
		--labels $(DEMO_DIR)/slides/labels.csv --slide-mpp 0.5 --region-px 128 --tile-px 32
	$(VENV)/bin/hipt-shards verify $(DEMO_DIR)/shards
	$(VENV)/bin/hipt-shards inspect $(DEMO_DIR)/shards --mosaic $(DEMO_DIR)/mosaic.png

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_storage.py
	$(PYTHON) benchmarks/bench_tile_encoder.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
