# leukofhir: `make demo` and `make test` set everything up themselves (venv, FHIR server build, browser).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup venv fhir-server browser demo lint docs test test-unit test-airflow-matrix bench lock clean airflow-stack \
	airflow-stack-stop

setup: venv fhir-server

# The venv is rebuilt when the dependencies or their lock change.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

fhir-server:
	scripts/fhir-server build

# Headless Chromium renders the HTML run report in the browser tests (Debian's package; root installs it).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "install Debian's chromium package for the browser tests (sudo apt-get install chromium)"; exit 1; fi; }

demo: setup
	$(BIN)/leukofhir demo

# The linter, the formatter's check and the import contract of pyproject.toml (docs/architecture.md: the layers).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or a page left out of nav fails.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Three pytest processes side by side (scripts/test-suite: the tiers that start servers of their own, the rest of
# tests/integration, the DAG and pure tests), each with its own HAPI server and ports; TEST_SUITE_SERIAL=1 runs one.
test: lint docs setup browser
	scripts/test-suite $(PYTEST_ARGS)

# The pure tests, on UNIT_WORKERS processes (pytest-xdist; they share nothing).
UNIT_WORKERS ?= 2
test-unit: venv
	$(BIN)/pytest -p no:cacheprovider -n $(UNIT_WORKERS) -m "not fhir and not airflow_server and not stack \
	  and not airflow_matrix and not packaging and not service" $(PYTEST_ARGS)

# The wheel installed into fresh venvs with the oldest and the newest supported Airflow, by README "Installing into
# an existing Airflow", then a backfill against the real HAPI server (tests/matrix; CI runs it after `make test`).
test-airflow-matrix: setup
	$(BIN)/pytest -p no:cacheprovider -m airflow_matrix tests/matrix $(PYTEST_ARGS)

# The CeleryExecutor stack without Docker (Redis, PostgreSQL, Airflow, two Celery workers): README,
# "A CeleryExecutor stack without Docker". The script installs Debian's redis-server and postgresql when missing.
airflow-stack: venv
	scripts/airflow-stack start

airflow-stack-stop:
	scripts/airflow-stack stop

# Regenerate the lock from a fresh resolution of pyproject.toml (with the test extras).
lock:
	rm -rf /tmp/leukofhir-lock && $(PYTHON) -m venv /tmp/leukofhir-lock
	/tmp/leukofhir-lock/bin/pip install -q -e ".[test,celery]"
	/tmp/leukofhir-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	-scripts/fhir-server stop
	-scripts/airflow-stack stop
	rm -rf $(VENV) fhir-server/target build dist *.egg-info site
