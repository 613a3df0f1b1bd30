# One-word commands. Each creates the virtualenv first if it is missing or stale.
# `make test` is the test command CI runs; `make check` is lint + format + types + tests.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test faults audit lint format types check bench lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the main job on local servers (DATABASE_URL, AMQP_URL; default localhost)
	$(BIN)/prompter-worker migrate --create-database
	$(BIN)/prompter-worker demo --events 300
	$(BIN)/prompter-worker run

test: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadgroup  # two processes; the fault scenarios in one of them

faults: $(STAMP)  ## the whole fault suite, with the slow scenarios `make test` skips
	PROMPTER_FAULTS_SLOW=1 $(BIN)/pytest -m faults tests/faults

audit: $(STAMP)  ## the pins against OSV / PyPI advisories; exit 3 = NOT AUDITED (no source)
	$(BIN)/python scripts/audit constraints.txt

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

types: $(STAMP)
	$(BIN)/mypy

check: lint types test

bench: $(STAMP)
	$(BIN)/python -m bench

lock:  ## re-pin every dependency after changing pyproject.toml
	bash scripts/lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
