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


def interleaved_medians(fns, repeat: int, warmup: int = 1, before=None) -> list[float]:
    """Median seconds of each of `fns`, run in turn within every repeat: when the machine's load
    changes during the run, every function sees the same changes, so their ratios hold. Each
    repeat starts one function later, so that every function follows every other equally often:
    in a fixed order the first one always ran right after the last, and a peer that streams
    hundreds of MB through the cache (torchao's eager ops) left it a cold cache every time
    (2x slower on a 64 MB input). `before`, when given, runs untimed before every timed call."""
    fns = list(fns)
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for r in range(repeat):
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            if before is not None:
                before()
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]
