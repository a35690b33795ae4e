"""qlib quantize / dequantize / fake_quant vs torch.quantize_per_tensor / dequantize on the CPU:
median microseconds per call, per-tensor int8, float32 input, one table. The five calls
are timed round-robin, so load from other processes hits them alike.

    .venv/bin/python benchmarks/bench_quantize.py [--threads N]
"""
import argparse
import warnings

import torch

import qlib  # noqa: F401
from timing import interleaved_medians_ms

ops = torch.ops.qlib


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
        a, b, c, d, e = (
            t * 1e3
            for t in interleaved_medians_ms(
                [
                    lambda: ops.quantize(x, s, z, -128, 127, torch.int8),
                    lambda: torch.quantize_per_tensor(x, 0.05, -20, torch.qint8),
                    lambda: ops.dequantize(q, s, z, torch.float32),
                    lambda: tq.dequantize(),
                    lambda: ops.fake_quant(x, s, z, -128, 127),
                ],
                budget_s=3.0,
                max_reps=3001,
            )
        )
        print(f"| {n} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {c:.1f} | {d:.1f} | {d / c:.2f}x | {e:.1f} |")


if __name__ == "__main__":
    main()
