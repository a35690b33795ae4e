"""qlib Linear4bit (NF4 and int4, one absmax per 64 weights) vs the 4-bit weight-only peers on
the CPU: ATen's int4 kernel (_weight_int4pack_mm_for_cpu, what torchao runs on the CPU),
torchao's int4 weight-only config and bitsandbytes' NF4 Linear4bit (both when installed), and
the dense F.linear in the input's dtype.

    python benchmarks/bench_linear_4bit.py [--quick] [--threads N] [--no-cpu] [--rows 1,16,128]
                                           [--dtypes float32,bfloat16]

Timed round-robin (timing.interleaved_medians_ms, 3 calls a peer a round, the first untimed),
medians in ms, for x in float32 and bfloat16, (K, N) in {(768, 768), (768, 3072),
(4096, 4096)}, M in {1, 16, 128} (--rows). Ratios: peer time / qlib time (above 1: qlib is faster).
ATen's and torchao's int4 kernels cast a float32 x to bfloat16: the float32 tables also time qlib's
int4 layer with compute_dtype=torch.bfloat16, the same work, in a ratio table of their own.
A first table gives each scheme's error against the float64 product with the float weight.
torchao and bitsandbytes are not in the project's .venv; to include them, run with a Python
that has them and the same torch (benchmarks/RESULTS.md says how). Where CUDA is available, a
last table times qlib's NF4 layer against the dense bfloat16 layer on the GPU.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import qlib  # noqa: E402
from peers_4bit import make_aten_int4, make_bnb_nf4_dequant, make_bnb_nf4_fused, make_torchao_int4  # noqa: E402
from qlib.nn import Linear4bit  # noqa: E402
from timing import cuda_median_ms, interleaved_medians_ms  # noqa: E402

GROUP = 64
SHAPES = [(768, 768), (768, 3072), (4096, 4096)]


BF16_COMPUTE = "qlib int4 bf16-compute"  # (compute_dtype=torch.bfloat16: the int4 peers' work on a float32 x)


def peers(lin, bf16_compute=False):
    """{name: forward} for every peer available here; with bf16_compute also qlib's int4 layer with
    compute_dtype=torch.bfloat16, which runs a float32 x as ATen's and torchao's int4 kernels do (x
    cast to bfloat16)."""
    nf4, int4 = Linear4bit.from_float(lin, "nf4", GROUP), Linear4bit.from_float(lin, "int4", GROUP)
    out = {"qlib nf4": nf4, "qlib int4": int4}
    if bf16_compute:
        out[BF16_COMPUTE] = Linear4bit.from_float(lin, "int4", GROUP, compute_dtype=torch.bfloat16)
    for make in (make_aten_int4, make_torchao_int4, make_bnb_nf4_fused, make_bnb_nf4_dequant):
        f = make(lin, GROUP)
        if f is not None:
            out[f.name] = f
    return out


@torch.inference_mode()
def accuracy(quick):
    print(f"Error against float64 x @ W.T + b with the float weight (M = 16, block / group {GROUP}):")
    print(f"{'K':>5} {'N':>5}  " + "  ".join(f"{n:>26}" for n in ("scheme", "rel. Frobenius error")))
    for K, N in SHAPES[:2] if quick else SHAPES:
        lin = nn.Linear(K, N)
        x = torch.randn(16, K)
        ref = x.double() @ lin.weight.double().T + lin.bias.double()
        for name, f in peers(lin, bf16_compute=True).items():
            err = ((f(x).double() - ref).norm() / ref.norm()).item()
            print(f"{K:5d} {N:5d}  {name:>26}  {err:26.4f}")


def runs(f, x):
    """Whether peer f takes an x of this dtype (bitsandbytes' matmul_4bit takes float32 only)."""
    try:
        f(x)
        return True
    except RuntimeError:
        return False


@torch.inference_mode()
def speed(quick, dtype, row_counts):
    rows = []
    for K, N in SHAPES[:2] if quick else SHAPES:
        lin = nn.Linear(K, N)
        fns = peers(lin, bf16_compute=dtype == torch.float32)
        dense_w, dense_b = lin.weight.detach().to(dtype), lin.bias.detach().to(dtype)
        fns = {f"dense {str(dtype)[6:]}": lambda x: F.linear(x, dense_w, dense_b), **fns}
        for M in row_counts:
            x = torch.randn(M, K).to(dtype)
            names = [n for n in fns if runs(fns[n], x)]
            ms = interleaved_medians_ms([lambda f=fns[n]: f(x) for n in names], budget_s=0.6 if quick else 1.5, block=3)
            rows.append((K, N, M, dict(zip(names, ms))))
    names = list(dict.fromkeys(n for row in rows for n in row[3]))
    print(f"\nx {str(dtype)[6:]}: median ms")
    head = f"{'K':>5} {'N':>5} {'M':>4} " + " ".join(f"{n[:18]:>18}" for n in names)
    print(head)
    print("-" * len(head))
    for K, N, M, ms in rows:
        print(f"{K:5d} {N:5d} {M:4d} " + " ".join(f"{ms.get(n, float('nan')):18.3f}" for n in names))
    print(f"\nx {str(dtype)[6:]}: ratios (peer ms / qlib ms; int4 peers against qlib int4, the rest against qlib nf4)")
    others = [n for n in names if not n.startswith("qlib")]
    ratio_table(rows, others, lambda n, ms: ms["qlib int4"] if "int4" in n else ms["qlib nf4"])
    if BF16_COMPUTE in names:
        same_work = [n for n in others if "int4" in n or n.startswith("dense")]
        print(f"\nx {str(dtype)[6:]}, the same work as the int4 peers (x cast to bfloat16): peer ms / ms of {BF16_COMPUTE}")
        ratio_table(rows, same_work, lambda n, ms: ms[BF16_COMPUTE])


def ratio_table(rows, names, reference):
    head = f"{'K':>5} {'N':>5} {'M':>4} " + " ".join(f"{n[:18]:>18}" for n in names)
    print(head)
    print("-" * len(head))
    for K, N, M, ms in rows:
        print(f"{K:5d} {N:5d} {M:4d} " + " ".join(f"{ms.get(n, float('nan')) / reference(n, ms):17.2f}x" for n in names))


@torch.inference_mode()
def speed_cuda(quick):
    """GPU: qlib NF4 Linear4bit against the dense bfloat16 layer (bfloat16 x), CUDA-event medians.
    The 4-bit layer reads 4.5 bits a weight instead of 16: decode (small M) is where it wins."""
    print(f"\nGPU {torch.cuda.get_device_name()}: bfloat16 x, median ms (CUDA events)")
    print(f"{'K':>6} {'N':>6} {'M':>5} {'dense bf16':>11} {'qlib nf4':>9} {'dense / qlib':>13} {'rel. err':>9}")
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
    for K, N in shapes:
        lin = nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
        q = Linear4bit.from_float(lin, "nf4", GROUP)
        # The reference multiplies W_hat decoded by the (tested) CPU kernel, so a wrong CUDA kernel
        # shows here and not only as a time.
        w_hat = torch.ops.qlib.dequantize_4bit(q.packed.cpu(), q.absmax.cpu(), q.codebook.cpu(), K, GROUP,
                                               torch.float32).double().cuda()
        for M in (1, 4, 16, 128, 1024):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_dense = cuda_median_ms(lambda: F.linear(x, lin.weight, lin.bias))
            t_q = cuda_median_ms(lambda: q(x))
            ref = x.double() @ w_hat.T + lin.bias.double()
            err = ((q(x).double() - ref).norm() / ref.norm()).item()
            print(f"{K:6d} {N:6d} {M:5d} {t_dense:11.3f} {t_q:9.3f} {t_dense / t_q:12.2f}x {err:9.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, shorter timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cpu", action="store_true", help="the GPU section only")
    ap.add_argument("--rows", default="1,16,128", help="the CPU tables' M values")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="the CPU tables' x dtypes")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{args.threads} threads, qlib {qlib.build_info()['cpu_isa']}")
    if not args.no_cpu:
        accuracy(args.quick)
        for dtype in args.dtypes.split(","):
            speed(args.quick, getattr(torch, dtype), [int(m) for m in args.rows.split(",")])
    if torch.cuda.is_available():
        speed_cuda(args.quick)


if __name__ == "__main__":
    main()
