"""`zeropoint quantize MODEL --bits N --imatrix FILE`: each layer's group scales are the
importance-weighted search's (calibrate.mse_qparams with the file's entry), layers without an
entry keep min/max, and an importance matrix that does not fit the model is a one-line error that
says what did not match."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zeropoint.calibrate.estimators import mse_qparams
from zeropoint.cli import main
from zeropoint.core import choose_qparams
from zeropoint.gguf.imatrix import ImportanceMatrix, write_imatrix
from zeropoint.spec import QuantSpec

SPEC = QuantSpec(4, "symmetric", "per_group", group_size=32)
LAYERS = {  # module -> GGUF name, the tiny checkpoint's first layer
    "model.layers.0.self_attn.q_proj": ("blk.0.attn_q.weight", 64),
    "model.layers.0.mlp.down_proj": ("blk.0.ffn_down.weight", 128),
}


def _imatrix(path, entries: dict[str, int], seed=3):
    rng = np.random.default_rng(seed)
    sums = {n: (rng.gamma(0.3, size=cols) * 40).astype(np.float32) for n, cols in entries.items()}
    write_imatrix(path, ImportanceMatrix(sums, {n: np.array([10]) for n in sums}, ["t"], 1, 8))
    return {n: s / np.float32(10) for n, s in sums.items()}


def _float_weight(checkpoint, module):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    return model.get_submodule(module).weight.detach()


def test_each_layer_takes_the_weighted_search_of_its_entry(tiny_checkpoint, tmp_path, capsys):
    from zeropoint.models.quantized import load_quantized

    imatrix = tmp_path / "imatrix.gguf"
    importance = _imatrix(imatrix, dict(LAYERS.values()))
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_checkpoint), "-o", str(out), "--group-size", "32",
                 "--imatrix", str(imatrix)]) == 0
    assert "weights 2 of 14 layers" in capsys.readouterr().out
    model = load_quantized(out, fuse=False).model
    for module, (gname, _) in LAYERS.items():
        w = _float_weight(tiny_checkpoint, module)
        scale, _ = mse_qparams(w, SPEC, importance=importance[gname])
        got = model.get_submodule(module).weight_q.scale
        assert torch.equal(got, scale.reshape(got.shape)), module
    # A layer without an entry keeps min/max.
    module = "model.layers.1.self_attn.k_proj"
    got = model.get_submodule(module).weight_q.scale
    assert torch.equal(got, choose_qparams(_float_weight(tiny_checkpoint, module), SPEC)[0]
                       .reshape(got.shape))


@pytest.mark.parametrize("entries, complaint", [
    ({"blk.0.attn_q.weight": 48}, "its entry blk.0.attn_q.weight has 48 values, but "
                                  "model.layers.0.self_attn.q_proj has 64 input columns"),
    ({"encoder.layer.0.weight": 64}, "has no entry for any of the 14 layers to quantize"),
])
def test_an_importance_matrix_that_does_not_fit_is_named(tiny_checkpoint, tmp_path, capsys,
                                                          entries, complaint):
    imatrix = tmp_path / "imatrix.gguf"
    _imatrix(imatrix, entries)
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_checkpoint), "-o", str(out), "--group-size", "32",
                 "--imatrix", str(imatrix), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert complaint in err and "was it made for this model?" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_missing_or_broken_file_is_named(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["quantize", str(tiny_checkpoint), "-o", out, "--imatrix",
                 str(tmp_path / "none.gguf"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(20))
    assert main(["quantize", str(tiny_checkpoint), "-o", out, "--imatrix", str(broken),
                 "--quiet"]) == 2
    assert "broken.gguf" in capsys.readouterr().err
