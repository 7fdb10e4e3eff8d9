# Thin targets: each is the command CI (or a new user) runs. `.venv` is made on first use,
# with every extra: tests compare against Grain and orbax where they are installed.
#
# Two ends of the supported JAX range (pyproject.toml): `.venv` uses the machine's `python3`
# (3.11 resolves JAX 0.10.2, the oldest we support); `.venv-newest` uses the newest Python
# found (pyenv's or on PATH: 3.12+ resolves the newest JAX release on the registry). `make test` tests the
# first, `make test-newest` the second; `.ci/run` runs both.
PY ?= python3
PY_NEWEST ?= $(shell for p in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -V -r) python3.14 python3.13 python3.12; do $$p -c '' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NEWEST := .venv-newest
NEWEST_STAMP := $(NEWEST)/.installed
EXTRAS := '.[test,bench,distributed,demo]'

.PHONY: test test-slow test-newest demo lint typecheck bench bench-sweep bench-datarax clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e $(EXTRAS)
	touch $(STAMP)

# The newest JAX: `--upgrade` so an existing venv moves to a release published since.
$(NEWEST_STAMP): pyproject.toml
	@test -n "$(PY_NEWEST)" || { echo "no python3.12+ found: set PY_NEWEST=/path/to/python"; exit 1; }
	test -x $(NEWEST)/bin/python || $(PY_NEWEST) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST)/bin/python -m pip install --quiet --upgrade -e $(EXTRAS) jax jaxlib
	touch $(NEWEST_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check jaxbatch tests examples benchmarks
	$(BIN)/ruff format --check jaxbatch tests examples benchmarks

# pyright fetches its own node package on first use, so it is not part of `make test`.
typecheck: $(STAMP)
	$(BIN)/pyright

# Two workers (one per core: JAX compile time dominates and is single-threaded); a test
# module stays on one worker, so the compiled functions it shares are compiled once.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m 'not slow'

# The heaviest sweeps (marked `slow`): every path of the law checker per batcher, the
# examples, the demo and the bench smoke run. CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow

# The whole suite, `slow` included, on the newest JAX (lint is version-independent: run once,
# by `test`).
test-newest: $(NEWEST_STAMP)
	$(NEWEST)/bin/python -c 'import jax, sys; print("JAX", jax.__version__, "on Python", sys.version.split()[0])'
	$(NEWEST)/bin/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Peers (Grain; tf.data where TensorFlow is installed) are compared against where present.
# `make bench` measures on the newest JAX; `make bench-sweep` adds the headline ratios on
# the oldest supported JAX, 0.11.x and the newest (benchmarks/version_sweep.py).
bench: $(NEWEST_STAMP)
	$(NEWEST)/bin/python benchmarks/run.py

bench-sweep: $(STAMP) $(NEWEST_STAMP) .venv-0.11/.installed
	$(BIN)/python benchmarks/version_sweep.py

# JAX 0.11.x, excluded from the range (pyproject.toml says why) but watched by the sweep:
# install as usual, then force 0.11 (pip warns about the conflict, on purpose).
.venv-0.11/.installed: pyproject.toml
	test -x .venv-0.11/bin/python || $(PY_NEWEST) -m venv .venv-0.11
	.venv-0.11/bin/python -m pip install --quiet --upgrade pip
	.venv-0.11/bin/python -m pip install --quiet -e $(EXTRAS)
	.venv-0.11/bin/python -m pip install --quiet 'jax==0.11.*' 'jaxlib==0.11.*' || true
	touch .venv-0.11/.installed

# Datarax 0.1.17, the peer of the shuffled epoch, needs JAX 0.11.1 (outside our range): its own
# venv, jaxbatch installed over it without deps (its own deps first, at versions that keep
# that JAX). The bench's Datarax row names the JAX it ran on.
DATARAX := .venv-datarax
$(DATARAX)/.installed: pyproject.toml
	@test -n "$(PY_NEWEST)" || { echo "no python3.12+ found: set PY_NEWEST=/path/to/python"; exit 1; }
	test -x $(DATARAX)/bin/python || $(PY_NEWEST) -m venv $(DATARAX)
	$(DATARAX)/bin/python -m pip install --quiet --upgrade pip
	$(DATARAX)/bin/python -m pip install --quiet datarax grain 'equinox>=0.13' 'jaxtyping>=0.3'
	$(DATARAX)/bin/python -m pip install --quiet --no-deps -e .
	touch $(DATARAX)/.installed

bench-datarax: $(DATARAX)/.installed
	$(DATARAX)/bin/python benchmarks/bench_pipeline.py --fixed-only --results benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(NEWEST) .venv-0.11 $(DATARAX) build dist *.egg-info
