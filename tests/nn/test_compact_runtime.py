"""The compact runtime on Llama models against transformers' own forward and generate
(tests/nn/test_compact_families.py holds the other families).

The oracle is the HF model itself: its forward with its own cache gives the logits each step, and
generate(do_sample=False) the tokens. Both the decoder's paths are checked: the general one
(prefill, batch > 1, fast=False) and the batch-1 step on preallocated buffers and C kernels.

Tolerance: the decoder runs the same kernels on the same float32 inputs as the HF forward; only
summation orders differ (the RMSNorm sum of squares, the attention matmuls and softmax), each
worth a few float32 ulps (~1e-7 relative) and carried through two layers to logits of size ~1;
the differences seen are below 3e-7. rtol 1e-4 / atol 1e-5 leaves a wide margin for other CPUs'
vector widths while a real mistake (a position off by one in the rotary table, the wrong kv head
for a query head, a missing bias or epsilon, a stale cache row) moves logits by 1e-3 or more.
"""

import pytest
import torch
from hf_reference import assert_logits_close, hf_logits

from zeropoint import QuantSpec, Recipe, Rule, quantize_model
from zeropoint.nn.compact_runtime import CompactLlama, supports
from zeropoint.nn.generate import _cache_keyword, greedy_generate

INT8 = QuantSpec(8, "symmetric", "per_channel")
INT4 = QuantSpec(4, "symmetric", "per_group", group_size=128)

# (name, LlamaConfig arguments): grouped-query attention with tied embeddings, plain multi-head
# attention untied, and one kv head with an explicit head_dim, biases and a scaled rope (so that
# a rotary table not taken from the model's own rotary module would show).
CONFIGS = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "mqa-bias-rope": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                          attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 500.0}),
}


def tiny_llama(name, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # hidden 256 and intermediate 384: group-128 weights have 2 and 3 groups a row. No
    # end-of-sequence token: generate runs the full length, as the decoder does.
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384,
                         num_hidden_layers=2, eos_token_id=None, bos_token_id=None,
                         pad_token_id=None, **CONFIGS[name])
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves biases zero and norms one: make them count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def quantized(model, spec, fuse):
    if spec is not None:
        quantize_model(model, Recipe(spec, (Rule("lm_head", spec),)), fuse=fuse)
    return model


def prompt(batch=1, length=9, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


SPECS = {"float": None, "int8": INT8, "int4-g128": INT4}
# (spec name, fuse q/k/v and gate/up): a float model has nothing to fuse.
WEIGHTS = [("float", False), ("int8", True), ("int8", False), ("int4-g128", True),
           ("int4-g128", False)]
WEIGHT_IDS = [s if s == "float" else f"{s}-{'fused' if f else 'unfused'}" for s, f in WEIGHTS]


@pytest.mark.parametrize("path", ["c-step", "general"])
@pytest.mark.parametrize("spec,fuse", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_every_step_match_the_hf_forward(name, spec, fuse, path):
    # c-step: the one-row step with csrc/token_ops.c's norm, attention and gating (where the C
    # kernels build; without them batch-1 steps take the general path).
    fast = path != "general"
    model = quantized(tiny_llama(name), SPECS[spec], fuse)
    ids = prompt()
    with torch.inference_mode():
        expected, tokens = hf_logits(model, ids, steps=6)
        decoder = CompactLlama(model, fast=fast)
        decoder.start(1, ids.shape[1] + 6)
        assert_logits_close(decoder.forward(ids, all_logits=True), expected[0], atol=1e-5)
        for token, want in zip(tokens, expected[1:]):
            assert_logits_close(decoder.forward(token), want, atol=1e-5)
    assert (decoder._steps is not None) == fast


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_of_two_and_a_second_prompt_block_match_the_hf_forward(name):
    """Batch > 1 takes the general path; a block of tokens after the prompt needs the causal
    mask offset by the cached positions."""
    from transformers import DynamicCache

    model = quantized(tiny_llama(name, seed=1), INT4, fuse=True)
    ids = prompt(batch=2, length=12, seed=1)
    with torch.inference_mode():
        kw = {_cache_keyword(type(model).forward): DynamicCache(config=model.config),
              "use_cache": True}
        first = model(ids[:, :5], **kw).logits
        second = model(ids[:, 5:], **kw).logits
        decoder = CompactLlama(model)
        decoder.start(2, 12)
        assert_logits_close(decoder.forward(ids[:, :5], all_logits=True), first, atol=1e-5)
        assert_logits_close(decoder.forward(ids[:, 5:], all_logits=True), second, atol=1e-5)
        with pytest.raises(ValueError, match="the cache holds 2 sequences of 12 positions"):
            decoder.forward(ids[:, :1])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_are_those_of_generate(name, spec, batch, threads):
    model = quantized(tiny_llama(name, seed=2), SPECS[spec], fuse=True)
    ids = prompt(batch=batch, length=7, seed=2)
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=15, do_sample=False)
        compact = greedy_generate(model, ids, 15, loop="compact")
        hf = greedy_generate(model, ids, 15, loop="hf")
    assert expected.shape == (batch, 22)
    assert torch.equal(compact, expected)
    assert torch.equal(hf, expected)
    assert torch.get_num_threads() == threads  # the steps' one thread was given back


@pytest.fixture
def threads():
    return torch.get_num_threads()


def test_a_single_new_token_and_the_auto_loop():
    model = tiny_llama("gqa-tied")
    ids = prompt()
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=1, do_sample=False)
        assert torch.equal(greedy_generate(model, ids, 1, loop="compact"), expected)
        assert torch.equal(greedy_generate(model, ids, 4),
                           greedy_generate(model, ids, 4, loop="hf"))
    with pytest.raises(ValueError, match="unknown loop 'fast'; accepted: auto, hf, compact"):
        greedy_generate(model, ids, 3, loop="fast")


def test_a_decoder_made_before_quantization_is_not_reused():
    """greedy_generate builds its decoder per call: quantizing the model in place in between
    must change the tokens' source, not keep the float weights."""
    model = tiny_llama("gqa-tied", seed=3)
    ids = prompt(seed=3)
    with torch.inference_mode():
        greedy_generate(model, ids, 5)
        quantize_model(model, Recipe(QuantSpec(2, "symmetric", "per_group", group_size=128),
                                     (Rule("lm_head", INT4),)))
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(greedy_generate(model, ids, 5), expected)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        eos_token_id=None, bos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def test_an_unsupported_architecture_is_refused_and_auto_falls_back():
    model = tiny_gpt2()
    assert not supports(model)
    with pytest.raises(ValueError, match=r"got model type 'gpt2'; accepted: llama"):
        CompactLlama(model)
    ids = prompt()
    with pytest.raises(ValueError, match="accepted: llama"):
        greedy_generate(model, ids, 3, loop="compact")
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(greedy_generate(model, ids, 6), expected)  # "auto": the HF loop


def test_a_length_dependent_rope_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, rope_parameters={"rope_type": "dynamic",
                                                                 "factor": 2.0, "rope_theta": 1e4})
    model = LlamaForCausalLM(config).eval()
    assert not supports(model)
    with pytest.raises(ValueError, match="rope type 'dynamic' depends on the decoded length"):
        CompactLlama(model)


@pytest.mark.slow
def test_smollm2_int4_compact_tokens_equal_the_hf_loop():
    from zeropoint.models.load import load_model

    loaded = load_model(None, progress=False)
    model = loaded.model
    quantize_model(model, Recipe(INT4, (Rule("lm_head", INT4),)))
    ids = loaded.tokenizer("The history of the printing press", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        decoder = CompactLlama(model)
        compact = decoder.greedy(ids, 32)
        hf = greedy_generate(model, ids, 32, loop="hf")
    assert decoder._steps is not None  # the batch-1 step path ran
    assert compact.shape == (1, ids.shape[1] + 32)
    assert torch.equal(compact, hf)
