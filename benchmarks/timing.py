"""Shared timing for the benchmarks: medians of host-clock or CUDA-event timings."""
import statistics
import time

import torch


def host_median_s(fn, reps=30, warmup=3):
    """Median seconds of fn() by the host clock (CPU work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_median_ms(fn, reps=30, warmup=5):
    """Median milliseconds of fn() on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
