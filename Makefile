# `make test` and `make demo` work on a fresh clone: they create .venv and install the project first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_out

.PHONY: install test test-portability demo bench clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q

# The tests that compare floats across processes, run again on torch's scalar kernels (no SIMD): other
# reduction orders than this CPU's AVX-512 ones, as another CPU would give (docs/portability.md).
test-portability: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PYTHON) -m pytest -q -p no:cacheprovider -k "two_processes or one_process" tests

# The embedded default of the end-to-end recipe: synthetic slides -> shards -> tiny HIPT trained end to
# end on the CPU (a few minutes) -> metrics and report in demo_out/e2e.
demo: $(STAMP)
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no recipes/e2e.py

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_storage.py
	$(PYTHON) benchmarks/bench_tile_encoder.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
