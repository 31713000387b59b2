# `make test` and `make demo` work on a fresh clone: they create .venv and install the project first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_out
# the interpreter .venv is made with, e.g. `make test PYTHON3=/usr/bin/python3` (Debian's) or python3.10
PYTHON3 ?= python3

.PHONY: install test test-portability test-floors demo bench clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PYTHON3) -m venv $(VENV) || { rm -rf $(VENV); echo "error: '$(PYTHON3) -m venv' failed;" \
		"on Debian/Ubuntu install the venv module first: apt-get install -y python3-venv" >&2; exit 1; }
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# TEST_WORKERS pytest-xdist processes sharing the tests (worksteal: an idle worker takes queued tests from the
# other, so neither finishes long before the other), each worker and what it starts on cores/TEST_WORKERS threads
# (tests/conftest.py); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal

# The tests that compare floats across processes, run again on torch's scalar kernels (no SIMD): other
# reduction orders than this CPU's AVX-512 ones, as another CPU would give (docs/portability.md).
test-portability: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PYTHON) -m pytest -q -p no:cacheprovider -k "two_processes or one_process" tests

# The declared floors, tested: a separate venv on the lowest Python that requires-python allows, every direct
# dependency at the lowest version pyproject.toml allows (indirect ones at their newest), then the suite
# (docs/portability.md, "Supported versions"). uv resolves the floors; pip has no such resolution.
FLOORS_VENV ?= .venv-floors
LOWEST_PYTHON := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\)"/\1/p' pyproject.toml)
UV := $(VENV)/bin/uv

$(UV): $(STAMP)
	$(PYTHON) -m pip install "uv>=0.5"

# python3.X on PATH (a pyenv shim counts only where it runs), else any of pyenv's 3.X.* builds
test-floors: $(UV)
	@py=$$(for candidate in python$(LOWEST_PYTHON) $$HOME/.pyenv/versions/$(LOWEST_PYTHON).*/bin/python; do \
		"$$candidate" -c 'import sys; print(sys.executable)' 2>/dev/null && break; done); \
	if [ -z "$$py" ]; then \
		echo "test-floors: no Python $(LOWEST_PYTHON) (the lowest that requires-python allows): neither" \
			"python$(LOWEST_PYTHON) on PATH nor ~/.pyenv/versions/$(LOWEST_PYTHON).*; install one" >&2; exit 1; fi; \
	rm -rf $(FLOORS_VENV) && $(UV) venv --python "$$py" $(FLOORS_VENV)
	$(UV) pip install --python $(FLOORS_VENV)/bin/python --resolution lowest-direct -e ".[dev]"
	$(UV) pip freeze --python $(FLOORS_VENV)/bin/python
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider

# The embedded default of the end-to-end recipe: synthetic slides -> shards -> tiny HIPT trained end to
# end on the CPU (a few minutes) -> metrics and report in demo_out/e2e. -q: a user error is the recipe's
# one `error:` line, not repeated in accelerate's CalledProcessError traceback.
demo: $(STAMP)
	$(VENV)/bin/accelerate launch -q --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no recipes/e2e.py

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_storage.py
	$(PYTHON) benchmarks/bench_tile_encoder.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
