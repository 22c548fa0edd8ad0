"""Gemma 3 270M, the second real model: transformers (through zeropoint's GGUF loader) and
llama.cpp compute the same model from the same file.

The source is a Q4_K_M-mix GGUF (Q5_0, Q4_K, Q6_K and Q8_0 tensors): both runtimes see the same
dequantized weights, so the figures compare runtimes, not quantizations.
"""
from __future__ import annotations

import pytest

from zeropoint.gguf.llama_cpp import llama_cpp_perplexity
from zeropoint.models.evaluate import default_text, perplexity
from zeropoint.models.load import load_model


@pytest.mark.slow
def test_gemma3_perplexity_agrees_between_transformers_and_llama_cpp(gemma3_gguf):
    text = default_text()
    loaded = load_model(gemma3_gguf, progress=False)
    ours = perplexity(loaded.model, loaded.tokenizer, text, max_tokens=1024)
    del loaded
    theirs = llama_cpp_perplexity(gemma3_gguf, text, max_tokens=1024)
    assert theirs.tokens == ours.tokens  # the same tokenizer on both sides
    # llama.cpp multiplies with 8-bit activations on the K-quant tensors and keeps K/V in f16
    assert theirs.perplexity == pytest.approx(ours.perplexity, rel=2e-2)
