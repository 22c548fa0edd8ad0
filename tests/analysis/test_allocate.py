"""Bit allocation: the knapsack against brute force, real bytes, recipes that quantize accepts."""

import copy
import itertools
import json
import random

import pytest
import torch

from zeropoint import QTensor, QuantSpec, Recipe, Rule, quantize_model
from zeropoint.analysis.allocate import LayerOptions, Option, _hull, allocate, qtensor_nbytes, solve
from zeropoint.analysis.specs import menu
from zeropoint.cli import main

from test_sensitivity import TinyLM, lm_batches

SPECS = menu()


def random_layers(rng, n_layers=4, n_options=5):
    layers = []
    for i in range(n_layers):
        options = [Option(SPECS[j], rng.randint(10, 100), rng.random() * 10) for j in range(n_options)]
        layers.append(LayerOptions(f"l{i}", (8, 8), options))
    return layers


def brute_force(layers, budget):
    best = None
    for combo in itertools.product(*(layer.options for layer in layers)):
        if sum(o.nbytes for o in combo) <= budget:
            err = sum(o.error for o in combo)
            if best is None or err < best:
                best = err
    return best


def lagrangian(layers, lam):
    """The choice that minimises error + lam * bytes, layer by layer (the Lagrangian relaxation)."""
    return [min(layer.options, key=lambda o: (o.error + lam * o.nbytes, o.nbytes)) for layer in layers]


def test_solve_is_optimal_at_every_lagrangian_budget():
    # At a budget equal to the bytes of a Lagrangian solution, that solution is optimal (Everett
    # 1963): the knapsack must find the same total error as brute force over every combination.
    rng = random.Random(0)
    checked = 0
    for _ in range(40):
        layers = random_layers(rng)
        for lam in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0):
            budget = sum(o.nbytes for o in lagrangian(layers, lam))
            chosen = solve(layers, budget)
            assert sum(o.nbytes for o in chosen.values()) <= budget
            assert sum(o.error for o in chosen.values()) == pytest.approx(brute_force(layers, budget))
            checked += 1
    assert checked == 240


def test_solve_is_feasible_and_near_optimal_at_any_budget():
    rng = random.Random(1)
    gaps = []
    for _ in range(60):
        layers = random_layers(rng)
        budget = rng.randint(sum(min(o.nbytes for o in l.options) for l in layers), 320)
        chosen = solve(layers, budget)
        assert sum(o.nbytes for o in chosen.values()) <= budget
        best = brute_force(layers, budget)
        got = sum(o.error for o in chosen.values())
        assert got >= best - 1e-9
        gaps.append(got - best)
    assert sum(g < 1e-9 for g in gaps) >= 40  # optimal in most instances, never infeasible


def test_hull_is_convex_and_falling():
    rng = random.Random(2)
    for _ in range(100):
        options = [Option(SPECS[0], rng.randint(1, 50), rng.random()) for _ in range(8)]
        hull = _hull(options)
        assert [o.nbytes for o in hull] == sorted(o.nbytes for o in hull)
        assert all(a.error > b.error for a, b in zip(hull, hull[1:]))
        slopes = [(b.error - a.error) / (b.nbytes - a.nbytes) for a, b in zip(hull, hull[1:])]
        assert all(s1 < s2 for s1, s2 in zip(slopes, slopes[1:]))
        for o in options:  # every option lies on or above the hull
            for a, b in zip(hull, hull[1:]):
                if a.nbytes <= o.nbytes <= b.nbytes:
                    line = a.error + (b.error - a.error) * (o.nbytes - a.nbytes) / (b.nbytes - a.nbytes)
                    assert o.error >= line - 1e-12


def test_budget_below_the_cheapest_menu_is_an_error():
    layers = random_layers(random.Random(3))
    with pytest.raises(ValueError, match="below the smallest the menu can reach"):
        solve(layers, 5)


@pytest.mark.parametrize("shape", [(64, 576), (96, 200), (7, 130)])
def test_bytes_are_the_real_qtensor_bytes(shape):
    w = torch.randn(shape)
    for spec in SPECS:
        assert qtensor_nbytes(shape, spec) == QTensor.quantize(w, spec).nbytes


def test_allocation_beats_uniform_at_the_same_size_on_held_out_input():
    model = TinyLM(seed=1)
    calibration, held_out = lm_batches(n=4, seed=0), lm_batches(n=4, seed=7)
    uniform = QuantSpec(3, "symmetric", "per_group", group_size=32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    recipe = Recipe(uniform, ())  # every Linear, head included
    probe = allocate(model, calibration, 8.0, recipe=recipe)
    uniform_bytes, _ = probe.uniform(uniform)
    budget = 8 * uniform_bytes / probe.numel
    alloc = allocate(model, calibration, budget, recipe=recipe)
    assert alloc.total_bytes <= uniform_bytes
    chosen = alloc.recipe(recipe)

    def damage(spec_for):
        quantized = copy.deepcopy(model)
        modules = dict(quantized.named_modules())
        with torch.no_grad():
            for n in names:
                modules[n].weight.copy_(QTensor.quantize(modules[n].weight, spec_for(n)).dequantize())
        total = 0.0
        with torch.no_grad():
            for b in held_out:
                ref = torch.log_softmax(model(**b).logits, -1)
                q = torch.log_softmax(quantized(**b).logits, -1)
                total += float((ref.exp() * (ref - q)).sum(-1).mean())
        return total / len(held_out)

    assert damage(chosen.spec_for) < 0.7 * damage(lambda n: uniform)
    assert len({chosen.spec_for(n) for n in names}) > 1


def test_recipe_round_trips_and_quantize_model_gets_the_bytes(tmp_path):
    model = TinyLM(seed=2)
    alloc = allocate(model, lm_batches(n=2), 4.5)  # default recipe: every Linear but lm_head
    assert alloc.bits_per_weight <= 4.5 and alloc.budget_bpw == pytest.approx(4.5, abs=0.01)
    recipe = alloc.recipe(Recipe())
    recipe.save(tmp_path / "r.json")
    loaded = Recipe.load(tmp_path / "r.json")
    assert loaded == recipe
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, loaded)
    assert {layer.name: layer.bytes for layer in report.layers} == \
        {name: o.nbytes for name, o in alloc.chosen.items()}
    assert sum(layer.bytes for layer in report.layers) == alloc.total_bytes


def test_a_generous_budget_buys_the_least_error_everywhere():
    model = TinyLM(seed=3)
    alloc = allocate(model, lm_batches(n=1), 9.0, menu=[QuantSpec(4, "symmetric", "per_channel"),
                                                         QuantSpec(8, "symmetric", "per_channel")])
    assert {o.spec.bits for o in alloc.chosen.values()} == {8}


def test_activation_modes_cannot_take_mixed_specs():
    alloc = allocate(TinyLM(seed=4), lm_batches(n=1), 4.0)
    with pytest.raises(ValueError, match="mixes specs"):
        alloc.recipe(Recipe(QuantSpec(8, "symmetric", "per_channel"), (Rule("lm_head", None),),
                            activations="int8-dynamic"))


@pytest.mark.parametrize("budget", [0, -1.0])
def test_budget_must_be_positive(budget):
    with pytest.raises(ValueError, match="positive number of bits"):
        allocate(TinyLM(), lm_batches(n=1), budget)


# --- quantize --budget-bpw -------------------------------------------------------------------------


def test_quantize_with_a_budget_writes_a_recipe_that_quantize_accepts(tiny_checkpoint, tmp_path,
                                                                     capsys, monkeypatch):
    from argparse import Namespace

    from zeropoint.cli.analyze import allocate_recipe

    out = tmp_path / "q"
    args = Namespace(model=str(tiny_checkpoint), output=str(out), budget_bpw=5.0, quiet=False,
                     calib=str(tiny_checkpoint / "text.txt"), budget_tokens=512, recipe_out=None)
    recipe = allocate_recipe(args, Recipe())
    printed = capsys.readouterr().out
    path = tmp_path / "q.recipe.json"  # beside the output
    assert path.is_file() and Recipe.load(path) == recipe
    assert "allocation" in printed and "uniform int4 sym g128" in printed
    assert main(["quantize", str(tiny_checkpoint), "-o", str(out), "--recipe", str(path), "--quiet"]) == 0
    manifest = json.loads((out / "zeropoint.json").read_text())
    quantized = manifest["quantized"]
    assert "lm_head.weight" not in quantized and len(quantized) == 14
    numel = sum(q["shape"][0] * q["shape"][1] for q in quantized.values())
    specs = {name.removesuffix(".weight"): QuantSpec.from_dict(q["spec"]) for name, q in quantized.items()}
    nbytes = sum(qtensor_nbytes(tuple(quantized[n + ".weight"]["shape"]), s) for n, s in specs.items())
    assert 8 * nbytes / numel <= 5.0
    assert specs == {n: recipe.spec_for(n) for n in specs}


def test_quantize_budget_flag_end_to_end(tiny_checkpoint, tmp_path):
    """Through the real `quantize --budget-bpw` hook in cli.quantize."""
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_checkpoint), "-o", str(out), "--budget-bpw", "4.5", "--quiet"])
    assert code == 0
    recipe = Recipe.load(tmp_path / "q.recipe.json")
    assert len(recipe.rules) == 15  # lm_head kept float, then one rule per allocated layer
    manifest = json.loads((out / "zeropoint.json").read_text())
    assert manifest["quantized_bytes"] * 8 <= 4.5 * manifest["quantized_params"]


def test_budget_below_the_menu_exits_2(tiny_checkpoint, tmp_path, capsys):
    code = main(["quantize", str(tiny_checkpoint), "-o", str(tmp_path / "q"), "--budget-bpw", "1.0", "--quiet"])
    assert code == 2
    assert "below the smallest the menu can reach" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


# --- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_budget_allocation_beats_uniform_int4_g128_on_held_out_text(smollm2, capsys):
    """Allocate on pydoc (1024 tokens), evaluate on the Lee corpus (1024 tokens, not used for the
    allocation): lower perplexity than uniform 4-bit group-128 at no more bytes."""
    from zeropoint.analysis.common import text_batches
    from zeropoint.models.evaluate import default_text, lee_text, perplexity

    model, tok = smollm2.model, smollm2.tokenizer
    uniform = QuantSpec(4, "symmetric", "per_group", group_size=128)
    base = Recipe.uniform(uniform)  # lm_head float
    batches = text_batches(tok, default_text(), window=512, max_tokens=1024)
    n_weights = sum(m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n != "lm_head")
    uniform_bytes = sum(qtensor_nbytes(tuple(m.weight.shape), uniform) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    alloc = allocate(model, batches, 8 * uniform_bytes / n_weights, recipe=base)

    def evaluate(recipe):
        q = copy.deepcopy(model)
        report = quantize_model(q, recipe)
        nbytes = sum(layer.bytes for layer in report.layers)
        return perplexity(q, tok, lee_text(), max_tokens=1024).perplexity, nbytes

    ppl_uniform, bytes_uniform = evaluate(base)
    ppl_alloc, bytes_alloc = evaluate(alloc.recipe(base))
    assert bytes_uniform == uniform_bytes and bytes_alloc <= bytes_uniform
    with capsys.disabled():
        print(f"\nSmolLM2, Lee corpus, 1024 tokens: uniform int4 sym g128 perplexity {ppl_uniform:.2f} at "
              f"{8 * bytes_uniform / n_weights:.3f} bits/weight; budget allocation {ppl_alloc:.2f} at "
              f"{8 * bytes_alloc / n_weights:.3f} bits/weight (Linear weights but lm_head, scales "
              "included)")
    assert ppl_alloc < ppl_uniform
