"""GPTQ onto llama-quantize --imatrix's block scales with the Hessian shrunk towards its diagonal
(GPTQOptions.diagonal_shrink): from full GPTQ (0) to the importance-weighted nearest rounding
(1), against llama's weighted quantizer (gguf.weighted, byte-identical to llama-quantize
--imatrix in tests/gguf) read by gguf-py's dequantizer."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from zeropoint.algorithms.gptq import GPTQOptions, gptq_columns
from zeropoint.gguf.gptq_grids import block_grid
from zeropoint.gguf.iquants import quantize as quantize_iquant
from zeropoint.gguf.weighted import quantize_weighted

N_IN = 256


def decode(data, qtype: str, shape) -> torch.Tensor:
    raw = data.contiguous().view(-1).numpy() if isinstance(data, torch.Tensor) else data.ravel()
    out = gguf_dequantize(raw, GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(shape)


def inputs(gen, n, column_scale, mixing_seed):
    """Activations (n, N_IN): shared column energies, correlations drawn from `mixing_seed`."""
    g = torch.Generator().manual_seed(mixing_seed)
    mix = torch.eye(N_IN) + 1.5 * torch.randn(N_IN, N_IN, generator=g) / N_IN ** 0.5
    return (torch.randn(n, N_IN, generator=gen) @ mix) * column_scale


def hessian(x):
    return 2 * x.T @ x / x.shape[0]


def gptq(w, H, qtype, imp, shrink):
    grid = block_grid(qtype, w, imp)
    r = gptq_columns(w, H, grid, GPTQOptions(percdamp=0.01, act_order=True,
                                             diagonal_shrink=shrink))
    return decode(grid.pack(r.fits, r.codes), qtype, w.shape)


def layer_error(H, w, w_hat) -> float:
    d = (w - w_hat).double()
    return float(((d @ H.double()) * d).sum())


@pytest.fixture
def layer(gen):
    column_scale = torch.logspace(-1, 0.5, N_IN)[torch.randperm(N_IN, generator=gen)]
    calib = inputs(gen, 4096, column_scale, mixing_seed=1)
    w = torch.randn(48, N_IN, generator=gen) * 0.05
    imp = (calib ** 2).mean(0).numpy()  # what an importance matrix holds: mean x^2 per column
    return w, hessian(calib), imp, column_scale


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "IQ4_XS"])
def test_full_shrink_is_nearest_rounding_on_llamas_weighted_scales(qtype, layer):
    # No correlations left: nothing to spread, every weight to its nearest level of the grid
    # llama.cpp stored, so never farther from it than llama.cpp's own weighted rounding.
    w, H, imp, _ = layer
    ours = gptq(w, H, qtype, imp, shrink=1.0)
    encode = quantize_iquant if qtype == "IQ4_XS" else quantize_weighted
    theirs = decode(encode(w.numpy(), qtype, imp), qtype, w.shape)
    assert ((w - ours).abs() <= (w - theirs).abs() + 1e-7).all()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "IQ4_XS"])
def test_gptq_beats_weighted_rounding_on_the_calibration_hessian(qtype, layer):
    w, H, imp, _ = layer
    rtn = gptq(w, H, qtype, imp, shrink=1.0)
    for shrink in (0.0, 0.5):
        assert layer_error(H, w, gptq(w, H, qtype, imp, shrink)) < layer_error(H, w, rtn)


def test_shrinking_fits_a_held_out_text_whose_correlations_differ(layer, gen):
    # The held-out text has the calibration text's column energies (its diagonal) but other
    # correlations between columns: what full GPTQ fitted beyond the diagonal does not carry
    # over, and shrinking towards the diagonal keeps what does.
    w, H, imp, column_scale = layer
    held_out = hessian(inputs(gen, 4096, column_scale, mixing_seed=2))
    errors = {s: layer_error(held_out, w, gptq(w, H, "Q4_0", imp, s)) for s in (0.0, 0.5)}
    assert errors[0.5] < errors[0.0]


def test_shrink_out_of_range_is_refused():
    with pytest.raises(ValueError, match="diagonal_shrink must be in"):
        GPTQOptions(diagonal_shrink=1.5)
