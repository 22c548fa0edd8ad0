"""Range estimators and observers at 2 threads: each estimator on a 4096x4096 float32 matrix,
per-channel and per-group-128; each observer's update on a (2048, 4096) activation batch, as a
ratio to one torch.aminmax over that batch. torch.ao's observers run beside ours as the peer.

    .venv/bin/python benchmarks/bench_calibrate.py [--repeat 5]

Targets (issue #3): MSE search per-group-128 under 1 s; min/max and moving-average observer
updates under 3x one torch.aminmax. On a machine shared with other jobs, 2-thread timings can
jump tenfold (a descheduled OpenMP thread stalls every op): rerun when it is quiet.
"""

from __future__ import annotations

import argparse
import warnings

import torch


from zeropoint import QuantSpec
from zeropoint.calibrate import (
    EntropySearch,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSESearch,
    entropy_qparams,
    minmax_qparams,
    mse_qparams,
    percentile_qparams,
)

from timing import median_seconds  # benchmarks/timing.py

warnings.filterwarnings("ignore")  # torch.ao's deprecation notices

try:
    from torch.ao.quantization import observer as ao
except Exception:  # the peer is optional: its rows are skipped
    ao = None




def estimators(x, repeat: int) -> None:
    specs = {
        "per-channel": QuantSpec(4, "symmetric", "per_channel"),
        "per-group-128": QuantSpec(4, "asymmetric", "per_group", group_size=128),
    }
    cases = [
        ("minmax", minmax_qparams),
        ("percentile 99.99", lambda x, s: percentile_qparams(x, s, 99.99)),
        ("mse (coarse+fine, default)", mse_qparams),
        ("mse (whole grid)", lambda x, s: mse_qparams(x, s, MSESearch(coarse_step=1))),
        ("entropy (default)", entropy_qparams),
        ("entropy stride 16", lambda x, s: entropy_qparams(x, s, EntropySearch(stride=16))),
    ]
    print(f"Estimators on a 4096x4096 float32 N(0,1) matrix, int4, median of {repeat} (seconds)")
    head = f"{'estimator':<28}" + "".join(f"{k:>16}" for k in specs)
    print(head + "\n" + "-" * len(head))
    results = {}
    for name, fn in cases:
        row = f"{name:<28}"
        for key, spec in specs.items():
            t = median_seconds(lambda: fn(x, spec), repeat)
            results[(name, key)] = t
            row += f"{t:>16.3f}"
        print(row, flush=True)
    q = x.view(-1, 128)
    peer = median_seconds(lambda: torch.quantile(q, 0.9999, dim=1), repeat)
    print(f"{'peer: torch.quantile rows':<28}{'':>16}{peer:>16.3f}")
    t = results[("mse (coarse+fine, default)", "per-group-128")]
    print(f"\nMSE search per-group-128: {t:.3f} s (target < 1 s: {'met' if t < 1 else 'MISSED'})")
    print("entropy per-group-128: groups of 128 < 2048 bins share the tensor's threshold "
          "(see entropy_qparams); per-channel rows of 4096 get one histogram each.\n")


def observers(batch, repeat: int) -> None:
    base = median_seconds(lambda: torch.aminmax(batch), repeat)
    print(f"Observer update on a (2048, 4096) batch, median of {repeat}; one torch.aminmax "
          f"over it: {base * 1e3:.2f} ms; ratio = update / aminmax")
    head = f"{'observer':<34}{'per-tensor ms':>14}{'ratio':>8}{'per-channel ms':>16}{'ratio':>8}"
    print(head + "\n" + "-" * len(head))
    specs = [QuantSpec(8, "asymmetric"), QuantSpec(8, "asymmetric", "per_channel", axis=-1)]
    ours = [
        ("MinMaxObserver", MinMaxObserver),
        ("MovingAverageMinMaxObserver", MovingAverageMinMaxObserver),
        ("HistogramObserver", HistogramObserver),
    ]
    ratios = {}
    for name, cls in ours:
        row = f"{name:<34}"
        for spec in specs:
            obs = cls(spec)
            t = median_seconds(lambda: obs.update(batch), repeat)
            ratios[(name, spec.granularity.value)] = t / base
            width = 14 if spec is specs[0] else 16
            row += f"{t * 1e3:>{width}.2f}{t / base:>8.2f}"
        print(row, flush=True)
    if ao is not None:
        peers = [
            ("torch.ao MinMaxObserver", ao.MinMaxObserver(),
             ao.PerChannelMinMaxObserver(ch_axis=1)),
            ("torch.ao MovingAverage...", ao.MovingAverageMinMaxObserver(),
             ao.MovingAveragePerChannelMinMaxObserver(ch_axis=1)),
            ("torch.ao HistogramObserver", ao.HistogramObserver(), None),
        ]
        for name, pt, pc in peers:
            row = f"{name:<34}"
            t = median_seconds(lambda: pt(batch), repeat)
            row += f"{t * 1e3:>14.2f}{t / base:>8.2f}"
            if pc is not None:
                t = median_seconds(lambda: pc(batch), repeat)
                row += f"{t * 1e3:>16.2f}{t / base:>8.2f}"
            print(row, flush=True)
    for name in ("MinMaxObserver", "MovingAverageMinMaxObserver"):
        worst = max(ratios[(name, "per_tensor")], ratios[(name, "per_channel")])
        print(f"{name}: worst ratio {worst:.2f} (target < 3: {'met' if worst < 3 else 'MISSED'})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    estimators(torch.randn(4096, 4096, generator=g), args.repeat)
    observers(torch.randn(2048, 4096, generator=g), max(args.repeat, 9))


if __name__ == "__main__":
    main()
