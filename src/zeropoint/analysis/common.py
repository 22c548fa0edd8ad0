"""What the analyses share: which layers, which inputs, how to run the model, how to swap a weight.

Any torch.nn.Module with nn.Linear layers works. A batch is a tensor (the module's one input) or a
dict of keyword arguments (`input_ids=...` for Hugging Face models); the model's final output is
its `logits` (a language model: damage is KL of the next-token distribution) or else its
`last_hidden_state` or the tensor it returns (damage is 1 - cosine of each output row).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..nn.layers import linear_layers
from ..qtensor import QTensor
from ..recipe import Recipe, Rule
from ..spec import QuantSpec

Batch = torch.Tensor | dict


def analyzed_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear the analyses quantize; ValueError if none."""
    return list(linear_layers(model, "the analysis (it quantizes Linear weights)").items())


def as_recipe(what: QuantSpec | Recipe | None, keep_float: Sequence[str] = ()) -> Recipe:
    """A uniform spec (None: everything float) or a Recipe as a Recipe, with `keep_float` name
    patterns (fnmatch) kept in float on top."""
    if isinstance(what, Recipe):
        recipe = what
    elif what is None or isinstance(what, QuantSpec):
        recipe = Recipe(what, ())
    else:
        raise TypeError(f"expected a QuantSpec, a Recipe or None, got {type(what).__name__}")
    return recipe.with_rules(Rule(p, None) for p in keep_float)


def text_batches(tokenizer, text: str, *, window: int = 512, max_tokens: int = 2048,
                 causal: bool = True) -> list[dict]:
    """The first `max_tokens` tokens of `text` (no special tokens added), cut into windows of
    `window` tokens, each a batch of one sequence: {'input_ids': (1, T)}."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0, :max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} token(s); the analysis needs at least 2")
    batches = []
    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window]
        if chunk.numel() < 2:
            break
        batch = {"input_ids": chunk[None]}
        if causal:
            batch["use_cache"] = False
        batches.append(batch)
    return batches


def batch_tokens(batch: Batch) -> int:
    """Rows of output one batch produces (tokens, or samples for a plain tensor input)."""
    t = batch["input_ids"] if isinstance(batch, dict) else batch
    return int(t.shape[:-1].numel()) if not isinstance(batch, dict) else int(t.numel())


def run(model: nn.Module, batch: Batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def final_output(out) -> tuple[torch.Tensor, str]:
    """(the output tensor whose damage is measured, 'kl' or 'cosine')."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits, "kl"
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, dict):
        hidden = out.get("last_hidden_state")
    if isinstance(hidden, torch.Tensor):
        return hidden, "cosine"
    if isinstance(out, torch.Tensor):
        return out, "cosine"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], "cosine"
    raise TypeError(
        f"cannot find the model's output tensor in a {type(out).__name__}; accepted: an object "
        "with .logits or .last_hidden_state, a tensor, or a tuple whose first item is a tensor"
    )


def quantize_weight(module: nn.Linear, spec: QuantSpec) -> QTensor:
    w = module.weight.detach()
    try:
        return QTensor.quantize(w, spec)
    except ValueError as e:
        raise ValueError(f"weight {tuple(w.shape)}: {e}") from None


@contextmanager
def swapped_weights(weights: dict[nn.Module, torch.Tensor], requires_grad: bool = False):
    """Give each module a fresh weight Parameter for the duration, then put the originals back.

    A fresh Parameter, rather than writing into weight.data, leaves tied weights alone: SmolLM2's
    lm_head shares its weight with the token embedding, which must stay float."""
    saved = {}
    try:
        for module, w in weights.items():
            saved[module] = module._parameters["weight"]
            module._parameters["weight"] = nn.Parameter(w, requires_grad=requires_grad)
        yield
    finally:
        for module, original in saved.items():
            module._parameters["weight"] = original


@contextmanager
def frozen(model: nn.Module):
    """Every parameter with requires_grad False for the duration (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def one_thread():
    """torch on one thread for the duration. For the small elementwise passes and reductions of
    the analyses (error sums, weight round trips): they gain little from a second thread, and on
    a busy machine every parallel region waits for its slowest thread, which costs them 10-20x."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def progress_bar(iterable, desc: str, enabled: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="step", disable=not enabled, leave=False)
