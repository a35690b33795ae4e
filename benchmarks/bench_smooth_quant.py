"""What qlib.smooth_quant's divisions cost: all-MiniLM-L6-v2 with dynamic int8 Linears, plain
against smoothed (alpha 0.5, 128 calibration sentences), and against the smoothed model with its
divisions removed (the same weights, wrong outputs: the division's share alone). A batch of 64
sentences, the models timed round-robin; medians and the median of each round's ratio.

Each division writes a new tensor the size of the layer's input. With glibc's default malloc
settings those buffers often come back as fresh pages (glibc trims and unmaps freed memory), so
run it twice: as is, and with MALLOC_TRIM_THRESHOLD_=2000000000 MALLOC_MMAP_THRESHOLD_=1000000000
MALLOC_TOP_PAD_=268435456 (freed memory kept for reuse).

With --compile each model runs under torch.compile (its first call compiles).

    .venv/bin/python benchmarks/bench_smooth_quant.py [--rounds 61] [--threads N] [--compile]
"""
import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings

import torch

import qlib
from qlib.nn.smoothing import BUFFER, settle_divide_input

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from minilm_int8 import load_model, sentences  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=61)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    fp32 = load_model().eval()
    tokenize = getattr(fp32, "preprocess", None) or fp32.tokenize
    calib = sentences(428)[300:]
    calib_batches = [tokenize(calib[i:i + 32]) for i in range(0, 128, 32)]
    plain = qlib.quantize_dynamic(copy.deepcopy(fp32))
    smooth = qlib.quantize_dynamic(qlib.smooth_quant(copy.deepcopy(fp32), calib_batches, progress=False))
    undivided = copy.deepcopy(smooth)
    for m in undivided.modules():
        m._buffers.pop(BUFFER, None)
        settle_divide_input(m)
    batch = tokenize(sentences(64))
    models = {"int8 dynamic": plain, "int8 dynamic, smoothed": smooth, "smoothed, divisions removed": undivided}
    if args.compile:
        models = {name: torch.compile(model) for name, model in models.items()}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(batch)
                if r:  # (the first round warms up)
                    times[name].append((time.perf_counter() - t0) * 1e3)
    env = {k: os.environ[k] for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
           if k in os.environ}
    print(f"all-MiniLM-L6-v2, a batch of 64 sentences {tuple(batch['input_ids'].shape)}, {args.threads} threads, "
          f"{args.rounds} rounds{', torch.compile' if args.compile else ''}; malloc settings: {env or 'glibc defaults'}")
    print(f"{'model':30s} {'median ms':>10s} {'/ int8 dynamic (paired)':>24s}")
    base = times["int8 dynamic"]
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, base))
        print(f"{name:30s} {statistics.median(t):10.1f} {ratio:23.3f}x")


if __name__ == "__main__":
    main()
