# make train: set up a virtual environment and run the embedded default (tiny model, stdlib source, CPU).
# make test:  set up and run ruff and the whole test suite (notebooks included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dsjax-installed

.PHONY: setup train test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,notebook]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m dsjax.train $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# A worker that crashes (a native abort) fails the run and ends it: the other worker finishes the tests it
# holds and no more start. By default xdist would start another worker on the rest of the crashed file,
# the crashed test included, up to 8 times (a deadlock that XLA aborts after 40 s, 8 times over).
test: lint
	$(PY) -m pytest -n 2 --dist loadfile --max-worker-restart=0 -q --nbmake --durations=25

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
