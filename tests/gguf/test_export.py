"""Hugging Face llama checkpoints -> GGUF (zeropoint.gguf.export), checked by running llama.cpp.

llama.cpp's logits on the exported file are compared with transformers' on the same token ids:
that only matches when every tensor has the right GGUF name and the query/key rows are permuted
the way ggml's rope expects.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zeropoint.gguf import export
from zeropoint.gguf.export import export_hf
from zeropoint.gguf.llama_cpp import llama_cpp_perplexity, llama_cpp_quantize, open_llama
from zeropoint.gguf.reader import read_gguf

TEXT = ("The quick brown fox jumps over the lazy dog. In 1984, 42 dogs ran 7 miles; "
        "they said: \"don't stop!\" and it's true.\n\nNumbers like 3.14159 and 2718 matter. ") * 8
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_llama(path, tied=False, digits=False, seed=0):
    """A 2-layer Llama (4 query heads sharing 2 key/value heads) with a byte-level BPE tokenizer
    trained on TEXT, saved as a Hugging Face checkpoint; returns (model, tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level]) if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIALS[0],
                                     bos_token=SPECIALS[1], eos_token=SPECIALS[2])
    hf_tok.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size() + 8,  # 8 ids with no token: [PAD] entries in the GGUF
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        initializer_range=0.15,  # strong enough weights that attention (and rope) matter
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model, hf_tok


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied-digits"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model, tok = make_tiny_llama(path, tied=request.param, digits=request.param)
    return path, model, tok


def hf_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(largest |difference| / largest |ref|, mean |difference| / mean |ref|, share of positions
    with the same top token)."""
    diff = np.abs(ours - ref)
    return (float(diff.max() / np.abs(ref).max()), float(diff.mean() / np.abs(ref).mean()),
            float((ours.argmax(-1) == ref.argmax(-1)).mean()))


def llama_logits(gguf_path, ids) -> np.ndarray:
    llm = open_llama(gguf_path, n_ctx=256)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_export_f32_runs_in_llama_cpp_with_transformers_logits(tiny, tmp_path):
    path, model, tok = tiny
    out = tmp_path / "f32.gguf"
    report = export_hf(path, out, "F32")
    assert report.bits_per_weight == 32.0 and not report.fallbacks
    f = read_gguf(out)
    assert f.get("general.architecture") == "llama" and f.get("llama.block_count") == 2
    assert f.get("llama.attention.head_count_kv") == 2
    tied = model.config.tie_word_embeddings
    assert f.get("tokenizer.ggml.pre") == ("smollm" if tied else "gpt-2")
    assert ("output.weight" in f) != model.config.tie_word_embeddings
    assert f.get("tokenizer.ggml.tokens")[-1] == f"[PAD{model.config.vocab_size - 1}]"
    assert f.get("tokenizer.ggml.bos_token_id") == 1 and f.get("tokenizer.ggml.eos_token_id") == 2

    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:200]
    llm = open_llama(out, n_ctx=256)
    try:  # llama.cpp's own tokenizer splits the text the same way
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False)[:200] == ids
        assert llm.tokenize(b"<|im_start|>hi", add_bos=False, special=True)[0] == 1
    finally:
        llm.close()
    worst, mean, same_top = compare(llama_logits(out, ids), hf_logits(model, ids))
    # llama.cpp keeps K and V in float16: agreement to ~1e-3 of the logits, not 1e-6.
    # (Measured: worst 0.0014-0.0023, mean 0.0008; without the q/k permutation mean 1.17.)
    assert worst < 1e-2 and mean < 3e-3 and same_top == 1.0


def test_without_the_qk_permutation_the_logits_are_wrong(tiny, tmp_path, monkeypatch):
    """The check above can fail: skip the permutation and llama.cpp computes another model."""
    path, model, tok = tiny
    monkeypatch.setattr(export, "permute_qk", lambda w, n_head: w)
    out = tmp_path / "unpermuted.gguf"
    export_hf(path, out, "F32")
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:200]
    worst, mean, same_top = compare(llama_logits(out, ids), hf_logits(model, ids))
    assert mean > 0.3 and same_top < 0.5


def test_permute_qk_interleaves_the_halves_of_each_head():
    w = torch.arange(8.0).view(8, 1)  # 2 heads of 4 rows: [x0 x1 y0 y1] per head
    assert permute_rows(w, 2) == [0, 2, 1, 3, 4, 6, 5, 7]


def permute_rows(w, n_head):
    return export.permute_qk(w, n_head).view(-1).int().tolist()


def test_export_q8_0_is_llama_cpps_quantization_of_the_f32_export(tiny, tmp_path):
    path, model, tok = tiny
    export_hf(path, tmp_path / "f32.gguf", "F32")
    report = export_hf(path, tmp_path / "q8.gguf", "Q8_0")
    assert report.plan.counts()["Q8_0"] == 2 * 7 + (1 if model.config.tie_word_embeddings else 2)
    llama_cpp_quantize(tmp_path / "f32.gguf", tmp_path / "ref.gguf", "Q8_0")
    assert (tmp_path / "q8.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:200]
    worst, mean, same_top = compare(llama_logits(tmp_path / "q8.gguf", ids), hf_logits(model, ids))
    # Q8_0 weights and llama.cpp's 8-bit activations in a random (untrained, so touchy) network:
    # measured mean 0.036-0.039, top-1 agreement 0.94-0.95.
    assert mean < 0.1 and same_top > 0.85


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="cannot export architecture GPT2LMHeadModel"):
        export_hf(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_bad_checkpoints_are_clear_errors(tiny, tmp_path):
    import shutil

    path, _, _ = tiny
    broken = tmp_path / "ckpt"
    shutil.copytree(path, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        export_hf(broken, tmp_path / "x.gguf")
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        export_hf(broken, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="no GGUF name"):
        export.gguf_name("model.layers.0.self_attn.q_norm.weight")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_real_smollm2_exports_to_a_gguf_with_transformers_perplexity(tmp_path):
    """The default model, loaded by transformers and saved as a checkpoint, comes back as a GGUF
    whose tensors are the original GGUF's (q/k permuted back) and whose llama.cpp perplexity is
    transformers' float perplexity."""
    from zeropoint.gguf.convert import dequantize_tensor
    from zeropoint.models.evaluate import default_text, perplexity
    from zeropoint.models.load import load_model, strip_gguf_quantization
    from zeropoint.models.source import default_model_path

    loaded = load_model(None, progress=False)
    hf_dir = tmp_path / "smollm2"
    strip_gguf_quantization(loaded.model).save_pretrained(hf_dir)
    loaded.tokenizer.save_pretrained(hf_dir)
    text = default_text()
    reference = perplexity(loaded.model, loaded.tokenizer, text, max_tokens=1024)

    f32 = tmp_path / "f32.gguf"
    export_hf(hf_dir, f32, "F32")
    ours, original = read_gguf(f32), read_gguf(default_model_path())
    for name in ("blk.0.attn_q.weight", "blk.7.attn_k.weight", "blk.29.ffn_down.weight"):
        t = original[name]
        assert torch.equal(dequantize_tensor(ours.raw(name), "F32", t.shape),
                           dequantize_tensor(original.raw(t), t.type, t.shape)), name
    got = llama_cpp_perplexity(f32, text, max_tokens=1024)
    assert got.tokens == reference.tokens
    assert got.perplexity == pytest.approx(reference.perplexity, rel=2e-3)

    q8 = tmp_path / "q8.gguf"
    export_hf(hf_dir, q8, "Q8_0")
    got_q8 = llama_cpp_perplexity(q8, text, max_tokens=1024)
    assert got_q8.perplexity == pytest.approx(reference.perplexity, rel=2e-2)


def test_cli_exports_a_checkpoint_and_scores_it(tiny, tmp_path, capsys):
    from zeropoint.cli import main

    path, model, tok = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "model.gguf"
    assert main(["quantize", str(path), "--type", "Q4_K_M", "-o", str(out), "--eval", "--text",
                 str(text), "--max-tokens", "128"]) == 0
    printed = capsys.readouterr().out
    assert "Q4_K_M (llama.cpp mix Q4_K_M)" in printed and "perplexity with llama.cpp" in printed
    # 64-wide rows: every K choice falls back (token_embd/output take Q8_0 by the output rule)
    assert "Q4_K -> Q5_0 (rows of 64)" in printed
    assert read_gguf(out).get("general.file_type") == 15
    assert main(["quantize", str(path), "--type", "Q8_0", "-o", str(out),
                 "--recipe", "r.json"]) == 2
    assert "pass a recipe .json as --type" in capsys.readouterr().err


def test_cli_takes_a_recipe_file_as_the_type(tiny, tmp_path, capsys):
    from zeropoint.cli import main

    path, _, _ = tiny
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"default": "Q8_0", "tensors": {r"blk\.1\.": "Q4_0",
                                                                 "ffn_down": "F16"}}))
    out = tmp_path / "mixed.gguf"
    assert main(["quantize", str(path), "--type", str(recipe), "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    types = {t.name: t.type for t in read_gguf(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.1.attn_q.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
