"""The rules of a GGUF file's layout that its reader and its writer both keep: the versions, the
dimension limit, the data alignment, and the bytes a tensor of a ggml type takes."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .constants import GGUF_DEFAULT_ALIGNMENT, GGUFValueType
from .types import ggml_type

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    from typing import Any

ALIGNMENT_KEY = "general.alignment"
SUPPORTED_VERSIONS = (2, 3)  # version 1 (2023) used u32 counts; llama.cpp no longer reads it
MAX_DIMS = 4  # GGML_MAX_DIMS


def data_alignment(metadata: Mapping[str, Any]) -> int:
    """The alignment of tensor data: `general.alignment` (a u32 power of two) or 32."""
    meta = metadata.get(ALIGNMENT_KEY)
    if meta is None:
        return GGUF_DEFAULT_ALIGNMENT
    if meta.type != GGUFValueType.UINT32:
        # The type, not the value: a string or array value may be as large as the file.
        raise ValueError(f"{ALIGNMENT_KEY} must be a u32 power of two, got a {meta.type.name}")
    v = meta.value
    if not isinstance(v, int) or v <= 0 or v & (v - 1):
        raise ValueError(f"{ALIGNMENT_KEY} must be a u32 power of two, got {v!r}")
    return v


def tensor_nbytes(type_name: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of ggml type `type_name` and torch-order `shape` (row = shape[-1])."""
    shape = tuple(int(s) for s in shape)
    qtype = ggml_type(type_name)
    block, size = qtype.block_size, qtype.type_size
    if not shape or shape[-1] % block:
        raise ValueError(f"a {type_name} tensor's rows must be a multiple of {block} values, "
                         f"got shape {shape}")
    return math.prod(shape) // block * size
