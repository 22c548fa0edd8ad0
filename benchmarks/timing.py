"""The one timing rule every benchmark here follows: warm up, then the median of repeated runs
(these machines are noisy; a median of many beats a mean, and a ratio beats an absolute)."""

import statistics
import time


def median_seconds(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # allocator, thread pool, caches
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns, repeat: int, warmup: int = 1) -> list[float]:
    """Median seconds of each of `fns`, run in turn within every repeat: when the machine's load
    changes during the run, every function sees the same changes, so their ratios hold."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]
