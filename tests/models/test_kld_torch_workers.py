"""TorchLogits runs groups of chunks side by side on single-threaded workers: the logits it
yields are each chunk's own, in order, as a plain forward of that chunk alone gives them, and
torch's thread count is what it was afterwards."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from family_checkpoints import load_tiny

from zeropoint.models import kld
from zeropoint.models.kld import TorchLogits


@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_come_back_in_order_as_a_plain_forward_gives_them(threads, monkeypatch):
    model, tok = load_tiny("llama")
    runner = TorchLogits(model, tok, "tiny")
    # a budget of two chunks' logits: several waves of groups
    monkeypatch.setattr(kld, "LOGITS_BUDGET", 2 * 4 * 8 * runner.vocab_size)
    inputs = np.random.default_rng(0).integers(0, runner.vocab_size, size=(7, 16), dtype=np.int32)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = list(runner.chunk_logits(inputs))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    assert len(rows) == len(inputs)
    with torch.inference_mode():
        for row, chunk in zip(rows, inputs):
            alone = model(input_ids=torch.from_numpy(chunk[None].astype(np.int64))).logits[0]
            torch.testing.assert_close(row, alone[8:15], rtol=1e-5, atol=1e-5)
