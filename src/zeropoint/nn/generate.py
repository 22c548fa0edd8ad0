"""Greedy text generation: a plain loop with a KV cache, for timing models alike.

transformers' `generate` spends about a millisecond a token on its own bookkeeping (logits
processors, stopping criteria, input preparation); at 10-30 ms a token that is a visible share of
a small quantized model's time and blurs the comparison between weight formats. This loop does
only what greedy decoding needs: one forward per token over the cache, argmax of the last logits.
It yields the tokens `generate(do_sample=False)` yields when no end-of-sequence token stops it
(tests/nn/test_generate.py holds it to that).

For Llama-family models the loop can skip transformers' module tree altogether (loop="compact",
the default where the architecture allows): compact_runtime.CompactLlama runs the same weights and
kernels with a preallocated cache, which at batch 1 removes most of the Python time per token.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    # transformers 5.x renamed the forward's `past_key_values` to `cache` (old name deprecated).
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


LOOPS = ("auto", "hf", "compact")


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                    loop: str = "auto") -> torch.Tensor:
    """(batch, prompt + max_new_tokens) token ids: the prompt, then `max_new_tokens` tokens each
    chosen by argmax over the causal LM's last logits. Never stops early (no end-of-sequence
    check), so every call does the same work.

    loop: "hf" calls the model's forward with a transformers cache each token; "compact" runs
    compact_runtime.CompactLlama (Llama-family models only; ValueError otherwise); "auto" takes
    "compact" where the model is supported, else "hf"."""
    from transformers import DynamicCache

    from . import compact_runtime

    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be a 2-D int64 tensor (batch, tokens), got {input_ids.dim()}-D "
            f"{input_ids.dtype}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; accepted: {', '.join(LOOPS)}")
    if loop == "compact" or (loop == "auto" and compact_runtime.supports(model)):
        # Built per call: it holds references to the model's current modules, which
        # quantize_model replaces in place between calls.
        return compact_runtime.CompactLlama(model).greedy(input_ids, max_new_tokens)
    cache = DynamicCache(config=model.config)
    kwargs = {_cache_keyword(type(model).forward): cache, "use_cache": True, "logits_to_keep": 1}
    tokens = [input_ids]
    step = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=step, **kwargs).logits  # (batch, 1, vocab)
        step = logits[:, -1].argmax(dim=-1, keepdim=True)  # (batch, 1)
        tokens.append(step)
    return torch.cat(tokens, dim=1)
