"""Tiny Hugging Face checkpoints of every family zeropoint supports, made from each family's
transformers config with random weights (a few seconds, no download), shared by the family tests
(tests/gguf/test_export_families.py, tests/models/test_families.py).

Each gets the kind of tokenizer its family ships, trained here on TEXT: byte-level BPE with Llama
3's or Qwen2's split regex, or SentencePiece-style BPE with byte fallback (Mistral, Gemma, Phi-3).
Dimensions are multiples of 32 so that Q8_0 and Q4_0 apply to every matrix.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. In 1984, 42 dogs ran 7 miles; "
        "they said: \"don't stop!\" and it's true.\n\nNumbers like 3.14159 and 2718 matter. "
        "Quantization maps each weight to one of a few levels; the error compounds layer by "
        "layer. ") * 6

FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

_ROOT = Path(tempfile.mkdtemp(prefix="zp-families-"))
atexit.register(shutil.rmtree, _ROOT, True)

_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, initializer_range=0.15, bos_token_id=1, eos_token_id=2)


def _configs():
    import transformers as T

    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, "llama3", dict(
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            rope_theta=10000.0)),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, "spm", dict(
            sliding_window=None, head_dim=16)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, "qwen2", dict(tie_word_embeddings=True)),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, "qwen2", dict(head_dim=32)),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, "gemma", dict(
            head_dim=16, query_pre_attn_scalar=16, sliding_window=32, num_hidden_layers=4,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, "gemma", dict(
            head_dim=32, query_pre_attn_scalar=32, sliding_window=32, num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                         "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": 10000.0}})),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, "spm", dict(
            sliding_window=None, original_max_position_embeddings=256, pad_token_id=0)),
    }


def train_tokenizer(kind: str):
    """A PreTrainedTokenizerFast trained on TEXT: 'llama3'/'qwen2' byte-level BPE with that
    split regex, 'spm' (Llama 2 / Mistral: a space put before the text) or 'gemma' (none)
    BPE with byte fallback."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # llama.cpp looks up <|endoftext|> in any model whose name says phi3, as Phi-3's has it
    specials = ["<unk>", "<s>", "</s>"] + (["<|endoftext|>"] if kind == "spm" else [])
    if kind in ("llama3", "qwen2"):
        regex = LLAMA3_REGEX if kind == "llama3" else QWEN2_REGEX
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                      show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([TEXT], trainer)
    else:
        bytes_ = [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=True)
        trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials + bytes_,
                                      show_progress=False)
        tok.train_from_iterator([TEXT.replace(" ", "\u2581")], trainer)
        steps = [normalizers.Replace(" ", "\u2581")]
        if kind == "spm":
            steps.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if kind == "spm" else []))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@functools.cache
def tiny_checkpoint(family: str) -> Path:
    """The directory of `family`'s tiny checkpoint (made once per test session)."""
    config_cls, model_cls, tok_kind, extra = _configs()[family]
    path = _ROOT / family
    tok = train_tokenizer(tok_kind)
    assert len(tok) <= _COMMON["vocab_size"]
    tok.save_pretrained(path)
    torch.manual_seed(sum(map(ord, family)))
    config = config_cls(**{**_COMMON, **extra})
    if family.startswith("gemma"):
        config._attn_implementation = "eager"  # soft-capping is eager-only in transformers
    model = model_cls(config).eval()
    with torch.no_grad():  # Gemma's norms start at 0 (1 + w): make them matter to the test
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return path


def load_tiny(family: str):
    """(model, tokenizer) of the tiny checkpoint, float32 and eval, as transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint(family)
    kw = {"attn_implementation": "eager"} if family.startswith("gemma") else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(path)
