"""A GGUF-to-GGUF requantization runs on numpy, gguf-py and the C kernels alone (issue 18): in a
fresh interpreter, `zeropoint quantize X.gguf --type T` leaves torch and transformers out of
sys.modules, and its bytes are gguf-py's (legacy types) and the torch kernels' (K types)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quantize

from zeropoint import ckernels
from zeropoint.gguf.blocks import quantize_blocks
from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.reader import read_gguf
from zeropoint.gguf.writer import TensorData, write_gguf

SRC = str(Path(__file__).resolve().parents[2] / "src")

_PROBE = """
import json, sys
from zeropoint.cli import main
code = main(["quantize", sys.argv[1], "--type", sys.argv[2], "-o", sys.argv[3], "--quiet",
             *sys.argv[4:]])
print(json.dumps({"code": code,
                  "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""

pytestmark = pytest.mark.skipif(ckernels.library() is None, reason="needs the C kernels")


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """Two layers: Q8_0 and Q4_K weights (rows of 256, so K types need no fallback), F32 norms,
    and a vocabulary of strings to copy."""
    rng = np.random.default_rng(5)
    meta = {"general.architecture": MetaValue.string("llama"),
            "llama.block_count": MetaValue.u32(2), "llama.attention.head_count": MetaValue.u32(2),
            "tokenizer.ggml.tokens": MetaValue.array([f"tok{i}" for i in range(300)],
                                                     GGUFValueType.STRING)}
    tensors = []
    for layer, wtype in enumerate(("Q8_0", "Q4_K")):
        for name in ("ffn_up", "ffn_down", "attn_q"):
            x = torch.from_numpy(rng.standard_normal((64, 256), dtype=np.float32))
            tensors.append(TensorData(f"blk.{layer}.{name}.weight", wtype, (64, 256),
                                      quantize_blocks(x, wtype)))
        tensors.append(TensorData(f"blk.{layer}.ffn_norm.weight", "F32", (256,),
                                  rng.standard_normal(256, dtype=np.float32)))
    path = tmp_path_factory.mktemp("src") / "small.gguf"
    write_gguf(path, meta, tensors)
    return path


def requantize_without_torch(src: Path, qtype: str, out: Path, *options: str) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(src), qtype, str(out), *options],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q8_0", "F16", "BF16", "Q4_K", "Q6_K", "Q4_K_M"])
def test_requantize_imports_no_torch_and_keeps_the_bytes(small_gguf, tmp_path, qtype):
    out = tmp_path / f"{qtype}.gguf"
    r = requantize_without_torch(small_gguf, qtype, out)
    assert r == {"code": 0, "loaded": []}
    src, got = read_gguf(small_gguf), read_gguf(out)
    assert got.get("tokenizer.ggml.tokens") == src.get("tokenizer.ggml.tokens")
    for t in src.tensors:
        o = got[t.name]
        if t.type == "F32" or o.type == t.type:  # kept: the same bytes
            assert np.array_equal(got.raw(o), src.raw(t)), t.name
            continue
        x = dequantize(src.raw(t), GGMLQuantizationType[t.type]).astype(np.float32)
        if o.type in ("Q4_0", "Q5_1", "Q8_0", "F16", "BF16"):  # gguf-py quantizes these
            expected = quantize(x, GGMLQuantizationType[o.type]).view(np.uint8).reshape(-1)
        else:  # K types: the torch code, with the C kernels off
            with ckernels.disabled():
                expected = quantize_blocks(torch.from_numpy(x), o.type).numpy().reshape(-1)
        assert np.array_equal(got.raw(o), expected), f"{t.name}: {t.type} -> {o.type}"


@pytest.mark.parametrize("qtype, weighted", [("IQ4_XS", False), ("Q4_K", True), ("IQ4_XS", True)])
def test_i_quants_and_importance_import_no_torch(small_gguf, tmp_path, qtype, weighted):
    """The i-quant and --imatrix paths run on numpy rows too. Their bytes are held to llama.cpp in
    test_iquants.py and test_weighted.py; here they must be what those functions write."""
    from zeropoint.gguf.imatrix import ImportanceMatrix, write_imatrix
    from zeropoint.gguf.iquants import quantize as iquantize
    from zeropoint.gguf.weighted import quantize_weighted

    src = read_gguf(small_gguf)
    weights = [t for t in src.tensors if t.type != "F32"]
    rng = np.random.default_rng(7)
    imatrix = ImportanceMatrix(
        sums={t.name: rng.uniform(0.5, 2.0, t.shape[-1]).astype(np.float32) for t in weights},
        counts={t.name: np.array([1]) for t in weights}, datasets=["test"], chunk_count=1,
        chunk_size=1)
    options = []
    if weighted:
        write_imatrix(tmp_path / "imatrix.gguf", imatrix)
        options = ["--imatrix", str(tmp_path / "imatrix.gguf")]
    out = tmp_path / f"{qtype}.gguf"
    assert requantize_without_torch(small_gguf, qtype, out, *options) == {"code": 0, "loaded": []}
    got = read_gguf(out)
    for t in weights:
        x = dequantize(src.raw(t), GGMLQuantizationType[t.type]).astype(np.float32)
        x = x.reshape(-1, t.shape[-1])
        expected = (quantize_weighted(x, qtype, imatrix.importance(t.name), t.name) if weighted
                    else iquantize(x, qtype))
        assert np.array_equal(got.raw(got[t.name]), expected.reshape(-1)), t.name
