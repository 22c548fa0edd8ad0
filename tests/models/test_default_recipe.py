"""The default recipe (no spec options) on tiny Llama and Gemma 3 checkpoints, and each of the
default's candidates (models/choose.py; on the tiny models the choice is R1, on Gemma 3 270M it
is R2, so both are made here): the tied embedding/head table is stored once, and the quantized
model computes what transformers' own architecture computes with the same (dequantized) weights:
in its module path (Gemma's scaled embedding included) and in `zeropoint generate`'s compact
decoder (greedy tokens)."""

from __future__ import annotations

import json

import pytest
import torch
from family_checkpoints import tiny_checkpoint

from zeropoint.cli import main
from zeropoint.models.choose import CANDIDATES

FAMILIES = ("llama", "gemma3")
# (family, candidate name): None is `zeropoint quantize` with no spec option.
MADE = [(f, None) for f in FAMILIES] + [(f, c.name) for f in FAMILIES for c in CANDIDATES]


@pytest.fixture(scope="module", params=MADE, ids=[f"{f}-{c or 'default'}" for f, c in MADE])
def default_dir(request, tmp_path_factory):
    family, name = request.param
    src = tiny_checkpoint(family)
    out = tmp_path_factory.mktemp("default") / family
    if name is None:
        assert main(["quantize", str(src), "-o", str(out), "--quiet"]) == 0
        return family, src, out
    from zeropoint.modeldir.writer import save_quantized
    from zeropoint.models.load import load_model

    loaded = load_model(src, progress=False)
    candidate = next(c for c in CANDIDATES if c.name == name)
    candidate.quantize(loaded.model)
    out.mkdir()
    save_quantized(loaded.model, out, recipe=candidate.recipe, kind=loaded.kind,
                   tokenizer=loaded.tokenizer, config=loaded.config)
    return family, src, out


def candidate_of(out):
    """The candidate a directory was made with: the recorded default choice, else the one whose
    recipe the manifest holds."""
    from zeropoint.modeldir.format import read_manifest

    manifest = read_manifest(out)
    chosen = manifest.extra.get("default_choice", {}).get("chosen")
    return next(c for c in CANDIDATES
                if c.name == chosen
                or (chosen is None and c.recipe.to_dict() == manifest.extra["recipe"]))


def oracle_model(directory):
    """transformers' architecture from the directory's config, every quantized tensor
    dequantized into its float weight (the tied head follows the embedding by itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zeropoint.modeldir.format import read_tensors

    _, quantized, kept = read_tensors(directory)
    config = AutoConfig.from_pretrained(directory)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    state = dict(kept) | {name: q.dequantize() for name, q in quantized.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def test_specs_and_a_tied_table_stored_once(default_dir):
    from safetensors import safe_open

    from zeropoint.modeldir.format import read_manifest, read_tensors

    family, src, out = default_dir
    recipe = candidate_of(out).recipe
    table, linear = recipe.spec_for("lm_head"), recipe.default
    _, quantized, _ = read_tensors(out)
    embed = quantized.pop("model.embed_tokens.weight")
    assert embed.spec == table
    config = json.loads((out / "config.json").read_text())
    if config.get("tie_word_embeddings", family == "gemma3"):
        assert "lm_head.weight" not in quantized  # tied: the embedding's bytes serve the head
    else:
        assert quantized.pop("lm_head.weight").spec == table
    assert quantized and all(q.spec == linear for q in quantized.values())
    stored = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        for k in names:
            stored += f.get_tensor(k).nbytes
    assert any(n.startswith("lm_head") for n in names) == ("lm_head.weight" in read_tensors(out)[1])
    assert read_manifest(out).total_bytes == stored


def test_module_path_equals_transformers_with_the_same_weights(default_dir):
    from zeropoint.models.quantized import load_quantized

    family, _, out = default_dir
    loaded = load_quantized(out, backend="fallback")
    if family == "gemma3":
        assert loaded.model.model.embed_tokens.embed_scale is not None
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 11]])
    with torch.inference_mode():
        ours = loaded.model(input_ids=ids).logits
        theirs = oracle_model(out)(input_ids=ids).logits
    # The int8 head's torch kernel computes in bfloat16 (nn/kernels.Int8WeightOnly): logits
    # agree to its rounding; a lost embedding scale would move them by far more.
    err = (ours - theirs).abs().max().item()
    assert err < 0.02 * theirs.abs().max().item(), err


def test_generate_greedy_tokens_equal_transformers(default_dir, tmp_path, capsys):
    family, _, out = default_dir
    path = tmp_path / "g.json"
    assert main(["generate", str(out), "--prompt", "the quantized model", "--max-tokens", "12",
                 "--ignore-eos", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["engine"] == "zeropoint's compact decoder"
    turn = record["turns"][0]
    model = oracle_model(out)
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        expect = model.generate(torch.tensor([turn["prompt_tokens"]]), max_new_tokens=12,
                                do_sample=False)
    assert turn["tokens"] == expect[0, len(turn["prompt_tokens"]):].tolist()
