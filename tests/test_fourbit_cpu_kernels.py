"""The 4-bit CPU kernel families (qlib.set_fourbit_cpu_kernel): every one this CPU runs decodes
the same bits and computes linear_4bit to the float64 product's tolerance. 'amx-bf16' (AMX
tiles, a bfloat16 x of 3 to 256 rows) is tested where the CPU has it."""
import os
import subprocess
import sys

import pytest
import torch

import qlib
from conftest import kernel_family_fixture

ops = torch.ops.qlib
KERNELS = qlib.fourbit_cpu_kernels()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def current():
    return qlib.build_info()["fourbit_cpu_kernel"]


kernel = kernel_family_fixture(KERNELS, qlib.set_fourbit_cpu_kernel)


def unpacked_w_hat(packed, absmax, codebook, k, block_size):
    """W_hat float32 from the packed bytes with plain torch ops."""
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(1)[:, :k].long()
    return codebook[codes] * absmax.repeat_interleave(block_size, 1)[:, :k]


def test_kernel_names_and_errors():
    assert KERNELS[0] == "scalar" and current() == KERNELS[-1]  # the best by default
    with pytest.raises(RuntimeError, match="unknown kernel 'avx9'; expected 'auto' or one of scalar"):
        qlib.set_fourbit_cpu_kernel("avx9")
    for name in ("avx512", "avx512-bf16", "amx-bf16"):
        if name not in KERNELS:
            with pytest.raises(RuntimeError, match=f"this CPU cannot run the '{name}' kernel; it can run: scalar"):
                qlib.set_fourbit_cpu_kernel(name)
    assert current() == KERNELS[-1]  # a refused name changes nothing


def test_environment_variable_names_the_kernel():
    code = "import qlib; print(qlib.build_info()['fourbit_cpu_kernel'])"
    env = dict(os.environ, QLIB_FOURBIT_CPU_KERNEL="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["QLIB_FOURBIT_CPU_KERNEL"] = "avx9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "QLIB_FOURBIT_CPU_KERNEL=avx9 is not usable" in out.stdout


@pytest.mark.parametrize("block_size", [32, 64, 96, 48, 7])
def test_dequantize_every_kernel(kernel, block_size):
    K = 3 * 64 + 37
    w = torch.randn(23, K)
    w[5] *= 1e-39  # subnormal blocks: their bfloat16 W_hat is not flushed to zero
    cb = qlib.codebook_4bit("nf4")
    packed, absmax = ops.quantize_4bit(w, cb, block_size)
    ref = unpacked_w_hat(packed, absmax, cb, K, block_size)
    for dtype in DTYPES:
        assert torch.equal(ops.dequantize_4bit(packed, absmax, cb, K, block_size, dtype), ref.to(dtype))


@pytest.mark.parametrize("block_size", [32, 64, 96, 48, 7])
@pytest.mark.parametrize("K", [200, 1061])
def test_linear_matches_float64_every_kernel(kernel, block_size, K):
    """Every M range (dots, of 1, 2 or 4 weight rows a call; AMX tiles of 16 rows; panels), odd
    K, non-contiguous x, a bias (N = 37: groups of weight rows and a rest)."""
    N = 37
    cb = qlib.codebook_4bit("int4")
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), cb, block_size)
    w_hat = unpacked_w_hat(packed, absmax, cb, K, block_size).double()
    bias = torch.randn(N)
    for dtype in DTYPES:
        for M in (1, 2, 3, 4, 8, 15, 16, 17, 24, 25, 33, 64, 65, 100, 257):
            x = torch.randn(M, 2 * K).to(dtype)[:, ::2]
            y = ops.linear_4bit(x, packed, absmax, cb, block_size, bias)
            ref = x.double() @ w_hat.T + bias.double()
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            assert y.dtype == dtype and y.shape == (M, N)
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(),
                                       msg=lambda m: f"{dtype} M={M}: {m}")


@pytest.mark.parametrize("block_size", [64, 128, 96])
def test_few_rows_match_the_rows_of_five(kernel, block_size):
    """1-4 rows of x (on AVX512 CPUs, with K and the blocks whole 32-code steps, a kernel that
    runs 2-4 weight rows at once; a bfloat16 x up to 2 rows on AMX CPUs) put each weight row in its place:
    float32 and float16 rows give the bits of a 5-row call (the 8-row kernel: the same sums);
    bfloat16 rows, where 5 rows run bfloat16 dot products or AMX tiles (other sums of the same
    products), are within one bfloat16 rounding (N = 37: groups of 2 or 4 and a rest)."""
    K, N = 1024, 37
    cb = qlib.codebook_4bit("nf4")
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), cb, block_size)
    bias = torch.randn(N)
    for dtype in DTYPES:
        x = torch.randn(5, K).to(dtype)
        five = ops.linear_4bit(x, packed, absmax, cb, block_size, bias)
        tol = 2**-8 if dtype == torch.bfloat16 and kernel in ("avx512-bf16", "amx-bf16") else 0
        for a, b in ((0, 1), (4, 5), (0, 2), (3, 5), (0, 3), (2, 5), (0, 4), (1, 5)):
            torch.testing.assert_close(ops.linear_4bit(x[a:b], packed, absmax, cb, block_size, bias),
                                       five[a:b], rtol=tol, atol=tol, msg=lambda e: f"{dtype} rows {a}:{b}: {e}")


@pytest.mark.parametrize("M", [1, 2, 5])
def test_bfloat16_x_multiplies_the_kernels_w_hat(kernel, M):
    """Each row of x holds two ones: y is then exactly W_hat[:, k] + W_hat[:, j] in float32,
    rounded to bfloat16. The bfloat16 kernels ('avx512-bf16', 'amx-bf16') add W_hat rounded to
    bfloat16 (as at::BFloat16 rounds), the others W_hat itself: this tells the two apart."""
    K, N = 1024, 64
    cb = qlib.codebook_4bit("nf4")
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), cb, 64)
    w_hat = ops.dequantize_4bit(packed, absmax, cb, K, 64, torch.float32)
    if kernel in ("avx512-bf16", "amx-bf16"):
        w_hat = ops.dequantize_4bit(packed, absmax, cb, K, 64, torch.bfloat16).float()
    for _ in range(4):
        cols = torch.randperm(K)[:2 * M].view(M, 2)
        x = torch.zeros(M, K)
        x[torch.arange(M)[:, None], cols] = 1.0
        y = ops.linear_4bit(x.bfloat16(), packed, absmax, cb, 64, None)
        ref = (w_hat[:, cols[:, 0]] + w_hat[:, cols[:, 1]]).T.bfloat16()
        assert torch.equal(y, ref), (kernel, M, cols)


def test_bfloat16_batches_add_the_bias_rounded_to_bfloat16():
    """README: a bfloat16 x of more than 24 rows (AVX512-BF16) runs ATen's bfloat16 GEMM, which
    adds the bias rounded to bfloat16; fewer rows add the float32 bias. Rows with two ones give
    y = W_hat[:, k] + W_hat[:, j] + bias exactly in float32 (bias on a 1/256 grid), rounded once."""
    if "avx512-bf16" not in KERNELS:
        pytest.skip("this CPU has no AVX512-BF16")
    K, N, M = 1024, 48, 30
    cb = qlib.codebook_4bit("nf4")
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), cb, 64)
    w_hat = ops.dequantize_4bit(packed, absmax, cb, K, 64, torch.bfloat16).float()
    bias = torch.round((torch.randn(N) * 100) * 256) / 256  # (not bfloat16 values: 100.3-like)
    cols = torch.randperm(K)[:2 * M].view(M, 2)
    x = torch.zeros(M, K)
    x[torch.arange(M)[:, None], cols] = 1.0
    dot = (w_hat[:, cols[:, 0]] + w_hat[:, cols[:, 1]]).T
    qlib.set_fourbit_cpu_kernel("avx512-bf16")  # (amx-bf16 runs 30 rows on its tiles)
    try:
        batch = ops.linear_4bit(x.bfloat16(), packed, absmax, cb, 64, bias)
        assert torch.equal(batch, (dot + bias.bfloat16().float()).bfloat16())
        for m in (0, 7, 29):
            alone = ops.linear_4bit(x[m:m + 1].bfloat16(), packed, absmax, cb, 64, bias)
            assert torch.equal(alone[0], (dot[m] + bias).bfloat16())
    finally:
        qlib.set_fourbit_cpu_kernel("auto")


def test_amx_rows_alone_equal_rows_in_a_batch():
    """On the tile unit each sum runs over k in one order whatever the other rows are: any
    3 to 256 rows of x, at any offset, give the batch's bits (a row or column mixed up in the
    tile packing or the store would not; past 64 rows the later passes over the weight reuse the
    first pass's W_hat)."""
    if "amx-bf16" not in KERNELS:
        pytest.skip("this CPU has no AMX-BF16")
    K, N = 1000, 45  # odd tile counts: K / 32 and N / 16 not whole
    cb = qlib.codebook_4bit("nf4")
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), cb, 64)
    x = torch.randn(230, K).bfloat16()  # 64 rows a pass over the weight: 3 passes, then 38 rows
    x[7, 3] = x[70, 999] = x[200, 500] = float("nan")  # each stays in its row
    batch = ops.linear_4bit(x, packed, absmax, cb, 64, None)
    nan_rows = torch.zeros(230, dtype=torch.bool)
    nan_rows[[7, 70, 200]] = True
    assert batch[nan_rows].isnan().all() and not batch[~nan_rows].isnan().any()
    for a, b in ((0, 3), (0, 16), (1, 18), (5, 40), (20, 64), (48, 64), (60, 75), (30, 100), (100, 230)):
        torch.testing.assert_close(ops.linear_4bit(x[a:b], packed, absmax, cb, 64, None), batch[a:b],
                                   rtol=0, atol=0, equal_nan=True, msg=lambda m: f"rows {a}:{b}: {m}")


@pytest.mark.parametrize("M", [30, 300])
def test_nan_stays_in_its_row_every_kernel(kernel, M):
    """A NaN / Inf at the start of a row of x (K = 200, not a multiple of 32) stays in its row
    on every path: oneDNN's bfloat16 GEMM, which the panels call past the fused kernels' rows,
    read each row to a multiple of 32 values and made the row before NaN."""
    K, N = 200, 20
    cb = qlib.codebook_4bit("nf4")
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), cb, 64)
    bad = [4, 11, M - 1]
    for dtype in DTYPES:
        x = torch.randn(M, K).to(dtype)
        x[4, 0], x[11, 5], x[M - 1, 23] = float("inf"), float("nan"), float("nan")
        y = ops.linear_4bit(x, packed, absmax, cb, 64, None)
        rows = torch.zeros(M, dtype=torch.bool)
        rows[bad] = True
        assert not torch.isfinite(y[rows]).any(), (dtype, M)
        assert torch.isfinite(y[~rows]).all(), (dtype, M, (~torch.isfinite(y)).any(1).nonzero().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panels_under_inference_mode_and_autograd(kernel, dtype):
    """Past the fused kernels' rows, with W_hat past L2 (4-9 MB here), each thread decodes its
    own panels and runs ATen's GEMM in the parallel region: the workers take the caller's
    thread-local state, so the op runs under torch.inference_mode and below autograd (an x
    that requires grad) alike, and the panels (N = 2100: not a whole number of 16-row panels
    a thread) cover every column."""
    K, N, M = 1024, 2100, 300
    cb = qlib.codebook_4bit("nf4")
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), cb, 64)
    w_hat = unpacked_w_hat(packed, absmax, cb, K, 64).double()
    bias = torch.randn(N)
    x = torch.randn(M, K).to(dtype)
    y = ops.linear_4bit(x, packed, absmax, cb, 64, bias)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    ref = x.double() @ w_hat.T + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    with torch.inference_mode():
        assert torch.equal(ops.linear_4bit(x, packed, absmax, cb, 64, bias), y)
    xg = x.clone().requires_grad_()
    yg = ops.linear_4bit(xg, packed, absmax, cb, 64, bias)
    assert torch.equal(yg.detach(), y)
    (gx,) = torch.autograd.grad(yg.float().sum(), xg)
    g_ref = w_hat.sum(0).expand(M, K)
    torch.testing.assert_close(gx.double(), g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@pytest.mark.skipif("avx512" not in KERNELS, reason="needs two float32 kernel families with other x layouts")
def test_kernel_switched_by_another_thread_mid_call():
    """linear_4bit reads the kernel family once a call: x laid out for one family was read by
    another's dots when a thread switched it meanwhile (errors of 3 at 4096 features)."""
    import threading
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4096, 4096, generator=g), torch.randn(4, 4096, generator=g)
    packed, absmax = ops.quantize_4bit(w, qlib.codebook_4bit("nf4"), 64)
    run = lambda: qlib.linear_4bit(x, packed, absmax, "nf4", 64)  # noqa: E731
    refs = []
    try:
        for name in ("avx512", "scalar"):
            qlib.set_fourbit_cpu_kernel(name)
            refs.append(run())
        stop = threading.Event()

        def flip():
            while not stop.is_set():
                for name in ("avx512", "scalar"):
                    qlib.set_fourbit_cpu_kernel(name)

        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            worst = max(min((run() - r).abs().max().item() for r in refs) for _ in range(40))
        finally:
            stop.set()
            flipper.join()
    finally:
        qlib.set_fourbit_cpu_kernel("auto")
    assert worst < 1e-4
