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


def interleaved_medians_ms(fns, budget_s=1.5, min_reps=7, max_reps=200, block=1, before=None):
    """Medians (ms) of fns timed round-robin, so that load from other processes on a shared
    machine hits all of them alike. Each round calls each fn `block` times back to back and
    keeps all but the first of them when block > 1: every fn is then timed with its own
    data in cache (a weight that fits the last-level cache is hot for every fn alike, not
    only for the fn that happens to run after another one that read it). `before`, when
    given, runs untimed before every call (e.g. to evict the caches)."""
    for f in fns:
        f()
        f()
    t0 = time.perf_counter()
    for f in fns:
        f()
    one = time.perf_counter() - t0
    rounds = max(min_reps, min(max_reps, int(budget_s / max(one * block, 1e-6))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, ts in zip(fns, times):
            for j in range(block):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                f()
                if j > 0 or block == 1:
                    ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


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


def cuda_graph_median_ms(fn, reps=30, calls=10):
    """Median milliseconds per call of fn's GPU work alone: replays of a CUDA graph of `calls`
    calls (no launch or host overhead). None if fn cannot be captured (a host sync)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return cuda_median_ms(graph.replay, reps=reps) / calls
