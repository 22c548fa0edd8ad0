"""Every supported family, Hugging Face -> GGUF, checked by running llama.cpp on the file.

For each family a tiny checkpoint made from its transformers config (tests/family_checkpoints.py)
is exported to F32; llama.cpp's logits on the file are compared with transformers' on the same
ids, and llama.cpp's tokenizer with transformers'. That only matches when every tensor has its
llama.cpp name, q/k rows are permuted where llama.cpp's rope wants it, Gemma's norms carry their
+1, and the sliding window, its layer pattern and the soft-capping reach llama.cpp's graph (the
text is 4x longer than the tiny Gemmas' 32-token window).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from family_checkpoints import FAMILY_NAMES, TEXT, load_tiny, tiny_checkpoint

from zeropoint.gguf import export, families
from zeropoint.gguf.export import export_hf
from zeropoint.gguf.llama_cpp import open_llama
from zeropoint.gguf.reader import read_gguf

N_TOKENS = 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (F32 GGUF path, HF model, token ids of TEXT), each made once."""
    made = {}

    def get(name):
        if name not in made:
            out = tmp_path_factory.mktemp(name) / "f32.gguf"
            export_hf(tiny_checkpoint(name), out, "F32")
            model, tok = load_tiny(name)
            made[name] = out, model, tok(TEXT, add_special_tokens=False)["input_ids"][:N_TOKENS]
        return made[name]

    return get


def hf_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(path, ids) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits on `ids`, and its own tokenization of TEXT."""
    llm = open_llama(path, n_ctx=256)
    try:
        tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=False)[:N_TOKENS]
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)]), tokens
    finally:
        llm.close()


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(largest |difference| / largest |ref|, mean |difference| / mean |ref|, share of positions
    with the same top token)."""
    diff = np.abs(ours - ref)
    return (float(diff.max() / np.abs(ref).max()), float(diff.mean() / np.abs(ref).mean()),
            float((ours.argmax(-1) == ref.argmax(-1)).mean()))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_llama_cpp_runs_the_export_with_transformers_logits(name, exported):
    path, model, ids = exported(name)
    got, tokens = llama_logits(path, ids)
    assert tokens == ids  # llama.cpp's tokenizer (gpt2 or llama model) splits TEXT the same way
    worst, mean, same_top = compare(got, hf_logits(model, ids))
    # llama.cpp keeps K and V in float16: agreement to ~1e-3 of the logits. Measured worst
    # 2e-4..9e-4 (Gemma 2 highest), mean 7e-5..6e-4; without Gemma's +1 on the norms, or with
    # Mistral's q/k unpermuted, the mean is above 0.1 (tests below).
    assert worst < 5e-3 and mean < 3e-3 and same_top == 1.0


def _family_keys(path):
    f = read_gguf(path)
    return f, {t.name for t in f.tensors}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_file_holds_what_llama_cpp_expects_of_the_family(name, exported):
    from safetensors.torch import load_file

    path, model, _ = exported(name)
    family = families.family_of(model.config)
    f, names = _family_keys(path)
    arch = family.arch
    assert f.get("general.architecture") == arch
    assert f.get("tokenizer.ggml.model") == ("gpt2" if name in ("llama", "qwen2", "qwen3")
                                             else "llama")
    assert f.get("tokenizer.ggml.pre") == {"llama": "llama-bpe", "qwen2": "qwen2",
                                           "qwen3": "qwen2"}.get(name, "default")
    assert ("blk.0.attn_q.bias" in names) == (name == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (name in ("qwen3", "gemma3"))
    assert ("blk.0.attn_qkv.weight" in names) == (name == "phi3")
    assert ("rope_freqs.weight" in names) == (name == "llama")
    assert ("blk.0.post_ffw_norm.weight" in names) == name.startswith("gemma")
    if name == "gemma2":
        assert f.get("gemma2.attn_logit_softcapping") == 50.0
        assert f.get("gemma2.final_logit_softcapping") == 30.0
    if name.startswith("gemma"):
        assert f.get(f"{arch}.attention.sliding_window") == 32
        assert f.get(f"{arch}.attention.sliding_window_pattern") == [
            t == "sliding_attention" for t in model.config.layer_types]
        assert f.get("tokenizer.ggml.add_space_prefix") is False
        # Gemma's norm weights are stored +1; others as they are
        state = load_file(tiny_checkpoint(name) / "model.safetensors")
        stored = np.frombuffer(f.raw("blk.1.ffn_norm.weight"), np.float32)
        hf = state["model.layers.1.pre_feedforward_layernorm.weight"].float().numpy()
        np.testing.assert_array_equal(stored, hf + 1)
    if name in ("mistral", "phi3"):
        assert f.get("tokenizer.ggml.add_space_prefix") is True
    if name == "gemma3":
        assert f.get("gemma3.rope.freq_base") == 1e6
        assert f.get("gemma3.rope.freq_base_swa") == 10000.0


@pytest.mark.parametrize("name,change", [
    ("gemma3", {"norm_offset": 0.0}),
    ("gemma2", {"sliding_window": False}),  # llama.cpp's default window (4096) then applies
    ("mistral", {"permute_qk": False}),
])
def test_without_the_familys_facts_llama_cpp_computes_another_model(name, change, exported,
                                                                   tmp_path, monkeypatch):
    """The check above can fail: drop one of the family's facts and the logits part."""
    _, model, ids = exported(name)
    wrong = dataclasses.replace(families.family_of(model.config), **change)
    monkeypatch.setattr(export, "family_of", lambda config, where: wrong)
    out = tmp_path / "wrong.gguf"
    export_hf(tiny_checkpoint(name), out, "F32")
    got, _ = llama_logits(out, ids)
    worst, mean, same_top = compare(got, hf_logits(model, ids))
    assert mean > 0.02 and worst > 0.02


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_q8_0_export_stays_close(name, exported, tmp_path):
    _, model, ids = exported(name)
    out = tmp_path / "q8.gguf"
    report = export_hf(tiny_checkpoint(name), out, "Q8_0")
    assert report.plan.counts().get("Q8_0", 0) >= 2 * 4  # every 2-D weight of 64 columns
    worst, mean, same_top = compare(llama_logits(out, ids)[0], hf_logits(model, ids))
    # Q8_0 weights and llama.cpp's 8-bit activations in a random network: measured mean
    # 0.01-0.03, top-1 agreement 0.95-1.0.
    assert mean < 0.1 and same_top > 0.85


def _config_dir(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("config,named", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
     "Gemma3ForConditionalGeneration"),
    ({"model_type": "falcon"}, "model_type 'falcon'"),
])
def test_an_unknown_family_is_refused_naming_it(tmp_path, config, named):
    _config_dir(tmp_path, config)
    with pytest.raises(ValueError, match="cannot export architecture") as e:
        export_hf(tmp_path, tmp_path / "x.gguf")
    assert named in str(e.value)
    for fam in ("Llama", "Mistral", "Qwen2/2.5", "Qwen3", "Gemma 2", "Gemma 3", "Phi-3"):
        assert fam in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_a_query_scale_llama_cpp_does_not_use_is_refused(tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("gemma3"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["query_pre_attn_scalar"] = 256
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="query_pre_attn_scalar 256 differs from the 32"):
        export_hf(ckpt, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
