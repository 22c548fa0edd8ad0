"""Quantized modules, quantize_model, and the zeropoint directory on small models built here."""

import pytest
import torch
from torch import nn

from zeropoint import QTensor, QuantSpec, Recipe, Rule, load, quantize_model
from zeropoint.modeldir.format import read_manifest
from zeropoint.nn.qlinear import QEmbedding, QLinear
from zeropoint.modeldir.writer import save_quantized

BF16_EPS = 2.0**-8


def reference(x, q: QTensor, bias=None):
    """The layer the QLinear stands for: float64 matmul with the dequantized weight."""
    y = x.double() @ q.dequantize().double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize(
    "spec,kernel",
    [
        (QuantSpec(4, "symmetric", "per_group", group_size=128), "int4pack"),
        (QuantSpec(4, "asymmetric", "per_group", group_size=128), "int4pack"),
        (QuantSpec(3, "symmetric", "per_group", group_size=128), "int4pack"),
        (QuantSpec(2, "asymmetric", "per_channel"), "int4pack"),
        (QuantSpec(4, "symmetric", "per_group", group_size=96), "int4pack"),  # 576 = 6 x 96
        (QuantSpec(4, "symmetric", "per_group", group_size=128), "int4pack"),  # ragged on 576
        (QuantSpec(8, "symmetric", "per_channel"), "int8pack"),
        (QuantSpec(6, "symmetric", "per_channel"), "int8pack"),
        (QuantSpec(8, "asymmetric", "per_group", group_size=64), "dequantize"),
    ],
    ids=lambda v: v.describe() if isinstance(v, QuantSpec) else v,
)
def test_qlinear_computes_its_dequantized_layer(gen, spec, kernel):
    lin = nn.Linear(576, 256)
    q = QTensor.quantize(lin.weight.detach(), spec)
    layer = QLinear(q, lin.bias)
    assert layer.kernel.backend == kernel
    x = torch.randn(3, 576, generator=gen)
    y, ref = layer(x), reference(x, q, lin.bias)
    assert y.dtype == torch.float32 and y.shape == (3, 256)
    # The fast kernels round activations (and 4-bit scales) to bfloat16: bound the error by
    # that rounding, element by element, from |x| @ |W|.
    bound = 4 * BF16_EPS * (x.double().abs() @ q.dequantize().double().abs().T) + 1e-5
    assert bool(((y.double() - ref).abs() <= bound).all())
    # The portable fallback gives the same numbers within the same rounding.
    fallback = QLinear(q, lin.bias, backend="fallback")
    assert bool(((fallback(x).double() - y.double()).abs() <= 2 * bound).all())


def test_int8_dynamic_activations_need_8bit_per_channel(gen):
    lin = nn.Linear(64, 32)
    q8 = QTensor.quantize(lin.weight.detach(), QuantSpec(8, "symmetric", "per_channel"))
    layer = QLinear(q8, lin.bias, activations="int8-dynamic")
    x = torch.randn(2, 64, generator=gen)
    # 7-bit dynamic activations (fbgemm's reduce_range): a coarse but bounded error.
    assert torch.nn.functional.cosine_similarity(layer(x).flatten(), lin(x).flatten(), dim=0) > 0.99
    q4 = QTensor.quantize(lin.weight.detach(), QuantSpec(4, "symmetric", "per_group", group_size=32))
    with pytest.raises(ValueError, match="int8-dynamic activations need 8-bit symmetric per-channel"):
        QLinear(q4, None, activations="int8-dynamic")


@pytest.mark.parametrize("spec", [QuantSpec(4, "asymmetric", "per_group", group_size=16),
                                  QuantSpec(8, "symmetric", "per_channel")], ids=lambda s: s.describe())
def test_qembedding_lookup_is_the_dequantized_row(gen, spec):
    table = torch.randn(100, 48, generator=gen)
    q = QTensor.quantize(table, spec)
    emb = QEmbedding(q)
    ids = torch.tensor([[3, 99, 0], [3, 7, 50]])
    assert torch.equal(emb(ids), q.dequantize()[ids])


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_quantize_model_follows_the_recipe_and_shrinks_memory():
    model = tiny_llama()
    recipe = Recipe(QuantSpec(4, "symmetric", "per_group", group_size=32),
                    (Rule("lm_head", None), Rule("*.down_proj", QuantSpec(8, "symmetric", "per_channel"))))
    report = quantize_model(model, recipe)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"
    assert kinds["model.layers.1.mlp.down_proj"] == "QLinear"
    assert model.model.layers[1].mlp.down_proj.weight_q.spec.bits == 8
    assert model.model.layers[0].self_attn.q_proj.weight_q.spec.bits == 4
    assert len(report.layers) == 2 * 7
    # Sizes are measured from the tensors themselves, independently of the report's arithmetic.
    fresh = tiny_llama()
    float_params = sum(p.numel() for p in fresh.parameters())  # tied embedding counted once
    assert report.params == float_params
    assert report.float_bytes == 4 * (float_params + sum(b.numel() for b in fresh.buffers()))
    linear_params = sum(q.weight_q.numel for q in model.modules() if isinstance(q, QLinear))
    assert report.stored_bytes == sum(
        m.weight_q.nbytes for m in model.modules() if isinstance(m, QLinear)
    ) + 4 * (float_params - linear_params)
    assert report.resident_bytes < report.float_bytes


def test_embeddings_are_quantized_only_when_asked():
    model = tiny_llama()
    quantize_model(model, Recipe(QuantSpec(4, "symmetric", "per_group", group_size=32),
                                 quantize_embeddings=True))
    assert isinstance(model.model.embed_tokens, QEmbedding)
    assert isinstance(model.lm_head, nn.Linear)  # still float, and no longer tied


@pytest.mark.parametrize("quantize_embeddings", [False, True])
def test_save_and_load_give_bit_identical_logits(tmp_path, quantize_embeddings):
    model = tiny_llama()
    recipe = Recipe(QuantSpec(4, "asymmetric", "per_group", group_size=32),
                    (Rule("lm_head", None), Rule("*.o_proj", QuantSpec(8, "symmetric", "per_channel"))),
                    quantize_embeddings=quantize_embeddings)
    quantize_model(model, recipe)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = model(ids).logits
    out = tmp_path / "q"
    out.mkdir()
    manifest = save_quantized(model, out, recipe=recipe, kind="causal-lm", config=model.config)
    loaded = load(out)
    with torch.inference_mode():
        after = loaded.model(ids).logits
    assert torch.equal(before, after)
    assert read_manifest(out).quantized == manifest.quantized
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert manifest.total_bytes <= on_disk < manifest.total_bytes + 64 * 1024  # headers only
