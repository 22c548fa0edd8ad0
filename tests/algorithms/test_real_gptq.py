"""GPTQ, HQQ and round-to-nearest on the default model (SmolLM2-135M): perplexity on held-out
news prose (lee_text), side by side with the float model."""

import copy
import gc

import pytest

from zeropoint import QuantSpec, Recipe, quantize_model
from zeropoint.algorithms.hqq import hqq_quantize
from zeropoint.algorithms.sequential import calibration_ids, gptq_model
from zeropoint.models.evaluate import default_text, lee_text, perplexity
from zeropoint.models.load import load_model

pytestmark = pytest.mark.slow

SEQUENCES, LENGTH = 32, 256  # short enough for CI on 2 cores


@pytest.fixture(scope="module")
def smollm():
    return load_model(None, progress=False)


@pytest.fixture(scope="module")
def float_ppl(smollm):
    return perplexity(smollm.model, smollm.tokenizer, lee_text()).perplexity


def _ppl(smollm, quantize) -> float:
    model = copy.deepcopy(smollm.model)
    quantize(model)
    result = perplexity(model, smollm.tokenizer, lee_text()).perplexity
    del model
    gc.collect()
    return result


@pytest.mark.parametrize("bits, share", [(4, 0.5), (3, 0.8)])
def test_gptq_closes_the_gap_to_float(smollm, float_ppl, bits, share):
    spec = QuantSpec(bits, "symmetric", "per_group", group_size=128)
    recipe = Recipe.uniform(spec)  # lm_head stays float
    calib = calibration_ids(smollm.tokenizer, default_text(), SEQUENCES, LENGTH)
    rtn = _ppl(smollm, lambda m: quantize_model(m, recipe))
    hqq = _ppl(smollm, lambda m: quantize_model(m, recipe, quantize_fn=lambda n, w, s: hqq_quantize(w, s)))
    gptq = _ppl(smollm, lambda m: gptq_model(m, recipe, calib))
    print(f"\n{spec.describe()}, perplexity on lee_text (2048 tokens); GPTQ calibrated on "
          f"{SEQUENCES} x {LENGTH} tokens of default_text")
    for name, value in (("float", float_ppl), ("rtn", rtn), ("hqq", hqq), ("gptq", gptq)):
        print(f"  {name:<6}{value:8.3f}")
    closed = (rtn - gptq) / (rtn - float_ppl)
    print(f"  gptq closes {closed:.0%} of rtn's gap (target {share:.0%})")
    assert hqq < rtn
    assert closed >= share
