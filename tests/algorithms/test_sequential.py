"""Sequential GPTQ over a tiny Llama built here, and `zeropoint quantize --method gptq|hqq`."""

import copy

import pytest
import torch

from zeropoint import QuantSpec, Recipe, Rule, load, quantize_model
from zeropoint.algorithms.gptq import GPTQOptions
from zeropoint.algorithms.sequential import calibration_ids, decoder_layers, gptq_model
from zeropoint.cli import main
from zeropoint.nn.qlinear import QLinear

VOCAB = 256


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("true_sequential, act_order", [(True, True), (False, False)])
def test_gptq_beats_rtn_on_held_out_input(tiny, true_sequential, act_order):
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, VOCAB, (16, 32), generator=g)
    held_out = torch.randint(0, VOCAB, (4, 32), generator=g)
    recipe = Recipe.uniform(QuantSpec(3, "symmetric", "per_group", group_size=32))
    ref = logits(tiny, held_out)

    model = copy.deepcopy(tiny)
    report = gptq_model(model, recipe, calib, GPTQOptions(percdamp=0.1, act_order=act_order),
                        batch=5, true_sequential=true_sequential)
    qlinears = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert len(qlinears) == 2 * 7  # q, k, v, o, gate, up, down in each layer; lm_head float
    assert report.layers == 2 and report.tokens == 16 * 32 and report.peak_rss_bytes > 0
    assert len(report.losses) == 2 * 7  # one GPTQ run (and loss) per Linear
    gptq_err = float(((logits(model, held_out) - ref) ** 2).mean())

    rtn = copy.deepcopy(tiny)
    quantize_model(rtn, recipe)
    rtn_err = float(((logits(rtn, held_out) - ref) ** 2).mean())
    assert gptq_err < 0.8 * rtn_err


def test_recipe_rules_are_followed(tiny):
    recipe = Recipe(QuantSpec(4, "asymmetric", "per_group", group_size=32), rules=(
        Rule("lm_head", None), Rule("*.v_proj", None),
        Rule("*.down_proj", QuantSpec(8, "symmetric", "per_channel")),
    ))
    model = copy.deepcopy(tiny)
    gptq_model(model, recipe, torch.randint(0, VOCAB, (4, 16)))
    layer = decoder_layers(model)[1]
    assert type(layer.self_attn.v_proj) is torch.nn.Linear
    assert torch.equal(layer.self_attn.v_proj.weight, decoder_layers(tiny)[1].self_attn.v_proj.weight)
    assert layer.mlp.down_proj.weight_q.spec == QuantSpec(8, "symmetric", "per_channel")
    assert layer.self_attn.q_proj.weight_q.spec.bits == 4


def test_calibration_and_model_errors(tiny):
    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": torch.arange(len(text.split()))[None]}

    ids = calibration_ids(Tok(), "a " * 100, 4, 20)
    assert ids.shape == (4, 20) and ids[1, 0] == 25  # evenly spread, not overlapping
    with pytest.raises(ValueError, match="has 100 tokens"):
        calibration_ids(Tok(), "a " * 100, 8, 20)
    with pytest.raises(ValueError, match="decoder stack"):
        gptq_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), Recipe(), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="calib_ids"):
        gptq_model(copy.deepcopy(tiny), Recipe(), torch.zeros(4, dtype=torch.long))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gptq")
    words = [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    tiny.save_pretrained(path)
    (path / "calib.txt").write_text(" ".join(words[(i * 37) % len(words)] for i in range(1200)))
    return path


@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_cli_writes_a_zeropoint_directory(tiny_checkpoint, tmp_path, method, capsys):
    out = tmp_path / method
    args = ["quantize", str(tiny_checkpoint), "-o", str(out), "--method", method, "--bits", "4",
            "--group-size", "32"]
    if method == "gptq":  # hqq is calibration-free: calibration options are an error there
        args += ["--calib", str(tiny_checkpoint / "calib.txt"), "--calib-tokens", "1024"]
    assert main(args) == 0
    loaded = load(out)
    assert sum(isinstance(m, QLinear) for m in loaded.model.modules()) == 14
    import json

    assert json.loads((out / "zeropoint.json").read_text())["method"] == method
    if method == "gptq":
        assert "peak memory" in capsys.readouterr().out


def test_cli_rejects_gptq_for_gguf_output(tiny_checkpoint, tmp_path):
    code = main(["quantize", str(tiny_checkpoint), "-o", str(tmp_path / "x.gguf"), "--type", "Q4_0",
                 "--method", "gptq"])
    assert code == 2 and not (tmp_path / "x.gguf").exists()
