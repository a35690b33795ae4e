"""One QAT training step of a Linear, qlib vs torch.ao, on the CPU: forward + backward of
``QATLinear`` (int8 per-channel symmetric weights, int8 per-tensor activations with a
moving-average observer) against torch.ao's QAT Linear with its default fbgemm qconfig
(the same scheme) plus its activation FakeQuantize, and plain fp32 ``nn.Linear``. Median
microseconds per step, the three timed round-robin; ratio = torch.ao / qlib (> 1: qlib is faster).

    .venv/bin/python benchmarks/bench_qat.py [--threads N] [--budget 3]
"""
import argparse
import platform

import torch
import torch.ao.nn.qat as ao_qat
import torch.ao.quantization as tq
from torch import nn

import qlib
from qlib.nn import QATLinear
from timing import interleaved_medians_ms

SHAPES = [(8, 64, 64), (64, 256, 256), (64, 1024, 1024), (256, 4096, 1024)]  # batch, in, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per shape")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qconfig = tq.get_default_qat_qconfig("fbgemm")
    print(f"torch {torch.__version__}, qlib {qlib.build_info()['cpu_isa']}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads; median us per forward + backward step")
    print("| batch x in x out | qlib QATLinear | torch.ao QAT Linear | fp32 nn.Linear | torch.ao / qlib | qlib / fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for batch, k, n in SHAPES:
        lin = nn.Linear(k, n)
        ours = QATLinear.from_float(lin)
        lin.qconfig = qconfig
        theirs, act_fq = ao_qat.Linear.from_float(lin), qconfig.activation()
        x = torch.randn(batch, k)
        # Round-robin (one step of each a round), so a slow phase of the machine hits all three.
        t_ours, t_theirs, t_fp32 = (t / 1e3 for t in interleaved_medians_ms(
            [lambda: ours(x).sum().backward(), lambda: theirs(act_fq(x)).sum().backward(),
             lambda: lin(x).sum().backward()], budget_s=args.budget, min_reps=20, max_reps=2000))
        print(f"| {batch} x {k} x {n} | {t_ours * 1e6:.0f} | {t_theirs * 1e6:.0f} | {t_fp32 * 1e6:.0f} | "
              f"{t_theirs / t_ours:.2f}x | {t_ours / t_fp32:.2f}x |")


if __name__ == "__main__":
    main()
