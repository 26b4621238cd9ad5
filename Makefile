# The two commands of the README. Each sets up its own environment first.
VENV ?= .venv
export ATTNKIT_VENV := $(VENV)

.PHONY: env test bench

env:
	@bash scripts/bootstrap.sh

test: env
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: env
	$(VENV)/bin/attnkit bench $(BENCH_ARGS)
