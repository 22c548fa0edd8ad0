"""`zeropoint imatrix` end to end on the tiny checkpoint: values against inputs captured here
from transformers' own forward, both file formats (read back by gguf-py and by zeropoint), a
zeropoint directory, and user errors."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zeropoint.cli import main
from zeropoint.gguf.imatrix import read_imatrix

CTX, TOKENS = 64, 512
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """GGUF name -> float64 sum of x^2 per column over the first 512 tokens in windows of 64
    (the word-level tokenizer adds no BOS), from inputs captured off transformers' model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).float().eval()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tok((tiny_checkpoint / "text.txt").read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[:TOKENS]).reshape(-1, CTX)
    sums, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for hf, short in HF_TO_GGUF.items():
            def grab(mod, args, key=f"blk.{i}.{short}.weight"):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                sums[key] = sums.get(key, 0) + (x ** 2).sum(0)
            handles.append(layer.get_submodule(hf).register_forward_pre_hook(grab))
    with torch.no_grad():
        for w in windows:  # one window at a time: batching must not change anything
            model(input_ids=w[None])
    for h in handles:
        h.remove()
    return {k: v.numpy() for k, v in sums.items()}


def _run(tiny_checkpoint, out, *extra, model=None):
    return main(["imatrix", str(model or tiny_checkpoint), "--calib",
                 str(tiny_checkpoint / "text.txt"), "--ctx", str(CTX), "--calib-tokens",
                 str(TOKENS), "-o", str(out), "--quiet", *extra])


def test_gguf_output_matches_captured_inputs(tiny_checkpoint, tmp_path, expected):
    out = tmp_path / "imatrix.gguf"
    assert _run(tiny_checkpoint, out) == 0
    r = gguf.GGUFReader(out)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == TOKENS // CTX
    assert r.fields["imatrix.chunk_size"].contents() == CTX
    assert r.fields["imatrix.datasets"].contents() == [str(tiny_checkpoint / "text.txt")]
    tensors = {t.name: np.asarray(t.data).reshape(-1) for t in r.tensors}
    assert set(tensors) == {n + s for n in expected for s in (".in_sum2", ".counts")}
    for name, sums in expected.items():
        assert tensors[name + ".counts"].tolist() == [TOKENS]
        np.testing.assert_allclose(tensors[name + ".in_sum2"], sums, rtol=2e-5)


def test_dat_output(tiny_checkpoint, tmp_path, expected):
    out = tmp_path / "imatrix.bin"
    assert _run(tiny_checkpoint, out, "--format", "dat") == 0
    assert out.read_bytes()[:4] != b"GGUF"
    imat = read_imatrix(out)
    assert imat.names() == sorted(expected) and imat.chunk_count == TOKENS // CTX
    for name, sums in expected.items():
        np.testing.assert_allclose(imat.importance(name), sums / TOKENS, rtol=2e-5)


def test_zeropoint_directory_runs_on_dequantized_weights(tiny_checkpoint, tmp_path, expected):
    qdir = tmp_path / "q8"
    assert main(["quantize", str(tiny_checkpoint), "-o", str(qdir), "--bits", "8",
                 "--granularity", "per_channel", "--quiet"]) == 0
    out = tmp_path / "q8.gguf"
    assert _run(tiny_checkpoint, out, model=qdir) == 0
    imat = read_imatrix(out)
    assert imat.names() == sorted(expected)
    # the first matrices read the embeddings (kept in float): the same sums; later ones read
    # what 8-bit weights computed: close, not equal
    np.testing.assert_allclose(imat.sums["blk.0.attn_q.weight"],
                               expected["blk.0.attn_q.weight"], rtol=2e-5)
    later = imat.sums["blk.1.ffn_down.weight"]
    np.testing.assert_allclose(later, expected["blk.1.ffn_down.weight"], rtol=0.05)
    assert not np.array_equal(later, expected["blk.1.ffn_down.weight"].astype(np.float32))


@pytest.mark.parametrize("extra,message", [
    (["--ctx", "8"], "--ctx must be at least 16"),
    (["--calib-tokens", "100"], "at least two windows (128 tokens"),
    (["--ctx", "512", "--calib-tokens", "4096"], "needs at least 1024"),
    (["--format", "dat", "--threads", "0"], "--threads must be at least 1"),
])
def test_user_errors(tiny_checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "x.gguf"
    assert _run(tiny_checkpoint, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
