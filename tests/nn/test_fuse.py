"""Fused sibling QLinears (fuse.py) against the separate layers they replace, bit for bit."""

import copy

import pytest
import torch

from zeropoint import QTensor, QuantSpec, Recipe, load, quantize_model
from zeropoint.nn.fuse import fuse_members, fuse_shared_inputs, stack_rows
from zeropoint.nn.qlinear import QLinear
from zeropoint.modeldir.writer import save_quantized

SPECS = [
    QuantSpec(4, "symmetric", "per_group", group_size=128),  # ragged last group on 576
    QuantSpec(4, "asymmetric", "per_group", group_size=32),
    QuantSpec(2, "asymmetric", "per_channel"),
    QuantSpec(8, "symmetric", "per_channel"),
    QuantSpec(8, "asymmetric", "per_group", group_size=64),  # the dequantizing path
]


def siblings(spec, outs=(576, 192, 192), bias=(True, False, True), activations=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for out, has_bias in zip(outs, bias):
        w = torch.randn(out, 576, generator=g) * 0.05
        b = torch.randn(out, generator=g) if has_bias else None
        layers.append(QLinear(QTensor.quantize(w, spec), b, activations))
    return layers


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 5, 576)])
def test_fused_members_give_the_separate_outputs_bit_for_bit(gen, spec, shape):
    separate = siblings(spec)
    fused = copy.deepcopy(separate)
    assert fuse_members(fused)
    x = torch.randn(*shape, generator=gen)
    with torch.inference_mode():
        expected = [layer(x) for layer in separate]
        in_order = [layer(x) for layer in fused]
        reversed_order = [layer(x) for layer in reversed(fused)][::-1]
    for e, a, b in zip(expected, in_order, reversed_order):
        assert e.shape == a.shape and a.is_contiguous()
        assert torch.equal(e, a) and torch.equal(e, b)


def test_int8_dynamic_members_fuse_exactly(gen):
    spec = QuantSpec(8, "symmetric", "per_channel")
    separate = siblings(spec, outs=(96, 64), bias=(True, True), activations="int8-dynamic")
    fused = copy.deepcopy(separate)
    assert fuse_members(fused)
    x = torch.randn(3, 576, generator=gen)
    with torch.inference_mode():
        assert all(torch.equal(s(x), f(x)) for s, f in zip(separate, fused))


def test_a_sibling_called_on_another_input_computes_afresh(gen):
    separate = siblings(SPECS[0])
    fused = copy.deepcopy(separate)
    fuse_members(fused)
    x1, x2 = torch.randn(1, 576, generator=gen), torch.randn(1, 576, generator=gen)
    with torch.inference_mode():
        assert torch.equal(fused[0](x1), separate[0](x1))
        assert torch.equal(fused[1](x2), separate[1](x2))  # not x1's columns
        assert torch.equal(fused[2](x1), separate[2](x1))
        assert torch.equal(fused[1](x1), separate[1](x1))  # served twice: computed again


def test_an_input_edited_in_place_is_seen_outside_inference_mode(gen):
    separate = siblings(SPECS[3])
    fused = copy.deepcopy(separate)
    fuse_members(fused)
    x = torch.randn(1, 576, generator=gen)
    with torch.no_grad():
        fused[0](x)
        x.mul_(2)
        assert torch.equal(fused[1](x), separate[1](x))


def test_stacked_qtensor_dequantizes_to_the_stacked_weights(gen):
    for spec in SPECS:
        qs = [QTensor.quantize(torch.randn(n, 576, generator=gen), spec) for n in (32, 48)]
        stacked = stack_rows(qs)
        assert torch.equal(stacked.dequantize(), torch.cat([q.dequantize() for q in qs]))


def test_incompatible_siblings_are_left_alone(gen):
    a = siblings(QuantSpec(4, "symmetric", "per_group", group_size=32), outs=(64,), bias=(False,))
    b = siblings(QuantSpec(8, "symmetric", "per_channel"), outs=(64,), bias=(False,))
    assert not fuse_members(a + b)
    assert [m.kernel.backend for m in a + b] == ["int4pack", "int8pack"]
    # 8 rows each take the fallback (the int4 kernel needs out_features % 16 == 0), 16 stacked
    # rows would take the int4 kernel: other roundings, so they are not fused.
    c = siblings(SPECS[0], outs=(8, 8), bias=(False, False))
    assert not fuse_members(c)
    with pytest.raises(ValueError, match="same spec"):
        stack_rows([a[0].weight_q, b[0].weight_q])
    per_tensor = QTensor.quantize(torch.randn(8, 16, generator=gen), QuantSpec(8, "symmetric"))
    with pytest.raises(ValueError, match="per output channel or per group"):
        stack_rows([per_tensor, per_tensor])


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # attention_bias: q/k/v carry biases, so the stacked bias is exercised too.
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()  # transformers initializes biases to zero
    return model


MODEL_SPECS = [QuantSpec(4, "symmetric", "per_group", group_size=32),
               QuantSpec(4, "asymmetric", "per_channel"),
               QuantSpec(8, "symmetric", "per_channel")]


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: s.describe())
def test_fused_model_logits_and_saved_file_do_not_change(tmp_path, spec):
    recipe = Recipe.uniform(spec)
    plain, fused = tiny_llama(), tiny_llama()
    quantize_model(plain, recipe, fuse=False)
    quantize_model(fused, recipe)
    assert "(fused)" in repr(fused.model.layers[0].self_attn.q_proj)
    assert "(fused)" not in repr(plain.model.layers[0].self_attn.q_proj)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected, got = plain(ids).logits, fused(ids).logits
    assert torch.equal(expected, got)
    for directory, model in (("plain", plain), ("fused", fused)):
        (tmp_path / directory).mkdir()
        save_quantized(model, tmp_path / directory, recipe=recipe, kind="causal-lm",
                       config=model.config)
    tensors = sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors"))
    assert tensors == sorted(p.name for p in (tmp_path / "fused").glob("*.safetensors"))
    for name in tensors:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "fused" / name).read_bytes()
    reloaded = load(tmp_path / "fused").model
    assert "(fused)" in repr(reloaded.model.layers[1].mlp.up_proj)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, expected)


def test_fuse_shared_inputs_counts_the_groups():
    model = tiny_llama()
    quantize_model(model, Recipe.uniform(MODEL_SPECS[0]), fuse=False)
    assert fuse_shared_inputs(model) == 4  # q/k/v and gate/up in each of 2 layers
    assert fuse_shared_inputs(model) == 0  # already fused
