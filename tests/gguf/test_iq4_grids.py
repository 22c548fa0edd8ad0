"""GPTQ onto IQ4_NL and IQ4_XS (zeropoint.gguf.iq4_grids): the bytes it writes, read by
gguf-py's dequantizer (independent of zeropoint's), against llama.cpp's quantizer's own."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from zeropoint.algorithms.gptq import GPTQOptions, gptq_columns
from zeropoint.gguf.blocks import dequantize_blocks
from zeropoint.gguf.gptq_grids import block_grid
from zeropoint.gguf.iquants import quantize as quantize_iquant

TYPES = ("IQ4_NL", "IQ4_XS")
COLUMNS = 512  # two IQ4_XS super-blocks, sixteen IQ4_NL blocks


def decode(data: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    out = gguf_dequantize(data.contiguous().view(-1).numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(shape)


def weights(gen, n_out=24):
    w = torch.randn(n_out, COLUMNS, generator=gen) * torch.logspace(-3, 0, n_out)[:, None]
    w[3] = 0.0  # a zero row: every step 0
    w[7, 32:64] = -w[7, 32:64].abs()
    return w


def importance(gen):
    return (torch.rand(COLUMNS, generator=gen) ** 4 + 1e-3).numpy()


def gptq(w, H, qtype, imp, act_order=True):
    grid = block_grid(qtype, w, imp)
    r = gptq_columns(w, H, grid, GPTQOptions(act_order=act_order))
    return grid.pack(r.fits, r.codes), r


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("qtype", TYPES)
def test_identity_hessian_rounds_to_the_nearest_level_of_llamas_steps(qtype, with_importance,
                                                                      gen):
    # No error to spread: the headers (d, IQ4_XS's sub-block scales) are llama.cpp's quantizer's,
    # and each value goes to its nearest level under them. llama.cpp picks its indices under its
    # search's step before refitting d, so its values are never closer than these.
    w = weights(gen)
    imp = importance(gen) if with_importance else None
    data, _ = gptq(w, torch.eye(COLUMNS), qtype, imp, act_order=False)
    llama = torch.from_numpy(quantize_iquant(w.numpy(), qtype, imp))
    assert data.shape == llama.shape and data.dtype == torch.uint8
    header = 2 if qtype == "IQ4_NL" else 8
    per_row = data.view(w.shape[0], -1, data.shape[1] // (COLUMNS // (32 if header == 2 else 256)))
    llama_blocks = llama.view(per_row.shape)
    assert torch.equal(per_row[..., :header], llama_blocks[..., :header])
    ours, theirs = decode(data, qtype, w.shape), decode(llama, qtype, w.shape)
    assert ((w - ours).abs() <= (w - theirs).abs()).all()
    assert not torch.equal(ours, theirs)  # llama.cpp's own indices are not always the nearest


@pytest.mark.parametrize("qtype", TYPES)
def test_written_bytes_decode_to_what_gptq_rounded_to(qtype, gen):
    # The weights GPTQ worked with (the fits' dequantized values) are what llama.cpp will read.
    w = weights(gen)
    x = torch.randn(1024, COLUMNS, generator=gen)
    data, r = gptq(w, 2 * x.T @ x / x.shape[0], qtype, importance(gen))
    values = decode(data, qtype, w.shape)
    assert torch.equal(values, dequantize_blocks(data.contiguous().view(-1), qtype, w.shape))
    # Every value lies on its block's grid: re-rounding it onto the same steps changes nothing.
    again = torch.cat([f.round_cols(values[:, 32 * k : 32 * k + 32])[1]
                       for k, f in enumerate(r.fits)], 1)
    assert torch.equal(again, values)
    assert not torch.equal(values, decode(torch.from_numpy(quantize_iquant(w.numpy(), qtype)),
                                          qtype, w.shape))


def correlated_inputs(gen, n, k):
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen) / k ** 0.5 * 4
    return (torch.randn(n, k, generator=gen) @ mix) * torch.linspace(0.3, 3.0, k)


@pytest.mark.parametrize("qtype", TYPES)
def test_correlated_inputs_beat_llamas_weighted_quantization(qtype, gen):
    x = correlated_inputs(gen, 4096, COLUMNS)
    w = torch.randn(32, COLUMNS, generator=gen) * 0.02
    H = 2 * x.T @ x / x.shape[0]
    imp = (torch.diagonal(H) / 2).numpy()  # an importance matrix: the mean x^2 of each column
    data, _ = gptq(w, H, qtype, imp)
    llama = torch.from_numpy(quantize_iquant(w.numpy(), qtype, imp))

    def err(b):
        d = (w - decode(b, qtype, w.shape)).double()
        return float(((x.double() @ d.T) ** 2).sum())

    assert err(data) < 0.8 * err(llama)


def test_iq4_needs_the_weights():
    with pytest.raises(ValueError, match="IQ4_XS.*weights"):
        block_grid("IQ4_XS")
