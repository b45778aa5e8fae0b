#!/usr/bin/env bash
# Build the llama.cpp reference implementation (CPU only) used to generate
# test fixtures under tests/fixtures/ref/.  Nothing built here is committed.
#
# Source: the llama-cpp-python sdist from PyPI, which vendors llama.cpp
# (vendor/llama.cpp).  Output: $REF (default <repo>/ref/):
#   ref/bin/   llama-tokenize llama-completion llama-simple llama-perplexity
#              llama-bench llama-server llama-cli     (symlink to ref/build/bin)
#   ref/lib/   libllama.so libggml*.so               (same directory)
#   ref/llama_cpp_python-<ver>/   unpacked sdist (its llama_cpp/ Python package
#              is used by tools/gen_ref_fixtures.py with LLAMA_CPP_LIB_PATH)
#   ref/VERSION  llama-cpp-python version + llama.cpp commit
#   ref/READY    path of llama-tokenize + version (written once it exists)
#
# Usage: tools/build_llamacpp.sh [-j N] [--sdist FILE] [--version X.Y.Z]
#                                [--only TARGET]
#   --only llama-server builds that one tool (what `make test-peers` needs)
# Env:   REF=<dir> to build elsewhere.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REF="${REF:-$ROOT/ref}"
JOBS=2
SDIST=""
VERSION="0.3.36"   # pinned: llama.cpp ggml-org/llama.cpp@0c1e57098
ONLY=""

while [ $# -gt 0 ]; do
    case "$1" in
        -j) JOBS="$2"; shift 2 ;;
        --sdist) SDIST="$2"; shift 2 ;;
        --version) VERSION="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

mkdir -p "$REF/cache"
# llama.cpp forces its runtime and library output into <build>/bin; expose
# that directory as ref/bin and ref/lib.
for d in bin lib; do
    if [ -d "$REF/$d" ] && [ ! -L "$REF/$d" ]; then rmdir "$REF/$d"; fi
    ln -sfn build/bin "$REF/$d"
done

if [ -z "$SDIST" ]; then
    SDIST="$REF/cache/llama_cpp_python-$VERSION.tar.gz"
    if [ ! -f "$SDIST" ]; then
        PIP="${PIP:-pip3}"
        "$PIP" download --no-deps --no-binary :all: \
            "llama-cpp-python==$VERSION" -d "$REF/cache"
    fi
fi

SRC_PARENT="$REF"
SRC="$REF/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    tar -xzf "$SDIST" -C "$SRC_PARENT"
fi
LCPP="$SRC/vendor/llama.cpp"

COMMIT="$(sed -n 's/.*update llama.cpp to ggml-org\/llama.cpp@\([0-9a-f]*\).*/\1/p' "$SRC/CHANGELOG.md" | head -n1)"
LVER="$(sed -n 's/^set(LLAMA_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$LCPP/CMakeLists.txt" | paste -sd. -)"
{
    echo "llama-cpp-python $VERSION"
    echo "llama.cpp commit $COMMIT (from CHANGELOG.md of the sdist)"
    echo "llama.cpp version $LVER"
} > "$REF/VERSION"
cat "$REF/VERSION"

BUILD="$REF/build"
# Release, CPU only, -march=native; no network (no curl/openssl, no prebuilt UI).
cmake -S "$LCPP" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
    -DGGML_OPENMP=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_COMMIT="$COMMIT" \
    -DCMAKE_BUILD_RPATH="$BUILD/bin"

# Build in priority order so the cheap, most-needed tools appear first.
build() { ninja -C "$BUILD" -j "$JOBS" "$@"; }
if [ -n "$ONLY" ]; then
    build "$ONLY"
    ls -l "$REF/bin/$ONLY"
    exit 0
fi
build llama-tokenize
printf 'llama-tokenize %s\nllama.cpp commit %s version %s (llama-cpp-python %s)\n' \
    "$REF/bin/llama-tokenize" "$COMMIT" "$LVER" "$VERSION" > "$REF/READY"
build llama llama-perplexity llama-simple llama-completion llama-bench
build llama-server || echo "warning: llama-server failed to build" >&2
build llama-cli || echo "warning: llama-cli failed to build" >&2
ls -l "$REF/bin/"
echo "done: $REF"
