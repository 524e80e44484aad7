# Commerce developer entry points. `make` (or `make help`) lists them.
#
# Infra (PostgreSQL, RabbitMQ, Redis) is checked/started by
# scripts/ensure-infra.sh, which reads the same COMMERCE__*__URL variables as
# the services; what the console's browser test needs (Node.js, Chromium, npm
# packages) by scripts/ensure-browser.sh. CARGO_TARGET_DIR is honoured from the environment if set.

CARGO ?= cargo
TEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help up test release fmt lint check infra browser bench bench-saga bench-hop bench-gateway gateway-instructions bench-catalog bench-reservations check-broker-restart

help: ## List the targets
	@echo "Commerce make targets:"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'
	@echo "Variables: TEST_ARGS='...' is passed to the test runner (e.g. make test TEST_ARGS=checkout runs only tests whose name contains 'checkout')."

infra: ## Make sure PostgreSQL, RabbitMQ and Redis answer (starts/installs them if needed)
	scripts/ensure-infra.sh

browser: ## Make sure Node.js, Chromium and e2e/browser's npm packages are there (the console's browser test)
	scripts/ensure-browser.sh

up: infra ## Start infra, build, and run every service under the supervisor
	$(CARGO) build --bins
	$(CARGO) run --quiet --bin commerce -- up

test: infra browser ## Start infra, install the browser test's needs, build all binaries, run all tests (nextest if installed)
	$(CARGO) build --workspace --bins
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace $(TEST_ARGS)"; \
		$(CARGO) nextest run --workspace $(TEST_ARGS); \
	else \
		echo "cargo-nextest not installed; using cargo test"; \
		echo "$(CARGO) test --workspace $(TEST_ARGS)"; \
		$(CARGO) test --workspace $(TEST_ARGS); \
	fi

release: ## Release builds of every binary, the gateway's with whole-program optimisation (target/release-lto/gateway)
	$(CARGO) build --release --bins
	$(CARGO) build --profile release-lto -p gateway

fmt: ## Format all code
	$(CARGO) fmt --all

lint: ## Check formatting and run clippy (warnings are errors)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

check: lint test ## lint + test

bench: ## Saga load against a running system (make up); BENCH_ARGS='--rate 100 --duration 30s --floor'
	$(CARGO) run --quiet --bin commerce -- bench $(BENCH_ARGS)

bench-saga: infra ## Issue 5's figures: highest rate, 100/50/25% load, pgbench floors (stop make up first)
	scripts/bench-saga.sh

bench-hop: infra ## Benchmark one message hop through the broker
	$(CARGO) bench -p shared --bench one_hop

bench-gateway: infra ## Gateway vs direct vs nginx for a small GET
	scripts/bench-gateway.sh

gateway-instructions: infra ## Instructions per proxied request (callgrind); GATEWAY_BIN=path to count another build
	scripts/gateway-instructions.sh $(GATEWAY_BIN)

bench-catalog: infra ## GET /products/{id} through the gateway, cache warm vs off
	scripts/bench-catalog.sh

bench-reservations: infra ## Reservations/s: one hot product vs spread over 1,000
	scripts/bench-reservations.sh

check-broker-restart: infra ## DISRUPTIVE: restart the real RabbitMQ mid-benchmark; check nothing is lost
	scripts/broker-restart-check.sh
