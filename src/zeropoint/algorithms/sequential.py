"""GPTQ over a whole decoder model, one layer after another (GPTQ Sec. 4 "Step 3"; the
`--true-sequential` order of the GPTQ repository).

The calibration set's inputs to the first decoder layer are captured once. Then, layer by layer,
the Linears that read one tensor (q/k/v; gate/up) are quantized together in the order the layer
calls them, each from a Hessian of its inputs as computed with everything before it already
quantized; the layer's outputs, recomputed with all its Linears quantized, feed the next layer.
Only one layer's activations for the calibration set are held at a time, and each Hessian is
freed once its Linears are done. Quantized Linears keep fake-quantized float weights (exactly
their QTensor's dequantized values) until the end, when quantize_model swaps in QLinear.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.search import MSESearch
from ..nn.layers import linear_layers
from ..nn.quantize_model import ModelReport, importance_quantize_fn, quantize_model
from ..qtensor import QTensor
from ..recipe import Recipe
from .gptq import GPTQOptions, HessianAccumulator, gptq, inverse_hessian
from .solvers import SolveJob, run_jobs

# Each group's scale from an MSE search of its range (1% steps), not plain min/max.
DEFAULT_CLIP = MSESearch()
# Damping for whole models, 10x the paper's 1%: calibrated on pydoc and scored on news prose
# (SmolLM2, 32 x 256 tokens, int4 sym g128) perplexity went 49.4 (1%) -> 46.0 (10%) -> 46.7
# (30%) -> 46.5 (100%); at int3, 279 (1%) -> 200 (30%) -> 196 (100%). A stronger pull towards
# the identity Hessian (round-to-nearest) keeps GPTQ from fitting the calibration text's
# correlations, which another text does not share. Act-order too: with static groups it costs
# nothing at inference (the groups stay by column position).
MODEL_OPTIONS = GPTQOptions(percdamp=0.1, act_order=True)

BATCH_SEQUENCES = 8  # calibration sequences per forward: bounds the attention's working memory


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the inputs it was run for are seen."""


@dataclass
class SequentialReport:
    model: ModelReport
    layers: int
    sequences: int
    tokens: int
    seconds: float
    peak_rss_bytes: int  # VmHWM: the process's peak resident memory so far
    # GPTQ's proxy loss of each Linear, by its full name ('model.layers.0.self_attn.q_proj')
    losses: dict[str, float]


CALIB_SEQUENCE_TOKENS = 512  # GPTQ calibration sequences are cut to this many tokens


def calibration_ids(tokenizer, text: str, sequences: int, length: int) -> torch.Tensor:
    """(sequences, length) token ids: non-overlapping windows spread evenly over `text`."""
    if sequences < 1 or length < 2:
        raise ValueError(f"need at least 1 sequence of 2 tokens, got {sequences} of {length}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < sequences * length:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens; {sequences} sequences of {length} need "
            f"{sequences * length}: use a longer text or fewer tokens"
        )
    stride = ids.numel() // sequences  # >= length
    return torch.stack([ids[i * stride : i * stride + length] for i in range(sequences)])


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack of a causal LM (model.model.layers: Llama, Mistral, Qwen2/3, Gemma 2/3,
    Phi-3 all keep it there). What is inside each layer is found from its modules, not names."""
    for path in ("model.layers", "layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ValueError(
        f"sequential GPTQ needs a decoder stack at model.model.layers (Llama, Mistral, Qwen2/2.5, "
        f"Qwen3, Gemma 2, Gemma 3, Phi-3); {type(model).__name__} has none"
    )


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    recipe: Recipe,
    calib_ids: torch.Tensor,
    options: GPTQOptions = MODEL_OPTIONS,
    *,
    clip: MSESearch | None = DEFAULT_CLIP,
    true_sequential: bool = True,
    batch: int = BATCH_SEQUENCES,
    progress: bool = False,
    backend: str = "auto",
    solver=None,
    importance: Callable[[str], object] | None = None,
) -> SequentialReport:
    """Quantize `model` in place with GPTQ, layer by layer, calibrated on `calib_ids` (N, L).

    Linears inside the decoder layers that the recipe gives a spec get GPTQ; any other target
    (an lm_head the recipe quantizes, embeddings) gets round-to-nearest. Returns the measured
    sizes, the time and the peak memory.

    clip (default: an MSE search of each group's range) picks each
    group's scale; None keeps min/max. tests/algorithms/test_real_gptq.py has the accuracy
    these defaults reach on SmolLM2.
    true_sequential: quantize q/k/v, then o, then gate/up, then down, each from inputs computed
    with the ones before already quantized (about 1.3x the forward work of one pass for all).
    solver: where each Linear's GPTQ runs (algorithms/solvers.py; default here, one after
    another); a RaySolver gives the same codes.
    importance(module name) -> its weight per input column (an importance matrix's entry) or
    None: each group's clip search weighs its columns' errors by it (nn.importance_quantize_fn
    for the targets GPTQ does not take).
    """
    started = time.perf_counter()
    qtensors: dict[str, QTensor] = {}
    losses: dict[str, float] = {}

    def solve(layer, prefix, members, H):
        return _group_jobs(layer, members, H, recipe, prefix, options, clip, qtensors, losses,
                           importance)

    n_layers = run_sequential(model, calib_ids, solve, true_sequential=true_sequential,
                              batch=batch, progress=progress, solver=solver)

    rtn = importance_quantize_fn(importance) if importance is not None else None

    def supply(name, weight, spec):
        if name in qtensors:
            return qtensors[name]
        return rtn(name, weight, spec) if rtn else QTensor.quantize(weight, spec)

    report = quantize_model(model, recipe, progress=False, backend=backend, quantize_fn=supply)
    return SequentialReport(report, n_layers, calib_ids.shape[0], calib_ids.numel(),
                            time.perf_counter() - started, peak_rss_bytes(), losses)


SolveGroup = Callable[[nn.Module, str, list, torch.Tensor], list[SolveJob] | None]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    calib_ids: torch.Tensor,
    solve: SolveGroup,
    *,
    true_sequential: bool = True,
    batch: int = BATCH_SEQUENCES,
    progress: bool = False,
    solver=None,
) -> int:
    """The layer-by-layer driver behind every sequential GPTQ; returns the number of layers.

    For each group of Linears that read one tensor, `solve(layer, prefix, names, H)` gets the
    decoder layer, its name prefix ('model.layers.3.'), the Linears' names inside it and their
    inputs' Hessian (in, in). It either quantizes them itself, or returns SolveJobs
    (algorithms/solvers.py), which `solver` runs (default: here, one after another; a RaySolver:
    a stage's jobs as parallel tasks) before their `apply` writes the results back. Either way
    each Linear's weight must end up holding its quantized values before the next stage, so
    that the next Hessians and the next layer's inputs see them.
    """
    if calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise ValueError(
            f"calib_ids must be (sequences, length >= 2), got {tuple(calib_ids.shape)}"
        )
    model.eval()
    layers = decoder_layers(model)
    prefix = _prefix_of(model, layers)
    inputs, kwargs = _first_layer_inputs(model, layers[0], calib_ids, batch)
    bar = tqdm(range(len(layers)), desc="gptq", unit="layer", disable=not progress)
    groups, names = None, None
    for i in bar:
        layer = layers[i]
        if tuple(linear_layers(layer)) != names:  # layers of one stack share their structure
            names = tuple(linear_layers(layer))
            groups = _input_groups(layer, inputs[0], kwargs)
        stages = groups if true_sequential else [sum(groups, [])]
        for stage in stages:
            shared = _shared_inputs(stage, groups)  # a fresh list: popped below
            hessians = _collect(layer, shared, inputs, kwargs)
            jobs = []
            while hessians:
                members, acc = shared.pop(0), hessians.pop(0)  # freed once its jobs are made
                jobs += solve(layer, f"{prefix}{i}.", members, acc.hessian) or []
                del acc
            run_jobs(solver, jobs)  # the stage's Linears, in parallel on a RaySolver
        for b, x in enumerate(inputs):  # the quantized layer's outputs feed the next layer
            inputs[b] = _output(layer(x, **kwargs[x.shape[0]]))
    del inputs
    return len(layers)


def peak_rss_bytes() -> int:
    """VmHWM from /proc/self/status (the peak resident set), else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- internals ---------------------------------------------------------------------------------


def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    name = next(n for n, m in model.named_modules() if m is layers)
    return name + "."


def _output(out):
    return out[0] if isinstance(out, tuple) else out  # older transformers return tuples


def _first_layer_inputs(model, first_layer, calib_ids, batch):
    """Hidden states entering layer 0 for every batch, and the layer's keyword arguments
    (attention mask, rotary embeddings, ...) for each batch size."""
    inputs, kwargs = [], {}

    def catch(module, args, kw):
        x = args[0] if args else kw.pop("hidden_states")
        inputs.append(x.detach())
        kwargs.setdefault(x.shape[0], {k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for start in range(0, calib_ids.shape[0], batch):
            try:
                model(input_ids=calib_ids[start : start + batch].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def _input_groups(layer, x, kwargs) -> list[list[str]]:
    """The layer's Linears grouped by the tensor they read, in calling order: for llama
    [[q, k, v], [o], [gate, up], [down]], for Phi-3's fused projections [[qkv], [o], [gate_up],
    [down]]. Found by running one batch with hooks that keep each input alive, so that identity
    (not a reusable address) tells shared inputs apart; norms between (Qwen3's and Gemma 3's q/k
    norms, Gemma's sandwich norms) and biases need no special case."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def hook_for(name):
        def hook(module, args):
            for t, names in seen:
                if t is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))
        return hook

    for name, lin in linear_layers(layer).items():
        handles.append(lin.register_forward_pre_hook(hook_for(name)))
    try:
        layer(x, **kwargs[x.shape[0]])
    finally:
        for h in handles:
            h.remove()
    return [names for _, names in seen]


def _shared_inputs(stage: list[str], groups: list[list[str]]) -> list[list[str]]:
    """A stage's Linears split back into the groups that share one input."""
    return [g for g in groups if g[0] in stage]


def _collect(layer, shared, inputs, kwargs) -> list[HessianAccumulator]:
    """One Hessian per input group, over every calibration batch; the forward stops as soon as
    the last group's last Linear has been reached."""
    linears = linear_layers(layer)
    accs = [HessianAccumulator(linears[g[0]].in_features) for g in shared]
    handles = []
    for gi, group in enumerate(shared):
        def add(module, args, acc=accs[gi]):
            acc.add(args[0])
        handles.append(linears[group[0]].register_forward_pre_hook(add))
    def stop(module, args):
        raise _Stop
    handles.append(linears[shared[-1][-1]].register_forward_pre_hook(stop))
    try:
        for x in inputs:
            try:
                layer(x, **kwargs[x.shape[0]])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return accs


def _group_jobs(layer, members, H, recipe, prefix, options, clip, qtensors, losses,
                importance=None) -> list:
    """One SolveJob per Linear of `members` that the recipe quantizes, all from one inverse of
    their shared Hessian H; applying a job stores its QTensor in `qtensors` (full name ->
    QTensor) and its loss in `losses`, and leaves the Linear's weight fake-quantized for the rest
    of the layer's passes. Solved apart, each Linear gets the codes it got stacked with the
    others (GPTQ rounds every row on its own). One input, so one importance for the members
    (q, k, v; gate, up): the first's."""
    linears = linear_layers(layer)
    inverses = {}  # dtype -> InverseHessian of H
    imp = importance(prefix + members[0]) if importance is not None else None
    jobs = []
    for name in members:
        spec = recipe.spec_for(prefix + name)
        if spec is None:
            continue
        w = linears[name].weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        if dtype not in inverses:
            inverses[dtype] = inverse_hessian(H, options, dtype)

        def apply(r, w=w, full=prefix + name, spec=spec):
            q = QTensor.from_codes(r.codes, spec, r.scale, r.zero_point, w.dtype)
            w.data.copy_(q.dequantize())
            qtensors[full] = q
            losses[full] = r.loss

        jobs.append(SolveJob(prefix + name, _solve_spec, w.detach(), inverses[dtype],
                             (spec, options, clip, imp), apply))
    return jobs


def _solve_spec(weight, inverse, spec, options, clip, importance):
    """A SolveJob's function: GPTQ of one Linear's weight onto a QuantSpec."""
    return gptq(weight, inverse, spec, options, clip=clip, importance=importance)
