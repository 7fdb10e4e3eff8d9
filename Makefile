# Thin targets: each is the command CI (or a new user) runs. `.venv` is made on first use,
# with every extra: tests compare against Grain and orbax where they are installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench,distributed,demo]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check jaxbatch tests examples benchmarks
	$(BIN)/ruff format --check jaxbatch tests examples benchmarks

# pyright fetches its own node package on first use, so it is not part of `make test`.
typecheck: $(STAMP)
	$(BIN)/pyright

# Two workers (one per core: JAX compile time dominates and is single-threaded); a test
# module stays on one worker, so the compiled functions it shares are compiled once.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Peers (Grain; tf.data where TensorFlow is installed) are compared against where present.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info
