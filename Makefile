# chatmesh developer tasks. `make run` and `make test` are the only two commands a newcomer needs:
# each installs what it uses into .venv (and .tools for buf) before doing its job.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := .tools/node_modules/.bin/buf
PROMTOOL := .tools/prometheus/usr/bin/promtool
# The web page's tests drive Debian's Chromium through playwright (its own browser downloads are not
# reachable from these machines).
CHROMIUM := /usr/bin/chromium
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# llama-cpp-python compiles from source (about 8 minutes on 2 cores; pip caches the wheel afterwards).
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

SRC := chatmesh envoy/gateway chat_service inference_service embedding_service tests benchmarks tools

.PHONY: install install-test models run test test-fast lint format protos protos-check buf-lint bench clean

$(VENV)/.runtime-installed: pyproject.toml tools/install_llama.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing runtime packages into $(VENV) (first time: ~10 min, llama-cpp-python compiles)"
	$(PY) -m pip install --upgrade pip wheel setuptools
	@# llama.cpp built for every CPU of this architecture, not just this one (see tools/install_llama.py),
	@# installed before the project so pip never builds or reuses a CPU-specific wheel for it.
	$(PY) tools/install_llama.py
	$(PY) -m pip install -e .
	$(PY) tools/install_llama.py --check
	@touch $@

$(VENV)/.test-installed: $(VENV)/.runtime-installed
	@echo ">> installing test and lint packages"
	$(PY) -m pip install -e '.[test]'
	@touch $@

# The catalog models the tests serve, pulled once into ~/.cache/chatmesh/models (outside the venv, so a
# fresh venv does not download them again; docs/models.md). `make run` pulls the ones it serves itself.
TEST_MODELS := gemma-3-270m smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
$(VENV)/.models-pulled: $(VENV)/.runtime-installed chatmesh/models/catalog.py
	@echo ">> pulling the catalog models the tests use: $(TEST_MODELS)"
	$(PY) -m chatmesh models pull $(TEST_MODELS)
	@touch $@

$(BUF):
	@echo ">> installing buf from npm into .tools/"
	npm install --prefix .tools --no-fund --no-audit @bufbuild/buf@1.75.0

# promtool checks the alert rules in deploy/prometheus: Debian's prometheus package, unpacked into .tools
# (not installed: that would also start a Prometheus server).
$(PROMTOOL):
	@echo ">> unpacking promtool from Debian's prometheus package into .tools/prometheus"
	@mkdir -p .tools/prometheus
	cd .tools && apt-get download prometheus
	dpkg-deb -x .tools/prometheus_*.deb .tools/prometheus
	rm -f .tools/prometheus_*.deb
	@$(PROMTOOL) --version | head -1

$(CHROMIUM):
	@echo ">> installing Debian's chromium for the web page's browser tests"
	apt-get install -y --no-install-recommends chromium || { echo "could not install chromium: run 'sudo apt-get install chromium' (or set CHATMESH_CHROMIUM to a Chromium binary)"; exit 1; }

install: $(VENV)/.runtime-installed
install-test: $(VENV)/.test-installed $(VENV)/.models-pulled $(BUF) $(PROMTOOL) $(CHROMIUM)
models: $(VENV)/.models-pulled

## The whole mesh on this machine, embedded defaults, Ctrl-C to stop.
run: install
	$(PY) -m chatmesh run

## The whole test suite (lint, unit, integration, end-to-end) against real components.
test: install-test $(VENV)/.models-pulled lint
	$(PY) -m pytest

test-fast: install-test
	$(PY) -m pytest tests/unit

lint: install-test protos-check buf-lint
	$(PY) -m ruff check $(SRC)
	$(PY) -m ruff format --check $(SRC)
	$(PY) -m mypy $(SRC)

format: install-test
	$(PY) -m ruff check --fix $(SRC)
	$(PY) -m ruff format $(SRC)

## Regenerate the Python stubs, Envoy's descriptor set and the OpenAPI document from protos/, and the
## gateway's config for the default settings (envoy/envoy.yaml).
protos: install-test
	$(PY) tools/protos.py

protos-check: install-test
	$(PY) tools/protos.py --check

buf-lint: install-test
	@mkdir -p build
	$(PY) tools/protos.py --buf-image build/buf-image.binpb
	$(BUF) lint build/buf-image.binpb --config protos/buf.yaml --path chatmesh

## Every benchmark behind the figures in docs/benchmarks.md (needs PostgreSQL; gateway_overhead.py needs wrk, h2load).
bench: install-test
	$(PY) benchmarks/llama_build.py
	$(PY) benchmarks/inference_relay.py
	$(PY) benchmarks/embedding_throughput.py
	$(PY) benchmarks/vector_search.py
	$(PY) benchmarks/cache_quality.py --sample 2000
	$(PY) benchmarks/cache_speed.py
	$(PY) benchmarks/telemetry_overhead.py
	$(PY) benchmarks/openai_api.py
	$(PY) benchmarks/triton_relay.py --tokens-per-s 1000
	$(PY) benchmarks/answer_quality.py
	$(PY) benchmarks/chat_overhead.py
	$(PY) benchmarks/concurrent_streams.py
	$(PY) benchmarks/engine_concurrency.py
	$(PY) benchmarks/prefix_reuse.py
	$(PY) benchmarks/mesh_concurrency.py
	$(PY) benchmarks/storage_queries.py
	$(PY) benchmarks/gateway_overhead.py
	$(PY) benchmarks/load_test.py
	$(PY) benchmarks/accounting_load.py

clean:
	rm -rf $(VENV) .tools build .pytest_cache .mypy_cache .ruff_cache
