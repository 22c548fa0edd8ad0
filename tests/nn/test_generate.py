"""greedy_generate against transformers' own generate loop."""

import pytest
import torch

from zeropoint import QuantSpec, Recipe, quantize_model
from zeropoint.nn.generate import greedy_generate


def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # No end-of-sequence token: generate then runs the full length, as greedy_generate does.
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=None,
                         bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_generate_yields_the_tokens_of_generate(seed, quantized):
    model = tiny_llama(seed)
    if quantized:
        quantize_model(model, Recipe.uniform(QuantSpec(4, "symmetric", "per_group", group_size=32)))
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)
        got = greedy_generate(model, ids, 12)
    assert expected.shape == (1, 21)
    assert torch.equal(got, expected)


def test_greedy_generate_rejects_bad_input():
    model = tiny_llama(0)
    with pytest.raises(ValueError, match="2-D int64"):
        greedy_generate(model, torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        greedy_generate(model, torch.zeros(1, 5, dtype=torch.long), 0)
