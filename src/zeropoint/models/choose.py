"""The default of `zeropoint quantize MODEL -o OUT`: among a few candidate recipes, the one that
fits the size budget and measures best on this model.

Candidates (all in the two forms the compact decoder's fast gemv reads: int8 per channel and
4-bit groups) differ in where the bits go. R1 puts the linears in 4-bit groups of 32 with a
float16 scale and minimum (ggml's Q4_1 form) and the embedding and head in int8 per row; R2
swaps them: the linears in int8 per channel, the table in the 4-bit groups. On a model whose
table holds most of the weights (Gemma 3: 262,144 x 640) R2 is the smaller; on SmolLM2 it is
over budget. Both search each float-minimum group's scale and minimum for least squared error
(calibrate/fit.py), which never does worse than min/max on a group.

Budget: the weight bytes of llama.cpp's Q4_K_M of the same model, from the tensor shapes and
gguf.mixes' rules (nothing is quantized to know it). When one candidate fits it is taken; when
several do, each is quantized in memory and scored by mean KL-divergence from the float model's
next-token distributions on a slice of the calibration text (calibrate.texts, never the scoring
texts of models/evaluate.py), and the lowest wins.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..qtensor import qtensor_nbytes
from ..recipe import (
    DEFAULT_LINEAR_SPEC,
    DEFAULT_TABLE_SPEC,
    WIDE_LINEAR_SPEC,
    WIDE_TABLE_SPEC,
    Recipe,
)

PEER_MIX = "Q4_K_M"
MEASURE_TOKENS = 384  # of the calibration text: a few seconds of forward passes per candidate


@dataclass(frozen=True)
class Candidate:
    name: str
    summary: str
    recipe: Recipe
    searched: bool = True  # float-minimum groups searched (calibrate/fit.py), else min/max

    def quantize(self, model, *, progress: bool = False):
        """Quantize `model` in place (nn.quantize_model); returns its ModelReport."""
        from ..nn.quantize_model import fitted_quantize_fn, quantize_model

        return quantize_model(model, self.recipe, progress=progress,
                              quantize_fn=fitted_quantize_fn if self.searched else None)


CANDIDATES = (
    Candidate("R1", "linears int4 g32 float16 scale+min (searched), embedding/head int8 per row",
              Recipe.linears_and_tables(DEFAULT_LINEAR_SPEC, DEFAULT_TABLE_SPEC)),
    Candidate("R2", "linears int8 per channel, embedding/head int4 g32 float16 scale+min "
              "(searched)", Recipe.linears_and_tables(WIDE_LINEAR_SPEC, WIDE_TABLE_SPEC)),
)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 10 * 2**20 else f"{nbytes / 2**10:.1f} KiB"


@dataclass
class Scored:
    candidate: Candidate
    weight_bytes: int
    kld: float | None = None  # mean KL-divergence from float; None: not measured
    seconds: float | None = None  # quantize + score


@dataclass
class Choice:
    chosen: Candidate
    budget_bytes: int
    scored: list[Scored] = field(default_factory=list)
    reason: str = ""
    # The chosen candidate's quantized copy of the model, where measuring made one (else None:
    # quantize the model with chosen.quantize).
    model: torch.nn.Module | None = field(default=None, repr=False)

    def describe(self) -> str:
        lines = [f"default recipe: {self.chosen.name} ({self.chosen.summary}); {self.reason}",
                 f"  budget: llama.cpp {PEER_MIX} of this model, {_size(self.budget_bytes)} of "
                 "weights"]
        for s in self.scored:
            size = _size(s.weight_bytes)
            fits = "fits" if s.weight_bytes <= self.budget_bytes else "over budget"
            kld = f", KLD {s.kld:.4f}" if s.kld is not None else ""
            lines.append(f"  {s.candidate.name}: {size} ({fits}){kld}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen.name, "summary": self.chosen.summary,
            "searched": self.chosen.searched, "reason": self.reason,
            "budget_bytes": self.budget_bytes, "budget": f"llama.cpp {PEER_MIX}",
            "candidates": [{"name": s.candidate.name, "summary": s.candidate.summary,
                            "weight_bytes": s.weight_bytes, "kld": s.kld} for s in self.scored],
        }


def recipe_weight_bytes(model: torch.nn.Module, recipe: Recipe) -> int:
    """Weight bytes `model` would hold under `recipe`: every quantized tensor's codes, scales
    and zero-points, the parameters kept in float, a tied tensor once. From shapes alone."""
    from ..nn.layers import module_kind
    from ..nn.quantize_model import storage_key

    quantized: dict[tuple, int] = {}
    quantized_keys = set()
    for name, module in model.named_modules():
        spec = recipe.spec_for(name, module_kind(module))
        if spec is None:
            continue
        w = module.weight
        key = storage_key(w)
        quantized_keys.add(key)
        quantized[(*key, spec)] = qtensor_nbytes(tuple(w.shape), spec)
    kept = {}
    for t in model.parameters():
        key = storage_key(t)
        if key not in quantized_keys:
            kept[key] = t.nbytes
    return sum(quantized.values()) + sum(kept.values())


def peer_budget_bytes(loaded) -> int:
    """Weight bytes of llama.cpp's Q4_K_M of the loaded model's source (models.load's
    LoadedModel), from gguf.mixes' plan over its tensors' shapes."""
    from pathlib import Path

    from ..gguf.mixes import ModelParams, plan_types

    source = Path(loaded.source)
    if source.is_file():
        from ..gguf.reader import read_gguf

        with read_gguf(source) as f:
            tensors = [(t.name, t.type, tuple(t.shape)) for t in f.tensors]
            params = ModelParams.from_metadata(f.metadata)
    else:
        from ..gguf.export import (
            check_architecture,
            extra_sources,
            gguf_name,
            hparams,
            model_params,
        )

        family = check_architecture(loaded.config, source)
        hp = hparams(loaded.config, family)
        params = model_params(hp)
        tied = bool(getattr(loaded.config, "tie_word_embeddings", False))
        state = loaded.model.state_dict()
        tensors = []
        for name, t in state.items():
            g = None if (tied and name == "lm_head.weight") else gguf_name(name, family)
            if g is not None:
                tensors.append((g, "F32", tuple(t.shape)))
        # What llama.cpp needs that the torch model does not hold (Llama 3.1's rope_freqs).
        have = {name for name, _, _ in tensors}
        tensors += [(s.name, s.type, tuple(s.shape)) for s in extra_sources(hp)
                    if s.name not in have]
    return plan_types(tensors, PEER_MIX, params).weight_bytes()


def calibration_ids(tokenizer, tokens: int = MEASURE_TOKENS) -> torch.Tensor:
    """(1, tokens) ids from the start of the default calibration text."""
    from ..calibrate.texts import default_calibration_text

    ids = tokenizer(default_calibration_text(), return_tensors="pt")["input_ids"]
    return ids[:, :tokens]


@torch.no_grad()
def _log_probs(model, ids) -> torch.Tensor:
    """(tokens, vocab) float32 log-probabilities of the next token at every position."""
    logits = model(ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def mean_kld(base_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over positions of KL(base || other), each (tokens, vocab) log-probabilities."""
    p = base_log_probs.exp()
    return float((p * (base_log_probs - log_probs)).sum(-1).mean())


def choose(model, budget_bytes: int, ids: torch.Tensor | None = None,
           candidates: Sequence[Candidate] = CANDIDATES, *, progress: bool = False) -> Choice:
    """The candidate for `model` (a float torch model, left unchanged): the only one within
    `budget_bytes`, else the lowest mean KLD from `model` on `ids` (1, tokens) among those within
    it. When none fits (a tiny model, whose scales weigh more than llama.cpp's), the smallest."""
    scored = [Scored(c, recipe_weight_bytes(model, c.recipe)) for c in candidates]
    fitting = [s for s in scored if s.weight_bytes <= budget_bytes]
    if not fitting:
        smallest = min(scored, key=lambda s: s.weight_bytes)
        return Choice(smallest.candidate, budget_bytes, scored,
                      "none fits the budget: the smallest (not measured)")
    if len(fitting) == 1:
        return Choice(fitting[0].candidate, budget_bytes, scored,
                      "the only candidate within the budget (not measured)")
    if ids is None:
        raise ValueError("several candidates fit the budget: calibration ids are needed to "
                         "measure them")
    base = _log_probs(model, ids)
    best, best_model = None, None
    for s in fitting:
        started = time.perf_counter()
        trial = copy.deepcopy(model)
        s.candidate.quantize(trial)
        s.kld = mean_kld(base, _log_probs(trial, ids))
        s.seconds = time.perf_counter() - started
        if best is None or s.kld < best.kld:  # the first of equals stays
            best, best_model = s, trial
        del trial
        if progress:
            print(f"  measured {s.candidate.name}: KLD {s.kld:.4f} in {s.seconds:.1f} s",
                  flush=True)
    others = ", ".join(f"{s.candidate.name} {s.kld:.4f}" for s in fitting)
    return Choice(best.candidate, budget_bytes, scored,
                  f"lowest mean KLD from float on {ids.shape[1]} calibration tokens ({others})",
                  best_model)
