"""One tensor from one ggml type to another, a few rows at a time: the conversion behind
requantize.write_quantized (and so behind every GGUF file zeropoint writes from another's
tensors).

Between two legacy types both steps are one pass in C (`codecs.transcode`), whose floats never
leave L1; between types the numpy codecs have (codecs.py), rows are dequantized and quantized
again by them; otherwise by the torch kernels (gguf.blocks) or gguf-py. This module is what
imports numpy on that path: requantize imports it only when a tensor changes type, so a
requantization that copies every tensor runs without numpy.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import codecs
from .layout import tensor_nbytes

if TYPE_CHECKING:
    import torch

_CHUNK_VALUES = 1 << 18  # 1 MiB of float32 rows per step of `convert`: they stay in L2 cache
_TRANSCODE_VALUES = 1 << 20  # values per step when no float32 rows are made (at most 1 MiB out)

# float32 rows (rows, n), ggml type, tensor name -> flat uint8 bytes (`quantize_tensor` is the
# default)
Encoder = Callable[["torch.Tensor", str, str], np.ndarray]


def dequantize_tensor(data: np.ndarray, qtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Bytes of a `qtype` tensor -> float32 tensor of `shape`.

    zeropoint's torch kernels where it has the type (bit-identical to gguf-py and to ggml's
    dequantize_row_*); gguf-py's `gguf.quants.dequantize` for the rest.
    """
    import torch

    from . import blocks

    shape = tuple(int(s) for s in shape)
    data = np.ascontiguousarray(data).reshape(-1)
    if qtype == "F32":
        return torch.from_numpy(data.view(np.float32)).view(shape)
    if qtype == "F16":
        return torch.from_numpy(data.view(np.float16)).to(torch.float32).view(shape)
    if qtype == "BF16":  # bf16 is the top half of a float32
        wide = data.view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(wide.view(np.float32)).view(shape)
    if qtype in blocks.BLOCK_TYPES:
        return blocks.dequantize_blocks(torch.from_numpy(data), qtype, shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        out = dequantize(data, GGMLQuantizationType[qtype])
    except (KeyError, NotImplementedError) as e:
        raise ValueError(f"cannot dequantize ggml type {qtype}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(shape)


def quantize_tensor(x: torch.Tensor, qtype: str, name: str = "tensor") -> np.ndarray:
    """float32 tensor (rows = last dim) -> flat uint8 bytes of ggml type `qtype`."""
    import torch

    from . import blocks

    if qtype == "F32":
        out = x.to(torch.float32)
    elif qtype in ("F16", "BF16"):
        out = x.to(torch.float16 if qtype == "F16" else torch.bfloat16)  # round to nearest even
        if not torch.isfinite(out).all():
            big = float(x.abs().max())
            raise ValueError(f"{name}: values up to {big:.4g} are not finite in {qtype}")
        out = out.view(torch.int16)
    else:
        try:
            out = blocks.quantize_blocks(x.reshape(-1, x.shape[-1]), qtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out.contiguous().view(-1).view(torch.uint8).numpy()


def convert(data: np.ndarray, src_type: str, shape: Sequence[int], dst_type: str,
            name: str = "tensor", encoder: Encoder | None = None) -> Iterator[np.ndarray]:
    """Bytes of a `src_type` tensor -> its bytes in `dst_type`, yielded a few rows at a time.

    Rows are dequantized and quantized again in chunks of about _CHUNK_VALUES, so the float32
    rows stay in cache and reuse the same memory; a whole tensor in float32 would be fresh memory
    for every tensor, whose page faults cost more than the quantization itself. A piece may be a
    view of a buffer the next piece reuses (as TensorData allows): use it, or copy it, before
    asking for the next. `encoder` (default `quantize_tensor`) turns float32 rows into bytes:
    another one (gguf.hqq's) must treat rows independently, as the pieces split the tensor by
    rows."""
    shape = tuple(int(s) for s in shape)
    data = np.ascontiguousarray(data).reshape(-1)
    rows, row_values = math.prod(shape[:-1]), shape[-1]
    row_bytes = tensor_nbytes(src_type, (row_values,))
    if len(data) != rows * row_bytes:
        raise ValueError(f"{name}: {src_type} shape {shape} needs {rows * row_bytes} bytes, "
                         f"got {len(data)}")
    if encoder is None and codecs.can_transcode(src_type, dst_type):
        yield from _transcode(data, src_type, rows, row_values, dst_type, name)
        return
    if encoder is None and codecs.supported(src_type) and codecs.supported(dst_type):
        yield from _convert_rows(data, src_type, rows, row_values, dst_type, name)
        return
    if getattr(encoder, "takes_numpy", False) and codecs.supported(src_type):
        yield from _convert_rows(data, src_type, rows, row_values, dst_type, name,
                                 lambda x: encoder(x, dst_type, name))
        return
    encoder = encoder or quantize_tensor
    step = max(1, _CHUNK_VALUES // row_values)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        x = dequantize_tensor(data[first * row_bytes : (first + n) * row_bytes], src_type,
                              (n, row_values))
        try:
            yield encoder(x, dst_type, name)
        except ValueError:
            # Encode the whole tensor to raise its error with the tensor's own block numbers.
            encoder(dequantize_tensor(data, src_type, shape), dst_type, name)
            raise


def _convert_rows(data: np.ndarray, src_type: str, rows: int, row_values: int, dst_type: str,
                  name: str, quantize: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> Iterator[np.ndarray]:
    """convert() by the numpy codecs, _CHUNK_VALUES at a time; `quantize` (float32 rows ->
    bytes) replaces dst_type's codec, e.g. an importance-weighted encoder that takes numpy."""
    custom = quantize is not None
    quantize = quantize or (lambda x: codecs.quantize_rows(x, dst_type))
    row_bytes = tensor_nbytes(src_type, (row_values,))
    step = max(1, _CHUNK_VALUES // row_values)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        x = codecs.dequantize_rows(data[first * row_bytes : (first + n) * row_bytes], src_type,
                                   row_values)
        try:
            yield quantize(x)
        except ValueError:
            # Again over the whole tensor, to raise with the tensor's own block numbers.
            try:
                quantize(codecs.dequantize_rows(data, src_type, row_values))
            except ValueError as e:
                raise e if custom else ValueError(f"{name}: {e}") from None
            raise


_scratch = threading.local()  # each thread's output buffer, reused from piece to piece


def _claim_scratch(nbytes: int) -> tuple[np.ndarray, bool]:
    """This thread's reusable output buffer (at least `nbytes`) and True; or, while another
    convert() on this thread still holds it (generators taken in turns), a fresh one and False.
    One buffer per call was 10-15% slower on a whole model: fresh memory for every tensor."""
    if getattr(_scratch, "busy", False):
        return np.empty(nbytes, np.uint8), False
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _scratch.buf = np.empty(max(nbytes, _TRANSCODE_VALUES), np.uint8)
    _scratch.busy = True
    return buf, True


def _transcode(data: np.ndarray, src_type: str, rows: int, row_values: int, dst_type: str,
               name: str) -> Iterator[np.ndarray]:
    """convert() for two legacy types: codecs.transcode, _TRANSCODE_VALUES at a time, into the
    thread's reused buffer. A piece of ~1M values keeps the Python work per call negligible,
    and the piece in L2 for the write."""
    src_row, dst_row = (tensor_nbytes(t, (row_values,)) for t in (src_type, dst_type))
    step = max(1, _TRANSCODE_VALUES // row_values)
    buf, claimed = _claim_scratch(min(step, rows) * dst_row)
    try:
        for first in range(0, rows, step):
            n = min(step, rows - first)
            piece = data[first * src_row : (first + n) * src_row]
            try:
                out = codecs.transcode(piece, src_type, dst_type, buf[: n * dst_row])
            except ValueError:
                # Again over the whole tensor, to raise with the tensor's own block numbers.
                try:
                    codecs.transcode(data, src_type, dst_type)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                raise
            yield out
    finally:
        if claimed:
            _scratch.busy = False


__all__ = ["Encoder", "convert", "dequantize_tensor", "quantize_tensor"]
