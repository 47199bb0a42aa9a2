# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench compare lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,sweep,zoo]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) experiments/run.py --agent hybrid_rnn

# one pytest-xdist worker per core, a test module on one worker (its module-scoped fixtures are built once)
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile

# the inner loop: every test but those marked slow (entry points end to end, learning to a result)
test-fast: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) experiments/bench.py

compare: $(STAMP)
	$(PY) experiments/compare.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
