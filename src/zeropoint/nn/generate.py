"""Text generation: greedy_generate, a plain greedy loop for timing models alike, and
stream_tokens, token by token with sampling (Sampling, Sampler), for `zeropoint generate`.

transformers' `generate` spends about a millisecond a token on its own bookkeeping (logits
processors, stopping criteria, input preparation); at 10-30 ms a token that is a visible share of
a small quantized model's time and blurs the comparison between weight formats. This loop does
only what greedy decoding needs: one forward per token over the cache, argmax of the last logits.
It yields the tokens `generate(do_sample=False)` yields when no end-of-sequence token stops it
(tests/nn/test_generate.py holds it to that).

For the families the compact decoder knows (compact_config) the loop can skip transformers' module tree altogether (loop="compact",
the default where the architecture allows): compact_runtime.CompactLlama runs the same weights and
kernels with a preallocated cache, which at batch 1 removes most of the Python time per token.

stream_tokens drives any decoder with start(length) and feed(ids) -> logits: TorchDecoder here
(compact or transformers) or llama.cpp's (gguf/llama_cpp.py), so that tokens are chosen by one
Sampler whatever runs the model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
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
    compact_runtime.CompactDecoder (the families compact_config knows; ValueError otherwise); "auto" takes
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


# --- streaming generation with sampling --------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits. temperature 0 is greedy (argmax); above 0
    the logits are divided by it, then cut to the top_k most likely tokens (0: no cut), then to
    the smallest set whose probability reaches top_p (1: no cut), as transformers' warpers do
    in that order. seed makes a sampled run repeatable; None draws one (`Sampler.seed` says
    which)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no cut) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2^63-1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(vocab,) float64 probabilities that `sampling` (not greedy) draws the next token from,
    given the (vocab,) logits of the last position: zero outside the top-k / top-p cut."""
    if sampling.greedy:
        raise ValueError("greedy decoding takes the argmax; it has no sampling distribution")
    scaled = logits.double() / sampling.temperature
    if 0 < sampling.top_k < scaled.numel():
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1:
        ordered, order = torch.sort(probs, descending=True)
        # A token stays while the probability of the tokens before it is still under top_p: the
        # most likely token always stays.
        before = torch.cumsum(ordered, dim=0) - ordered
        drop = torch.zeros_like(probs, dtype=torch.bool)
        drop[order] = before >= sampling.top_p
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum()
    return probs


class Sampler:
    """Chooses token ids from logits by a Sampling, from its own seeded generator: the same seed
    and the same logits give the same tokens, whatever else uses torch's global generator."""

    def __init__(self, sampling: Sampling = Sampling()):
        self.sampling = sampling
        self.seed = sampling.seed
        if self.seed is None and not sampling.greedy:
            self.seed = int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(self.seed or 0)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from the (vocab,) logits of the last position."""
        if self.sampling.greedy:
            return int(torch.argmax(logits))
        probs = sampling_probabilities(logits, self.sampling)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TorchDecoder:
    """One sequence through a causal LM in torch, token ids in, last logits out, with a KV cache:
    on compact_runtime.CompactLlama where the model allows (loop "auto"), else through the
    model's own forward with a transformers cache. `engine` says which."""

    def __init__(self, model, loop: str = "auto"):
        from . import compact_runtime

        if loop not in LOOPS:
            raise ValueError(f"unknown loop {loop!r}; accepted: {', '.join(LOOPS)}")
        self.model = model
        compact = loop == "compact" or (loop == "auto" and compact_runtime.supports(model))
        self.compact = compact_runtime.CompactLlama(model) if compact else None
        self.engine = "zeropoint's compact decoder" if compact else "transformers"
        self.max_len = getattr(model.config, "max_position_embeddings", None)

    def start(self, length: int) -> None:
        """Forget the sequence; the next one may be `length` tokens long."""
        if self.max_len is not None and length > self.max_len:
            raise ValueError(f"{length} tokens (prompt and new tokens) exceed the model's "
                             f"context of {self.max_len}")
        if self.compact is not None:
            self.compact.start(1, length)
        else:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> torch.Tensor:
        """The (vocab,) float logits after `ids`, run at the sequence's next positions."""
        x = torch.tensor([ids], dtype=torch.long)  # (1, len(ids))
        if self.compact is not None:
            return self.compact.forward(x)[0, -1].float()
        kwargs = {_cache_keyword(type(self.model).forward): self.cache, "use_cache": True,
                  "logits_to_keep": 1}
        return self.model(input_ids=x, **kwargs).logits[0, -1].float()


def stream_tokens(decoder, prompt: list[int], max_new_tokens: int, sampler: Sampler,
                  stop: Collection[int] = ()) -> Iterator[int]:
    """Token ids as the decoder makes them after `prompt`: at most `max_new_tokens`, ending early
    after a token in `stop` (which is yielded). `decoder` has start(length) and feed(ids) ->
    (vocab,) logits (TorchDecoder, gguf.llama_cpp.LlamaCppDecoder)."""
    if not prompt:
        raise ValueError("the prompt has no tokens; generation needs at least one")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    decoder.start(len(prompt) + max_new_tokens)
    logits = decoder.feed(list(prompt))
    for i in range(max_new_tokens):
        token = sampler(logits)
        yield token
        if token in stop or i == max_new_tokens - 1:
            return
        logits = decoder.feed([token])
