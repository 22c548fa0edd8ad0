"""HQQ into ggml block types (zeropoint.gguf.hqq): every block no worse than the type's own
quantization (llama.cpp's bytes), judged on gguf-py's decoding of both; files that llama.cpp
runs."""

import numpy as np
import pytest
import torch
from test_export import make_tiny_llama
from test_gptq_grids import decode

from zeropoint.cli import main
from zeropoint.gguf.blocks import quantize_blocks
from zeropoint.gguf.gptq_grids import GRID_TYPES, block_grid
from zeropoint.gguf.hqq import hqq_blocks

BLOCK = {t: block_grid(t).group_size(256) for t in GRID_TYPES}


def weights(gen, n_out=48, n_in=512):
    """Weight-like rows: a spread of row scales, heavy-tailed values, an all-zero row, a row
    with one large outlier per 128 values."""
    w = torch.distributions.StudentT(5.0).sample((n_out, n_in)) * 0.02
    w *= torch.logspace(-1, 0, n_out)[:, None]
    w[4] = 0.0
    w[6, ::128] = 0.5
    return w


def block_errors(w, data, qtype) -> torch.Tensor:
    """(blocks,) float64 squared error of each block, decoded by gguf-py."""
    diff = w.double() - decode(data, qtype, w.shape).double()
    return diff.square().view(-1, BLOCK[qtype]).sum(1)


@pytest.mark.parametrize("qtype", GRID_TYPES)
def test_no_block_is_worse_than_the_types_own_and_the_tensor_is_better(qtype, gen):
    w = weights(gen)
    ours = block_errors(w, hqq_blocks(w, qtype), qtype)
    own = block_errors(w, quantize_blocks(w, qtype), qtype)
    assert bool((ours <= own).all())
    assert float(ours.sum()) < 0.995 * float(own.sum())


def test_legacy_refit_is_the_least_squares_line(gen):
    # Q4_1 blocks x ~ d q + m: refit's (d, m) are numpy's least squares, rounded to fp16.
    x = torch.randn(64, 32, generator=gen) * 0.05
    grid = block_grid("Q4_1")
    fit = grid.fit(x, 0)
    codes, _ = fit.round_cols(x)
    new = fit.refit(x, codes)
    for r in range(x.shape[0]):
        a = np.stack([codes[r].numpy().astype(np.float64), np.ones(32)], 1)
        (d, m), *_ = np.linalg.lstsq(a, x[r].numpy().astype(np.float64), rcond=None)
        assert abs(float(new.halves[r, 0]) - d) <= abs(d) * 2**-10
        assert abs(float(new.halves[r, 1]) - m) <= abs(m) * 2**-10 + 1e-7


@pytest.mark.parametrize("qtype, value", [("Q4_1", 0.25), ("Q4_0", 0.0), ("Q8_0", 0.0)])
def test_legacy_refit_keeps_degenerate_blocks(qtype, value):
    # A constant block of Q4_1 takes one code (no line through it); a zero block of the others
    # takes the zero code (no scale to fit): their parameters stay.
    x = torch.full((2, 32), value)
    fit = block_grid(qtype).fit(x, 0)
    codes, _ = fit.round_cols(x)
    assert torch.equal(fit.refit(x + 0.01, codes).halves, fit.halves)


def test_bad_input_is_named(gen):
    with pytest.raises(ValueError, match="whole blocks of 32"):
        hqq_blocks(torch.randn(2, 48), "Q4_0")
    with pytest.raises(ValueError, match="NaN or inf"):
        hqq_blocks(torch.full((1, 32), float("nan")), "Q4_0")
    with pytest.raises(ValueError, match="overflows float16"):
        hqq_blocks(torch.full((1, 256), 1e10), "Q4_K")
    with pytest.raises(ValueError, match="IQ4_NL.*accepted"):
        hqq_blocks(torch.randn(1, 32), "IQ4_NL")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hqq")
    make_tiny_llama(path)
    return path


def test_cli_writes_hqq_gguf_that_llama_cpp_runs(tiny_dir, tmp_path, capsys):
    from gguf import GGUFReader
    from test_gptq_gguf import assert_llama_cpp_agrees, read_tensors

    from zeropoint.models.load import load_model

    out, rtn = tmp_path / "hqq.gguf", tmp_path / "rtn.gguf"
    assert main(["quantize", str(tiny_dir), "--method", "hqq", "--type", "Q4_0", "-o",
                 str(out)]) in (None, 0)
    assert main(["quantize", str(tiny_dir), "--type", "Q4_0", "-o", str(rtn), "--quiet"]) in (
        None, 0)
    printed = capsys.readouterr().out
    assert "peak memory" in printed
    ours, own = read_tensors(out), read_tensors(rtn)
    f32 = tmp_path / "f32.gguf"
    main(["quantize", str(tiny_dir), "--type", "F32", "-o", str(f32), "--quiet"])
    exact = read_tensors(f32)
    changed = 0
    for name, (qtype, values) in ours.items():
        assert qtype == own[name][0]
        if qtype not in GRID_TYPES:
            assert torch.equal(values, own[name][1])
            continue
        w = exact[name][1]
        mine = (values.double() - w.double()).square().view(-1, BLOCK[qtype]).sum(1)
        theirs = (own[name][1].double() - w.double()).square().view(-1, BLOCK[qtype]).sum(1)
        assert bool((mine <= theirs).all()), name
        changed += not torch.equal(values, own[name][1])
    assert changed >= 10
    assert len(GGUFReader(out).tensors) == len(GGUFReader(rtn).tensors)

    assert_llama_cpp_agrees(out, load_model(tiny_dir, progress=False), ours)


def test_k_type_rows_must_hold_whole_super_blocks():
    with pytest.raises(ValueError, match="Q4_K takes rows of whole blocks of 256"):
        hqq_blocks(torch.randn(2, 96), "Q4_K")
    with pytest.raises(ValueError, match="Q4_K takes rows"):
        hqq_blocks(torch.randn(256), "Q4_K")
