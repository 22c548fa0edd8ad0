"""Fixtures the command-line tests share."""

import pytest


def save_bpe_tokenizer(path) -> int:
    """A byte-level BPE tokenizer (what the GGUF export and every family's tokenizer class
    take), trained on a line of text and saved in `path`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """save_bpe_tokenizer, for tests that build their own checkpoint."""
    return save_bpe_tokenizer


@pytest.fixture(scope="session")
def tiny_bpe_checkpoint(tmp_path_factory):
    """A 2-layer Llama with a byte-level BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-bpe")
    vocab = save_bpe_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
