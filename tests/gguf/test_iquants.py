"""gguf.iquants against two independent oracles: llama.cpp's own quantizers (ggml_quantize_chunk
of the libggml-base that llama-cpp-python ships, the code llama-quantize runs) for the bytes, with
and without importance, and gguf-py's dequantizers for the values. Then the dispatch around them:
quantize_blocks, requantize's dequantize_tensor, and llama-quantize's refusal of the very low-bit
types without an importance matrix."""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from zeropoint.gguf import blocks, iquants
from zeropoint.gguf.convert import dequantize_tensor, quantize_tensor
from zeropoint.gguf.layout import tensor_nbytes
from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.reader import read_gguf
from zeropoint.gguf.requantize import requantize
from zeropoint.gguf.types import TYPES
from zeropoint.gguf.writer import TensorData, write_gguf

IQ = iquants.IQ_TYPES


@pytest.fixture(scope="module")
def ggml():
    """ggml_quantize_chunk from llama-cpp-python's libggml-base (llama.cpp 0.3.36's own)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-cpp-python is not installed")
    path = Path(spec.submodule_search_locations[0]) / "lib" / "libggml-base.so"
    if not path.exists():
        pytest.skip(f"no {path}")
    lib = ctypes.CDLL(str(path))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def quantize(x, qtype, importance):
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros((x.shape[0], tensor_nbytes(qtype, (x.shape[1],))), np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
        fn(TYPES[qtype].id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
           None if imp is None else imp.ctypes.data)
        return out
    return quantize


def rows(seed: int, n: int = 512) -> np.ndarray:
    """Rows of the kinds the searches branch on: Gaussian, heavy-tailed, values on a coarse grid
    (ties everywhere, as in SmolLM2's Q4_1-grid weights), zero and near-zero blocks, an outlier."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, (12, n)).astype(np.float32) * 0.05
    x[1] = rng.standard_normal(n)
    x[2] = np.round(x[2] * 40) / 40
    x[3] = np.round(x[3] * 6) / 6
    x[4] = 0
    x[5, : n // 2] = 0
    x[6] = 1e-9 * np.sign(x[6])
    x[7, 3] = 40
    x[8] = np.abs(x[8])
    x[9] = -np.abs(x[9])
    x[10, ::2] = 0
    return x


# libggml builds its IQ2/IQ1 neighbour tables at first use by sorting every candidate (10-80 s
# here, once per process): those comparisons are slow tests.
_SLOW_ORACLE = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")


@pytest.mark.parametrize("weighting", ["importance", "ones", "plain"])
@pytest.mark.parametrize("qtype", [pytest.param(t, marks=pytest.mark.slow) if t in _SLOW_ORACLE
                                   else t for t in IQ])
def test_quantize_is_llama_cpps(qtype, weighting, ggml):
    if weighting == "plain" and iquants.requires_importance(qtype):
        pytest.skip(f"llama.cpp has no {qtype} without importance")
    for seed in range(3):
        x = rows(seed)
        rng = np.random.default_rng(100 + seed)
        imp = {"importance": rng.gamma(0.5, 2, x.shape[1]).astype(np.float32),
               "ones": np.ones(x.shape[1], np.float32), "plain": None}[weighting]
        ours = iquants.quantize(x, qtype, imp)
        theirs = ggml(x, qtype, imp)
        bad = np.nonzero((ours != theirs).any(axis=1))[0]
        assert bad.size == 0, f"seed {seed}: rows {bad.tolist()} differ"


def test_iq4_nl_takes_rows_of_32s(ggml):
    x = rows(7, n=96)
    assert np.array_equal(iquants.quantize(x, "IQ4_NL"), ggml(x, "IQ4_NL", None))


@pytest.mark.parametrize("qtype", IQ)
def test_dequantize_is_gguf_pys(qtype):
    """Random blocks (every bit pattern is a valid code), finite fp16 scales."""
    t = TYPES[qtype]
    rng = np.random.default_rng(t.id)
    raw = rng.integers(0, 256, (64, t.type_size), dtype=np.uint8)
    scales = rng.standard_normal(64).astype(np.float16).view(np.uint8).reshape(64, 2)
    if qtype == "IQ1_M":  # the fp16 scale is spread over the top nibbles of the 4 scale words
        bits = scales.view(np.uint16).reshape(64)
        words = raw[:, 48:56].copy().view(np.uint16) & 0x0FFF  # (64, 4)
        for k in range(4):
            words[:, k] |= ((bits >> 4 * k) & 0xF) << 12
        raw[:, 48:56] = words.view(np.uint8)
    else:
        raw[:, :2] = scales
    ours = iquants.dequantize(raw, qtype)
    theirs = gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(-1)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", ["IQ4_XS", "IQ3_S", "IQ1_M"])
def test_quantize_tensor_and_dequantize_tensor_route_to_the_i_quants(qtype):
    x = torch.from_numpy(rows(3))
    data = quantize_tensor(x, qtype)
    assert np.array_equal(data, iquants.quantize(x.numpy(), qtype).reshape(-1))
    back = dequantize_tensor(data, qtype, x.shape)
    assert torch.equal(back, torch.from_numpy(iquants.dequantize(data, qtype)).view(x.shape))
    assert torch.equal(blocks.dequantize_blocks(torch.from_numpy(data), qtype, x.shape), back)
    # on Gaussian rows the codebook gives the error of a 4-, 3- or 1.75-bit code, not garbage
    gauss = torch.from_numpy(np.random.default_rng(5).standard_normal((8, 512), np.float32))
    back = dequantize_tensor(quantize_tensor(gauss, qtype), qtype, gauss.shape)
    err = float((back - gauss).norm() / gauss.norm())
    assert err < {"IQ4_XS": 0.12, "IQ3_S": 0.25, "IQ1_M": 0.6}[qtype]


def test_the_very_low_bit_types_need_importance():
    x = rows(0)
    for qtype in ("IQ2_XXS", "IQ2_XS", "IQ1_S"):
        with pytest.raises(ValueError, match=f"{qtype} needs an importance matrix"):
            iquants.quantize(x, qtype)
        with pytest.raises(ValueError, match="needs an importance matrix"):
            blocks.quantize_blocks(torch.from_numpy(x), qtype)


def test_bad_input_is_named():
    x = rows(0)
    with pytest.raises(ValueError, match="rows of 500 values do not tile into IQ4_XS's blocks of 256"):
        iquants.quantize(x[:, :500], "IQ4_XS")
    y = x.copy()
    y[5, 7] = np.nan
    with pytest.raises(ValueError, match="row 5 has values that are not finite"):
        iquants.quantize(y, "IQ3_S")
    with pytest.raises(ValueError, match=r"importance must have shape \(512,\)"):
        iquants.quantize(x, "IQ3_S", np.ones(256, np.float32))
    with pytest.raises(ValueError, match="importance has values that are not finite"):
        iquants.quantize(x, "IQ3_S", np.full(512, np.inf, np.float32))
    with pytest.raises(ValueError, match="not an i-quant: 'Q4_K'"):
        iquants.quantize(x, "Q4_K")
    with pytest.raises(ValueError, match="whole blocks of 136 bytes"):
        iquants.dequantize(np.zeros(100, np.uint8), "IQ4_XS")


# --- llama-quantize's refusal, through requantize ---------------------------------------------


def tiny_llama(path: Path, hidden: int = 64) -> Path:
    """A one-block llama GGUF; with hidden 64 only ffn_down's rows tile into 256."""
    gen = torch.Generator().manual_seed(0)
    meta = {
        "general.architecture": MetaValue.string("llama"),
        "llama.block_count": MetaValue.u32(1),
        "llama.attention.head_count": MetaValue.u32(4),
        "llama.attention.head_count_kv": MetaValue.u32(4),
    }
    shapes = {"blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_v.weight": (hidden, hidden),
              "blk.0.ffn_down.weight": (hidden, 256), "blk.0.ffn_up.weight": (256, hidden)}
    tensors = [TensorData(n, "F32", s, torch.randn(*s, generator=gen)) for n, s in shapes.items()]
    write_gguf(path, meta, tensors)
    return path


@pytest.mark.parametrize("mix", ["IQ3_XXS", "IQ2_M", "IQ1_M"])
def test_requantize_refuses_the_very_low_bit_mixes_without_importance(mix, tmp_path):
    src = tiny_llama(tmp_path / "tiny.gguf", hidden=256)
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=r"blk\.0\.\w+\.weight: I\w+ needs an importance matrix "
                                         "and no importance matrix was given"):
        requantize(src, out, mix)
    with pytest.raises(ValueError, match="the importance matrix has no entry for it"):
        requantize(src, out, mix, importance=lambda name: None)
    assert not out.exists()


def test_requantize_writes_an_iq4_xs_mix_without_importance(tmp_path, ggml):
    src = tiny_llama(tmp_path / "tiny.gguf")
    report = requantize(src, tmp_path / "out.gguf", "IQ4_XS")
    out = read_gguf(tmp_path / "out.gguf")
    types = {t.name: t.type for t in out.tensors}
    assert types["blk.0.ffn_down.weight"] == "IQ4_XS" and types["blk.0.attn_q.weight"] == "IQ4_NL"
    assert {c.name for c in report.plan.fallbacks} == {"blk.0.attn_q.weight",
                                                       "blk.0.attn_v.weight",
                                                       "blk.0.ffn_up.weight"}
    source = read_gguf(src)
    for t in out.tensors:
        x = source.raw(next(s for s in source.tensors if s.name == t.name)).view(np.float32)
        expected = ggml(x.reshape(t.shape), t.type, None)
        assert np.array_equal(out.raw(t), expected.reshape(-1)), t.name
