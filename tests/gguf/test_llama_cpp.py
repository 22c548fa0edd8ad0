"""`zeropoint eval FILE.gguf --engine llama.cpp`: perplexity from llama.cpp's own logits."""
from __future__ import annotations

import json

import pytest

from zeropoint.cli import main
from zeropoint.gguf.export import export_hf
from zeropoint.gguf.llama_cpp import llama_cpp_perplexity
from zeropoint.models.evaluate import perplexity

from test_export import TEXT, make_tiny_llama  # noqa: I001 - a sibling test module

WINDOW, MAX_TOKENS = 64, 250


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tok = make_tiny_llama(path)
    export_hf(path, path / "model.gguf", "F32")
    (path / "text.txt").write_text(TEXT)
    return path, model, tok


def test_perplexity_protocol_matches_models_evaluate(tiny_gguf):
    """Same ids (llama.cpp's tokenizer = the HF one here), same windows, same unscored first
    tokens: llama.cpp's perplexity equals transformers' up to float16 K/V rounding."""
    path, model, tok = tiny_gguf
    ours = llama_cpp_perplexity(path / "model.gguf", TEXT, window=WINDOW, max_tokens=MAX_TOKENS)
    ref = perplexity(model, tok, TEXT, window=WINDOW, max_tokens=MAX_TOKENS)
    assert ours.tokens == ref.tokens == MAX_TOKENS - 4  # 4 windows, each first token unscored
    assert ours.perplexity == pytest.approx(ref.perplexity, rel=1e-3)
    other = llama_cpp_perplexity(path / "model.gguf", TEXT, window=2 * WINDOW,
                                 max_tokens=MAX_TOKENS)
    assert other.tokens == MAX_TOKENS - 2 and other.perplexity != ours.perplexity


def test_eval_cli_writes_the_figures_as_json(tiny_gguf, tmp_path, capsys):
    path, _, _ = tiny_gguf
    out = tmp_path / "eval.json"
    assert main(["eval", str(path / "model.gguf"), "--engine", "llama.cpp", "--text",
                 str(path / "text.txt"), "--window", str(WINDOW), "--max-tokens", str(MAX_TOKENS),
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {"model", "engine", "perplexity", "nll", "tokens", "window", "max_tokens",
            "bits_per_weight", "bytes", "sample"} <= set(data)
    expected = llama_cpp_perplexity(path / "model.gguf", TEXT, window=WINDOW, max_tokens=MAX_TOKENS)
    assert data["engine"] == "llama.cpp" and data["perplexity"] == expected.perplexity
    assert data["tokens"] == MAX_TOKENS - 4 and data["window"] == WINDOW
    assert data["bits_per_weight"] == 32.0
    assert data["bytes"] == (path / "model.gguf").stat().st_size
    assert isinstance(data["sample"], str)
    assert f"perplexity {expected.perplexity:.3f}" in printed and "sample:" in printed


@pytest.mark.slow
def test_eval_cli_on_the_default_model(tmp_path, capsys):
    from zeropoint.models.source import default_model_path

    out = tmp_path / "eval.json"
    assert main(["eval", str(default_model_path()), "--engine", "llama.cpp", "--max-tokens", "256",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tokens"] == 255 and 8 < data["perplexity"] < 40
    assert data["bits_per_weight"] == pytest.approx(5.74, abs=0.01)  # llama.cpp says 5.74 BPW
    assert len(data["sample"].split()) >= 3  # a real model writes words


def test_eval_cli_errors(tiny_gguf, tmp_path, capsys):
    path, _, _ = tiny_gguf
    assert main(["eval", str(path), "--engine", "llama.cpp"]) == 2
    assert "needs a .gguf file" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes((path / "model.gguf").read_bytes()[:2000])
    assert main(["eval", str(bad), "--engine", "llama.cpp", "--text", str(path / "text.txt")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["eval", str(path / "model.gguf"), "--engine", "llama.cpp", "--text",
                 str(tmp_path / "missing.txt")]) == 2
    assert "cannot read text file" in capsys.readouterr().err
    model = str(path / "model.gguf")
    assert main(["eval", model, model, "--engine", "llama.cpp"]) == 2
    assert "one GGUF file" in capsys.readouterr().err
