"""`zeropoint imatrix` and the imatrix files against llama.cpp's own llama-imatrix (slow).

Values. llama-imatrix runs the model in ggml's kernels, zeropoint in transformers' forward on
the dequantized weights, so they agree only as far as those two computations agree:
- On an F32 copy of SmolLM2 (llama-quantize ... F32) with an F32 KV cache and flash attention
  off, both compute in float32 throughout and differ only in summation order: every column's
  mean of x^2 agrees within 1e-4 relative (measured: 2.5e-5 at worst over 210 matrices).
- On the default Q4_1 file itself llama.cpp also rounds each activation to 8 bits (Q8_1) before
  every product with a Q4_1 weight and keeps K/V in F16, which moves every layer's output by
  about 1% and a few columns by up to 25%; zeropoint computes in float32. There the first
  matrices (inputs: the embeddings after one RMS norm) still agree within 1e-4, and every matrix
  within 5% in relative L1 (measured: 2.2% at worst).
The token counts and the windows must agree exactly.

Files: rewriting llama-imatrix's GGUF file gives the same bytes; our .dat is byte for byte the
.dat llama-imatrix converts the same file to, and llama-imatrix reads ours back.
"""
from __future__ import annotations

import numpy as np
import pytest

from zeropoint.cli import main
from zeropoint.gguf.imatrix import read_imatrix, write_imatrix
from zeropoint.gguf.llama_tools import run_tool
from zeropoint.models.evaluate import default_text
from zeropoint.models.source import default_model_path

pytestmark = pytest.mark.slow

CTX, CHUNKS = 256, 2


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("imatrix") / "text.txt"
    path.write_text(default_text()[:20000], encoding="utf-8")
    return path


def _llama_imatrix(model, text, out, *extra):
    run_tool("llama-imatrix", "-m", model, "-f", text, "-c", CTX, "--chunks", CHUNKS, "-o", out,
             "-t", 2, "--no-ppl", *extra)
    return read_imatrix(out)


def _zeropoint_imatrix(model, text, out):
    assert main(["imatrix", str(model), "--calib", str(text), "--ctx", str(CTX),
                 "--calib-tokens", str(CTX * CHUNKS), "-o", str(out), "--quiet"]) == 0
    return read_imatrix(out)


@pytest.fixture(scope="module")
def theirs_default(llama_tools, text_file):
    return _llama_imatrix(default_model_path(), text_file, text_file.parent / "theirs.gguf")


def _same_entries(ours, theirs):
    assert ours.names() == theirs.names() and len(ours) == 210  # 30 blocks x 7 matrices
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (
        CHUNKS, CTX)
    for name in ours.names():
        assert ours.counts[name].tolist() == theirs.counts[name].tolist() == [CTX * CHUNKS]


def test_values_on_an_f32_model_agree_to_float_rounding(llama_tools, text_file, tmp_path):
    f32 = tmp_path / "smollm2-f32.gguf"
    run_tool("llama-quantize", "--allow-requantize", default_model_path(), f32, "F32", "2")
    theirs = _llama_imatrix(f32, text_file, tmp_path / "theirs.gguf",
                            "-ctk", "f32", "-ctv", "f32", "-fa", "off")
    ours = _zeropoint_imatrix(f32, text_file, tmp_path / "ours.gguf")
    _same_entries(ours, theirs)
    for name in ours.names():
        np.testing.assert_allclose(ours.importance(name), theirs.importance(name), rtol=1e-4,
                                   err_msg=name)


def test_values_on_the_default_q4_1_file(theirs_default, text_file, tmp_path):
    ours = _zeropoint_imatrix(default_model_path(), text_file, tmp_path / "ours.gguf")
    _same_entries(ours, theirs_default)
    for name in ours.names():
        a, b = ours.importance(name), theirs_default.importance(name)
        if name.startswith("blk.0.attn_") and not name.endswith("output.weight"):
            np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=name)
        assert np.abs(a - b).sum() / np.abs(b).sum() < 0.05, name


def test_our_gguf_file_is_llama_imatrixs_bytes(theirs_default, text_file, tmp_path):
    out = tmp_path / "rewritten.gguf"
    write_imatrix(out, theirs_default)
    assert out.read_bytes() == (text_file.parent / "theirs.gguf").read_bytes()


def test_dat_is_llama_imatrixs_conversion_and_reads_back(theirs_default, text_file, tmp_path):
    converted = tmp_path / "theirs.dat"
    run_tool("llama-imatrix", "-m", default_model_path(), "--in-file",
             text_file.parent / "theirs.gguf", "-c", CTX, "--output-format", "dat",
             "-o", converted)
    ours = tmp_path / "ours.dat"
    write_imatrix(ours, theirs_default)
    assert ours.read_bytes() == converted.read_bytes()
    # llama-imatrix reads our .dat back; its GGUF holds the same means
    back = tmp_path / "back.gguf"
    run_tool("llama-imatrix", "-m", default_model_path(), "--in-file", ours, "-c", CTX,
             "-o", back)
    again = read_imatrix(back)
    for name in theirs_default.names():
        np.testing.assert_allclose(again.importance(name), theirs_default.importance(name),
                                   rtol=1e-6)
