# Set-up and everyday commands. `make run` and `make test` work on a fresh machine: each
# creates .venv and installs what it needs (torch pinned to the CPU build on these machines).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-unit test-integration config bench eval clean

run: $(STAMP)
	$(VENV)/bin/linewatch run --config config.toml

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

test-integration: $(STAMP)
	$(VENV)/bin/pytest -q tests/integration

# regenerate the commented default config from the config models
config: $(STAMP)
	$(PY) -m linewatch.configdoc > config.toml

bench: $(STAMP)
	$(PY) bench/bench_daemon.py

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,postgres,text]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) var reports .pytest_cache
