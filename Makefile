# Two commands a newcomer needs: `make demo` and `make test`. Both set everything up.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The PyFlink engine's own venv: Flink 2.0 caps numpy, pyarrow and protobuf (see DESIGN.md).
FLINK_VENV  := .venv-flink
FLINK_STAMP := $(FLINK_VENV)/.installed
FLINK_REQS  := deploy/docker/requirements-flink.txt
FLINK_NODEPS := deploy/docker/requirements-flink-nodeps.txt

.PHONY: setup flink-setup browser-setup demo test lint format bench clean

setup: $(STAMP)

flink-setup: $(FLINK_STAMP)

# Tessera goes in with --no-deps (editable, so the job runs this checkout); its runtime
# dependencies come from the same list the Flink image installs.
$(FLINK_STAMP): $(FLINK_REQS) $(FLINK_NODEPS) pyproject.toml
	test -x $(FLINK_VENV)/bin/python || $(PYTHON) -m venv $(FLINK_VENV)
	$(FLINK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(FLINK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(FLINK_REQS)
	$(FLINK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r $(FLINK_NODEPS)
	$(FLINK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(FLINK_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/tessera demo

test: setup flink-setup browser-setup lint
	$(BIN)/pytest

# The console's browser tests drive Debian's chromium (a browser download cannot work offline).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

browser-setup: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup flink-setup
	$(BIN)/tessera bench --sizes $(or $(SIZES),100000)
	$(BIN)/tessera identity bench --records $(or $(IDENTITY_RECORDS),100000)
	$(BIN)/python -m pipelines.bench_erasure --events $(or $(ERASURE_EVENTS),100000)
	$(BIN)/python -m pipelines.bench_scaling --events $(or $(SCALING_EVENTS),100000)
	$(BIN)/python -m pipelines.bench_broker --records $(or $(BROKER_RECORDS),50000)
	$(BIN)/tessera profiles bench --profiles $(or $(PROFILES),1000000)

clean:
	rm -rf $(VENV) $(FLINK_VENV) .pytest_cache .ruff_cache .tessera
