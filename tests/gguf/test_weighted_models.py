"""Weighted quantization of the real models, SmolLM2 (ffn_down keeps K types) and Gemma 3 (hidden
640: K types everywhere but token_embd), against llama-quantize --imatrix with an importance
matrix that llama-imatrix computed on a short text: the whole output file, byte for byte."""
from __future__ import annotations

import os
import pydoc_data.topics

import pytest

from zeropoint.gguf.imatrix import read_imatrix
from zeropoint.gguf.llama_tools import run_tool
from zeropoint.gguf.requantize import requantize
from zeropoint.gguf.weighted import imatrix_metadata

pytestmark = pytest.mark.slow

# Every llama.cpp mix zeropoint writes is held to llama-quantize byte for byte on the tiny model
# of test_weighted.py (and each single type with --pure); here the real models, with a mix of
# each family and rule: legacy (Q4_0's imatrix rule gives early ffn_down Q4_1), the K mixes at
# 2, 3, 4 and 6 bits. On Gemma every 640-wide tensor takes its K type.
CASES = [("smollm2", mix) for mix in ("Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K")] + \
        [("gemma3", mix) for mix in ("Q5_0", "Q3_K_S", "Q4_K_S", "Q5_K_M")]

def llama_imatrix(model, out, folder):
    """llama-imatrix on a few KB of pydoc text: 2 chunks of 128 tokens, no perplexity."""
    text = folder / "calib.txt"
    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[:20])[:12000])
    run_tool("llama-imatrix", "-m", model, "-f", text, "-c", "128", "-b", "128", "--chunks", "2",
             "--no-ppl", "-t", "2", "-o", out,
             env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})  # no spinning on a busy machine
    return out


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def weighted_model(request, llama_tools, tmp_path_factory):
    """(model path, imatrix path) for each real model, the imatrix made once."""
    from zeropoint.models.source import default_model_path

    folder = tmp_path_factory.mktemp(f"weighted_{request.param}")
    model = (default_model_path() if request.param == "smollm2"
             else request.getfixturevalue("gemma3_gguf"))
    return model, llama_imatrix(model, folder / "imatrix.gguf", folder)


@pytest.mark.parametrize("weighted_model, mix", CASES, indirect=["weighted_model"])
def test_mix_with_imatrix_is_llama_quantize(weighted_model, tmp_path, mix):
    model, imatrix_path = weighted_model
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    run_tool("llama-quantize", "--allow-requantize", "--imatrix", imatrix_path, model, theirs,
             mix)
    imatrix = read_imatrix(imatrix_path)
    requantize(model, ours, mix, importance=imatrix.importance,
               extra_metadata=imatrix_metadata(str(imatrix_path), imatrix))
    assert ours.read_bytes() == theirs.read_bytes()
