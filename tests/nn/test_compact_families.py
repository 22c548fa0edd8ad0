"""The compact decoder against transformers' own forward, for every family it runs.

Each family gets a tiny checkpoint made here from its transformers config with random weights
(dims multiples of 32, a few layers), quantized with zeropoint's round-to-nearest (int4 group-32
with q/k/v and gate/up fused, int8 per channel unfused) or left float. The oracle is the HF model
holding those very weights, run by transformers step by step with its own KV cache; the decoder
must give the same logits at every step, on both its paths (the general torch path, and the
batch-1 step on C kernels).

The configs make every family's peculiarity count: sliding windows shorter than the 15 positions
decoded, soft-caps small enough that tanh bends the scores, norm weights and biases moved off
their init values, Llama 3's rope scaling, Phi-3's longrope switching to its long factors in the
middle of the decode, Phi-3's partial rotary (Phi-4-mini's), Gemma 3's local and global rope
bases.

Tolerance: the decoder runs the same kernels on the same float32 inputs; only summation orders
(RMSNorm's sum of squares, attention) and libm's exp/tanh against torch's vectorized ones differ,
each a few float32 ulps, carried through a few layers to logits of size ~1-10. The differences
seen are below 2e-6 (printed by the failure message otherwise). rtol 1e-4 / atol 1e-4 leaves room
for other CPUs' vector widths, while a real mistake (a window off by one, a missing norm offset,
the embedding unscaled, the wrong rope table for a layer, soft-capping skipped) moves logits by
1e-2 or more.
"""

import pytest
import torch
from hf_reference import assert_logits_close, hf_logits

from zeropoint import QuantSpec, Recipe, Rule, quantize_model
from zeropoint.nn.compact_config import SUPPORTED_MODEL_TYPES
from zeropoint.nn.compact_runtime import CompactDecoder, supports
from zeropoint.nn.generate import _cache_keyword, greedy_generate

VOCAB = 128
SIZES = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, eos_token_id=None,
             bos_token_id=None, pad_token_id=None, max_position_embeddings=64)
GEMMA_SOFTCAPS = dict(attn_logit_softcapping=0.5, final_logit_softcapping=2.0)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
# name -> (config class, model class, config arguments beyond SIZES)
FAMILY_CONFIGS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 500000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=5, query_pre_attn_scalar=24, layer_types=LAYER_TYPES, **GEMMA_SOFTCAPS)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=5, query_pre_attn_scalar=48, layer_types=LAYER_TYPES,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1000000.0}})),
    "phi3-partial-rotary": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})),
    "phi3-longrope-window": ("Phi3Config", "Phi3ForCausalLM", dict(
        sliding_window=6, original_max_position_embeddings=12,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + i / 16 for i in range(16)],
                         "long_factor": [1.0 + i / 4 for i in range(16)],
                         "original_max_position_embeddings": 12})),
}
FAMILIES = list(FAMILY_CONFIGS)

INT8 = QuantSpec(8, "symmetric", "per_channel")
INT4 = QuantSpec(4, "asymmetric", "per_group", group_size=32)
# (name, spec, fuse q/k/v and gate/up)
WEIGHTS = {"float": (None, False), "int4-fused": (INT4, True), "int8-unfused": (INT8, False)}


def tiny_model(name, seed=0):
    import transformers

    config_class, model_class, extra = FAMILY_CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**SIZES, **extra})
    model = getattr(transformers, model_class)(config).float().eval()
    with torch.no_grad():  # init leaves biases zero and norms at one (Gemma: zero): make them count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def quantized(model, weights):
    spec, fuse = WEIGHTS[weights]
    if spec is not None:
        quantize_model(model, Recipe(spec, (Rule("lm_head", spec),)), fuse=fuse)
    return model


def prompt(batch=1, length=9, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", ["c-step", "general"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_every_step_match_the_hf_forward(name, weights, path):
    model = quantized(tiny_model(name), weights)
    ids = prompt()
    with torch.inference_mode():
        expected, tokens = hf_logits(model, ids, steps=6)
        decoder = CompactDecoder(model, fast=path == "c-step")
        decoder.start(1, ids.shape[1] + 6)
        if path == "c-step" and decoder._steps is None:
            pytest.skip("no C compiler: the batch-1 step takes the general path")
        assert_logits_close(decoder.forward(ids, all_logits=True), expected[0])
        for token, want in zip(tokens, expected[1:]):
            assert_logits_close(decoder.forward(token), want)


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_of_two_and_a_second_prompt_block_match_the_hf_forward(name):
    """Batch > 1 takes the general path; a block after the prompt needs the causal and window
    masks offset by the cached positions (and longrope's table chosen by the block's end)."""
    from transformers import DynamicCache

    model = quantized(tiny_model(name, seed=1), "int4-fused")
    ids = prompt(batch=2, length=14, seed=1)
    with torch.inference_mode():
        kw = {_cache_keyword(type(model).forward): DynamicCache(config=model.config),
              "use_cache": True}
        first = model(ids[:, :5], **kw).logits
        second = model(ids[:, 5:], **kw).logits
        decoder = CompactDecoder(model)
        decoder.start(2, 14)
        assert_logits_close(decoder.forward(ids[:, :5], all_logits=True), first)
        assert_logits_close(decoder.forward(ids[:, 5:], all_logits=True), second)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_are_those_of_generate(name):
    model = quantized(tiny_model(name, seed=2), "int4-fused")
    ids = prompt(length=7, seed=2)
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)
        compact = greedy_generate(model, ids, 12, loop="compact")
    assert expected.shape == (1, 19)
    assert torch.equal(compact, expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_cache_keeps_keys_and_values_only(name):
    """Memory per token: 2 (k and v) * layers * kv heads * head_dim float32 values."""
    model = tiny_model(name)
    config = model.config
    decoder = CompactDecoder(model)
    batch, max_len = 2, 40
    decoder.start(batch, max_len)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert decoder.kv_cache.untyped_storage().nbytes() == batch * max_len * per_token


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def test_an_unknown_family_is_named_with_those_supported():
    model = tiny_gpt2()
    assert not supports(model)
    with pytest.raises(ValueError) as error:
        CompactDecoder(model)
    message = str(error.value)
    assert "model type 'gpt2'" in message
    assert "accepted: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3" in message
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma2",
                                          "gemma3_text", "phi3"}


def test_an_unknown_activation_is_refused():
    model = tiny_model("mistral")
    model.config.hidden_act = "relu"
    with pytest.raises(ValueError, match="no activation 'relu'; accepted: silu"):
        CompactDecoder(model)


@pytest.mark.slow
def test_gemma3_270m_int4_compact_logits_match_the_hf_forward(gemma3_gguf):
    """The real Gemma 3 270M (weights from a Q4_K_M file), quantized as `zeropoint quantize
    --bits 4` does (int4 symmetric group-128, lm_head float): the decoder's logits at every
    step are transformers' own, and so are the greedy tokens."""
    from zeropoint.models.load import load_model

    loaded = load_model(gemma3_gguf, progress=False)
    model = loaded.model
    assert model.config.model_type == "gemma3_text"
    quantize_model(model, Recipe(QuantSpec(4, "symmetric", "per_group", group_size=128)))
    ids = loaded.tokenizer("The history of the printing press", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected, tokens = hf_logits(model, ids, steps=12)
        decoder = CompactDecoder(model)
        decoder.start(1, ids.shape[1] + 12)
        assert decoder._steps is not None  # the batch-1 step on C kernels
        assert_logits_close(decoder.forward(ids, all_logits=True), expected[0])
        for token, want in zip(tokens, expected[1:]):
            assert_logits_close(decoder.forward(token), want)
