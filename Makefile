# The two commands of the README. Each sets up its own environment first.
VENV ?= .venv
export ATTNKIT_VENV := $(VENV)

.PHONY: env test bench

env:
	@bash scripts/bootstrap.sh

# Two pytest workers (pytest-xdist), each test file on one of them: on a fresh clone most of the
# suite's time is Numba compiling the kernels cold, which runs single-threaded per process.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2

test: env
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: env
	$(VENV)/bin/attnkit bench $(BENCH_ARGS)
