"""Quantize and dequantize a 4096x4096 float32 matrix: zeropoint against torch's own kernels and
torchao, measured in the same run at 2 threads. Prints medians and ratios (peer time / ours),
each from zeropoint and that one peer timed in turn.

    .venv/bin/python benchmarks/bench_core.py [--repeat 15] [--cold]

By default the input stays in the cache from call to call where the cache holds it (this
machine's L3 holds 64 MB); --cold writes 1 GiB before every timed call, so that every call reads
its input from memory, as it would for a weight seen once.
"""

from __future__ import annotations

import argparse
import warnings

import torch


from zeropoint import QTensor, QuantSpec, choose_qparams, dequantize, quantize

from timing import interleaved_medians  # benchmarks/timing.py

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")

try:
    from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine
except Exception:  # torchao is optional: its rows are skipped
    quantize_affine = dequantize_affine = None




def torchao_fns(x, spec, scale, zp, block):
    if quantize_affine is None:
        return None, None
    dtype = torch.int8 if spec.symmetric else torch.uint8
    zp_ao = zp if not spec.symmetric else torch.zeros_like(zp)
    q = lambda: quantize_affine(x, block, scale, zp_ao, dtype, spec.qmin, spec.qmax)  # noqa: E731
    codes = q()
    dq = lambda: dequantize_affine(codes, block, scale, zp_ao, dtype, spec.qmin, spec.qmax)  # noqa: E731
    return q, dq


def cases(x):
    """(name, spec, torch peer quantize, torch peer dequantize, torchao block size)."""
    rows, cols = x.shape
    for bits in (8, 4):
        pt = QuantSpec(bits, "symmetric")
        s, _ = choose_qparams(x, pt)
        tq = lambda s=s: torch.quantize_per_tensor(x, float(s), 0, torch.qint8)  # noqa: E731
        yield f"per-tensor int{bits}", pt, tq, tq().dequantize, (rows, cols)

        pc = QuantSpec(bits, "asymmetric", "per_channel")
        s, z = choose_qparams(x, pc)
        tq = lambda s=s, z=z: torch.quantize_per_channel(  # noqa: E731
            x, s.reshape(-1).double(), z.reshape(-1).long(), 0, torch.quint8)
        yield f"per-channel int{bits}", pc, tq, tq().dequantize, (1, cols)

        pg = QuantSpec(bits, "asymmetric", "per_group", group_size=128)
        s, z = choose_qparams(x, pg)
        # torch has no per-group op: per-channel over the (rows * cols / 128, 128) view is one.
        xg = x.view(-1, 128)
        tq = lambda s=s, z=z: torch.quantize_per_channel(  # noqa: E731
            xg, s.reshape(-1).double(), z.reshape(-1).long(), 0, torch.quint8)
        yield f"per-group-128 int{bits}", pg, tq, tq().dequantize, (1, 128)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--cold", action="store_true", help="evict the caches before every timed call")
    args = ap.parse_args()
    flush = torch.empty(1 << 30, dtype=torch.uint8) if args.cold else None
    before = (lambda: flush.fill_(1)) if args.cold else None  # noqa: E731
    torch.set_num_threads(2)
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    gb = x.numel() * x.element_size() / 1e9
    print(f"4096x4096 float32, {torch.get_num_threads()} threads, median of {args.repeat}, "
          f"{'caches evicted before each call' if args.cold else 'no eviction between calls'}; "
          "GB/s of float input; ratio = peer time / zeropoint time (>1: zeropoint faster)\n")
    head = f"{'case':<22}{'op':<11}{'zeropoint':>10}{'torch':>9}{'ratio':>7}{'torchao':>9}{'ratio':>7}"
    print(head)
    print("-" * len(head))
    for name, spec, torch_q, torch_dq, block in cases(x):
        scale, zp = choose_qparams(x, spec)
        ours_q = lambda: quantize(x, spec, scale, zp)  # noqa: E731
        codes = ours_q()
        ours_dq = lambda: dequantize(codes, spec, scale, zp)  # noqa: E731
        ao_q, ao_dq = torchao_fns(x, spec, scale, zp, block)
        ops = [("quantize", ours_q, torch_q, ao_q), ("dequantize", ours_dq, torch_dq, ao_dq)]
        if spec.bits < 8:  # what storing 4-bit costs end to end: qparams, codes and packing
            ops.append(("+pack", lambda: QTensor.quantize(x, spec), None, None))
        for op, ours, peer, ao in ops:
            # Each peer is timed in its own interleaved pairing with zeropoint: torchao's eager
            # ops stream hundreds of MB and would evict the input before the torch call too.
            pairs = [interleaved_medians([ours, f], args.repeat, before=before) if f else None
                     for f in (peer, ao)]
            t = next((p[0] for p in pairs if p), None)  # zeropoint's time beside the first peer
            if t is None:
                t = interleaved_medians([ours], args.repeat, before=before)[0]
            line = f"{name:<22}{op:<11}{gb / t:>10.2f}"
            for pair in pairs:
                line += f"{'-':>9}{'-':>7}" if pair is None else f"{gb / pair[1]:>9.2f}{pair[1] / pair[0]:>7.2f}"
            print(line)
    print("\n'+pack' is choose_qparams + quantize + bit packing into a QTensor; torch and torchao "
          "have no packed sub-byte equivalent.")


if __name__ == "__main__":
    main()
