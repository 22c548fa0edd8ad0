"""GPTQ's per-Linear solves as jobs (algorithms/solvers.py): solved apart they give the codes
solved stacked give, no thread count changes a code, and a 2-CPU Ray cluster on the loopback
address (conftest's ray_cluster) gives the local run's codes (GGUF files:
tests/gguf/test_gptq_gguf_ray.py)."""

import copy

import pytest
import torch

from zeropoint import QuantSpec, Recipe
from zeropoint.algorithms.gptq import GPTQOptions, gptq_columns, inverse_hessian
from zeropoint.algorithms.sequential import MODEL_OPTIONS, gptq_model
from zeropoint.algorithms.solvers import RaySolver
from zeropoint.gguf.gptq_grids import block_grid


def _threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    return saved


def _problem(n_in, rows=(512, 128, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, n_in, generator=g) * torch.rand(n_in, generator=g) * 3  # (n, in)
    H = 2 * x.T @ x / x.shape[0]  # (in, in)
    return [0.05 * torch.randn(r, n_in, generator=g) for r in rows], H


def _bytes(weight, H, qtype, options):
    grid = block_grid(qtype, weight, None)
    r = gptq_columns(weight, H, grid, options)
    return grid.pack(r.fits, r.codes)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K", "Q3_K"])
def test_apart_equals_stacked_on_any_thread_count(qtype):
    """The oracle is GPTQ of the stacked weights from the Hessian itself (what the sequential
    pass ran before the jobs): each Linear solved apart from one shared inverse gives the same
    bytes, on 1 thread and on 2 (Q6_K on 768-wide rows differed between 1 and 2 threads before
    the inverse's Cholesky was pinned to one thread)."""
    weights, H = _problem(768)
    options = GPTQOptions(percdamp=0.1, act_order=True)
    saved = _threads(1)
    try:
        stacked = _bytes(torch.cat(weights), H, qtype, options)  # (sum of out, row bytes)
        _threads(2)
        inverse = inverse_hessian(H, options)
        apart = torch.cat([_bytes(w, inverse, qtype, options) for w in weights])
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(apart, stacked)


def test_gptq_model_on_ray_gives_the_local_codes(tiny_checkpoint, ray_cluster):
    """The zeropoint-directory path (QuantSpec grids) too: every QTensor's codes and scales."""
    from zeropoint.models.load import load_model

    loaded = load_model(tiny_checkpoint, progress=False)
    recipe = Recipe.uniform(QuantSpec(4, "asymmetric", "per_group", group_size=32))
    ids = torch.randint(0, 120, (6, 40), generator=torch.Generator().manual_seed(2))
    a, b = loaded.model, copy.deepcopy(loaded.model)
    gptq_model(a, recipe, ids, MODEL_OPTIONS)
    with RaySolver(ray_cluster) as solver:
        gptq_model(b, recipe, ids, MODEL_OPTIONS, solver=solver)
    qa = {n: m.weight_q for n, m in a.named_modules() if hasattr(m, "weight_q")}
    qb = {n: m.weight_q for n, m in b.named_modules() if hasattr(m, "weight_q")}
    assert qa.keys() == qb.keys() and len(qa) == 14
    for name in qa:
        assert torch.equal(qa[name].packed, qb[name].packed), name
        assert torch.equal(qa[name].scale, qb[name].scale), name
        assert torch.equal(qa[name].zero_point, qb[name].zero_point), name


def test_solver_errors():
    with pytest.raises(ValueError, match="at least 1"):
        RaySolver("local", cpus=0)
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        RaySolver("local").run([])
