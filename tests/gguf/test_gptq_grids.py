"""GPTQ inside ggml block layouts (zeropoint.gguf.gptq_grids), against the types' own quantizers
and gguf-py's dequantizer."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from zeropoint.algorithms.gptq import GPTQOptions, gptq_columns
from zeropoint.gguf.blocks import LEGACY_TYPES, quantize_blocks
from zeropoint.gguf.gptq_grids import block_grid

COLUMNS = {"Q8_0": 96, "Q4_0": 96, "Q4_1": 96, "Q5_0": 96, "Q5_1": 96}  # K types: test_kquant_grids


def weights(gen, n_in, n_out=24):
    """Rows of uneven scale, with an all-zero row and (for the K types) all-zero sub-blocks."""
    w = torch.randn(n_out, n_in, generator=gen) * torch.logspace(-3, 0, n_out)[:, None]
    w[3] = 0.0
    w[5, :16] = 0.0  # one zero sub-block of 16 (Q3_K), half a block of 32
    w[7, 32:64] = -w[7, 32:64].abs()  # a block whose extreme is negative
    return w


def decode(data: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    """gguf-py's dequantizer: an implementation independent of zeropoint's."""
    out = gguf_dequantize(data.contiguous().view(-1).numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(shape)


def run(w, H, qtype, options: GPTQOptions) -> torch.Tensor:
    grid = block_grid(qtype)
    r = gptq_columns(w, H, grid, options)
    return grid.pack(r.fits, r.codes)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_identity_hessian_gives_the_types_own_bytes(qtype, act_order, gen):
    # Uncorrelated unit inputs: no error to spread, so every block keeps the scales and codes
    # the type's own quantizer (bit-exact with llama.cpp, tests/gguf) gives the same weights.
    w = weights(gen, COLUMNS[qtype])
    got = run(w, torch.eye(w.shape[1]), qtype, GPTQOptions(act_order=act_order))
    assert torch.equal(got, quantize_blocks(w, qtype))


def correlated_inputs(gen, n, k):
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen)
    return (torch.randn(n, k, generator=gen) @ mix) * torch.linspace(0.3, 3.0, k)


def output_error(x, w, w_hat) -> float:
    return float(((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_correlated_inputs_beat_the_types_own_quantization(qtype, act_order, gen):
    k = COLUMNS[qtype]
    x = correlated_inputs(gen, 2048, k)
    w = torch.randn(32, k, generator=gen) * 0.02
    H = 2 * x.T @ x / x.shape[0]
    data = run(w, H, qtype, GPTQOptions(act_order=act_order))
    rtn = quantize_blocks(w, qtype)
    assert data.shape == rtn.shape and data.dtype == torch.uint8
    gptq_err = output_error(x, w, decode(data, qtype, w.shape))
    rtn_err = output_error(x, w, decode(rtn, qtype, w.shape))
    assert gptq_err < 0.8 * rtn_err


def test_unknown_type_is_named():
    with pytest.raises(ValueError, match="IQ3_S.*accepted: Q8_0, Q4_0, .*Q6_K, IQ4_NL, IQ4_XS"):
        block_grid("IQ3_S")
