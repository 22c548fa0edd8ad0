"""Importance-weighted quantization: llama-quantize --imatrix, byte for byte.

Given the importance of each input column of a weight matrix (the mean of x^2 over calibration
tokens, `gguf.imatrix.ImportanceMatrix.importance(name)`), llama.cpp chooses every block's scale
to minimise the importance-weighted squared error instead of the plain max-based scale. The
searches are ggml-quants.c's `quantize_q4_0` .. `quantize_q6_K` with `quant_weights`; the C
kernels (csrc/weighted.h, legacy.c, kquants.c) run them with the same float32 arithmetic.

What llama.cpp does with an importance vector, per type (the facts the tests hold to):
- Q4_0, Q5_0: block scale by a weighted signed search, weights importance * sqrt(sigma2 + x^2),
  sigma2 = mean x^2 of the row. Q4_1, Q5_1: scale and min by a weighted least-squares search,
  same weights.
- Q2_K, Q3_K, Q4_K, Q5_K: sub-block searches under importance * sqrt(sigma2 + x^2) (sigma2 of
  the super-block; twice that for Q3_K .. Q5_K), then the sub-block scales themselves encoded by
  a search weighted by each sub-block's total weight. Q6_K: sub-block searches weighted by the
  importance alone, then the plain Q6_K encoding.
- Q8_0, F16, BF16, F32: the importance is not read.
So with a uniform importance (all ones) only Q8_0 and the float types give the unweighted
bytes; every other type above takes a different search than its unweighted reference
(`quantize_row_*_ref`), and its bytes differ.

Around the kernels, as llama-quantize: a tensor without an entry is quantized plainly; an entry
of another length is an error, except for token_embd, which is then quantized plainly
(requantize.tensor_importance); with an importance matrix the Q4_0 and Q5_0 mixes give the first
n_layer/8 ffn_down tensors the _1 type (mixes.plan_types(has_imatrix=True)); the output file
records the file, first dataset, entry and chunk counts (`imatrix_metadata`).

Rows are independent, so `weighted_encoder` fits convert.convert's row-chunked Encoder. There
is no eager path: without the C kernels weighted quantization is refused with a clear error.
"""
from __future__ import annotations

import ctypes

import numpy as np

from zeropoint import ckernels

from .iquants import IQ_TYPES
from .iquants import quantize as quantize_iq
from .metadata import MetaValue
from .types import TYPES

LEGACY_WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_WEIGHTED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
WEIGHTED_TYPES = LEGACY_WEIGHTED + K_WEIGHTED
"""Types whose bytes depend on the importance."""
IGNORES_IMPORTANCE = ("Q8_0", "F16", "BF16", "F32")
"""Types llama.cpp quantizes the same with or without an importance matrix."""

IMATRIX_FILE_KEY = "quantize.imatrix.file"
IMATRIX_DATASET_KEY = "quantize.imatrix.dataset"
IMATRIX_ENTRIES_KEY = "quantize.imatrix.entries_count"
IMATRIX_CHUNKS_KEY = "quantize.imatrix.chunks_count"
_NOT_FINITE = 1  # the kernels' reasons for refusing a block: 1 NaN or inf, 2 fp16 overflow


def check_importance(importance, n_per_row: int, name: str = "tensor") -> np.ndarray:
    """`importance` as a contiguous float32 (n_per_row,) vector, or ValueError saying what is
    wrong: another length (llama-quantize refuses that too), or a value that is not finite."""
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if imp.size != n_per_row:
        raise ValueError(f"{name}: the importance matrix has {imp.size} values for rows of "
                         f"{n_per_row}; it must have one per column (was it made for this model?)")
    if not np.isfinite(imp).all():
        raise ValueError(f"{name}: the importance matrix holds NaN or inf")
    return imp


def _library():
    lib = ckernels.library()
    if lib is None or not lib.zp_legacy_available():
        raise ValueError("weighted quantization (an importance matrix) needs zeropoint's C "
                         "kernels, which are disabled or could not be built here")
    return lib


def quantize_weighted(x, qtype: str, importance, name: str = "tensor") -> np.ndarray:
    """float32 rows (rows, n) -> (rows, row bytes) uint8 of `qtype`, quantized as
    llama-quantize does with `importance` (n,) for this tensor. Q8_0 ignores the importance
    (its plain bytes), as llama.cpp; the float types are no block types and not taken here."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: weighted quantization takes rows (rows, n), got shape {x.shape}")
    rows, n = x.shape
    if qtype in IQ_TYPES:  # the i-quants' searches take the importance too
        return quantize_iq(x, qtype, check_importance(importance, n, name), name)
    if qtype not in WEIGHTED_TYPES + ("Q8_0",):
        raise ValueError(f"{name}: no weighted quantizer for {qtype}; weighted types: "
                         f"{', '.join(WEIGHTED_TYPES)} (and Q8_0, which ignores the importance)")
    gtype = TYPES[qtype]
    if n % gtype.block_size:
        raise ValueError(f"{name}: rows of {n} values do not tile into {qtype}'s blocks of "
                         f"{gtype.block_size}")
    imp = check_importance(importance, n, name)
    lib = _library()
    out = np.empty((rows, n // gtype.block_size * gtype.type_size), np.uint8)
    fn = lib.zp_quantize_kquant_weighted if qtype in K_WEIGHTED else lib.zp_quantize_legacy_weighted
    why = ctypes.c_int(0)
    first = fn(gtype.id, x.ctypes.data, rows, n, imp.ctypes.data, out.ctypes.data,
               ctypes.byref(why), ckernels.threads(x.size))
    if first == -2:
        raise ValueError(f"the C kernels have no weighted quantizer for {qtype}")
    if first >= 0:
        if why.value == _NOT_FINITE:
            raise ValueError(f"{name}: x must be finite; block {first} holds NaN or inf")
        block = x.reshape(-1, gtype.block_size)[first]
        raise ValueError(f"{name}: {qtype} block {first}: its scale or minimum overflows "
                         f"float16 (largest |x| {float(np.abs(block).max()):.4g}); ggml cannot "
                         "store it")
    return out


def imatrix_metadata(file: str, imatrix) -> dict[str, MetaValue]:
    """The keys llama-quantize adds to a file quantized with `--imatrix file` (its path as the
    user gave it) holding `imatrix` (a gguf.imatrix.ImportanceMatrix): the file, the first
    dataset (each string cut to 127 bytes, as its fixed buffer does), the number of entries,
    and the number of chunks when known."""
    def cut(text: str) -> str:
        return text.encode("utf-8")[:127].decode("utf-8", "ignore")

    keys = {IMATRIX_FILE_KEY: MetaValue.string(cut(str(file)))}
    if imatrix.datasets:
        keys[IMATRIX_DATASET_KEY] = MetaValue.string(cut(imatrix.datasets[0]))
    keys[IMATRIX_ENTRIES_KEY] = MetaValue.u32(len(imatrix))
    if imatrix.chunk_count > 0:
        keys[IMATRIX_CHUNKS_KEY] = MetaValue.u32(imatrix.chunk_count)
    return keys


def weighted_encoder(importance):
    """An Encoder (see convert.convert) for one tensor: its rows quantized under
    `importance` (n,)."""
    def encode(x, qtype: str, name: str) -> np.ndarray:
        return quantize_weighted(x, qtype, importance, name).reshape(-1)
    encode.takes_numpy = True  # convert.convert may hand it numpy rows: no torch needed
    return encode


__all__ = ["IGNORES_IMPORTANCE", "K_WEIGHTED", "LEGACY_WEIGHTED", "WEIGHTED_TYPES",
           "check_importance", "imatrix_metadata", "quantize_weighted", "weighted_encoder"]
