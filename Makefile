# Run `make help` for the list of targets.
PYTHON ?= python

.PHONY: help install test lint quickstart bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## install the package and its development tools (editable)
	$(PYTHON) -m pip install -e '.[dev]'

test:  ## run the test suite, two workers (about 3 minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q -n 2 --dist worksteal

lint:  ## ruff: style and common bugs
	$(PYTHON) -m ruff check .

quickstart:  ## the offline quickstart: train on scikit-learn's digits, write a sample grid
	$(PYTHON) -m diffusion.train

bench:  ## speed against diffusers and lucidrains (pip install -e '.[bench]'; ~15 min on 2 CPU cores)
	$(PYTHON) -m experiments.performance.bench --profile quick

clean:  ## remove run outputs and caches
	rm -rf outputs multirun .pytest_cache .ruff_cache
