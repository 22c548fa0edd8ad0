"""GPTQ, HQQ and round-to-nearest on the default model (SmolLM2-135M), issue #7's accuracy
targets: perplexity on held-out news prose (the first 2048 tokens of lee_background.cor,
models.evaluate.lee_text), with GPTQ calibrated on a different text.

1. zeropoint files, symmetric group-128: GPTQ closes >= 50% of RTN's perplexity gap to float at
   4 bits and >= 80% at 3 bits.
2. GGUF, scored by llama.cpp itself: GPTQ's (and HQQ's) Q4_0 and Q3_K files beat llama.cpp's own
   quantization of the same float weights to the same type (the same file size).

The calibration text is gensim's lee.cor: 50 other news articles from the same source, with no
sentence in common with the scored text. Calibrated on Python's pydoc topics (code and reference
prose) instead, GPTQ falls short of the targets on news prose (32 x 256 tokens, damping 10%: int4
46.0 against RTN 50.2 and float 30.9, 22% of the gap; int3 ~200 against RTN 678, 74%; GGUF Q4_0
38.5 against llama.cpp's 37.6): the layer-wise fit follows the calibration text's activations.
CALIB keeps the module to a few GPTQ passes; benchmarks/bench_gptq.py runs the full-size set."""

import copy
import dataclasses
import gc
import importlib.util
from pathlib import Path

import pytest

from zeropoint import QuantSpec, Recipe, quantize_model
from zeropoint.algorithms.hqq import hqq_quantize
from zeropoint.algorithms.sequential import calibration_ids, gptq_model
from zeropoint.models.evaluate import lee_text, perplexity
from zeropoint.models.load import load_model
from zeropoint.models.source import default_model_path

pytestmark = pytest.mark.slow

CALIB = (16, 256)  # sequences x tokens of news_text() (about 5,600 tokens in all)
TARGETS = {4: 0.5, 3: 0.8}  # share of RTN's perplexity gap to float that GPTQ must close


def news_text() -> str:
    """gensim's test/test_data/lee.cor (Latin-1: it has pound signs)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the gensim package (pip install --no-deps gensim)")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee.cor"
    return path.read_text(encoding="latin-1")


def test_the_calibration_text_is_not_the_scored_text():
    sentences = {s.strip() for s in news_text().replace("\n", " ").split(". ") if len(s) > 40}
    scored = lee_text().replace("\n", " ")
    assert len(sentences) > 100 and not [s for s in sentences if s in scored]


@pytest.fixture(scope="module")
def smollm():
    return load_model(None, progress=False)


@pytest.fixture(scope="module")
def calib_ids(smollm):
    return calibration_ids(smollm.tokenizer, news_text(), *CALIB)


def _ppl(smollm, quantize=None) -> float:
    model = copy.deepcopy(smollm.model) if quantize else smollm.model
    if quantize:
        quantize(model)
    result = perplexity(model, smollm.tokenizer, lee_text()).perplexity
    del model
    gc.collect()
    return result


@pytest.fixture(scope="module")
def table(smollm, calib_ids):
    """{bits: {row: perplexity}}, computed once and printed for every bit width."""
    result = {}
    floating = _ppl(smollm)
    for bits in TARGETS:
        recipe = Recipe.uniform(QuantSpec(bits, "symmetric", "per_group", group_size=128))
        rows = {"float": floating}
        rows["rtn"] = _ppl(smollm, lambda m: quantize_model(m, recipe))
        rows["hqq"] = _ppl(smollm, lambda m: quantize_model(
            m, recipe, quantize_fn=lambda n, w, s: hqq_quantize(w, s)))
        rows["gptq"] = _ppl(smollm, lambda m: gptq_model(m, recipe, calib_ids))
        result[bits] = rows
        print(f"\nint{bits} sym g128, perplexity on lee_text (2048 tokens); GPTQ calibrated on "
              f"{CALIB[0]} x {CALIB[1]} tokens of lee.cor")
        for name, value in rows.items():
            gap = "" if name in ("float", "rtn") else \
                f"  closes {_closed(rows, name):.0%} of rtn's gap"
            print(f"  {name:<8}{value:9.2f}{gap}")
    return result


def _closed(rows, name) -> float:
    return (rows["rtn"] - rows[name]) / (rows["rtn"] - rows["float"])


@pytest.mark.parametrize("bits", TARGETS)
def test_hqq_beats_rtn(table, bits):
    assert table[bits]["hqq"] < table[bits]["rtn"]


@pytest.mark.parametrize("bits", TARGETS)
def test_gptq_closes_the_gap(table, bits):
    assert _closed(table[bits], "gptq") >= TARGETS[bits]


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """The default model's weights as an F32 GGUF: what llama.cpp's own quantizer starts from."""
    from zeropoint.gguf.requantize import requantize

    path = tmp_path_factory.mktemp("gguf") / "f32.gguf"
    requantize(default_model_path(), path, "F32")
    return path


@pytest.mark.parametrize("qtype", ["Q4_0", "Q3_K"])
def test_gptq_gguf_beats_llama_cpps_own_quantization(qtype, smollm, calib_ids, f32_gguf,
                                                     tmp_path):
    from zeropoint.gguf.gptq import gptq_gguf
    from zeropoint.gguf.llama_cpp import llama_cpp_perplexity, llama_cpp_quantize

    theirs, ours = tmp_path / "llama_cpp.gguf", tmp_path / "gptq.gguf"
    llama_cpp_quantize(f32_gguf, theirs, qtype)
    # gptq_gguf leaves the model's weights quantized: it gets a copy.
    loaded = dataclasses.replace(smollm, model=copy.deepcopy(smollm.model))
    gptq_gguf(loaded, ours, qtype, calib_ids)
    del loaded
    gc.collect()
    text = lee_text()
    ppl = {p.name: llama_cpp_perplexity(p, text).perplexity for p in (theirs, ours)}
    print(f"\n{qtype} perplexity on lee_text with llama.cpp: llama.cpp's own "
          f"{ppl[theirs.name]:.2f}, GPTQ {ppl[ours.name]:.2f} ({ours.stat().st_size:,} bytes, "
          f"llama.cpp's {theirs.stat().st_size:,})")
    assert abs(ours.stat().st_size - theirs.stat().st_size) < 4096  # the same types: header only
    assert ppl[ours.name] < ppl[theirs.name]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q3_K"])
def test_hqq_gguf_beats_llama_cpps_own_quantization(qtype, f32_gguf, tmp_path):
    # Calibration-free: measured 36.71 against 37.63 (Q4_0) and 47.99 against 49.00 (Q3_K).
    from zeropoint.gguf.hqq import hqq_encode
    from zeropoint.gguf.llama_cpp import llama_cpp_perplexity, llama_cpp_quantize
    from zeropoint.gguf.requantize import requantize

    theirs, ours = tmp_path / "llama_cpp.gguf", tmp_path / "hqq.gguf"
    llama_cpp_quantize(f32_gguf, theirs, qtype)
    requantize(f32_gguf, ours, qtype, encoder=hqq_encode)
    text = lee_text()
    ppl = {p.name: llama_cpp_perplexity(p, text).perplexity for p in (theirs, ours)}
    print(f"\n{qtype} perplexity on lee_text with llama.cpp: llama.cpp's own "
          f"{ppl[theirs.name]:.2f}, HQQ {ppl[ours.name]:.2f}")
    assert abs(ours.stat().st_size - theirs.stat().st_size) < 4096
    assert ppl[ours.name] < ppl[theirs.name]
