"""`zeropoint eval BASE QUANTIZED --kld` on the tiny checkpoint, against an oracle written here:
llama-perplexity's windowing and the full-vocabulary KL computed from transformers' logits."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeropoint.cli import main

WINDOW = 64
# The tiny model's random weights spread its distributions nearly evenly over 128 tokens; keep
# almost all of them exactly so that the figures test the windowing and the statistics (the
# sampled tail's error is measured in tests/models/test_base_logits.py and test_kld_real.py).
EXACT = ["--top-k", "120"]


@pytest.fixture(scope="module")
def noisy_copy(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with noise on every weight: a model to compare with it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("noisy")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    for f in tiny_checkpoint.glob("tokenizer*"):
        shutil.copy(f, out)
    shutil.copy(tiny_checkpoint / "special_tokens_map.json", out) \
        if (tiny_checkpoint / "special_tokens_map.json").exists() else None
    return out


def _oracle(base_dir, quant_dir, text, chunks):
    """Per-token KL(base || quant), nll of both and same-top flags: the text's tokens (this
    tokenizer adds no BOS) cut into `chunks` windows, logits at positions W/2 .. W-2 scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base_dir)(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: chunks * WINDOW]).reshape(chunks, WINDOW)
    logits = []
    for d in (base_dir, quant_dir):
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            logits.append(model(windows).logits[:, WINDOW // 2 : WINDOW - 1].double())
    targets = windows[:, WINDOW // 2 + 1 :]
    log_p, log_q = (torch.log_softmax(x, -1) for x in logits)
    kld = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    nll = -log_q.gather(-1, targets[..., None])[..., 0]
    nll_base = -log_p.gather(-1, targets[..., None])[..., 0]
    same = logits[0].argmax(-1) == logits[1].argmax(-1)
    return kld.flatten(), nll.flatten(), nll_base.flatten(), same.flatten()


def test_kld_matches_the_oracle(tiny_checkpoint, noisy_copy, tmp_path):
    text = tiny_checkpoint / "text.txt"
    out = tmp_path / "kld.json"
    assert main(["eval", str(tiny_checkpoint), str(noisy_copy), "--kld", "--text", str(text),
                 "--window", str(WINDOW), "--chunks", "8", "--json", str(out), *EXACT]) == 0
    got = json.loads(out.read_text())
    kld, nll, nll_base, same = _oracle(tiny_checkpoint, noisy_copy, text.read_text(), 8)
    assert got["tokens"] == kld.numel() == 8 * 31
    # float32 logits against the oracle's float64, and the 8 never-seen token ids left to the
    # tail sample: 0.16% apart on one run here, far inside the figure's own uncertainty (~5%)
    assert got["kld"]["value"] == pytest.approx(float(kld.mean()), rel=5e-3)
    assert got["kld"]["uncertainty"] == pytest.approx(float(kld.std() / kld.numel() ** 0.5),
                                                      rel=0.02)
    assert got["kld"]["value"] > 0.001  # the noise made a difference to measure
    assert got["kld_median"] == pytest.approx(float(kld.median()), rel=0.02)
    assert got["perplexity"]["value"] == pytest.approx(float(nll.mean().exp()), rel=1e-4)
    assert got["perplexity_base"]["value"] == pytest.approx(float(nll_base.mean().exp()), rel=1e-4)
    assert got["same_top"]["value"] == pytest.approx(float(same.double().mean()))
    dp = (-nll).exp() - (-nll_base).exp()
    assert got["delta_p_rms"]["value"] == pytest.approx(float(dp.pow(2).mean().sqrt()), rel=1e-4)
    for key in ("kld_percentiles", "delta_p_percentiles", "perplexity_ratio", "delta_p"):
        assert key in got


def test_a_model_against_itself_scores_zero(tiny_checkpoint, tmp_path, capsys):
    text = tiny_checkpoint / "text.txt"
    assert main(["eval", str(tiny_checkpoint), str(tiny_checkpoint), "--kld", "--text",
                 str(text), "--window", str(WINDOW), "--json", str(tmp_path / "k.json")]) == 0
    printed = capsys.readouterr().out
    assert "Mean    KLD:" in printed and "Same top p: 100.000" in printed
    got = json.loads((tmp_path / "k.json").read_text())
    assert abs(got["kld"]["value"]) < 1e-6 and got["perplexity_ratio"]["value"] == pytest.approx(1)


def test_saved_base_logits_give_the_same_figures(tiny_checkpoint, noisy_copy, tmp_path):
    text = tiny_checkpoint / "text.txt"
    common = ["--kld", "--text", str(text), "--window", str(WINDOW), "--chunks", "4"]
    saved = tmp_path / "base.zpkld"
    assert main(["eval", str(tiny_checkpoint), *common, "--save-base", str(saved)]) == 0
    assert main(["eval", str(noisy_copy), *common, "--base-logits", str(saved),
                 "--json", str(tmp_path / "reused.json")]) == 0
    assert main(["eval", str(tiny_checkpoint), str(noisy_copy), *common,
                 "--json", str(tmp_path / "direct.json")]) == 0
    reused = json.loads((tmp_path / "reused.json").read_text())
    direct = json.loads((tmp_path / "direct.json").read_text())
    for key in ("kld", "perplexity", "perplexity_base", "same_top", "delta_p_rms"):
        assert reused[key] == direct[key], key


def test_a_mismatched_reuse_is_an_error(tiny_checkpoint, noisy_copy, tmp_path, capsys):
    text = tiny_checkpoint / "text.txt"
    saved = tmp_path / "base.zpkld"
    common = ["--kld", "--window", str(WINDOW), "--chunks", "2"]
    assert main(["eval", str(tiny_checkpoint), *common, "--text", str(text),
                 "--save-base", str(saved)]) == 0
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[::-1])
    capsys.readouterr()
    assert main(["eval", str(noisy_copy), *common, "--text", str(other),
                 "--base-logits", str(saved)]) == 2
    assert "for another text" in capsys.readouterr().err
    assert main(["eval", str(noisy_copy), "--kld", "--window", "32", "--text", str(text),
                 "--base-logits", str(saved)]) == 2
    assert "--window 64, not 32" in capsys.readouterr().err
    assert main(["eval", str(noisy_copy), str(noisy_copy), *common, "--text", str(text),
                 "--base-logits", str(saved)]) == 2
    assert "holds the base logits of" in capsys.readouterr().err
    assert main(["eval", str(tiny_checkpoint), "--kld", "--text", str(text)]) == 2
    assert "--kld compares two models" in capsys.readouterr().err


def test_different_vocabularies_are_refused(tiny_checkpoint, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    wider = tmp_path / "wider"
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config.vocab_size = 140
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    for f in tiny_checkpoint.glob("tokenizer*"):
        shutil.copy(f, wider)
    assert main(["eval", str(tiny_checkpoint), str(wider), "--kld", "--window", str(WINDOW),
                 "--text", str(tiny_checkpoint / "text.txt")]) == 2
    err = capsys.readouterr().err
    assert "128 tokens" in err and "140" in err and "same tokenizer" in err


def test_a_zeropoint_directory_is_compared(tiny_checkpoint, tmp_path):
    from zeropoint.models.quantized import load_quantized

    q = tmp_path / "q"
    text = tiny_checkpoint / "text.txt"
    assert main(["quantize", str(tiny_checkpoint), "-o", str(q), "--bits", "4",
                 "--group-size", "32", "--quiet"]) == 0
    assert main(["eval", str(tiny_checkpoint), str(q), "--kld", "--text", str(text),
                 "--window", str(WINDOW), "--chunks", "3", "--json", str(tmp_path / "k.json"),
                 *EXACT]) == 0
    got = json.loads((tmp_path / "k.json").read_text())
    # The oracle runs the directory as load_quantized rebuilds it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_checkpoint)(text.read_text(),
                                                         add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 3 * WINDOW]).reshape(3, WINDOW)
    with torch.no_grad():
        p = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)(windows).logits
        q_logits = load_quantized(q).model(windows).logits
    half = slice(WINDOW // 2, WINDOW - 1)
    log_p, log_q = (torch.log_softmax(x[:, half].double(), -1) for x in (p, q_logits))
    kld = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    # 4 bits barely move this model (KLD ~5e-5): float32 log-probabilities set the tolerance.
    assert got["kld"]["value"] == pytest.approx(float(kld.mean()), rel=1e-3, abs=2e-6)
    assert got["kld"]["value"] > 1e-5
    assert np.isfinite(got["kld"]["uncertainty"])
