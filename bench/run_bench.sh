#!/usr/bin/env bash
# Builds the llama.cpp peer if needed and runs the engine benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x ref/bin/llama-bench ] || bash tools/build_llamacpp.sh
[ -x build/tern ] || make
build/tern pull --dir models smollm2-135m qwen2.5-coder-0.5b
python3 bench/bench_engine.py --models smollm2-135m qwen2.5-coder-0.5b --threads 1 2 "$@"
