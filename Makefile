# userstream: `make demo` runs everything in one process; `make test` runs lint and every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-bench test-channels test-cluster lint chromium format bench bench-quick bench-latency bench-writers chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/userstream demo

lint: $(STAMP)
	$(BIN)/ruff check core sync gateway tests bench
	$(BIN)/ruff format --check core sync gateway tests bench
	$(BIN)/mypy core sync gateway

# The browser client's Node unit tests; every test in wal ingest mode (the default), browser
# tests (tests/browser, Debian's /usr/bin/chromium) included, but the benchmarks' slow smoke
# tests (BENCH_SMOKE below); then the trigger-mode suite: the tests of its own relay and
# schema, and the end-to-end guarantees again (tests/conftest.py), without the integration
# tests that no ingest mode touches (Redis faults, presence, the SQL reference, the throwaway
# server, the Redis Cluster fixture). The access property runs 30 and 25 examples (its soak,
# thousands: README).
TRIGGER_SUITE := tests/integration tests/e2e/test_access_property.py tests/e2e/test_faults.py \
	tests/e2e/test_stream.py tests/e2e/test_must_refetch.py
TRIGGER_SKIPS := $(addprefix --ignore=tests/integration/,test_bus_redis_faults.py \
	test_signals_redis_faults.py test_presence_feed.py test_reference_access.py \
	test_logical_server.py test_redis_cluster.py)

# The browser tests drive Debian's Chromium, never a downloaded one: installed when missing.
chromium:
	@[ -x /usr/bin/chromium ] || { \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The smoke tests of the benchmarks of Redis outages, fan-out, capacity inputs and bus input
# start many processes for seconds each: `make test-bench` runs them, `make test` leaves them
# out.
BENCH_SMOKE := tests/bench/test_degraded_smoke.py tests/bench/test_fanout_smoke.py \
	tests/bench/test_capacity_smoke.py tests/bench/test_input_share_smoke.py

test: lint chromium
	node --test client/test/
	USERSTREAM_PROPERTY_EXAMPLES=30 $(BIN)/pytest $(addprefix --ignore=,$(BENCH_SMOKE))
	USERSTREAM_TEST_INGEST=trigger USERSTREAM_PROPERTY_EXAMPLES=25 $(BIN)/pytest $(TRIGGER_SUITE) \
		$(TRIGGER_SKIPS)

test-bench: $(STAMP)
	$(BIN)/pytest $(BENCH_SMOKE)

# The end-to-end and browser suites again with every gateway and relay on the channel bus
# (USERSTREAM_BUS=channels): on the tests' Redis, then on a throwaway three-node Redis Cluster
# (tests/redis_cluster.py). About ten minutes each; not part of `make test`.
test-channels: $(STAMP)
	USERSTREAM_TEST_BUS=channels $(BIN)/pytest tests/e2e tests/browser

test-cluster: $(STAMP)
	USERSTREAM_TEST_BUS=cluster $(BIN)/pytest tests/e2e tests/browser

format: $(STAMP)
	$(BIN)/ruff check --fix core sync gateway tests bench
	$(BIN)/ruff format core sync gateway tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.suite

bench-quick: $(STAMP)
	$(BIN)/python -m bench.suite --quick --out bench/results-quick.json

bench-latency: $(STAMP)
	$(BIN)/python -m bench.latency

bench-writers: $(STAMP)
	$(BIN)/python -m bench.writers
	$(BIN)/python -m bench.writers --relay-ceiling

chaos: $(STAMP)
	$(BIN)/python -m bench.chaos --minutes 10

clean:
	rm -rf $(VENV) .userstream .pytest_cache .mypy_cache .ruff_cache
