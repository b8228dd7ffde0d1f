"""The one timing rule every benchmark (and peer) uses: warm-up runs, then the median of `reps`."""

from __future__ import annotations

import statistics
import time


def median_time(fn, reps=3, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
