# The two commands at the top of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install redis chromium demo test test-cluster lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# redis-server from Debian when the machine has none (the tests and the demo start their own).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# Chromium from Debian for the operator page's browser tests (Playwright drives it; no browser
# download). Not fatal: without it those tests skip and say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium with apt-get (browser tests of the operator page)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium could not be installed: the browser tests will be skipped"; }

demo: install redis
	$(BIN)/python -m devtools.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy buffer_service

test: install redis chromium lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The integration suite (pipeline, workers, guarantees, operations, chaos) again on a local Redis
# Cluster of three primaries (TEST_REDIS=cluster, tests/conftest.py; docs/cluster.md). The chaos
# runs with a slow Chatwoot only differ from the others in Chatwoot's part: left to `make test`.
# Tests in these files that use no Redis at all are skipped there (tests/conftest.py).
CLUSTER_TESTS := tests/test_pipeline.py tests/test_workers.py tests/test_guarantees.py \
	tests/test_ops.py tests/test_cli.py tests/test_chaos.py
test-cluster: install redis
	TEST_REDIS=cluster $(BIN)/python -m pytest -q -p no:cacheprovider $(CLUSTER_TESTS) -k "not chatwoot-slow"

bench: install redis
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) .demo build *.egg-info
