"""The tiny llama GGUF that GGUF tests write: its metadata and its tensor list, in the order
llama.cpp's converter writes them (embedding, output norm, per block two norms and seven
weights, then the output), each weight made by the test's own `weight(name, shape)`."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.writer import TensorData

BLOCK_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_metadata(hidden: int, ff: int, layers: int, vocab: int, file_type: int) -> dict:
    return {
        "general.architecture": MetaValue.string("llama"),
        "llama.context_length": MetaValue.u32(128),
        "llama.embedding_length": MetaValue.u32(hidden),
        "llama.feed_forward_length": MetaValue.u32(ff),
        "llama.block_count": MetaValue.u32(layers),
        "llama.attention.head_count": MetaValue.u32(4),
        "llama.attention.head_count_kv": MetaValue.u32(4),
        "llama.attention.layer_norm_rms_epsilon": MetaValue.f32(1e-5),
        "llama.vocab_size": MetaValue.u32(vocab),
        "general.file_type": MetaValue.u32(file_type),
    }


def llama_tensors(hidden: int, ff: int, layers: int, vocab: int,
                  weight: Callable[[str, tuple[int, int]], TensorData]) -> list[TensorData]:
    """Every tensor but output.weight (tests give it a type of their own)."""
    ones = np.ones(hidden, np.float32)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden),
              "ffn_up": (ff, hidden), "ffn_down": (hidden, ff)}
    tensors = [weight("token_embd.weight", (vocab, hidden)),
               TensorData("output_norm.weight", "F32", (hidden,), ones)]
    for i in range(layers):
        tensors += [TensorData(f"blk.{i}.attn_norm.weight", "F32", (hidden,), ones),
                    TensorData(f"blk.{i}.ffn_norm.weight", "F32", (hidden,), ones)]
        tensors += [weight(f"blk.{i}.{stem}.weight", shapes[stem]) for stem in BLOCK_WEIGHTS]
    return tensors
