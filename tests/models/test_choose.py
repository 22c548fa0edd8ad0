"""models/choose.py: the default's candidates, sized against llama.cpp's Q4_K_M and measured.

The chooser is run on a tiny checkpoint with candidates whose error order is known by
construction (more bits: less error; float: none), never with the measurement replaced."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from family_checkpoints import tiny_checkpoint

from zeropoint import QuantSpec
from zeropoint.models.choose import (
    CANDIDATES,
    Candidate,
    calibration_ids,
    choose,
    peer_budget_bytes,
    recipe_weight_bytes,
)
from zeropoint.recipe import Recipe


@pytest.fixture(scope="module")
def tiny():
    from zeropoint.models.load import load_model

    return load_model(tiny_checkpoint("llama"), progress=False)


def per_channel(bits: int) -> QuantSpec:
    return QuantSpec(bits, "symmetric", "per_channel")


def candidate(name: str, spec: QuantSpec | None) -> Candidate:
    return Candidate(name, name, Recipe.linears_and_tables(spec, spec), searched=False)


FLOAT = candidate("float", None)  # no error at all, and the largest
INT8 = candidate("int8", per_channel(8))
INT3 = candidate("int3", per_channel(3))  # far more error than int8, and smaller


def sizes(model):
    return {c.name: recipe_weight_bytes(model, c.recipe) for c in (FLOAT, INT8, INT3)}


@pytest.mark.parametrize("order", [(INT3, INT8, FLOAT), (FLOAT, INT8, INT3)],
                         ids=["small-first", "large-first"])
def test_lowest_error_within_budget_wins_never_one_over_it(tiny, order):
    model = tiny.model
    size = sizes(model)
    assert size["int3"] < size["int8"] < size["float"]
    ids = torch.tensor([list(range(3, 67))])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Float measures best (KLD 0) but is over budget; of the two within it, int8 errs less.
    choice = choose(model, size["float"] - 1, ids, order)
    assert choice.chosen is INT8
    measured = {s.candidate.name: s.kld for s in choice.scored}
    assert measured["float"] is None  # over budget: not even measured
    assert 0 <= measured["int8"] < measured["int3"]
    # The winner's quantized copy comes with the choice, in the winner's specs.
    from zeropoint.nn.quantize_model import quantized_layers

    layers = quantized_layers(choice.model)
    assert layers and all(m.weight_q.spec == per_channel(8) for _, m in layers)
    # The float model is left as it was.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Only int3 fits: taken without measuring.
    only = choose(model, size["int8"] - 1, None, order)
    assert only.chosen is INT3 and all(s.kld is None for s in only.scored)


def test_weight_bytes_from_shapes_equal_what_quantizing_stores(tiny):
    import copy

    for c in CANDIDATES:
        model = copy.deepcopy(tiny.model)
        predicted = recipe_weight_bytes(model, c.recipe)
        report = c.quantize(model)
        assert predicted == report.stored_bytes, c.name


def test_tiny_checkpoint_budget_equals_its_q4_k_m_export(tiny, tmp_path):
    """A checkpoint directory: the budget from the shapes equals the tensor bytes of the Q4_K_M
    file the GGUF export writes (llama-quantize's bytes; the real tool is in the slow test)."""
    from zeropoint.gguf.mixes import parse_target
    from zeropoint.models.main_job import gguf_weights
    from zeropoint.models.source import resolve_model
    from zeropoint.models.to_gguf import write_gguf

    out = tmp_path / "tiny-q4_k_m.gguf"
    write_gguf(resolve_model(str(tiny.source)), out, parse_target("Q4_K_M"), "rtn")
    assert peer_budget_bytes(tiny) == gguf_weights(out)[0]


def test_calibration_ids_come_from_the_calibration_text(tiny):
    from zeropoint.calibrate.texts import default_calibration_text

    ids = calibration_ids(tiny.tokenizer, 50)
    assert ids.shape == (1, 50)
    assert torch.equal(ids[0], tiny.tokenizer(default_calibration_text(),
                                              return_tensors="pt")["input_ids"][0, :50])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_budget_equals_llama_quantize_q4_k_m(model, llama_tools, tmp_path):
    """The budget equals the tensor bytes of llama-quantize's own Q4_K_M of the source."""
    from zeropoint.gguf.llama_tools import run_tool
    from zeropoint.models.main_job import gguf_weights
    from zeropoint.models.source import default_model_path, gemma3_model_path

    src = {"smollm2": default_model_path, "gemma3": gemma3_model_path}[model]()
    out = tmp_path / "q4_k_m.gguf"
    run_tool("llama-quantize", "--allow-requantize", src, out, "Q4_K_M", "2")
    assert peer_budget_bytes(SimpleNamespace(source=str(src))) == gguf_weights(out)[0]
