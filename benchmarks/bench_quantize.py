"""qlib quantize / dequantize / fake_quant vs torch.quantize_per_tensor / dequantize on the CPU:
median microseconds per call, per-tensor int8, float32 input, one table.

    .venv/bin/python benchmarks/bench_quantize.py [--threads N]
"""
import argparse
import warnings

import torch

import qlib  # noqa: F401
from timing import host_median_s

ops = torch.ops.qlib


def median_us(fn):
    return host_median_s(fn, reps=301, warmup=1) * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # torch's quantized-tensor deprecation warning
    s, z = torch.tensor(0.05), torch.tensor(-20, dtype=torch.int32)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| numel | qlib quantize us | torch quantize_per_tensor us | x | qlib dequantize us | torch dequantize us | x | qlib fake_quant us |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (16384, 262144, 4194304):
        x = torch.randn(n)
        q = ops.quantize(x, s, z, -128, 127, torch.int8)
        tq = torch.quantize_per_tensor(x, 0.05, -20, torch.qint8)
        a = median_us(lambda: ops.quantize(x, s, z, -128, 127, torch.int8))
        b = median_us(lambda: torch.quantize_per_tensor(x, 0.05, -20, torch.qint8))
        c = median_us(lambda: ops.dequantize(q, s, z, torch.float32))
        d = median_us(lambda: tq.dequantize())
        e = median_us(lambda: ops.fake_quant(x, s, z, -128, 127))
        print(f"| {n} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {c:.1f} | {d:.1f} | {d / c:.2f}x | {e:.1f} |")


if __name__ == "__main__":
    main()
