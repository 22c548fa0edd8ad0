"""Importance-weighted quantization (gguf.weighted) against llama-quantize --imatrix on a tiny
model written here, and against a slow float32 loop of ggml-quants.c's weighted searches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_llama_gguf import llama_metadata, llama_tensors

from zeropoint import ckernels
from zeropoint.cli import main
from zeropoint.gguf import quantize_blocks
from zeropoint.gguf.imatrix import ImportanceMatrix, write_imatrix
from zeropoint.gguf.llama_tools import run_tool
from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.mixes import ModelParams, plan_types
from zeropoint.gguf.requantize import requantize, write_quantized
from zeropoint.gguf.weighted import (
    IGNORES_IMPORTANCE,
    WEIGHTED_TYPES,
    imatrix_metadata,
    quantize_weighted,
)
from zeropoint.gguf.writer import TensorData, write_gguf

F32 = np.float32
SINGLE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
         "Q4_0", "Q5_0"]

# --- a tiny llama model and its importance matrices --------------------------------------------

H, FF, LAYERS, VOCAB = 256, 288, 8, 64  # ffn_down rows of 288: the K types fall back there


def _tiny_model(path, rng):
    meta = llama_metadata(H, FF, LAYERS, VOCAB, file_type=0)

    def weight(name, shape):
        # Heavy tails and a scale per tensor: blocks whose searches have something to choose.
        x = rng.standard_t(4, size=shape).astype(F32) * F32(rng.uniform(0.005, 0.1))
        return TensorData(name, "F32", shape, x)

    tensors = llama_tensors(H, FF, LAYERS, VOCAB, weight)
    shapes = {t.name: t.shape for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    tensors.append(weight("output.weight", (VOCAB, H)))
    write_gguf(path, meta, tensors)
    return shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model path, {kind: imatrix path}, {kind: ImportanceMatrix}) for a tiny llama GGUF.
    "random": heavy-tailed sums, a few dead columns, one entry missing (quantized plainly) and
    one matrix that saw no token (all ones); "uniform": every value 1."""
    rng = np.random.default_rng(14)
    folder = tmp_path_factory.mktemp("weighted")
    model = folder / "tiny.gguf"
    shapes = _tiny_model(model, rng)
    sums, counts = {}, {}
    for name, shape in shapes.items():
        if name == "blk.3.attn_k.weight":
            continue
        s = (rng.gamma(0.3, size=shape[1]) * 50).astype(F32)
        s[rng.integers(0, shape[1], 3)] = 0
        sums[name], counts[name] = s, np.array([0 if name == "blk.1.ffn_up.weight" else 40])
    random = ImportanceMatrix(sums, counts, ["tiny random text"], 5, 8)
    uniform = ImportanceMatrix({n: np.ones(s[1], F32) for n, s in shapes.items()},
                               {n: np.array([1]) for n in shapes}, [], 1, 1)
    files = {"random": folder / "random.imatrix.gguf", "uniform": folder / "uniform.imatrix.gguf"}
    write_imatrix(files["random"], random)
    write_imatrix(files["uniform"], uniform)
    return model, files, {"random": random, "uniform": uniform}


def _llama_quantize(model, out, qtype, imatrix=None, pure=False):
    args = (["--imatrix", str(imatrix)] if imatrix else []) + (["--pure"] if pure else [])
    run_tool("llama-quantize", *args, model, out, qtype)


def _ours(model, out, target, imatrix_path, imatrix, tmp_path, pure=False):
    if pure:  # a recipe that is llama-quantize --pure
        recipe = tmp_path / "pure.json"
        recipe.write_text(json.dumps({"default": target, "pure": True}))
        target = str(recipe)
    return requantize(model, out, target, importance=imatrix.importance,
                      extra_metadata=imatrix_metadata(str(imatrix_path), imatrix))


@pytest.mark.parametrize("qtype", SINGLE_TYPES)
def test_every_single_type_is_llama_quantize_imatrix_byte_for_byte(tiny, llama_tools, tmp_path,
                                                                  qtype):
    model, files, imats = tiny
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    _llama_quantize(model, theirs, qtype, files["random"], pure=True)
    _ours(model, ours, qtype, files["random"], imats["random"], tmp_path, pure=True)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("mix", MIXES)
def test_every_mix_is_llama_quantize_imatrix_byte_for_byte(tiny, llama_tools, tmp_path, mix):
    model, files, imats = tiny
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    _llama_quantize(model, theirs, mix, files["random"])
    report = _ours(model, ours, mix, files["random"], imats["random"], tmp_path)
    assert ours.read_bytes() == theirs.read_bytes()
    if mix in ("Q4_0", "Q5_0"):  # the imatrix rule: layer 0's ffn_down gets the _1 type
        assert report.plan.types()["blk.0.ffn_down.weight"] == mix[:2] + "_1"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q8_0", "Q3_K", "Q6_K"])
def test_uniform_importance_is_llama_quantize_too(tiny, llama_tools, tmp_path, qtype):
    model, files, imats = tiny
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    _llama_quantize(model, theirs, qtype, files["uniform"], pure=True)
    _ours(model, ours, qtype, files["uniform"], imats["uniform"], tmp_path, pure=True)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("qtype", SINGLE_TYPES)
def test_which_types_a_uniform_importance_leaves_unweighted(tiny, llama_tools, tmp_path, qtype):
    """The oracle the issue asks for, read off llama.cpp itself: with all-ones importance only
    Q8_0 keeps its unweighted bytes (quantize_q8_0 never reads it); every other type switches
    to its weighted search. gguf.weighted's IGNORES_IMPORTANCE says the same, and for that type
    zeropoint's weighted path gives the plain bytes."""
    model, files, _ = tiny
    weighted, plain = tmp_path / "w.gguf", tmp_path / "p.gguf"
    _llama_quantize(model, weighted, qtype, files["uniform"], pure=True)
    _llama_quantize(model, plain, qtype, pure=True)
    w, p = (read_tensor_bytes(f) for f in (weighted, plain))
    assert (w == p) == (qtype in IGNORES_IMPORTANCE)
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(F32)
    ours = quantize_weighted(x, qtype, np.ones(256, F32))
    plain = np.asarray(quantize_blocks(torch.from_numpy(x), qtype))
    assert np.array_equal(ours, plain) == (qtype in IGNORES_IMPORTANCE)


def read_tensor_bytes(path) -> dict[str, bytes]:
    from zeropoint.gguf.reader import read_gguf

    f = read_gguf(path)
    return {t.name: f.raw(t).tobytes() for t in f.tensors}


def test_cli_imatrix_writes_llama_quantizes_file(tiny, llama_tools, tmp_path, capsys):
    model, files, _ = tiny
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    _llama_quantize(model, theirs, "Q4_K_M", files["random"])
    assert main(["quantize", str(model), "--type", "Q4_K_M", "--imatrix", str(files["random"]),
                 "-o", str(ours)]) == 0
    assert f"importance matrix {files['random']}: " in capsys.readouterr().out
    assert ours.read_bytes() == theirs.read_bytes()


# --- a slow loop of ggml-quants.c's weighted legacy searches, as the oracle without the tools ----


def _nearest(v) -> int:
    bits = np.array([F32(v) + F32(12582912.0)], F32).view(np.int32)[0]
    return int((bits & 0x7FFFFF) - 0x400000)


def _loop_signed(x, w, nmax):
    """make_qx_quants(n, nmax, x, L, 1, w): (codes level + nmax, scale), float32 step by step."""
    amax, mx = F32(0), F32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < F32(1e-15):
        return [0] * len(x), F32(0)

    def trial(iscale):
        levels = [min(max(_nearest(iscale * v), -nmax), nmax - 1) for v in x]
        slx, sl2 = F32(0), F32(0)
        for v, wi, l in zip(x, w, levels):
            slx = slx + wi * v * F32(l)
            sl2 = sl2 + wi * F32(l) * F32(l)
        return levels, slx, sl2

    levels, slx, sl2 = trial(F32(-nmax) / mx)
    scale = slx / sl2 if sl2 != 0 else F32(0)
    best = scale * slx
    for s in [*range(-9, 0), *range(1, 10)]:
        t_levels, slx, sl2 = trial(-(F32(nmax) + F32(0.1) * F32(s)) / mx)
        if sl2 > 0 and slx * slx > best * sl2:
            levels, scale = t_levels, slx / sl2
            best = scale * slx
    return [l + nmax for l in levels], scale


def _loop_min(x, w, nmax):
    """make_qkx3_quants(n, nmax, x, w, L, &min, Laux, -0.9, 0.05, 36, false): (codes, scale,
    the min as stored: x ~ scale * code + min)."""
    lo, hi, sw, sx = x[0], x[0], w[0], w[0] * x[0]
    for v, wi in zip(x[1:], w[1:]):
        lo, hi = min(lo, v), max(hi, v)
        sw, sx = sw + wi, sx + wi * v
    lo = min(lo, F32(0))
    if hi <= lo:
        return [0] * len(x), F32(0), lo

    def error(codes, scale, m):
        e = F32(0)
        for v, wi, c in zip(x, w, codes):
            d = scale * F32(c) + m - v
            e = e + wi * (d * d)
        return e

    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    codes = [min(max(_nearest(iscale * (v - lo)), 0), nmax) for v in x]
    best = error(codes, scale, lo)
    for s in range(37):  # the grids are laid from the min found so far
        iscale = (F32(-0.9) + F32(0.05) * F32(s) + F32(nmax)) / (hi - lo)
        trial = [min(max(_nearest(iscale * (v - lo)), 0), nmax) for v in x]
        sl, sl2, sxl = F32(0), F32(0), F32(0)
        for v, wi, c in zip(x, w, trial):
            sl, sl2, sxl = sl + wi * F32(c), sl2 + wi * F32(c) * F32(c), sxl + wi * F32(c) * v
        det = sw * sl2 - sl * sl
        if not det > 0:
            continue
        t_scale, t_min = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
        if t_min > 0:
            t_min, t_scale = F32(0), sxl / sl2
        err = error(trial, t_scale, t_min)
        if err < best:
            codes, best, scale, lo = trial, err, t_scale, t_min
    return codes, scale, lo


def _fields(raw, qtype):
    """One legacy block's bytes -> (d, m or None, codes 0..2^bits-1)."""
    d = raw[:2].view(np.float16)[0]
    col, m = (4, raw[2:4].view(np.float16)[0]) if qtype.endswith("_1") else (2, None)
    high = 0
    if qtype.startswith("Q5"):
        high, col = int.from_bytes(raw[col:col + 4].tobytes(), "little"), col + 4
    nib = raw[col:col + 16]
    codes = [int(b & 15) for b in nib] + [int(b >> 4) for b in nib]
    return d, m, [c | ((high >> j) & 1) << 4 for j, c in enumerate(codes)]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_legacy_weighted_equals_a_slow_loop_of_the_formulas(qtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, size=(2, 96)) * 0.05).astype(F32)
    x[1, 32:64] = 0  # an all-zero block
    imp = rng.gamma(0.5, size=96).astype(F32)
    got = quantize_weighted(x, qtype, imp).reshape(2, 3, -1)
    for r in range(2):
        sigma2 = F32(0)
        for v in x[r]:
            sigma2 = sigma2 + v * v
        sigma2 = sigma2 / F32(96)
        for b in range(3):
            xb, qb = list(x[r, 32 * b:32 * b + 32]), imp[32 * b:32 * b + 32]
            w = [q * np.sqrt(sigma2 + v * v) for q, v in zip(qb, xb)]
            d, m, codes = _fields(got[r, b], qtype)
            if qtype.endswith("_0"):
                want_codes, scale = _loop_signed(xb, w, 8 if qtype == "Q4_0" else 16)
            else:
                want_codes, scale, lo = _loop_min(xb, w, 15 if qtype == "Q4_1" else 31)
                assert m == np.float16(lo)
            assert d == np.float16(scale)
            assert codes == want_codes


# --- the plumbing's rules and errors ----------------------------------------------------------


def test_imatrix_rule_of_the_q4_0_and_q5_0_mixes():
    tensors = [(f"blk.{i}.ffn_down.weight", "F32", (64, 256)) for i in range(16)]
    params = ModelParams("llama", 16, 4, 4)
    for mix, guard in (("Q4_0", "Q4_1"), ("Q5_0", "Q5_1")):
        plain = plan_types(tensors, mix, params).types()
        weighted = plan_types(tensors, mix, params, has_imatrix=True).types()
        assert set(plain.values()) == {mix}
        assert [weighted[f"blk.{i}.ffn_down.weight"] for i in range(16)] == [guard] * 2 + [mix] * 14


def _one_tensor(tmp_path, name="blk.0.attn_q.weight", cols=64):
    path = tmp_path / "one.gguf"
    x = np.random.default_rng(0).standard_normal((4, cols)).astype(F32)
    meta = {"general.architecture": MetaValue.string("llama"),
            "llama.block_count": MetaValue.u32(1)}
    write_gguf(path, meta, [TensorData(name, "F32", (4, cols), x)])
    return path


def test_importance_of_the_wrong_length_is_refused_but_token_embd_is_quantized_plainly(tmp_path):
    src = _one_tensor(tmp_path)
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: the importance matrix has 32 "
                                         "values for rows of 64"):
        requantize(src, tmp_path / "o.gguf", "Q4_0", importance=lambda n: np.ones(32, F32))
    with pytest.raises(ValueError, match="NaN or inf"):
        requantize(src, tmp_path / "o.gguf", "Q4_0",
                   importance=lambda n: np.full(64, np.nan, F32))
    embd = _one_tensor(tmp_path, "token_embd.weight")
    requantize(embd, tmp_path / "w.gguf", "Q4_0", importance=lambda n: np.ones(32, F32))
    requantize(embd, tmp_path / "p.gguf", "Q4_0")
    assert read_tensor_bytes(tmp_path / "w.gguf") == read_tensor_bytes(tmp_path / "p.gguf")


def test_a_tensor_without_an_entry_is_quantized_plainly(tmp_path):
    src = _one_tensor(tmp_path, cols=256)
    for qtype in ("Q4_0", "Q4_K"):
        requantize(src, tmp_path / "w.gguf", qtype, importance=lambda n: None)
        requantize(src, tmp_path / "p.gguf", qtype)
        assert read_tensor_bytes(tmp_path / "w.gguf") == read_tensor_bytes(tmp_path / "p.gguf")


def test_bad_blocks_and_types_are_named():
    imp = np.ones(256, F32)
    x = np.ones((2, 256), F32)
    x[1, 40] = np.inf
    with pytest.raises(ValueError, match="t: x must be finite; block 9 holds NaN or inf"):
        quantize_weighted(x, "Q4_0", imp, "t")
    with pytest.raises(ValueError, match="block 1 holds NaN"):
        quantize_weighted(x, "Q4_K", imp, "t")
    with pytest.raises(ValueError, match="overflows float16"):
        quantize_weighted(np.full((1, 256), 1e9, F32), "Q6_K", imp, "t")
    with pytest.raises(ValueError, match="no weighted quantizer for TQ1_0"):
        quantize_weighted(x, "TQ1_0", imp)
    with pytest.raises(ValueError, match="do not tile"):
        quantize_weighted(np.ones((1, 96), F32), "Q4_K", np.ones(96, F32))
    with ckernels.disabled(), pytest.raises(ValueError, match="needs zeropoint's C kernels"):
        quantize_weighted(x, "Q4_0", imp)


def test_importance_and_a_custom_encoder_do_not_mix(tmp_path):
    src = _one_tensor(tmp_path)
    from zeropoint.gguf.reader import read_gguf
    from zeropoint.gguf.requantize import gguf_sources

    f = read_gguf(src)
    with pytest.raises(ValueError, match="cannot be combined"):
        write_quantized(gguf_sources(f), f.metadata, "Q4_0", tmp_path / "o.gguf",
                        importance=lambda n: None, encoder=lambda x, t, n: x)


def test_cli_imatrix_option_rules(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["quantize", "--method", "hqq", "--imatrix", "x.gguf", "-o", out]) == 2
    assert "--imatrix weights the rounding of --method rtn or gptq" in capsys.readouterr().err
    assert main(["quantize", "--type", "Q4_0", "--method", "hqq", "--imatrix", "x.gguf",
                 "-o", out + ".gguf"]) == 2
    assert "--method rtn or gptq" in capsys.readouterr().err
    assert main(["quantize", "--type", "Q4_0", "--imatrix", str(tmp_path / "none.gguf"),
                 "-o", out + ".gguf"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_weighted_types_are_the_block_types_zeropoint_writes():
    from zeropoint.gguf.iquants import IQ_TYPES  # weighted by gguf.iquants
    from zeropoint.gguf.types import WRITABLE_TYPES

    assert set(WEIGHTED_TYPES) | set(IGNORES_IMPORTANCE) | set(IQ_TYPES) >= set(WRITABLE_TYPES)


# --- GPTQ with an importance vector -------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_takes_llama_quantizes_weighted_block_scales(qtype, act_order):
    """With an importance vector the GPTQ grid's stored d (and m) are llama-quantize
    --imatrix's (quantize_weighted, held to it above), and with an identity Hessian (no error
    to spread) each code is the nearest level of that stored grid."""
    from zeropoint.algorithms.gptq import GPTQOptions, gptq_columns
    from zeropoint.gguf.blocks import dequantize_blocks
    from zeropoint.gguf.gptq_grids import WeightedLegacyGrid, block_grid

    rng = np.random.default_rng(5)
    w = torch.from_numpy((rng.standard_t(4, size=(6, 128)) * 0.05).astype(F32))
    imp = rng.gamma(0.5, size=128).astype(F32)
    grid = block_grid(qtype, w, imp)
    assert isinstance(grid, WeightedLegacyGrid)
    r = gptq_columns(w, torch.eye(128), grid, GPTQOptions(act_order=act_order))
    ours = grid.pack(r.fits, r.codes).numpy().reshape(6, 4, -1)
    llama = quantize_weighted(w.numpy(), qtype, imp).reshape(6, 4, -1)
    halves = 4 if qtype.endswith("_1") else 2
    assert np.array_equal(ours[..., :halves], llama[..., :halves])
    # every value on its nearest level: no level of the block's grid is closer
    got = dequantize_blocks(torch.from_numpy(ours.reshape(-1)), qtype, (6, 128)).numpy()
    d = ours[..., :2].copy().view(np.float16).astype(F32)  # (6, 4, 1)
    m = ours[..., 2:4].copy().view(np.float16).astype(F32) if halves == 4 else None
    top = (1 << TYPES_BITS[qtype]) - 1
    q = np.arange(top + 1, dtype=F32)
    levels = d * q + m if m is not None else d * (q - (top + 1) // 2)  # (6, 4, levels)
    dist = np.abs(w.numpy().reshape(6, 4, 32, 1) - levels[:, :, None, :])
    best = np.take_along_axis(levels[:, :, None, :], dist.argmin(-1)[..., None], -1)[..., 0]
    assert np.allclose(got.reshape(6, 4, 32), best, rtol=0, atol=1e-6)
    assert not np.array_equal(block_grid(qtype).fit(w[:, :32], 0).halves.numpy(),
                              grid.fit(w[:, :32], 0).halves.numpy())  # not the plain scales


TYPES_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gptq_on_k_types_with_no_error_to_spread_writes_llama_quantizes_bytes(qtype):
    """The K types requantize every value to the nearest code of the stored grid after their
    weighted scale search, so GPTQ on that grid (gptq_grids.WeightedKGrid) with an identity
    Hessian writes exactly llama-quantize --imatrix's bytes."""
    from zeropoint.algorithms.gptq import GPTQOptions, gptq_columns
    from zeropoint.gguf.gptq_grids import block_grid
    from zeropoint.gguf.kquant_grids import WeightedKGrid

    rng = np.random.default_rng(9)
    w = torch.from_numpy((rng.standard_t(4, size=(8, 512)) * 0.05).astype(F32))
    imp = rng.gamma(0.5, size=512).astype(F32)
    grid = block_grid(qtype, w, imp)
    assert isinstance(grid, WeightedKGrid)
    r = gptq_columns(w, torch.eye(512), grid, GPTQOptions(act_order=True))
    ours = grid.pack(r.fits, r.codes).numpy()
    assert np.array_equal(ours, quantize_weighted(w.numpy(), qtype, imp))
