"""Observers, qlib vs torch.ao: time to observe 10 batches of 1M elements and
compute the qparams (per-tensor, symmetric int8), medians over repeats.

    PYTHONPATH=python python benchmarks/bench_observers.py [--repeats 5] [--batches 10] [--numel 1000000]

Prints a markdown table per device (CPU, and CUDA when present). The cases are
timed round-robin (one run of each per round). The ratio
column is the torch.ao peer's median over qlib's (>1: qlib is faster): the
histogram observers (percentile, MSE, entropy) against HistogramObserver, the
min/max observers against MinMaxObserver / MovingAverageMinMaxObserver.

A second table per device: per-channel weight observers (ch_axis=0) seeing one
`--weight` (default 3072 x 768, a BERT-base FFN weight) `--batches` times and then
its qparams, as qlib.calibrate runs them. torch.ao has a per-channel min-max
observer only: the histogram rows have no peer.
"""
import argparse
import datetime
import platform
import random
import statistics
import time

import torch
from torch.ao import quantization as tq

import qlib
from qlib import observers as O


def ao(cls, **kw):
    return lambda: cls(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, **kw)


CASES = [
    # (name, factory, torch.ao peer name)
    ("qlib MinMaxObserver", lambda: O.MinMaxObserver(), "torch.ao MinMaxObserver"),
    ("qlib MovingAverageMinMaxObserver", lambda: O.MovingAverageMinMaxObserver(), "torch.ao MovingAverageMinMaxObserver"),
    ("qlib PercentileObserver", lambda: O.PercentileObserver(), "torch.ao HistogramObserver"),
    ("qlib MSEObserver", lambda: O.MSEObserver(), "torch.ao HistogramObserver"),
    ("qlib EntropyObserver", lambda: O.EntropyObserver(), "torch.ao HistogramObserver"),
    ("torch.ao MinMaxObserver", ao(tq.MinMaxObserver), None),
    ("torch.ao MovingAverageMinMaxObserver", ao(tq.MovingAverageMinMaxObserver), None),
    ("torch.ao HistogramObserver", ao(tq.HistogramObserver), None),
]


PER_CHANNEL_CASES = [
    ("qlib MinMaxObserver", lambda: O.MinMaxObserver(ch_axis=0), "torch.ao PerChannelMinMaxObserver"),
    ("qlib PercentileObserver", lambda: O.PercentileObserver(ch_axis=0), None),
    ("qlib MSEObserver", lambda: O.MSEObserver(ch_axis=0), None),
    ("qlib EntropyObserver", lambda: O.EntropyObserver(ch_axis=0), None),
    ("torch.ao PerChannelMinMaxObserver",
     lambda: tq.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric), None),
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(factory, batches, device):
    obs = factory().to(device)
    sync(device)
    t0 = time.perf_counter()
    for x in batches:
        obs(x)
    scale, _ = obs.calculate_qparams()
    scale.cpu()  # the qparams are read back: part of the job
    sync(device)
    return time.perf_counter() - t0


def bench(device, args, cases, batches, title):
    for _, factory, _ in cases:
        run_once(factory, batches[:1], device)  # warm-up
    # Round-robin, one run of each case per round, so a slow phase of a shared machine
    # hits qlib and its peers alike; each round in another (seeded) order, so no case always
    # follows the same one. On an AMX Xeon, qlib's MinMax run right after torch.ao's
    # HistogramObserver took 2.4x its time alone; rounds that only rotated the list kept that
    # neighbour (qlib's MinMax 0.8x torch.ao's on a Zen 4, 1.0-1.1x in shuffled rounds).
    times = {name: [] for name, _, _ in cases}
    order = random.Random(0)
    for _ in range(args.repeats):
        for name, factory, _ in order.sample(cases, len(cases)):
            times[name].append(run_once(factory, batches, device))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    lines = [
        f"### {device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        + title,
        "",
        "| observer | median ms | torch.ao peer | peer ms | speed-up (peer / qlib) |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for name, _, peer in cases:
        if peer is None:
            lines.append(f"| {name} | {medians[name] * 1e3:.1f} | | | |")
        else:
            lines.append(f"| {name} | {medians[name] * 1e3:.1f} | {peer} | {medians[peer] * 1e3:.1f} | "
                         f"{medians[peer] / medians[name]:.1f}x |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--numel", type=int, default=1_000_000)
    p.add_argument("--weight", type=int, nargs=2, default=[3072, 768], metavar=("OUT", "IN"),
                   help="the per-channel table's weight shape")
    p.add_argument("--device", action="append", help="cpu and/or cuda (default: every device present)")
    args = p.parse_args()
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [torch.device(d) for d in (args.device or present)]
    print(f"qlib observers vs torch.ao: {args.batches} batches of {args.numel} float32 N(0,1), "
          f"observe + calculate_qparams, per-tensor symmetric int8, median of {args.repeats} "
          f"round-robin rounds")
    print(f"torch {torch.__version__}, qlib build {qlib.build_info().get('cpu_isa')}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.numel, generator=g) for _ in range(args.batches)]
    weight = torch.randn(*args.weight, generator=g) * (torch.rand(args.weight[0], 1, generator=g) + 0.1)
    for d in devices:
        print(bench(d, args, CASES, [x.to(d) for x in batches], ""))
        print()
        print(bench(d, args, PER_CHANNEL_CASES, [weight.to(d)] * args.batches,
                    f", per channel: one {args.weight[0]} x {args.weight[1]} weight {args.batches} times"))
        print()


if __name__ == "__main__":
    main()
