#!/usr/bin/env bash
# run_ci.sh: every libFuzzer target for a short, fixed budget, as CI runs it.
#
#   tests/fuzz/run_ci.sh [BUILD_DIR]        (default build-fuzz, built with
#                                            CC=clang -DTN_FUZZ=ON -DTN_SANITIZE=ON)
#
# Each target starts from its committed inputs (tests/fuzz/corpus/<target>,
# tests/fuzz/seeds/<name>, tests/fuzz/regressions/<target>), all of which
# run first, then mutates for FUZZ_SECONDS with a fixed -seed. libFuzzer
# writes new inputs only into the first corpus folder it is given, which
# here is a temporary one, and crash files go under a temporary prefix: the
# repository is never written to. A crash, a leak, a timeout, running out
# of memory, or a target that does not start fails the run; the script goes
# on with the other targets, names every one that failed, copies what
# libFuzzer left (the crashing input) to BUILD_DIR/fuzz-artifacts/<target>/
# and exits 1.
#
# Environment:
#   FUZZ_SECONDS      seconds of fuzzing per target (default 20)
#   FUZZ_SEED         libFuzzer -seed (default 1)
#   FUZZ_TARGETS      which targets, space-separated (default: all seven)
#   FUZZ_RSS_MB       -rss_limit_mb (default 2048)
#   TERN_FUZZ_MODELS  where fuzz_tokenizer finds the model vocabularies
#                     (default: models/ in this repository)
#   FUZZ_REQUIRE_MODELS=1  fail, instead of skipping fuzz_tokenizer, when
#                     none of its vocabularies is there
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BUILD=${1:-build-fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-20}
SEED=${FUZZ_SEED:-1}
RSS_MB=${FUZZ_RSS_MB:-2048}
TARGETS=${FUZZ_TARGETS:-fuzz_gguf fuzz_api fuzz_tokenizer fuzz_chat fuzz_grammar fuzz_jinja fuzz_config}
export TERN_FUZZ_MODELS=${TERN_FUZZ_MODELS:-$ROOT/models}
# leaks are failures; a crash report should name lines
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

# per target: short name (seeds, dictionary), -max_len
declare -A SHORT=([fuzz_gguf]=gguf [fuzz_api]=api [fuzz_tokenizer]=tokenizer
                  [fuzz_chat]=chat [fuzz_grammar]=grammar [fuzz_jinja]=jinja
                  [fuzz_config]=config)
declare -A MAXLEN=([fuzz_gguf]=4096 [fuzz_api]=8192 [fuzz_tokenizer]=4097
                   [fuzz_chat]=8192 [fuzz_grammar]=4096
                   [fuzz_jinja]=8192 [fuzz_config]=8192)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-fuzz-ci.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

failed=()
skipped=()
t_all=$(date +%s)
for t in $TARGETS; do
  short=${SHORT[$t]:-}
  if [ -z "$short" ]; then
    echo "run_ci: unknown target $t" >&2
    failed+=("$t(unknown)")
    continue
  fi
  bin=$BUILD/$t
  if [ ! -x "$bin" ]; then
    echo "run_ci: $bin is missing (build $BUILD with TN_FUZZ=ON)" >&2
    failed+=("$t(not built)")
    continue
  fi
  if [ "$t" = fuzz_tokenizer ]; then
    have=0
    for f in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-Q4_K_M.gguf \
             qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
      [ -r "$TERN_FUZZ_MODELS/$f" ] && have=1
    done
    if [ $have = 0 ]; then
      if [ "${FUZZ_REQUIRE_MODELS:-0}" = 1 ]; then
        echo "run_ci: FAIL $t: no vocabulary under $TERN_FUZZ_MODELS" >&2
        failed+=("$t(no models)")
      else
        echo "run_ci: skip $t: no vocabulary under $TERN_FUZZ_MODELS" \
             "(make models, or set TERN_FUZZ_MODELS)" >&2
        skipped+=("$t")
      fi
      continue
    fi
  fi

  new=$WORK/$t/new
  art=$WORK/$t/artifacts
  mkdir -p "$new" "$art"
  dirs=("$new")
  for d in "tests/fuzz/corpus/$t" "tests/fuzz/seeds/$short" \
           "tests/fuzz/regressions/$t"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  opts=(-seed="$SEED" -max_total_time="$SECONDS_EACH" -max_len="${MAXLEN[$t]}"
        -timeout=10 -rss_limit_mb="$RSS_MB" -artifact_prefix="$art/"
        -print_final_stats=1 -detect_leaks=1)
  [ -f "tests/fuzz/$short.dict" ] && opts+=(-dict="tests/fuzz/$short.dict")

  echo "run_ci: $t for ${SECONDS_EACH}s over ${dirs[*]:1}"
  log=$WORK/$t/log
  t0=$(date +%s)
  "$bin" "${opts[@]}" "${dirs[@]}" >"$log" 2>&1
  rc=$?
  t1=$(date +%s)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
  if [ $rc -ne 0 ]; then
    echo "run_ci: FAIL $t (exit $rc after $((t1 - t0))s); its log ends:" >&2
    grep -v '^INFO: \|^#[0-9]' "$log" | tail -40 >&2
    keep=$BUILD/fuzz-artifacts/$t
    mkdir -p "$keep"
    cp "$art"/* "$keep"/ 2>/dev/null &&
      echo "run_ci: failing input(s) kept in $keep:" $(ls "$keep") >&2
    failed+=("$t")
  else
    echo "run_ci: ok   $t: ${runs:-?} runs in $((t1 - t0))s, ${cov:-cov: ?}," \
         "$(ls "$new" | wc -l) new inputs (discarded)"
  fi
done

echo "run_ci: $(($(date +%s) - t_all))s in all;" \
     "${#failed[@]} failed${failed[*]:+: ${failed[*]}};" \
     "${#skipped[@]} skipped${skipped[*]:+: ${skipped[*]}}"
[ ${#failed[@]} -eq 0 ]
