"""The i-quants and their mixes against llama.cpp's own tools on the two real models: the type
of every tensor (llama-quantize --dry-run, with and without an importance matrix, fallbacks
included) and, tensor by tensor, the bytes llama-quantize --imatrix writes for every i-quant.
The importance matrices are llama-imatrix's, made once per module."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from zeropoint.gguf.imatrix import read_imatrix
from zeropoint.gguf.llama_tools import tool_path
from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.mixes import IQ_MIXES, ModelParams, plan_types
from zeropoint.gguf.reader import read_gguf
from zeropoint.gguf.requantize import requantize
from zeropoint.gguf.writer import TensorData, write_gguf
from zeropoint.models.source import default_model_path

pytestmark = pytest.mark.slow

IQ_TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S",
            "IQ1_M")
# The llama-quantize file type whose tensors default to each i-quant: its names are types but
# for IQ2_S, whose file type defaults to IQ2_XS; IQ2_M's gives IQ2_S.
FILE_TYPE = {t: t for t in IQ_TYPES} | {"IQ2_S": "IQ2_M"}
_LAYERS = 2  # blocks kept in the cut-down models the byte tests quantize


def _run(llama_tools, *args) -> str:
    import subprocess

    done = subprocess.run([str(tool_path("llama-quantize")), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _text(path: Path) -> Path:
    from pydoc_data.topics import topics

    path.write_text("\n".join(topics[k] for k in sorted(topics))[:100_000])
    return path


def _imatrix(model: Path, out: Path) -> Path:
    import subprocess

    text = _text(out.with_suffix(".txt"))
    done = subprocess.run([str(tool_path("llama-imatrix")), "-m", str(model), "-f", str(text),
                           "-c", "256", "--chunks", "4", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request, llama_tools, tmp_path_factory):
    """(GGUF path, llama-imatrix file for it)."""
    path = Path(default_model_path() if request.param == "smollm2"
                else request.getfixturevalue("gemma3_gguf"))
    folder = tmp_path_factory.mktemp(request.param)
    return path, _imatrix(path, folder / "imatrix.gguf")


# --- the plans ------------------------------------------------------------------------------


_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s*(\w+),.*?(?:\((\w+)\))?\s*$")
_FALLBACK = re.compile(r"^warning: (\S+)\s+- ncols .*required for type\s+(\w+)\) -> falling back "
                       r"to\s+(\w+)")


def llama_plan(log: str) -> dict[str, tuple[str, str]]:
    """name -> (type wanted, type written) from llama-quantize's --dry-run log."""
    plan, wanted = {}, {}
    for line in log.splitlines():
        if m := _FALLBACK.match(line):
            wanted[m[1]] = m[2].upper()
        elif m := _LINE.match(line):
            plan[m[1]] = (m[3] or m[2]).upper()
    return {name: (wanted.get(name, t), t) for name, t in plan.items()}


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("mix", IQ_MIXES)
def test_mix_plans_and_fallbacks_are_llama_quantizes(model, mix, with_imatrix, llama_tools):
    path, imatrix = model
    args = ["--dry-run", *(["--imatrix", imatrix] if with_imatrix else []), path, mix]
    theirs = llama_plan(_run(llama_tools, *args))
    src = read_gguf(path)
    plan = plan_types([(t.name, t.type, t.shape) for t in src.tensors], mix,
                      ModelParams.from_metadata(src.metadata), has_imatrix=with_imatrix)
    ours = {c.name: (c.wanted if c.fallback else c.type, c.type) for c in plan.choices}
    assert len(theirs) == len(src.tensors)
    assert ours == theirs
    assert {c.name for c in plan.fallbacks} == {n for n, (w, t) in theirs.items() if w != t}


# --- the bytes ------------------------------------------------------------------------------


def cut_down(src_path: Path, out: Path) -> Path:
    """The model's first _LAYERS blocks (and its norms), block_count set to match: a model
    llama-quantize takes, small enough to quantize in seconds."""
    src = read_gguf(src_path)
    arch = src.metadata["general.architecture"].value
    metadata = dict(src.metadata)
    metadata[f"{arch}.block_count"] = MetaValue.u32(_LAYERS)
    keep = [t for t in src.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))
            and int(m[1]) < _LAYERS]
    write_gguf(out, metadata, [TensorData(t.name, t.type, t.shape, src.raw(t)) for t in keep])
    return out


# Every i-quant on SmolLM2 (its ffn_down rows tile into 256); on Gemma 3 (640-wide rows, so
# IQ4_NL fallbacks) one type of each grid family.
BYTE_CASES = [("smollm2", t) for t in IQ_TYPES] + \
    [("gemma3", t) for t in ("IQ4_XS", "IQ3_S", "IQ2_XXS", "IQ1_M")]


@pytest.mark.parametrize("model, qtype", BYTE_CASES, indirect=["model"])
def test_iquant_bytes_are_llama_quantizes(model, qtype, llama_tools, tmp_path):
    """--pure: every weight in qtype (IQ4_NL where rows do not tile into 256), quantized under
    llama-imatrix's importance; compared tensor by tensor."""
    path, imatrix = model
    small = cut_down(path, tmp_path / "small.gguf")
    theirs_path, ours_path = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    _run(llama_tools, "--allow-requantize", "--pure", "--imatrix", imatrix, small, theirs_path,
         FILE_TYPE[qtype], 2)
    recipe = tmp_path / "pure.json"
    recipe.write_text(f'{{"default": "{FILE_TYPE[qtype]}", "pure": true}}')
    requantize(small, ours_path, str(recipe), importance=read_imatrix(imatrix).importance)
    theirs, ours = read_gguf(theirs_path), read_gguf(ours_path)
    assert [(t.name, t.type) for t in ours.tensors] == [(t.name, t.type) for t in theirs.tensors]
    assert qtype in {t.type for t in ours.tensors}  # ffn_down's rows tile into 256 on both
    for a, b in zip(theirs.tensors, ours.tensors):
        assert np.array_equal(theirs.raw(a), ours.raw(b)), f"{a.name} ({a.type}) differs"


@pytest.mark.parametrize("model", ["smollm2"], indirect=True)  # reading is the model's no matter
@pytest.mark.parametrize("qtype", ["IQ4_XS", "IQ3_XXS", "IQ2_S", "IQ1_M"])
def test_requantizing_an_i_quant_file_is_llama_quantizes(model, qtype, llama_tools, tmp_path):
    """A file of i-quants read back (dequantized) and written as Q8_0: llama-quantize's bytes,
    so zeropoint reads the i-quants as llama.cpp does."""
    path, imatrix = model
    small = cut_down(path, tmp_path / "small.gguf")
    iq, theirs_path, ours_path = (tmp_path / f"{n}.gguf" for n in ("iq", "theirs", "ours"))
    _run(llama_tools, "--allow-requantize", "--pure", "--imatrix", imatrix, small, iq,
         FILE_TYPE[qtype], 2)
    _run(llama_tools, "--allow-requantize", "--pure", iq, theirs_path, "Q8_0", 2)
    recipe = tmp_path / "pure.json"
    recipe.write_text('{"default": "Q8_0", "pure": true}')
    requantize(iq, ours_path, str(recipe))
    theirs, ours = read_gguf(theirs_path), read_gguf(ours_path)
    assert qtype in {t.type for t in read_gguf(iq).tensors}
    assert [(t.name, t.type) for t in ours.tensors] == [(t.name, t.type) for t in theirs.tensors]
    for a, b in zip(theirs.tensors, ours.tensors):
        assert np.array_equal(theirs.raw(a), ours.raw(b)), f"{a.name} ({a.type}) differs"
