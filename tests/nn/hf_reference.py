"""The oracle the compact decoder's tests share: transformers' own forward, step by step with its
own cache."""
import torch

from zeropoint.nn.generate import _cache_keyword


def hf_logits(model, ids, steps):
    """HF logits for the prompt (every position), then for `steps` greedy tokens one at a time
    with its own cache: ([(b, t, vocab), (b, 1, vocab), ...], the tokens fed)."""
    from transformers import DynamicCache

    kw = {_cache_keyword(type(model).forward): DynamicCache(config=model.config), "use_cache": True}
    out = [model(ids, **kw).logits]
    tokens = []
    for _ in range(steps):
        tokens.append(out[-1][:, -1:].argmax(-1))  # (b, 1)
        out.append(model(tokens[-1], **kw).logits)
    return out, tokens


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=atol)
