# Flashgate build entry points. `make test` is what CI runs (.ci/run); `make bench` writes BENCHMARKS.md.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests need: stm32flash (a real AN3155 client nobody here wrote), softhsm2
# (the PKCS#11 token the broker's HSM backend is tested against), postgresql (a throwaway
# cluster per test, started with initdb/pg_ctl on a loopback port, for the shared ledger), jq (used
# by README.md's production flow, which a test runs as written), systemd (systemd-analyze verify
# of deploy/systemd/), tmux (an 80x24 terminal whose screen the progress-display test reads) and
# chromium with chromium-driver (headless Chromium driven over WebDriver by the web console's browser test).
TEST_PACKAGES := stm32flash softhsm2 postgresql jq systemd tmux chromium chromium-driver

.PHONY: all build test deps fmt clippy unit fuzz-check compose-test bench demo clean

all: build

build:
	$(CARGO) build --workspace --all-targets

## Everything CI checks: formatting, lints as errors, every test (unit, property, cross-crate, stm32flash),
## and the docker-compose fault scenario whenever a Docker engine answers.
test: deps fmt clippy unit fuzz-check compose-test

## Install the Debian packages the tests need when they are missing.
deps:
	@missing=""; for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Every test, required to find its tools: among them README.md's shell blocks run as written
## (cli/tests/integration/readme_flows.rs) and `systemd-analyze verify` of deploy/systemd/ with the
## example configurations installed in a temporary root (cli/tests/integration/deploy_files.rs).
unit:
	FLASHGATE_REQUIRE_STM32FLASH=1 FLASHGATE_REQUIRE_SOFTHSM=1 FLASHGATE_REQUIRE_POSTGRES=1 \
		FLASHGATE_REQUIRE_SYSTEMD_ANALYZE=1 FLASHGATE_REQUIRE_TMUX=1 FLASHGATE_REQUIRE_CHROMIUM=1 \
		$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

## The fuzz targets (fuzz/, not a workspace member) must keep compiling; running them is in docs/testing.md.
fuzz-check:
	$(CARGO) check --manifest-path fuzz/Cargo.toml --bins --target-dir target

## The docker-compose deployments under faults (tests/tests/compose_faults.rs: multi-site.yml, then the
## site brokers of sites.yml, one at a time): builds the images (deploy/docker/build.sh, no registry) and
## runs the scenarios whenever a Docker engine answers; with CI=true a missing engine is a failure,
## otherwise they are skipped with a note.
compose-test:
	@if docker info >/dev/null 2>&1; then \
		command -v docker-compose >/dev/null || { echo "installing docker-compose"; \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose; }; \
		./deploy/docker/build.sh && \
		FLASHGATE_COMPOSE=1 $(CARGO) test -p flashgate-tests --test compose_faults -- --nocapture; \
	elif [ "$${CI:-}" = true ]; then \
		echo "CI=true: the docker-compose fault scenario needs a Docker engine, and none answers 'docker info'" >&2; \
		exit 1; \
	else \
		echo "skipping the docker-compose fault scenario: no Docker engine answers 'docker info'"; \
	fi

## Benchmarks: release build, then every figure into BENCHMARKS.md (see scripts/bench.sh).
bench:
	$(CARGO) build --release
	./scripts/bench.sh

demo:
	$(CARGO) run --release -- demo

clean:
	$(CARGO) clean
