"""Diagnostics for a lent GPU: which error paths crash, fake_quant with and without
the CUDA value checks, and kernel breakdowns (torch.profiler) of the slow paths."""
import pathlib
import subprocess
import sys

import torch

import qlib
from qlib import observers as O
from qlib.nn import Int8Linear

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import cuda_median_ms as ms  # noqa: E402

ops = torch.ops.qlib

ERRORS = {
    "block_minmax 1-D cpu": "ops.block_minmax(torch.randn(3))",
    "int8_gemm b float cpu": "a=torch.zeros(4,8,dtype=torch.int8); ops.int8_gemm(a, a.float())",
    "fake_quant bad scale cpu": "ops.fake_quant(torch.randn(8), torch.tensor([-1.0]), torch.tensor([0]), -128, 127)",
    "torch own error": "torch.zeros(3).view(5)",
    "fake_quant bad scale cuda": "ops.fake_quant(torch.randn(8,device='cuda'), torch.tensor([-1.0],device='cuda'), torch.tensor([0],device='cuda'), -128, 127)",
}


def errors():
    for name, code in ERRORS.items():
        prog = f"import torch, qlib; ops = torch.ops.qlib\ntry:\n    {code}\nexcept Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0][:100])"
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
        print(f"[error path] {name}: rc={r.returncode} {r.stdout.strip()} {r.stderr.strip()[-200:] if r.returncode else ''}")


def fake_quant_checks():
    n, k = 4096, 4096
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, k, device="cuda", dtype=dtype)
        for mode, shape in (("tensor", (1,)), ("channel", (n, 1)), ("group", (n, k // 128))):
            s = torch.rand(shape, device="cuda") * 0.02 + 0.01
            z = torch.zeros(shape, device="cuda", dtype=torch.int32)
            row = []
            for checks in (True, False):
                qlib._C.set_cuda_value_checks(checks)
                row.append(ms(lambda: ops.fake_quant(x, s, z, -128, 127)))
            qlib._C.set_cuda_value_checks(False)  # the default
            nb = 2 * x.numel() * x.element_size()
            print(f"[fake_quant] {dtype} per-{mode}: checks on {row[0]*1e3:.1f} us, off {row[1]*1e3:.1f} us "
                  f"({nb / row[1] / 1e6:.0f} GB/s)")


def profile(name, fn):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as p:
        fn()
        torch.cuda.synchronize()
    print(f"[profile] {name}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def fwd_bwd_order():
    """Issue 2's outlier: bench_fake_quant's float32 per-tensor fwd+bwd (its first training
    row) took 0.22-0.27 ms against 0.14-0.15 per-channel, the kernels alone at 95% of copy.
    The rows timed in both orders, then a profile of each."""
    n, k = 4096, 4096
    x0 = torch.randn(n, k, device="cuda")
    g = torch.ones_like(x0)
    rows = {}
    for mode, shape in (("tensor", (1,)), ("channel", (n, 1))):
        s = torch.rand(shape, device="cuda") * 0.02 + 0.01
        z = torch.zeros(shape, device="cuda", dtype=torch.int32)
        leaf = x0.detach().requires_grad_()

        def call(s=s, z=z, leaf=leaf):
            ops.fake_quant(leaf, s, z, -128, 127).backward(g)
            leaf.grad = None
        rows[mode] = call
    for order in (("tensor", "channel"), ("channel", "tensor"), ("tensor", "channel")):
        print("[fwd+bwd order] " + ", ".join(f"per-{m} {ms(rows[m], reps=50) * 1e3:.1f} us" for m in order))
    for m in ("tensor", "channel"):
        profile(f"fake_quant per-{m} fp32 fwd+bwd", rows[m])


def main():
    if sys.argv[1:] == ["--fwd-bwd"]:
        return fwd_bwd_order()
    print(qlib.build_info())
    errors()
    fake_quant_checks()
    x = torch.randn(4096, 4096, device="cuda")
    s, z = torch.tensor([0.02], device="cuda"), torch.tensor([0], device="cuda", dtype=torch.int32)
    profile("fake_quant per-tensor fp32 fwd", lambda: ops.fake_quant(x, s, z, -128, 127))
    with torch.inference_mode():
        lin = torch.nn.Linear(8192, 8192, device="cuda")
        q = Int8Linear.from_float(lin)
        xb = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        profile("Int8Linear M=K=N=8192 bf16", lambda: q(xb))
        xb1 = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16)
        profile("Int8Linear M=16 K=N=8192 bf16", lambda: q(xb1))
    obs = O.MovingAverageMinMaxObserver().cuda()
    xo = torch.randn(1_000_000, device="cuda")
    obs(xo)
    profile("MovingAverageMinMaxObserver 1M", lambda: obs(xo))
    obs = O.MinMaxObserver().cuda()
    obs(xo)
    profile("MinMaxObserver 1M", lambda: obs(xo))


if __name__ == "__main__":
    main()
