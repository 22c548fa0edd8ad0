"""The compact decoder's gates (csrc/token_ops.c: SiLU and GELU-tanh times the up projection,
on their own vectorized e^x) against float64 torch, within a few float32 roundings."""

import pytest
import torch
import torch.nn.functional as F

from zeropoint import ckernels

needs_c = pytest.mark.skipif(ckernels.library() is None, reason="no C compiler here")
U = 2.0**-24  # float32 unit roundoff


def inputs(gen):
    """Every range a gate meets: a dense sweep past where e^x underflows, Gaussian activations
    of several scales, tiny values and exact zeros; odd length (a vector loop's tail)."""
    return torch.cat([torch.linspace(-120, 120, 200_001), torch.randn(50_001, generator=gen) * 3,
                      torch.randn(10_001, generator=gen) * 1e-4, torch.zeros(3)])


def run(name, g, u):
    out = g.clone()
    getattr(ckernels.library(), name)(out.data_ptr(), u.data_ptr(), out.numel())
    return out


@needs_c
@pytest.mark.parametrize("name, exact", [
    ("zp_silu_mul", lambda x: F.silu(x)),
    ("zp_gelu_tanh_mul", lambda x: F.gelu(x, approximate="tanh")),
], ids=["silu", "gelu_tanh"])
def test_gate_times_up_matches_float64(gen, name, exact):
    g = inputs(gen)
    u = torch.randn(g.numel(), generator=gen)
    y = run(name, g, u).double()
    reference = exact(g.double()) * u.double()
    # float32 evaluation of the formula: a few roundings relative to |g u| (the activation is
    # bounded by |g|); 8 u leaves room for the e^x polynomial's 2 ulp, and catches a wrong
    # constant or branch (errors of 1e-3 and up).
    err = (y - reference).abs()
    allowed = 8 * U * (g.double() * u.double()).abs()
    worst = int((err - allowed).argmax())
    assert bool((err <= allowed).all()), (
        f"at g={g[worst].item():.6g}: {y[worst].item():.9g} vs {reference[worst].item():.9g}")
    assert torch.isfinite(y).all()


@needs_c
def test_the_bound_catches_a_sloppy_gate(gen):
    # A gate off by 1e-6 relative (e.g. a degree-4 polynomial) fails the 8 u bound.
    g = inputs(gen)
    u = torch.ones(g.numel())
    y = run("zp_silu_mul", g, u).double() * (1 + 1e-6)
    assert not bool(((y - F.silu(g.double())).abs() <= 8 * U * g.double().abs()).all())
