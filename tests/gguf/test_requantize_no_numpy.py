"""A requantization that keeps every tensor's type is a copy, and runs on the standard library
(issue 18): in a fresh interpreter, `zeropoint quantize X.gguf --type T`, where T keeps every
tensor as it is, leaves numpy (and torch) out of sys.modules, and its file is llama-quantize's,
byte for byte, also where the kernel cannot copy. Nor does it import the rest of
UNUSED_BY_A_COPY. One tensor that changes type brings numpy in (the conversion needs it)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType
from tiny_llama_gguf import llama_metadata, llama_tensors

from zeropoint.gguf import quantize_blocks
from zeropoint.gguf.llama_tools import run_tool
from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.requantize import requantize
from zeropoint.gguf.writer import TensorData, write_gguf

SRC = str(Path(__file__).resolve().parents[2] / "src")
H, FF, LAYERS, VOCAB = 256, 512, 2, 1500  # a vocabulary long enough for the header's C walk

# What a copy has no use for, each once imported by it: numpy and torch; typing (annotations
# only), json (recipes), hashlib (the kernels' cache key), platform, tempfile and shutil (atomic
# output, argparse's terminal width), a thread pool, a progress bar.
UNUSED_BY_A_COPY = ("numpy", "torch", "typing", "json", "hashlib", "platform", "tempfile",
                    "shutil", "concurrent.futures", "tqdm")

_PROBE = f"""
import sys
before = set(sys.modules)
from zeropoint.cli import main
code = main(["quantize", sys.argv[1], "--type", sys.argv[2], "-o", sys.argv[3], "--quiet"])
loaded = [m for m in {UNUSED_BY_A_COPY!r} if m in sys.modules and m not in before]
import json  # the probe's own, after the count
print(json.dumps({{"code": code, "loaded": loaded}}))
"""


def _requantize_in_a_fresh_process(src: Path, target: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(src), target, str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def q4_0_model(tmp_path_factory):
    """A tiny llama GGUF as llama-quantize's Q4_0 mix leaves it: Q4_0 weights, a Q6_K output,
    F32 norms, and a vocabulary with float scores and int token types (arrays a copy must carry
    over without decoding them)."""
    rng = np.random.default_rng(18)
    meta = {
        **llama_metadata(H, FF, LAYERS, VOCAB, file_type=2),
        "tokenizer.ggml.model": MetaValue.string("llama"),
        "tokenizer.ggml.tokens": MetaValue.array([f"tok{i}" for i in range(VOCAB)],
                                                 GGUFValueType.STRING),
        "tokenizer.ggml.scores": MetaValue.array(rng.standard_normal(VOCAB).tolist(),
                                                 GGUFValueType.FLOAT32),
        "tokenizer.ggml.token_type": MetaValue.array([1] * VOCAB, GGUFValueType.INT32),
    }

    def weight(name, shape, qtype="Q4_0"):
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.05)
        return TensorData(name, qtype, shape, quantize_blocks(x, qtype))

    tensors = llama_tensors(H, FF, LAYERS, VOCAB, weight)
    tensors.append(weight("output.weight", (VOCAB, H), "Q6_K"))
    path = tmp_path_factory.mktemp("copy") / "tiny-q4_0.gguf"
    write_gguf(path, meta, tensors)
    return path


def test_a_requantization_that_keeps_every_type_imports_no_numpy(q4_0_model, llama_tools,
                                                                   tmp_path):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    assert _requantize_in_a_fresh_process(q4_0_model, "Q4_0", ours) == {"code": 0, "loaded": []}
    run_tool("llama-quantize", "--allow-requantize", q4_0_model, theirs, "Q4_0")
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_tensor_that_changes_type_brings_numpy_in(q4_0_model, llama_tools, tmp_path):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    r = _requantize_in_a_fresh_process(q4_0_model, "Q5_0", ours)
    assert r["code"] == 0
    assert [m for m in r["loaded"] if m in ("numpy", "torch")] == ["numpy"]
    run_tool("llama-quantize", "--allow-requantize", q4_0_model, theirs, "Q5_0")
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_copy_where_the_kernel_cannot_copy_is_the_same_file(q4_0_model, llama_tools, tmp_path,
                                                              monkeypatch):
    # copy_file_range refused (across file systems, say): read and written here, same bytes
    def refused(*args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refused)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    requantize(q4_0_model, ours, "Q4_0")
    run_tool("llama-quantize", "--allow-requantize", q4_0_model, theirs, "Q4_0")
    assert ours.read_bytes() == theirs.read_bytes()
