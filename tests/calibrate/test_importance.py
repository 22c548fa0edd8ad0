"""Importance sums by forward hooks (calibrate/importance.py) against a slow loop over captured
inputs, and against the diagonal of GPTQ's Hessian; llama-imatrix's windows."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zeropoint.algorithms.gptq import HessianAccumulator
from zeropoint.calibrate.importance import (
    SquaredInputs,
    collect_squared_inputs,
    imatrix_windows,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _slow_sums(model, windows, batch):
    """Capture every Linear's inputs, then add x^2 column by column, token by token."""
    captured = {name: [] for name in _linears(model)}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: captured[n].append(
        args[0].detach().clone())) for n, m in _linears(model).items()]
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch):
            model(input_ids=windows[s:s + batch], use_cache=False)
    for h in handles:
        h.remove()
    sums, counts = {}, {}
    for name, xs in captured.items():
        width = xs[0].shape[-1]
        total = [0.0] * width
        n = 0
        for x in xs:
            for row in x.reshape(-1, width).double().tolist():
                n += 1
                for j, v in enumerate(row):
                    total[j] += v * v
        sums[name], counts[name] = torch.tensor(total, dtype=torch.float64), n
    return sums, counts


def test_hooks_match_a_slow_loop(tiny):
    windows = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(3))
    modules = _linears(tiny)

    def forward(ids):
        tiny(input_ids=ids, use_cache=False)

    acc = collect_squared_inputs(forward, modules, windows, batch=2)
    sums, counts = _slow_sums(tiny, windows, batch=2)
    assert set(acc.sums) == set(modules) == set(sums)
    for name in modules:
        assert acc.counts[name] == counts[name] == 60
        torch.testing.assert_close(acc.sums[name], sums[name], rtol=1e-5, atol=1e-7)
    # q/k/v read one tensor, so their sums are one sum
    assert torch.equal(acc.sums["model.layers.0.self_attn.q_proj"],
                       acc.sums["model.layers.0.self_attn.v_proj"])


def test_sums_are_the_gptq_hessian_diagonal(tiny):
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    lin = tiny.model.layers[0].mlp.gate_proj
    acc, h = SquaredInputs({"gate": lin}), HessianAccumulator(32, torch.float64)
    with acc, torch.no_grad():
        lin(x)
        lin(x[:1])
    h.add(x), h.add(x[:1])
    # H = 2 X^T X / n, so its diagonal is 2 * sum(x^2) / n
    torch.testing.assert_close(acc.sums["gate"] * 2 / acc.counts["gate"], h.hessian.diagonal(),
                               rtol=1e-6, atol=0)
    assert acc.counts["gate"] == h.rows == 28


def test_hooks_come_off(tiny):
    lin = tiny.model.layers[0].mlp.up_proj
    acc = SquaredInputs({"up": lin})
    with acc, torch.no_grad():
        lin(torch.ones(2, 32))
    with torch.no_grad():
        lin(torch.ones(4, 32))
    assert acc.counts["up"] == 2 and not lin._forward_pre_hooks


def test_windows_as_llama_imatrix_cuts_them():
    ids = torch.arange(100, 1100)  # 1000 tokens, BOS already in front where the model adds one
    w = imatrix_windows(ids, 300, bos_id=None)
    assert w.shape == (3, 300) and torch.equal(w.reshape(-1), ids[:900])
    w = imatrix_windows(ids, 300, bos_id=1)
    assert torch.equal(w[:, 0], torch.ones(3, dtype=torch.long))
    assert torch.equal(w[:, 1:], ids[:900].reshape(3, 300)[:, 1:])
    assert imatrix_windows(ids, 300, None, max_windows=2).shape == (2, 300)
    assert ids[0] == 100  # the caller's ids are not changed


def test_windows_need_two_contexts():
    with pytest.raises(ValueError, match="needs at least 600"):
        imatrix_windows(torch.arange(599), 300, None)
    with pytest.raises(ValueError, match="at least one window"):
        imatrix_windows(torch.arange(900), 300, None, max_windows=0)
