# tern: top-level entry points. CMake + Ninja do the building.
#
#   make            release build: build/tern
#   make test       from a fresh Debian 12: deps, venv, models, release and
#                   ASan+UBSan builds, ctest and pytest on both
#   make serve      from a fresh Debian 12: deps, build, the default model,
#                   then `tern serve` on http://127.0.0.1:8080 (PORT=...)
#   make run        a greedy completion from the default model
#   make bench      tern vs llama.cpp (bench/run_bench.sh)

SHELL := /bin/bash
BUILD ?= build
ASAN_BUILD ?= build-asan
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= smollm2-135m gemma3-270m
JOBS ?= $(shell nproc)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps venv models test test-release test-asan run serve bench fuzz clean

all: $(BUILD)/tern

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release

$(BUILD)/tern: $(BUILD)/build.ninja FORCE
	ninja -C $(BUILD) -j$(JOBS)

$(ASAN_BUILD)/build.ninja:
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTN_SANITIZE=ON

asan: $(ASAN_BUILD)/build.ninja FORCE
	ninja -C $(ASAN_BUILD) -j$(JOBS)

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

models: venv
	$(PY) tools/fetch_model.py $(MODELS)

test: deps venv models
	$(MAKE) all asan
	$(MAKE) test-release test-asan

test-release:
	cd $(BUILD) && ctest --output-on-failure
	TERN_BIN=$(abspath $(BUILD)/tern) $(PY) -m pytest -q tests/e2e

test-asan:
	cd $(ASAN_BUILD) && TN_TEST_QUICK=1 ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure
	TERN_BIN=$(abspath $(ASAN_BUILD)/tern) TERN_SLOW=1 $(PY) -m pytest -q tests/e2e

PORT ?= 8080
HOST ?= 127.0.0.1
SERVE_MODEL ?= smollm2-135m
serve: deps
	$(MAKE) all
	$(MAKE) venv
	$(PY) tools/fetch_model.py $(SERVE_MODEL)
	$(BUILD)/tern serve -m $(SERVE_MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

run: all models
	$(BUILD)/tern run -m smollm2-135m --temp 0 -n 64 -p "The capital of France is"

bench: all models
	bash bench/run_bench.sh

# libFuzzer on the GGUF reader and the OpenAI request parser (clang,
# ASan+UBSan), FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz:
	CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
	ninja -C build-fuzz fuzz_gguf fuzz_api
	mkdir -p build-fuzz/corpus-gguf build-fuzz/corpus-api
	./build-fuzz/fuzz_gguf -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	  -dict=tests/fuzz/gguf.dict build-fuzz/corpus-gguf tests/fuzz/seeds/gguf
	./build-fuzz/fuzz_api -max_total_time=$(FUZZ_SECONDS) \
	  -dict=tests/fuzz/api.dict build-fuzz/corpus-api tests/fuzz/seeds/api

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)

FORCE:
