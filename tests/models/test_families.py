"""Every supported family through loading (Hugging Face directory and GGUF), the true-sequential
GPTQ pass, RTN/GPTQ/HQQ quantization and the analyses, on tiny checkpoints made from each
family's transformers config (tests/family_checkpoints.py).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from family_checkpoints import FAMILY_NAMES, TEXT, load_tiny, tiny_checkpoint

from zeropoint.algorithms.sequential import run_sequential
from zeropoint.gguf.export import export_hf
from zeropoint.models import ModelLoadError, load_model

LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
# Phi-3's q/k/v and gate/up are single fused Linears: each is its own group.
PHI3_GROUPS = [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"],
               ["mlp.down_proj"]]


def ids_of(tok, n=96) -> list[int]:
    return tok(TEXT, add_special_tokens=False)["input_ids"][:n]


def logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def rel_mean(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().mean() / ref.abs().mean())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_gguf_export_loads_back_as_the_same_model(name, tmp_path):
    """transformers' GGUF reader misses some of the file's facts (Qwen3's head size, Gemma's
    query scale, layer pattern and local rope base, Llama 3.1's rope factors); load_model puts
    them back, so the model read from the file is the checkpoint's."""
    model, tok = load_tiny(name)
    path = tmp_path / "f32.gguf"
    export_hf(tiny_checkpoint(name), path, "F32")
    loaded = load_model(path, progress=False)
    ids = ids_of(tok)
    assert ids_of(loaded.tokenizer) == ids
    torch.testing.assert_close(logits(loaded.model, ids), logits(model, ids),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_sequential_pass_follows_the_models_own_modules(name):
    """Groups of Linears that read one tensor, in calling order, found from the module structure:
    Phi-3's fused projections, Qwen2's biased ones, Qwen3's and Gemma 3's q/k norms in between."""
    model, tok = load_tiny(name)
    seen = []

    def solve(layer, prefix, members, H):
        seen.append((prefix, list(members), H.shape))

    calib = torch.tensor([ids_of(tok, 64)[:32], ids_of(tok, 64)[32:]])
    layers = run_sequential(model, calib, solve)
    expected = PHI3_GROUPS if name == "phi3" else LLAMA_GROUPS
    assert layers == model.config.num_hidden_layers
    assert [m for p, m, _ in seen] == expected * layers
    assert [p for p, _, _ in seen] == [f"model.layers.{i}." for i in range(layers)
                                       for _ in expected]
    inner = model.config.intermediate_size
    assert seen[3][2] == (inner, inner)  # down_proj reads the MLP's inner activations


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_gptq_into_gguf_writes_a_file_llama_cpp_runs_close_to_transformers(name, tmp_path):
    from zeropoint.algorithms.sequential import calibration_ids
    from zeropoint.gguf.gptq import gptq_gguf
    from zeropoint.gguf.llama_cpp import open_llama

    loaded = load_model(tiny_checkpoint(name), progress=False)
    reference = copy.deepcopy(loaded.model)
    calib = calibration_ids(loaded.tokenizer, TEXT, 4, 64)
    out = tmp_path / "gptq.gguf"
    report = gptq_gguf(loaded, out, "Q8_0", calib)
    per_layer = 4 if name == "phi3" else 7  # qkv, o, gate_up, down | q, k, v, o, gate, up, down
    assert report.gptq_tensors == loaded.config.num_hidden_layers * per_layer
    ids = ids_of(loaded.tokenizer)
    llm = open_llama(out, n_ctx=256)
    try:
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[: len(ids)])).float()
    finally:
        llm.close()
    ref = logits(reference, ids)
    # Q8_0 GPTQ weights, llama.cpp's 8-bit activations, a random network: measured mean
    # 0.01-0.04, top-1 agreement 0.95-1.0.
    assert rel_mean(got, ref) < 0.1
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.85


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_quantize_writes_a_directory_that_loads_and_scores_close(name, method, tmp_path):
    from zeropoint.cli import main
    from zeropoint.models.quantized import load_quantized

    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 2)
    out = tmp_path / "q"
    extra = ["--calib", str(text), "--calib-tokens", "512"] if method == "gptq" else []
    assert main(["quantize", str(tiny_checkpoint(name)), "-o", str(out), "--bits", "8",
                 "--method", method, *extra, "--quiet"]) == 0
    model, tok = load_tiny(name)
    q = load_quantized(out)
    ids = ids_of(tok)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    from zeropoint.nn.qlinear import QLinear

    assert sum(isinstance(m, QLinear) for m in q.model.model.layers.modules()) == n_linear
    # 8-bit weights: measured mean difference 0.2-1% of the float logits
    assert rel_mean(logits(q.model, ids), logits(model, ids)) < 0.03


@pytest.mark.slow  # 4-9 s each: the analyses calibrate and score several passes
@pytest.mark.parametrize("name", ["qwen2", "gemma3", "phi3"])
def test_analyze_budget_allocation_and_eval_run_on_the_family(name, tmp_path, capsys):
    from zeropoint.cli import main

    path = tiny_checkpoint(name)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 2)
    report = tmp_path / "a.json"
    assert main(["analyze", str(path), "--sensitivity", "--text", str(text), "--json",
                 str(report), "--quiet"]) == 0
    figures = json.loads(report.read_text())
    model, _ = load_tiny(name)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = json.dumps(figures)
    for n in linear_names - {"lm_head"}:
        assert f'"{n}"' in rows, n  # every Linear of the family's own structure is analysed
    out = tmp_path / "budget"
    assert main(["quantize", str(path), "-o", str(out), "--budget-bpw", "5",
                 "--budget-tokens", "256", "--quiet"]) == 0
    recipe = json.loads((tmp_path / "budget.recipe.json").read_text())
    chosen = {r["pattern"] for r in recipe["rules"] if r["spec"] is not None}
    assert chosen == linear_names - {"lm_head"}  # a spec for each of the family's own Linears

    scores = tmp_path / "eval.json"
    assert main(["eval", str(path), str(out), "--text", str(text), "--max-tokens", "128",
                 "--json", str(scores)]) == 0
    assert "perplexity" in scores.read_text()


def test_a_model_of_an_unknown_family_is_refused_naming_it(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path)
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel") as e:
        load_model(tmp_path, progress=False)
    for fam in ("Llama", "Mistral", "Qwen2/2.5", "Qwen3", "Gemma 2", "Gemma 3", "Phi-3"):
        assert fam in str(e.value)
