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
