#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity), the
# oracles for imatrix values, weighted and i-quant bytes and KL-divergence statistics. The
# llama-cpp-python wheel has no binding for them, so they are built from the llama.cpp source
# that ships in the same sdist (0.3.36), once per machine, into a cache:
#   ${ZEROPOINT_LLAMA_TOOLS:-~/.cache/zeropoint/llama-tools-0.3.36}/bin
# About 10 minutes on 2 cores the first time; a second run finds the cache and returns at once.
# The build goes to a temporary folder renamed into place, so a killed build leaves no cache.
set -euo pipefail
VERSION=0.3.36
DEST="${ZEROPOINT_LLAMA_TOOLS:-$HOME/.cache/zeropoint/llama-tools-$VERSION}"
TOOLS=(llama-quantize llama-imatrix llama-perplexity)

if [ -x "$DEST/bin/llama-quantize" ] && [ -x "$DEST/bin/llama-imatrix" ] && [ -x "$DEST/bin/llama-perplexity" ]; then
    echo "llama.cpp tools: $DEST/bin (cached)"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-tools.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" 2>/dev/null
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Only the three tools: no tests, examples, server or network code. Release build, native CPU,
# shared ggml libraries next to the binaries (the RPATH below finds them there).
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >"$WORK/configure.log" \
    || { cat "$WORK/configure.log"; exit 1; }
cmake --build "$WORK/build" -j"$(nproc)" --target "${TOOLS[@]}" >"$WORK/build.log" \
    || { tail -50 "$WORK/build.log"; exit 1; }

mkdir -p "$(dirname "$DEST")"
STAGE="$(mktemp -d "$(dirname "$DEST")/.llama-tools.XXXXXX")"
mkdir "$STAGE/bin"
cp "${TOOLS[@]/#/$WORK/build/bin/}" "$STAGE/bin/"
cp -P "$WORK"/build/bin/*.so* "$STAGE/bin/"
"$STAGE/bin/llama-quantize" --help >/dev/null 2>&1 || [ $? -eq 1 ]  # loads its libraries
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "llama.cpp tools: $DEST/bin"
