"""Batch-1 matmul straight from a QTensor's packed bytes (csrc/gemv.c), float32 activations.

At decode time a Linear sees one row; torch's int8/int4 kernels then cost more in dispatch and
dtype conversions (bfloat16 activations, both ways) than in arithmetic on SmolLM2's small
matrices. This path reads the very bytes the QTensor stores and computes in float32:

- int8, symmetric, per output channel: y[o] = s[o] * sum_i x[i] * q[o, i], the sum in float32
  fused multiply-adds (16 lanes per row, then a fixed tree and the tail), then one multiply.
- 4-bit, per group along in_features (symmetric or asymmetric, any group size, a shorter last
  group included; per channel is one group): y[o] = sum_i x[i] * w[o, i] with
  w[o, i] = (u - z) * s rounded once to float32 (the weight QTensor.dequantize() gives), the sum
  in float32 fused multiply-adds. Where float16 holds every scale (or zero-point) exactly (a
  float16 scale_dtype), the loop reads float16 copies: the same weights, fewer bytes.
Against the exact product with the dequantized weight, |y[o] - y_exact[o]| <= gamma_(n+2) *
sum_i |x[i] w[o, i]|, gamma_k = k u / (1 - k u), u = 2**-24, n = in_features: the classic bound
of a float32 dot product, plus the int8 scale's rounding. tests/nn/test_gemv.py holds every path
compiled in (AVX-512, AVX2, the portable loops: PATHS) to it against float64; the error seen is
about 1% of it.

Memory: the int8 path and the int8 batch kernel read the QTensor's bytes in place; the int4
batch kernel (int4pack, for prefill) still keeps its own packed copy. Other row counts (prefill,
perplexity) go to that kernel chosen before (or the dequantizing path), with its own numerics.
Rows can be shared with a second thread (PARALLEL_MIN_ROWS); a row's arithmetic never depends
on the split, nor on the rows beside it, so fused and separate layers agree bit for bit.
"""

from __future__ import annotations

import copy

import torch

from .. import ckernels
from ..qtensor import QTensor
from ..spec import Granularity

# Matrices of at least this many output rows split their rows over torch's threads (None: none
# do). One core does not read memory as fast as two: with the compact decoder at
# load 1.5, sharing every SmolLM2 matrix (576 rows and up) took int8 decoding from 66 to 82
# tokens/s and int4 from 94 to 110 (int8 heads), where sharing only the 3072- and 49152-row
# ones gained nothing. Rows are claimed in blocks by whichever thread is running, so a thread
# the OS has descheduled costs the others nothing. Below 256 rows the hand-off costs more than
# the second core gives.
PARALLEL_MIN_ROWS: int | None = 256

# The loops csrc/gemv.c can run (its `path` argument): "best" is the widest compiled in; the
# others force one, for tests and benchmarks (paths_available says which this build has).
PATHS = {"best": 0, "portable": 1, "avx2": 2, "avx512": 3}


def paths_available(lib) -> list[str]:
    """The names in PATHS that `lib` (ckernels.library()) has compiled in."""
    return [name for name, code in PATHS.items() if lib.zp_gemv_has_path(code)]


def gemv_form(q: QTensor) -> tuple[str, int] | None:
    """("int8" or "int4", group size along in_features) when csrc/gemv.c reads `q` in place,
    else None: 8-bit symmetric per channel, or 4-bit per group / per channel with whole-byte
    rows (even in_features), 2-D."""
    spec = q.spec
    if len(q.shape) != 2 or spec.bits not in (4, 8) or 0 in q.shape:
        return None
    in_features = q.shape[1]
    per_channel = spec.granularity is Granularity.PER_CHANNEL and spec.resolved_axis(2) == 0
    per_group = spec.granularity is Granularity.PER_GROUP and spec.resolved_axis(2) == 1
    if spec.bits == 8:
        return ("int8", in_features) if per_channel and spec.symmetric else None
    if in_features % 2 or not (per_channel or per_group):
        return None
    return "int4", (spec.group_size if per_group else in_features)


class GemvKernel:
    """One-row inputs through csrc/gemv.c; every other input through `fallback`.

    `backend` stays the fallback's name (the kernel for batch > 1); `decode_backend` names the
    one-row path."""

    def __init__(self, q: QTensor, fallback, lib, threads: int = 2, path: str = "best",
                 split_rows: int | None = None):
        """threads: how many threads split the rows of matrices of `split_rows` (default
        PARALLEL_MIN_ROWS; None: never) rows or more. path: which C loops (PATHS; tests check
        each one compiled in).
        """
        form = gemv_form(q)
        if form is None:
            raise ValueError(f"gemv reads 8-bit per-channel or 4-bit per-group weights, got "
                             f"{q.spec.describe()} on shape {q.shape}")
        if path not in PATHS or not lib.zp_gemv_has_path(PATHS[path]):
            raise ValueError(f"gemv path {path!r} is not compiled in here; have "
                             f"{', '.join(paths_available(lib))}")
        kind, group = form
        self._args = (lib, threads, path, split_rows)  # for __deepcopy__
        self.q, self.fallback, self.decode_backend = q, fallback, f"gemv-{kind}"
        self.out_features, self.in_features = q.shape
        # Scales are (out, groups) float32, contiguous already; zero-points None when symmetric,
        # else float32 for the C loop (integer ones converted: a copy of 4 bytes per group).
        scale = q.scale.contiguous()
        zp = None if q.zero_point is None else q.zero_point.to(torch.float32).contiguous()
        half, self._extra_bytes = 0, 0
        if kind == "int4":
            # float16 copies where float16 holds every value exactly (a float16 scale_dtype;
            # small integer zero-points): per token the loop reads 2 bytes a parameter instead
            # of 4 (at groups of 32, scales and zero-points are a third of a layer's bytes), for
            # 2 bytes a group kept beside the QTensor's 4.
            if _exact_in_half(scale):
                scale, half = scale.half(), half | 1
                self._extra_bytes += scale.nbytes
            if zp is not None and _exact_in_half(zp):
                zp, half = zp.half(), half | 2
                self._extra_bytes += zp.nbytes
        self._keep = (scale, zp)  # the pointers below must outlive this object
        n_in, n_out, code = self.in_features, self.out_features, PATHS[path]
        split_rows = PARALLEL_MIN_ROWS if split_rows is None else split_rows
        split = threads if split_rows is not None and n_out >= split_rows else 1
        w, s = q.packed.data_ptr(), scale.data_ptr()
        # run_pointers(x, y): y = W x on raw float32 pointers (in_features in, out_features out),
        # unchecked: for callers with fixed buffers (compact_runtime's step).
        if kind == "int8":
            fn = lib.zp_gemv_q8
            self.run_pointers = lambda xp, yp: fn(xp, w, s, yp, n_in, n_out, split, code)
        else:
            fn, z = lib.zp_gemv_q4, None if zp is None else zp.data_ptr()
            self.run_pointers = lambda xp, yp: fn(xp, w, s, z, yp, n_in, group, n_out, split,
                                                  code, half)
        self.threads = split

    def __deepcopy__(self, memo):
        # The call holds raw pointers into q: a copy must point into its own copy of q.
        q, fallback = copy.deepcopy(self.q, memo), copy.deepcopy(self.fallback, memo)
        return GemvKernel(q, fallback, *self._args)

    @property
    def backend(self) -> str:
        return self.fallback.backend

    def kernel_nbytes(self) -> int:
        """Bytes held beyond the QTensor: only what the batch > 1 kernel packed for itself."""
        from .qlinear import kernel_nbytes

        return kernel_nbytes(self.fallback, self.q) + self._extra_bytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ w.T + bias; x (..., in_features). One float32 row takes the C path."""
        if x.numel() != self.in_features or x.dtype != torch.float32 or not x.is_contiguous():
            return self.fallback.linear(x, bias)
        if x.shape[-1] != self.in_features:  # (in_features, 1) and such: the fallback says why
            return self.fallback.linear(x, bias)
        y = torch.empty(*x.shape[:-1], self.out_features)  # unpacked: 1 us less than a tuple
        self.run_pointers(x.data_ptr(), y.data_ptr())  # ctypes drops the GIL for the call
        if bias is not None:
            y.add_(bias)
        return y


def _exact_in_half(t: torch.Tensor) -> bool:
    """Whether float16 holds every value of float32 `t` exactly."""
    return bool(torch.equal(t.half().float(), t))


def with_gemv(q: QTensor, fallback, backend: str = "auto"):
    """`fallback` wrapped in a GemvKernel when `q` has a gemv form, the C library is available
    and `backend` is "auto" or "fast"; else `fallback` itself."""
    if backend not in ("auto", "fast") or gemv_form(q) is None:
        return fallback
    lib = ckernels.library()
    if lib is None:
        return fallback
    return GemvKernel(q, fallback, lib, threads=torch.get_num_threads())
