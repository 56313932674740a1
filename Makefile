# Tally: `make dev` runs the whole pipeline with demo traffic; `make test` passes the tests.
# Both create the virtualenv they need from nothing but this repo and the package registries.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install promtool infra-tools browser client-check dev test test-fast soak lint format clean bench bench-quick profile screenshots

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

# promtool and prometheus for tests/infra and the live Prometheus test: Debian's `prometheus`
# package, installed only when either is missing (as root, or through sudo). .ci/run calls this.
APT_GET := env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300
promtool:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo $(APT_GET) install -y --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { $$sudo $(APT_GET) update && $$sudo $(APT_GET) install -y --no-install-recommends prometheus >/dev/null; }; \
	  promtool --version | head -1; }

# docker-compose (validates docker-compose.yml offline: no engine needed) and nginx (checks and
# runs infra/nginx/nginx.conf) for tests/infra: Debian packages, installed only when missing.
INFRA_PACKAGES := docker-compose nginx
infra-tools:
	@command -v docker-compose >/dev/null && { command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo $(APT_GET) install -y --no-install-recommends $(INFRA_PACKAGES) >/dev/null 2>&1 || \
	  { $$sudo $(APT_GET) update && $$sudo $(APT_GET) install -y --no-install-recommends $(INFRA_PACKAGES) >/dev/null; }; \
	  docker-compose version --short; }

# chromium for tests/console (Playwright drives the system browser; it downloads none): Debian's
# package, installed only when missing. `make test` runs this.
browser:
	@command -v chromium >/dev/null || [ -n "$${TALLY_CHROMIUM:-}" ] || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo $(APT_GET) install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 || \
	  { $$sudo $(APT_GET) update && $$sudo $(APT_GET) install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null; }; \
	  chromium --version; }

dev: install
	$(BIN)/tally dev --demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check core schemas ingest consumers query client tests/client
	$(BIN)/mypy
	$(BIN)/mypy --strict client/tally_client

# The producer SDK (client/) is its own distributable: `pip install ./client` into a fresh venv must
# install it alone, nothing of the server's dependencies (issue 20). Built from a copy, so that
# setuptools leaves no build/ or egg-info in client/.
client-check:
	rm -rf build/client-venv build/client-src && mkdir -p build && cp -r client build/client-src
	$(PYTHON) -m venv build/client-venv
	build/client-venv/bin/pip install --quiet ./build/client-src
	build/client-venv/bin/python -I -c "import tally_client"
	@extra=$$(build/client-venv/bin/pip list --format=freeze --exclude pip --exclude setuptools --exclude tally-client); \
	  test -z "$$extra" || { echo "pip install ./client pulled in: $$extra"; exit 1; }

test: lint browser client-check
	$(BIN)/pytest

# The console's screenshots in README: the browser tests save them, this copies them into docs/img.
screenshots: install browser
	TALLY_TEST_ARTIFACTS=build/test-artifacts $(BIN)/pytest -q tests/console
	cp build/test-artifacts/console/console-explore.png build/test-artifacts/console/console-ops.png docs/img/

test-fast: install
	$(BIN)/pytest tests/unit

# The soak (tests/soak): the whole pipeline under steady mixed traffic, then exact counts,
# no unexpected answer or error log line, flat memory. 300 s here; `make test` runs it for 60 s
# (TALLY_SOAK_SECONDS unset). -s prints its summary table. Override: make soak TALLY_SOAK_SECONDS=900
TALLY_SOAK_SECONDS ?= 300
soak: install
	TALLY_SOAK_SECONDS=$(TALLY_SOAK_SECONDS) $(BIN)/pytest -s tests/soak

# Benchmarks (bench/suite.py, docs/performance.md): every figure beside its limit measured in the
# same run, one table, JSON in bench/results/. bench (~12 min) also draws the ingest chart.
# bench-quick (~3 min; CI runs it before the tests) fails when a gated ratio is > 30 % worse than
# bench/baseline.json twice in a row (a failing benchmark is measured once more).
bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.suite --chart docs/img/ingest-throughput-latency.png --markdown

bench-quick: install
	$(BIN)/python -m bench.suite --quick --gate bench/baseline.json

# The ingest benchmark's load on one `tally ingest` worker under py-spy: build/ingest-profile.svg (a flame
# graph), build/ingest-profile.txt (raw stacks) and the top functions by share (docs/performance.md).
# Override the load: make profile PROFILE_ARGS="--batch 1000 --seconds 30"
PROFILE_ARGS ?=
profile: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.profile $(PROFILE_ARGS)

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format core schemas ingest consumers query

clean:
	rm -rf $(VENV) .tally .pytest_cache .mypy_cache .ruff_cache .hypothesis
