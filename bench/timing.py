"""Timing for the benchmarks: wall seconds of repeated calls, after warm-up."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls after ``warmup`` untimed calls.

    The warm-up takes first-call costs (imports, page faults, caches) out of the figures, and
    a garbage collection before each call keeps one call's garbage out of the next one's time.
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out
