"""GGUF files for the reader and writer tests: a sample of every value type and several tensor
types written by zeropoint, and headers built byte by byte."""
from __future__ import annotations

import struct

import numpy as np
import torch
from gguf import GGUFValueType as V

from zeropoint.gguf import quantize_blocks
from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.writer import TensorData, write_gguf

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]

METADATA = {
    "general.architecture": MetaValue.string("llama"),
    "general.alignment": MetaValue.u32(64),
    "test.u8": MetaValue(200, V.UINT8),
    "test.i8": MetaValue(-100, V.INT8),
    "test.u16": MetaValue(60000, V.UINT16),
    "test.i16": MetaValue(-30000, V.INT16),
    "test.u32": MetaValue.u32(4_000_000_000),
    "test.i32": MetaValue.i32(-2_000_000_000),
    "test.u64": MetaValue(2**63 + 5, V.UINT64),
    "test.i64": MetaValue(-(2**62), V.INT64),
    "test.f32": MetaValue.f32(0.25),
    "test.f64": MetaValue(1 / 3, V.FLOAT64),
    "test.true": MetaValue.bool_(True),
    "test.false": MetaValue.bool_(False),
    "test.str": MetaValue.string("héllo, wörld ✓"),
    "test.empty_str": MetaValue.string(""),
    "test.arr_i32": MetaValue.array([1, -2, 3], V.INT32),
    "test.arr_u8": MetaValue.array([0, 255, 7], V.UINT8),
    "test.arr_f32": MetaValue.array([0.5, -1.25], V.FLOAT32),
    "test.arr_f64": MetaValue.array([0.1, 1e300], V.FLOAT64),
    "test.arr_bool": MetaValue.array([True, False, True], V.BOOL),
    "test.arr_str": MetaValue.array(["a", "", "Ġthe", "<|im_end|>"], V.STRING),
    "test.arr_u64": MetaValue.array([2**64 - 1, 0], V.UINT64),
}


def sample_tensors(gen: torch.Generator) -> list[TensorData]:
    out = [
        TensorData("f32_matrix", "F32", (3, 5), torch.randn(3, 5, generator=gen)),
        TensorData("f16_vector", "F16", (7,), torch.randn(7, generator=gen).half()),
    ]
    for i, qtype in enumerate(LEGACY):
        x = torch.randn(4 + i, 64, generator=gen)
        out.append(TensorData(f"blk.{i}.{qtype.lower()}.weight", qtype, (4 + i, 64),
                              quantize_blocks(x, qtype)))
    out.append(TensorData("lazy_3d", "Q8_0", (2, 3, 32),
                          lambda: quantize_blocks(torch.ones(2, 3, 32), "Q8_0")))
    return out


def write_sample(directory, gen: torch.Generator):
    """METADATA and sample_tensors written to directory/t.gguf: (path, tensors)."""
    tensors = sample_tensors(gen)
    path = directory / "t.gguf"
    size = write_gguf(path, METADATA, tensors)
    assert size == path.stat().st_size
    return path, tensors


def tensor_bytes(data) -> bytes:
    data = data() if callable(data) else data
    if isinstance(data, torch.Tensor):
        data = data.contiguous().view(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(data).view(np.uint8).tobytes()


def fresh(metadata):
    """The same values as plain MetaValues: written by encoding, not by copying read bytes."""
    return {k: MetaValue(m.value, m.type, m.sub_type) for k, m in metadata.items()}


# --- headers byte by byte -----------------------------------------------------------------------


def header(version=3, n_tensors=0, kvs=b"", infos=b"", n_kv=None):
    head = struct.pack("<4sIQQ", b"GGUF", version, n_tensors, n_kv if n_kv is not None else 0)
    return head + kvs + infos


def string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def tensor_info(name=b"w", dims=(32,), type_id=0, offset=0):
    packed = struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    return string(name) + packed + struct.pack("<IQ", type_id, offset)
