"""int8 ops (quantize_per_token, int8_gemm, int8_linear), qlib.nn.Int8Linear, qlib.quantize_dynamic."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import qlib
from qlib.nn import Int8Linear

ops = torch.ops.qlib
MAX_K = 2**17 - 1


def ref_gemm(a, b):
    return (a.cpu().to(torch.int64) @ b.cpu().to(torch.int64).T)


def rand_i8(*shape, device, low=-128):
    return torch.randint(low, 128, shape, dtype=torch.int8, device=device)


# ---------------------------------------------------------------- int8_gemm
@pytest.mark.parametrize("M", [1, 2, 17, 70])
@pytest.mark.parametrize("K", [1, 33, 64, 1025])
@pytest.mark.parametrize("N", [1, 17, 40])
def test_int8_gemm_exact(device, M, K, N):
    a, b = rand_i8(M, K, device=device), rand_i8(N, K, device=device)
    c = ops.int8_gemm(a, b)
    assert c.dtype == torch.int32 and c.shape == (M, N) and c.device == a.device
    assert torch.equal(c.cpu().long(), ref_gemm(a, b))


@pytest.mark.parametrize("offset", [1, 4, 8])
def test_int8_gemm_of_views_off_a_16_byte_boundary(device, offset):
    """Contiguous operands whose data starts off a 16-byte boundary (buf[offset:]): exact at
    every M (on CUDA cuBLASLt's int8 kernels need aligned pointers: such views are copied)."""
    for M, K, N in ((3, 32, 24), (20, 32, 64), (70, 64, 40)):
        a = rand_i8(M * K + offset, device=device)[offset:].view(M, K)
        b = rand_i8(N * K + offset, device=device)[offset:].view(N, K)
        assert torch.equal(ops.int8_gemm(a, b).cpu().long(), ref_gemm(a, b))


@pytest.mark.parametrize("case", ["a_no_min", "b_no_min", "both_min", "extremes"])
def test_int8_gemm_paths(device, case):
    # The CPU kernel picks a path by where -128 occurs; all must be exact.
    a, b = rand_i8(37, 300, device=device), rand_i8(45, 300, device=device)
    if case == "a_no_min":
        a = a.clamp(min=-127)
    elif case == "b_no_min":
        b = b.clamp(min=-127)
    elif case == "extremes":
        a = torch.where(a > 0, 127, -128).to(torch.int8)
        b = torch.where(b > 0, 127, -128).to(torch.int8)
    assert torch.equal(ops.int8_gemm(a, b).cpu().long(), ref_gemm(a, b))


def test_int8_gemm_noncontiguous(device):
    a = rand_i8(70, 96, device=device)[::2, 1:81]  # row stride 96, K = 80
    b = rand_i8(80, 33, device=device).T  # [33, 80], K stride 33
    b2 = rand_i8(20, 160, device=device)[:, ::2]  # K stride 2
    assert torch.equal(ops.int8_gemm(a, b).cpu().long(), ref_gemm(a, b))
    assert torch.equal(ops.int8_gemm(a, b2).cpu().long(), ref_gemm(a, b2))


def test_int8_gemm_empty(device):
    a, b = rand_i8(0, 8, device=device), rand_i8(5, 8, device=device)
    assert ops.int8_gemm(a, b).shape == (0, 5)
    c = ops.int8_gemm(rand_i8(3, 0, device=device), rand_i8(4, 0, device=device))
    assert c.shape == (3, 4) and (c == 0).all()


def test_int8_gemm_k_boundary(device):
    # K = 2^17 - 1: (-128)(-128)K = 2^31 - 2^14 fits int32; K = 2^17 would give 2^31.
    a = torch.full((2, MAX_K), -128, dtype=torch.int8, device=device)
    b = torch.full((3, MAX_K), -128, dtype=torch.int8, device=device)
    c = ops.int8_gemm(a, b)
    assert (c.cpu().long() == 16384 * MAX_K).all() and 16384 * MAX_K == 2**31 - 2**14
    b[1] = 127
    assert (ops.int8_gemm(a, b)[:, 1].cpu().long() == -128 * 127 * MAX_K).all()
    too_long = torch.zeros((1, MAX_K + 1), dtype=torch.int8, device=device)
    with pytest.raises(RuntimeError, match=r"qlib::int8_gemm: K = 131072 .*exact.*131071"):
        ops.int8_gemm(too_long, too_long)


def test_int8_gemm_errors(device):
    a = rand_i8(4, 8, device=device)
    with pytest.raises(RuntimeError, match="qlib::int8_gemm: b must be int8"):
        ops.int8_gemm(a, a.float())
    with pytest.raises(RuntimeError, match="disagree on K"):
        ops.int8_gemm(a, rand_i8(4, 9, device=device))
    with pytest.raises(RuntimeError, match="a must be 2-D"):
        ops.int8_gemm(a[0], a)


# ---------------------------------------------------------------- quantize_per_token
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (5, 33), (2, 3, 1025), (4, 0)])
def test_quantize_per_token_matches_quantize(device, dtype, shape):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    if x.numel():
        x.view(-1, shape[-1])[0] = 0  # all-zero row
    q, scale = ops.quantize_per_token(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    amax = x.float().abs().amax(-1, keepdim=True) if shape[-1] else torch.zeros_like(scale)
    expected_scale = torch.clamp(amax / 127, min=torch.finfo(torch.float32).eps)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, qlib.quantize(x, scale, None, -127, 127, torch.int8))


def test_quantize_per_token_noncontiguous(device):
    x = torch.randn(40, 66, device=device)[::2, 1:65]
    q, s = ops.quantize_per_token(x)
    q2, s2 = ops.quantize_per_token(x.contiguous())
    assert torch.equal(q, q2) and torch.equal(s, s2)


# ---------------------------------------------------------------- int8_linear
def ref_linear(x, w_q, w_scale, bias, act_scale=None):
    """float64 reference from qlib.quantize/dequantize."""
    if act_scale is None:
        q, s = ops.quantize_per_token(x)
        assert torch.equal(q, qlib.quantize(x, s, None, -127, 127))
    else:
        s = act_scale
        q = qlib.quantize(x, act_scale, None, -127, 127)
    xd = q.double() * s.double()
    y = xd @ (w_q.double() * w_scale.double().reshape(-1, 1)).T
    if bias is not None:
        y = y + bias.double()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("lead,K,N", [((1,), 64, 48), ((17,), 33, 17), ((2, 3), 1025, 5), ((4, 1, 2), 96, 1)])
def test_int8_linear_vs_reference(device, dtype, static, lead, K, N):
    x = torch.randn(*lead, K, device=device).to(dtype)
    w = rand_i8(N, K, device=device)
    w_scale = torch.rand(N, device=device) * 0.01 + 1e-3
    bias = torch.randn(N, device=device)
    act_scale = torch.tensor(x.float().abs().max().item() / 127, device=device) if static else None
    y = ops.int8_linear(x, w, w_scale, bias, act_scale)
    assert y.dtype == dtype and y.shape == (*lead, N)
    ref = ref_linear(x, w, w_scale, bias, act_scale)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    y_nb = ops.int8_linear(x, w, w_scale, None, act_scale)
    torch.testing.assert_close(y_nb.double(), ref - bias.double(), rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["dynamic", "static", "zero_point"])
@pytest.mark.parametrize("K", [1, 33, 64, 4096, 12289, 16384, 61441])
def test_int8_linear_small_m_matches_rows_of_a_batch(device, dtype, act, K):
    """M <= 4 rows (on CUDA one fused kernel) give the bits of the same rows inside a 17-row
    batch (cuBLASLt on CUDA): same codes, exact int32 sums, same float epilogue. K = 12289 at
    M = 4 and K = 16384 at M = 3 are past the default 48 KiB of shared memory for the codes
    (the kernel asks for more); K = 61441 at M = 4 is past even an H100's 227 KiB and takes
    the three-kernel path. K = 33 takes a strided weight and the byte loop; K = 64 an x off
    its 16-byte alignment (byte loads of x, 16-byte loads of the weight); K = 4096 a weight
    whose rows are 2K apart (contiguous along K); a NaN row stays NaN."""
    N = 37
    x = (torch.randn(17 * K + 1, device=device) * 2).to(dtype)
    x = x[1:].view(17, K) if K == 64 else x[:-1].view(17, K)
    x[2, K // 2] = math.nan
    w = rand_i8(N, 2 * K, device=device)
    w = w[:, ::2] if K == 33 else w[:, :K] if K == 4096 else w[:, :K].contiguous()
    s = torch.rand(N, device=device) * 0.01 + 1e-3
    b = torch.randn(N, device=device)
    extra = {"dynamic": (),
             "static": (torch.tensor(0.02, device=device),),
             "zero_point": (torch.tensor(0.02, device=device),
                            torch.tensor(-5, dtype=torch.int32, device=device), -128, 127)}[act]
    for bias in (b, None):
        batch = ops.int8_linear(x, w, s, bias, *extra)
        assert torch.isnan(batch[2]).all() and not torch.isnan(batch[:2]).any()
        for M in (1, 2, 3, 4):
            rows = ops.int8_linear(x[:M], w, s, bias, *extra)
            assert torch.equal(rows.nan_to_num(0.0), batch[:M].nan_to_num(0.0)), (M, bias is None)
            assert torch.equal(rows.isnan(), batch[:M].isnan())


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lo,hi", [(-128, 127), (-8, 7), (-120, 100)])
@pytest.mark.parametrize("M", [1, 5, 40, 70])
def test_int8_linear_zero_point_exact(device, packed, lo, hi, M):
    """Static activations with a zero point: codes are qlib.quantize's, and the int32
    sums equal sum((q - zp) * w) exactly (checked through a float32 epilogue)."""
    K, N = 67, 29
    x = torch.randn(M, K, device=device) * 3
    x[0, 5] = 1e6  # past the top edge
    w = rand_i8(N, K, device=device)
    w_scale = torch.rand(N, device=device) * 0.01 + 1e-3
    bias = torch.randn(N, device=device)
    act_scale = torch.tensor(0.05, device=device)
    for zp in (lo, hi, (lo + hi) // 2 + 1):
        z = torch.tensor(zp, dtype=torch.int32, device=device)
        args = (x, w, w_scale, bias, act_scale, z, lo, hi)
        y = ops.int8_linear_packed(x, ops.int8_pack_weight(w), *args[1:]) if packed else ops.int8_linear(*args)
        q = qlib.quantize(x, act_scale, z, lo, hi)
        acc = ((q.long() - zp).cpu() @ w.long().T.cpu()).to(device)  # exact (CUDA has no int64 matmul)
        assert acc.abs().max() < 2**24  # so its float32 is exact too
        ref = acc.float() * (act_scale * w_scale) + bias
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_int8_linear_zero_point_sum_past_int32(device):
    """sum (q - z) * w can pass 2^31 (|q - z| <= 255) while both int32 terms fit."""
    K = 70000
    x = torch.full((3, K), 1e3, device=device)  # every code at the top, 127
    w = torch.full((2, K), 127, dtype=torch.int8, device=device)
    w[1] = -127
    a, s = torch.tensor(0.5, device=device), torch.tensor([1e-3, 2e-3], device=device)
    z = torch.tensor(-128, dtype=torch.int32, device=device)
    y = ops.int8_linear(x, w, s, None, a, z, -128, 127)
    exact = K * 255 * 127  # > 2**31
    ref = torch.tensor([exact * 0.5 * 1e-3, -exact * 0.5 * 2e-3], dtype=torch.float64)
    torch.testing.assert_close(y.double().cpu(), ref.expand(3, 2), rtol=1e-6, atol=0)


def test_int8_linear_zero_point_errors(device):
    x, w, s = torch.randn(3, 8, device=device), rand_i8(4, 8, device=device), torch.ones(4, device=device)
    a, z = torch.tensor(0.1, device=device), torch.tensor(3, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="qlib::int8_linear: dynamic .* need a static act_scale"):
        ops.int8_linear(x, w, s, None, None, z)
    with pytest.raises(RuntimeError, match="qlib::int8_linear: dynamic .* range \\[-128, 127\\]"):
        ops.int8_linear(x, w, s, None, None, None, -128, 127)
    with pytest.raises(RuntimeError, match=r"act_quant_max\] = \[-129, 127\] must be non-empty and inside int8"):
        ops.int8_linear(x, w, s, None, a, z, -129, 127)
    with pytest.raises(RuntimeError, match="act_zero_point must be int32 or int64, got Float"):
        ops.int8_linear(x, w, s, None, a, z.float(), -128, 127)
    with pytest.raises(RuntimeError, match="act_zero_point must hold one"):
        ops.int8_linear(x, w, s, None, a, z.repeat(2), -128, 127)
    bad = torch.tensor(9, dtype=torch.int32, device=device)
    qlib.set_cuda_value_checks(True)  # CUDA reads the zero point back only when asked
    try:
        with pytest.raises(RuntimeError, match=r"act_zero_point 9 is outside \[act_quant_min, act_quant_max\] = \[-8, 7\]"):
            ops.int8_linear(x, w, s, None, a, bad, -8, 7)
    finally:
        qlib.set_cuda_value_checks(False)


@pytest.mark.parametrize("M", [2, 17])  # CUDA: the small-M kernel, and the batched path
def test_int8_linear_bad_static_qparams(device, M):
    """A static act_scale that is not finite and >= the smallest normal float32, or a zero point outside the range (int64
    past int32 too): the CPU raises; CUDA gives NaN rows (no host read), or raises as the CPU
    under set_cuda_value_checks."""
    x, w, s = torch.randn(M, 32, device=device), rand_i8(4, 32, device=device), torch.ones(4, device=device)
    good_scale, good_zp = torch.tensor(0.1, device=device), torch.tensor(3, dtype=torch.int32, device=device)
    # 1e-39 is subnormal in float32: 1 / scale would be infinite.
    cases = [(torch.tensor(v, device=device), good_zp, r"act_scale must be positive and finite, at least 1.17549e-38")
             for v in (0.0, -1.0, float("nan"), float("inf"), 1e-39)]
    cases += [(good_scale, torch.tensor(v, dtype=torch.int64, device=device), f"act_zero_point {v} is outside")
              for v in (9, 2**32 + 3)]
    for a, z, message in cases:
        for checks in (False, True):
            qlib.set_cuda_value_checks(checks)
            try:
                if device == "cpu" or checks:
                    with pytest.raises(RuntimeError, match=message):
                        ops.int8_linear(x, w, s, None, a, z, -8, 7)
                else:
                    assert ops.int8_linear(x, w, s, None, a, z, -8, 7).isnan().all()
            finally:
                qlib.set_cuda_value_checks(False)
    assert torch.isfinite(ops.int8_linear(x, w, s, None, good_scale, good_zp, -8, 7)).all()


def test_int8_linear_errors(device):
    x = torch.randn(3, 8, device=device)
    w = rand_i8(4, 8, device=device)
    s = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match="qlib::int8_linear: x of shape .* expects K = 8"):
        ops.int8_linear(torch.randn(3, 7, device=device), w, s, None)
    with pytest.raises(RuntimeError, match="qlib::int8_linear: w_scale must hold one scale per output channel"):
        ops.int8_linear(x, w, torch.ones(3, device=device), None)
    with pytest.raises(RuntimeError, match="qlib::int8_linear: bias must have shape"):
        ops.int8_linear(x, w, s, torch.ones(5, device=device))
    with pytest.raises(RuntimeError, match="qlib::int8_linear: act_scale must hold one"):
        ops.int8_linear(x, w, s, None, torch.ones(2, device=device))
    with pytest.raises(RuntimeError, match="qlib::int8_linear: x must be float32"):
        ops.int8_linear(x.double(), w, s, None)


# ---------------------------------------------------------------- opcheck
def test_fakes_check_the_arguments():
    """On meta tensors (the fakes, as torch.compile and torch.export run them) the int8 ops raise
    the kernels' argument errors: dtypes, shapes, the dynamic range."""
    m = dict(device="meta")
    x, w, s = torch.randn(3, 8, **m), torch.zeros(5, 8, dtype=torch.int8, **m), torch.ones(5, **m)
    empty = torch.empty(0, dtype=torch.int8, **m)
    cases = [
        (lambda: ops.int8_linear(x.int(), w, s, None), "qlib::int8_linear: x must be float32, float16 or bfloat16, got Int"),
        (lambda: ops.int8_linear(x, w.float(), s, None), "qlib::int8_linear: w_int8 must be int8, got Float"),
        (lambda: ops.int8_linear(x[:, :7], w, s, None), r"x of shape \[3, 7\] has 7 features but w_int8 .* expects K = 8"),
        (lambda: ops.int8_linear(x, w, s[:4], None), r"w_scale must hold one scale per output channel.*got shape \[4\]"),
        (lambda: ops.int8_linear(x, w, s, s[:3]), r"bias must have shape \[5\], got \[3\]"),
        (lambda: ops.int8_linear(x, w, s, None, None, None, -128, 127), "dynamic \\(per-token\\) activations are symmetric"),
        (lambda: ops.int8_linear_packed(x, empty, w, s.double(), None), "qlib::int8_linear_packed: w_scale must be float32, got Double"),
        (lambda: ops.int8_linear_packed(x.int(), empty, None, s, None), "qlib::int8_linear_packed: x must be float32"),
        (lambda: ops.int8_linear_packed(x, empty, None, s[0], None), r"qlib::int8_linear_packed: w_scale must hold one scale .*got shape \[\]"),
        (lambda: ops.int8_linear_packed(x, empty, None, s, s[:2]), r"qlib::int8_linear_packed: bias must have shape \[5\]"),
        (lambda: ops.int8_gemm(w, w.float()), "qlib::int8_gemm: b must be int8, got Float"),
        (lambda: ops.quantize_per_token(x.int()), "qlib::quantize_per_token: x must be float32"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert ops.int8_linear(x, w, s, None).shape == (3, 5)
    assert ops.int8_linear_packed(x, empty, None, s.view(5, 1), None).shape == (3, 5)


def test_opcheck(device):
    x = torch.randn(5, 40, device=device)
    w = rand_i8(24, 40, device=device)
    s = torch.rand(24, device=device) + 0.01
    b = torch.randn(24, device=device)
    torch.library.opcheck(ops.quantize_per_token, (x,))
    torch.library.opcheck(ops.quantize_per_token, (torch.randn(2, 3, 17, device=device).half(),))
    torch.library.opcheck(ops.int8_gemm, (rand_i8(17, 40, device=device), w))
    torch.library.opcheck(ops.int8_gemm, (rand_i8(1, 40, device=device), w))
    torch.library.opcheck(ops.int8_linear, (x, w, s, b))
    torch.library.opcheck(ops.int8_linear, (x.bfloat16().reshape(5, 1, 40), w, s, None))
    torch.library.opcheck(ops.int8_linear, (x, w, s, b, torch.tensor(0.02, device=device)))
    zp = torch.tensor(-3, dtype=torch.int32, device=device)
    torch.library.opcheck(ops.int8_linear, (x, w, s, b, torch.tensor(0.02, device=device), zp, -128, 127))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_gradient_is_straight_through(device, dtype, static):
    """The int8 weight is frozen: x gets grad @ (w_int8 * w_scale) (the activation quantization
    passed straight through), a bias parameter the sum of grad; both ops and Int8Linear (whose
    outputs required grad before and gave no gradient)."""
    x0 = torch.randn(2, 5, 40, device=device).to(dtype)
    w = rand_i8(24, 40, device=device)
    s = torch.rand(24, device=device) * 0.05 + 0.01
    extra = (torch.tensor(0.03, device=device),) if static else ()
    g = torch.randn(2, 5, 24, device=device).to(dtype)
    ref = (g.double().reshape(-1, 24) @ (w.double() * s.double()[:, None])).reshape(2, 5, 40)
    s_col = s.view(24, 1)  # ([N, 1] scales: an [N, N, K] weight broadcast before, summed to wrong values)
    on_cpu = torch.device(device).type == "cpu"
    for call in (lambda x, b: ops.int8_linear(x, w, s, b, *extra),
                 lambda x, b: ops.int8_linear_packed(x, ops.int8_pack_weight(w), w, s, b, *extra),
                 lambda x, b: ops.int8_linear(x, w, s_col, b, *extra),
                 lambda x, b: ops.int8_linear_packed(x, ops.int8_pack_weight(w), w, s_col, b, *extra),
                 *([lambda x, b: ops.int8_linear_packed(x, ops.int8_pack_weight(w), None, s_col, b, *extra)]
                   if on_cpu and qlib.build_info()["int8_packed_copy"] else [])):
        x = x0.clone().requires_grad_()
        b = torch.randn(24, device=device, requires_grad=True)
        call(x, b).backward(g)
        assert x.grad.dtype == dtype and b.grad.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(x.grad.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
        torch.testing.assert_close(b.grad, g.reshape(-1, 24).sum(0).float(), rtol=1e-5, atol=1e-4)
        no_bias = x0.clone().requires_grad_()  # (an absent bias has no input edge: it raised)
        call(no_bias, None).backward(g)
        assert torch.equal(no_bias.grad, x.grad)
        with pytest.raises(RuntimeError, match=r"qlib::int8_linear(_packed)?: w_scale and act_scale get no gradient"):
            ops.int8_linear(x, w, s.clone().requires_grad_(), None)
    torch.library.opcheck(ops.int8_linear, (x0.float().requires_grad_(), w, s, torch.randn(24, device=device, requires_grad=True), *extra))
    # A 1-D x: the bias gradient is grad itself (a sum over no dims summed them all).
    x1 = x0.detach()[0, 0].float().clone().requires_grad_()
    b1 = torch.randn(24, device=device, requires_grad=True)
    ops.int8_linear(x1, w, s, b1, *extra).backward(g[0, 0].float())
    assert torch.equal(b1.grad, g[0, 0].float())
    torch.testing.assert_close(x1.grad.double(), ref[0, 0], rtol=1e-4, atol=1e-3)
    model = nn.Sequential(nn.Linear(40, 40), Int8Linear.from_float(nn.Linear(40, 24))).to(device)
    model(torch.randn(3, 40, device=device)).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ["dynamic", "static"])
@pytest.mark.parametrize("weight_held", [False, True])
def test_jit_trace_without_tracer_warnings(device, activation, weight_held):
    """Under torch.jit.trace forward's bookkeeping runs untraced (its tensor-to-bool reads gave
    TracerWarnings; skipping it traced the unpacked kernel, 3x slower, and a stale static
    range): the graph records the op with the packing, and the traced module gives the
    module's outputs, after an in-place edit of the static range too."""
    import warnings

    scale = {"act_scale": 0.05} if activation == "static" else {}
    m = Int8Linear.from_float(nn.Linear(40, 24).to(device), activation, **scale)
    held = m.weight if weight_held else None
    if activation == "static":
        with torch.no_grad():
            m.act_quant_range.copy_(torch.tensor([-20, 20]))  # (no eager call before the trace)
    x = torch.randn(5, 40, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, (x,))
    (op,) = [n for n in traced.graph.nodes() if n.kind() == "qlib::int8_linear_packed"]
    packing = list(op.inputs())[1].node()  # (the module's packing, not an empty tensor)
    assert packing.kind() == "prim::GetAttr" and packing.s("name") == "weight_packed"
    for rows in (5, 1, 9):
        xi = torch.randn(rows, 40, device=device) * 3
        assert torch.equal(traced(xi), m(xi))
    assert held is None or held.shape == (24, 40)


def test_compile_fullgraph(device):
    lin = Int8Linear.from_float(nn.Linear(32, 16).to(device))
    x = torch.randn(4, 32, device=device)
    compiled = torch.compile(lin, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), lin(x))


def test_static_zero_point_compiles_and_exports(device):
    lin = Int8Linear.from_float(nn.Linear(32, 16).to(device), activation="static", act_scale=0.05)
    sd = dict(lin.state_dict(), act_zero_point=torch.tensor(-7, dtype=torch.int32, device=device),
              act_quant_range=torch.tensor([-128, 127], dtype=torch.int32, device=device))
    lin.load_state_dict(sd)
    assert "zero_point=-7" in repr(lin)
    x = torch.randn(4, 32, device=device)
    ref = lin(x)
    q = qlib.quantize(x, lin.act_scale, lin.act_zero_point, -128, 127)
    exact = ((q.double() + 7) @ lin.weight.double().T) * (0.05 * lin.weight_scale.double()) + lin.bias.double()
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.compile(lin, fullgraph=True, backend="eager")(x), ref)
    torch.testing.assert_close(torch.export.export(lin, (x,)).module()(x), ref)


# ---------------------------------------------------------------- Int8Linear
@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_int8linear_from_float(device, activation):
    lin = nn.Linear(96, 40).to(device)
    x = torch.randn(3, 7, 96, device=device)
    act_scale = x.abs().max() / 127 if activation == "static" else None
    q = Int8Linear.from_float(lin, activation=activation, act_scale=act_scale)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    assert activation in repr(q) and "int8" in repr(q)
    # per-channel symmetric: row absmax hits 127
    assert (q.weight.abs().amax(1) == 127).all()
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    fp32_bytes = lin.weight.numel() * 4
    assert q.weight_bytes() == fp32_bytes // 4 + 40 * 4


def test_int8linear_from_float_edge_weights(device):
    """An nn.Linear with no outputs converts (empty outputs, as nn.Linear gives); a NaN or Inf
    weight is refused by name instead of surfacing as an internal op's error."""
    for lin in (nn.Linear(16, 0), nn.Linear(0, 4)):
        lin = lin.to(device)
        q = Int8Linear.from_float(lin)
        x = torch.randn(3, lin.in_features, device=device)
        torch.testing.assert_close(q(x), lin(x).detach())  # empty, or the bias alone (K = 0)
    for bad in (math.nan, math.inf):
        lin = nn.Linear(16, 4).to(device)
        with torch.no_grad():
            lin.weight[2, 5] = bad
        with pytest.raises(ValueError, match=r"Int8Linear: the weight holds NaN or Inf \(output channel 2\)"):
            Int8Linear.from_float(lin)


def test_int8linear_from_float_tiny_weights(device):
    """Weights of any size quantize alike: the per-channel scale is floored at the smallest
    normal float32, not at float32's eps (which zeroed weights below ~6e-8, quantize_dynamic's
    outputs then the bias alone)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=False).to(device)
    x = torch.randn(5, 64, device=device)
    codes = None
    for e in (0, -20, -40, -100):
        small = nn.Linear(64, 8, bias=False).to(device)
        with torch.no_grad():
            small.weight.copy_(lin.weight * 2.0**e)  # (exact)
        q = qlib.quantize_dynamic(small)
        w = small.weight.detach().double()
        scale = w.abs().amax(1) / 127
        assert torch.equal(q.weight_scale, scale.float())
        # Round to nearest in the op's float32 math: within half a step of w / scale (a code
        # near a .5 tie may differ from float64's rounding), and the same codes at every e.
        assert ((q.weight.double() - w / scale[:, None]).abs() <= 0.5 + 1e-4).all()
        codes = q.weight.clone() if codes is None else codes
        assert torch.equal(q.weight, codes), e
        with torch.no_grad():
            y, ref = q(x).double(), small(x).double()
        assert ((y - ref).norm() / ref.norm()).item() < 0.02, e


def test_int8linear_weight_memory_measured(device, tmp_path):
    """weight_bytes() is a formula: measure what the module holds (its int8 weight, or the CPU
    kernel's packing of it: 1 byte a weight, N column sums and a tag at these aligned sizes) and
    what its state_dict holds and saves: 4x below float32, plus the scales."""
    N, K = 256, 512
    lin = nn.Linear(K, N).to(device)
    q = Int8Linear.from_float(lin)
    fp32 = lin.weight.nbytes
    held = {n: t.nbytes for n, t in q.named_buffers() if n != "bias"}
    assert held["weight_scale"] == 4 * N
    assert fp32 // 4 <= sum(held.values()) <= fp32 // 4 + 8 * N + 64, held
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (N, K)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (N,)
    assert sd["weight"].nbytes + sd["weight_scale"].nbytes == fp32 // 4 + 4 * N
    torch.save({k: v for k, v in sd.items() if k != "bias"}, tmp_path / "q.pt")
    torch.save(lin.weight.detach(), tmp_path / "w.pt")
    assert (tmp_path / "q.pt").stat().st_size * 3.9 < (tmp_path / "w.pt").stat().st_size


def test_int8linear_state_dict_round_trip(device, tmp_path):
    lin = nn.Linear(64, 24).to(device)
    q = Int8Linear.from_float(lin, activation="static", act_scale=0.05)
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias", "act_scale", "act_zero_point", "act_quant_range"}
    path = tmp_path / "int8.pt"
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    q2 = Int8Linear(64, 24, activation="static", device=device)
    q2.load_state_dict(loaded)
    x = torch.randn(5, 64, device=device)
    assert torch.equal(q(x), q2(x))
    qd = Int8Linear.from_float(nn.Linear(64, 24, bias=False).to(device))
    assert set(qd.state_dict()) == {"weight", "weight_scale"}


def test_int8linear_corrupt_state_dict(device):
    q = Int8Linear.from_float(nn.Linear(16, 8).to(device))
    sd = q.state_dict()
    bad_dtype = dict(sd, weight=sd["weight"].float())
    with pytest.raises(RuntimeError, match=r"state_dict\['weight'\] is torch.float32 .* expected torch.int8"):
        Int8Linear(16, 8, device=device).load_state_dict(bad_dtype)
    bad_shape = dict(sd, weight_scale=sd["weight_scale"][:4])
    with pytest.raises(RuntimeError, match=r"state_dict\['weight_scale'\] .* shape \(4,\), expected .* \(8,\)"):
        Int8Linear(16, 8, device=device).load_state_dict(bad_shape)
    for key, bad, message in [("weight", sd["weight"][:, :15], r"torch.int8 of shape \(8, 15\), expected torch.int8 of shape \(8, 16\)"),
                              ("weight", sd["weight"].to(torch.uint8), r"torch.uint8 of shape \(8, 16\), expected torch.int8"),
                              ("weight_scale", sd["weight_scale"].double(), r"torch.float64 of shape \(8,\), expected torch.float32"),
                              ("bias", sd["bias"][:3], r"torch.float32 of shape \(3,\), expected torch.float32 of shape \(8,\)")]:
        with pytest.raises(RuntimeError, match=rf"Int8Linear \(.*\): state_dict\['{key}'\] is {message}"):
            Int8Linear(16, 8, device=device).load_state_dict(dict(sd, **{key: bad}))
    with pytest.raises(RuntimeError, match="Missing key"):
        Int8Linear(16, 8, device=device).load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    for v in (math.nan, 0.0, -0.5, math.inf):
        bad_scale = dict(sd, weight_scale=sd["weight_scale"].clone().index_fill_(0, torch.tensor([3], device=device), v))
        with pytest.raises(RuntimeError, match=rf"state_dict\['weight_scale'\] holds {v}; weight_scale must be finite and > 0"):
            Int8Linear(16, 8, device=device).load_state_dict(bad_scale)
    static = Int8Linear.from_float(nn.Linear(16, 8).to(device), activation="static", act_scale=0.1)
    bad_act = dict(static.state_dict(), act_scale=torch.tensor(-1.0, device=device))
    with pytest.raises(RuntimeError, match=r"state_dict\['act_scale'\] holds -1.0"):
        static.load_state_dict(bad_act)
    subnormal = dict(static.state_dict(), act_scale=torch.tensor(1e-39, device=device))
    with pytest.raises(RuntimeError, match=r"state_dict\['act_scale'\] holds 1\.0+\d*e-39; act_scale must be finite and at least 1.17"):
        static.load_state_dict(subnormal)
    with pytest.raises(ValueError, match=r"from_float: act_scale must be positive and finite, at least 1.17.*got 1\.0+\d*e-39"):
        Int8Linear.from_float(nn.Linear(16, 8), activation="static", act_scale=1e-39)
    bad_zp = dict(static.state_dict(), act_zero_point=torch.tensor(200, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match=r"act_zero_point 200 lies outside act_quant_range \[-127, 127\]"):
        static.load_state_dict(bad_zp)
    with pytest.raises(ValueError, match="needs act_scale"):
        Int8Linear.from_float(nn.Linear(4, 4), activation="static")
    with pytest.raises(ValueError, match=r"act_scale must be one value \(per-tensor\), got shape \(2,\)"):
        Int8Linear.from_float(nn.Linear(4, 4), activation="static", act_scale=torch.ones(2))


# ---------------------------------------------------------------- quantize_dynamic
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.ModuleDict({"out": nn.Linear(32, 32)})

    def forward(self, x):
        return self.head["out"](self.mlp(self.attn(x)))


def test_quantize_dynamic(device):
    model = nn.Sequential(Block(), Block()).to(device)
    x = torch.randn(6, 32, device=device)
    with torch.no_grad():
        ref = model(x)
    seen = []

    def keep_heads_float(module, fqn):
        seen.append(fqn)
        return not fqn.endswith("head.out")

    out = qlib.quantize_dynamic(model, filter_fn=keep_heads_float)
    assert out is model
    assert "0.mlp.2" in seen and "1.head.out" in seen
    assert isinstance(model[0].attn, Int8Linear) and isinstance(model[1].mlp[2], Int8Linear)
    assert type(model[0].head["out"]) is nn.Linear and type(model[1].head["out"]) is nn.Linear
    with torch.no_grad():
        y = model(x)
    assert (y - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    all_q = qlib.quantize_dynamic(nn.Sequential(Block()).to(device))
    assert sum(isinstance(m, Int8Linear) for m in all_q.modules()) == 4
    assert isinstance(qlib.quantize_dynamic(nn.Linear(4, 4)), Int8Linear)


def _gpt2(device):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=97, n_positions=32)
    return transformers.GPT2LMHeadModel(config).to(device).eval()


def _conv1d_as_linear(model):
    """The reference: each transformers Conv1D replaced by hand with the nn.Linear it computes."""
    from transformers.pytorch_utils import Conv1D
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(*child.weight.shape, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


@pytest.mark.parametrize("swap", ["quantize_dynamic", "quantize_weight_only"])
def test_swaps_take_transformers_conv1d(device, swap):
    """GPT-2's Linear layers are transformers Conv1D modules (weight [in, out]): the inference swaps
    take them as the nn.Linear they compute (torch.ao's quantize_dynamic leaves them float,
    silently). The swapped model gives the bits of the same model with the Conv1Ds made nn.Linear
    by hand first; filter_fn patterns select them by name."""
    model = _gpt2(device)
    ids = torch.randint(0, 97, (2, 11), device=device)
    reference = getattr(qlib, swap)(_conv1d_as_linear(copy.deepcopy(model)))
    getattr(qlib, swap)(model)
    kind = Int8Linear if swap == "quantize_dynamic" else qlib.nn.Linear4bit
    assert sum(isinstance(m, kind) for m in model.modules()) == 2 * 4 + 1  # (c_attn, c_proj, c_fc, mlp.c_proj; lm_head)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    picked = getattr(qlib, swap)(_gpt2(device), filter_fn="*.attn.c_attn")
    assert isinstance(picked.transformer.h[1].attn.c_attn, kind)
    assert type(picked.transformer.h[1].attn.c_proj).__name__ == "Conv1D"


@pytest.mark.parametrize("swap", ["prepare", "prepare_qat", "gptq_quantize"])
def test_other_swaps_warn_of_the_conv1d_they_leave_float(swap):
    model = _gpt2("cpu")
    args = ([torch.randint(0, 97, (2, 11))],) if swap == "gptq_quantize" else ()
    with pytest.warns(UserWarning, match=r"8 transformers Conv1D modules .* stay float"):
        getattr(qlib, swap)(model, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (none chosen by filter_fn: no warning)
        getattr(qlib, swap)(_gpt2("cpu"), *args, filter_fn=lambda m, fqn: fqn == "lm_head")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_nan_row_gives_nan_row(device, dtype, static):
    """NaN in a row of x makes that output row NaN (as F.linear), for dynamic and static
    activations and with the packed weight, instead of the NaN silently becoming code 0;
    the other rows are unaffected."""
    K, N = 37, 11  # 37 = 32 + 5: NaN in the SIMD body (row 1) and in the tail (row 3)
    x = torch.randn(6, K, device=device).to(dtype)
    w = rand_i8(N, K, device=device, low=-127)
    s = torch.rand(N, device=device) * 0.01 + 1e-3
    b = torch.randn(N, device=device)
    act = torch.tensor(0.05, device=device) if static else None
    clean = ops.int8_linear(x, w, s, b, act)
    x[1, 3] = math.nan
    x[3, 35] = math.nan
    for y in (ops.int8_linear(x, w, s, b, act), ops.int8_linear_packed(x, ops.int8_pack_weight(w), w, s, b, act)):
        assert torch.isnan(y[[1, 3]]).all()
        keep = [0, 2, 4, 5]
        assert torch.equal(y[keep], clean[keep])
    q, scale = ops.quantize_per_token(x)
    assert torch.isnan(scale[[1, 3]]).all() and torch.isfinite(scale[[0, 2, 4, 5]]).all()


# ---------------------------------------------------------------- pre-packed weights
@pytest.mark.parametrize("M", [1, 3, 5, 33, 100])
@pytest.mark.parametrize("K,N", [(64, 48), (33, 17), (1025, 40)])
def test_int8_linear_packed_matches_unpacked(device, M, K, N):
    x = torch.randn(M, K, device=device)
    w = rand_i8(N, K, device=device, low=-127)
    s = torch.rand(N, device=device) * 0.01 + 1e-3
    b = torch.randn(N, device=device)
    packed = ops.int8_pack_weight(w)
    ref = ops.int8_linear(x, w, s, b)
    assert torch.equal(ops.int8_linear_packed(x, packed, w, s, b), ref)
    empty = w.new_empty((0,))  # no packed weight: packs per call, same result
    assert torch.equal(ops.int8_linear_packed(x, empty, w, s, b), ref)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="qlib::int8_linear_packed: w_packed"):
            ops.int8_linear_packed(x, packed[:-1], w, s, b)
    if qlib.build_info()["int8_packed_copy"]:
        # The packing alone (Int8Linear on the CPU); a CPU packing moved to CUDA is unpacked there.
        cpu_packed = ops.int8_pack_weight(w.cpu()).to(device)
        assert torch.equal(ops.int8_linear_packed(x, cpu_packed, None, s, b), ref)
        assert torch.equal(ops.int8_unpack_weight(cpu_packed, N, K), w)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="qlib::int8_unpack_weight: w_packed is empty"):
            ops.int8_linear_packed(x, packed, None, s, b)


def test_int8_packed_opcheck(device):
    w = rand_i8(24, 40, device=device)
    torch.library.opcheck(ops.int8_pack_weight, (w,))
    x, s = torch.randn(40, 40, device=device), torch.rand(24, device=device) + 0.01
    torch.library.opcheck(ops.int8_linear_packed, (x, ops.int8_pack_weight(w), w, s, None))
    a, zp = torch.tensor(0.02, device=device), torch.tensor(5, dtype=torch.int64, device=device)
    torch.library.opcheck(ops.int8_linear_packed, (x, ops.int8_pack_weight(w), w, s, None, a, zp, -8, 7))
    if qlib.build_info()["int8_packed_copy"]:
        cpu_packed = ops.int8_pack_weight(w.cpu()).to(device)
        torch.library.opcheck(ops.int8_unpack_weight, (cpu_packed, 24, 40))
        torch.library.opcheck(ops.int8_linear_packed, (x, cpu_packed, None, s, None))
        torch.library.opcheck(ops.int8_linear_packed, (x.requires_grad_(), cpu_packed, None, s, None, a, zp, -8, 7))


def test_int8linear_repacks_after_weight_edit(device):
    q = Int8Linear.from_float(nn.Linear(64, 24).to(device))
    x = torch.randn(40, 64, device=device)
    with torch.no_grad():
        q.weight[3] = -q.weight[3]
    expected = ops.int8_linear(x, q.weight, q.weight_scale, q.bias)
    assert torch.equal(q(x), expected)
    q2 = Int8Linear(64, 24, device=device)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), expected)


def test_int8linear_compiled_or_exported_after_load_state_dict_runs_the_loaded_weight():
    # The packed weight is not in the state_dict; a traced forward never repacks, so loading must.
    torch.manual_seed(0)
    x = torch.randn(64, 64)  # enough rows for the packed kernel
    src = qlib.quantize_dynamic(nn.Sequential(nn.Linear(64, 16)))
    expected = src(x)
    a = qlib.quantize_dynamic(nn.Sequential(nn.Linear(64, 16)))
    a.load_state_dict(src.state_dict())
    assert torch.equal(torch.export.export(a, (x,)).module()(x), expected)
    c = qlib.quantize_dynamic(nn.Sequential(nn.Linear(64, 16)))
    compiled = torch.compile(c, backend="eager")
    compiled(x)
    c.load_state_dict(src.state_dict())
    assert torch.equal(compiled(x), expected)


def test_int8linear_weight_read_inside_a_compiled_function():
    """`weight` where only the packing is kept (CPU) read under torch.compile(fullgraph=True) and
    torch.export: the unpack is an op in the graph (tracing the eager caching raised on
    is_inference()), and the module keeps only its packing."""
    torch.manual_seed(0)
    m = Int8Linear.from_float(nn.Linear(40, 24))
    x = torch.randn(5, 40)
    with_weight = lambda t: m(t) + m.weight.float().abs().sum(1)
    compiled = torch.compile(with_weight, fullgraph=True, backend="aot_eager")
    held = m._buffers["weight"]
    got = compiled(x)
    assert m._buffers["weight"] is held  # (the traced read caches nothing in the module)
    assert torch.equal(got, with_weight(x))

    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = Int8Linear.from_float(nn.Linear(40, 24))

        def forward(self, t):
            return self.lin(t) * self.lin.weight.float().mean()

    r = ReadsWeight()
    assert torch.equal(torch.export.export(r, (x,)).module()(x), r(x))


# ---------------------------------------------------------------- CUDA GEMM choice
def test_int8_cuda_gemm_choice():
    """The CUDA GEMM is picked by name, reported by build_info, and bad names raise."""
    built = qlib.int8_cuda_gemms()
    info = qlib.build_info()
    if not info["cuda"]:
        assert built == [] and info["int8_cuda_gemm"].startswith("none")
        with pytest.raises(RuntimeError, match="qlib.set_int8_cuda_gemm: this build of qlib has no 'cublaslt'"):
            qlib.set_int8_cuda_gemm("cublaslt")
        with pytest.raises(RuntimeError, match="qlib.set_int8_cuda_gemm: unknown GEMM 'nope'"):
            qlib.set_int8_cuda_gemm("nope")
        qlib.set_int8_cuda_gemm("auto")  # (the reset works in any build)
        assert qlib.build_info()["int8_cuda_gemm"].startswith("none")
        return
    # "auto": the fused Hopper GEMM on compute capability 9.0 when built, else cuBLASLt.
    auto = ("auto (cutlass-sm90 on compute capability 9.0, else cublaslt)" if "cutlass-sm90" in built
            else "cublaslt")
    assert built[0] == "cublaslt" and info["int8_cuda_gemm"] in built + [auto]
    try:
        for name in built:
            qlib.set_int8_cuda_gemm(name)
            assert qlib.build_info()["int8_cuda_gemm"] == name
        qlib.set_int8_cuda_gemm("auto")
        assert qlib.build_info()["int8_cuda_gemm"] == auto
        with pytest.raises(RuntimeError, match="qlib.set_int8_cuda_gemm: unknown GEMM 'nope'"):
            qlib.set_int8_cuda_gemm("nope")
    finally:
        qlib.set_int8_cuda_gemm("auto")


def test_int8_cuda_gemm_env_var():
    """QLIB_INT8_CUDA_GEMM picks the GEMM; an unusable value names the variable."""
    import subprocess
    import sys

    code = "import qlib; print(qlib.build_info()['int8_cuda_gemm'])"
    env = {k: v for k, v in __import__("os").environ.items()}
    env["QLIB_INT8_CUDA_GEMM"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if qlib.build_info()["cuda"]:
        assert "QLIB_INT8_CUDA_GEMM=bogus" in out.stdout and "unknown GEMM 'bogus'" in out.stdout
        env["QLIB_INT8_CUDA_GEMM"] = qlib.int8_cuda_gemms()[-1]
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == qlib.int8_cuda_gemms()[-1], out.stderr


def _sm90_gemm_runs():
    return (torch.cuda.is_available() and "cutlass-sm90" in qlib.int8_cuda_gemms()
            and torch.cuda.get_device_capability() == (9, 0))


@pytest.mark.skipif(not _sm90_gemm_runs(), reason="needs the cutlass-sm90 build and a compute capability 9.0 GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("M,K,N", [(5, 16, 8), (17, 64, 24), (64, 4096, 512), (65, 768, 200),
                                   (300, 1024, 1000), (1024, 4096, 4096), (129, 48, 8)])
def test_int8_linear_sm90_gemm_matches_cublaslt(dtype, static, M, K, N):
    """The fused Hopper GEMM gives the cuBLASLt path's bits (same float epilogue), for both tile
    sizes (M <= 64 and above), odd N, with and without bias, and a NaN row stays NaN."""
    x = torch.randn(M, K, device="cuda").to(dtype)
    x[M // 2, K // 3] = math.nan
    w = rand_i8(N, K, device="cuda", low=-127)
    s = torch.rand(N, device="cuda") * 0.01 + 1e-3
    b = torch.randn(N, device="cuda")
    act = torch.tensor(0.03, device="cuda") if static else None
    got = {}
    try:
        for gemm in ("cublaslt", "cutlass-sm90", "auto"):
            qlib.set_int8_cuda_gemm(gemm)
            got[gemm] = [ops.int8_linear(x, w, s, bias, act) for bias in (b, None)]
    finally:
        qlib.set_int8_cuda_gemm("auto")
    ref = got["cublaslt"]
    for g, a in zip(got["cutlass-sm90"], got["auto"]):
        assert torch.equal(g.nan_to_num(0.0), a.nan_to_num(0.0))  # "auto" (the fused GEMM on this GPU) too
    got = got["cutlass-sm90"]
    for g, r in zip(got, ref):
        assert g.dtype == dtype and g.shape == (M, N)
        assert torch.isnan(g[M // 2]).all()
        assert torch.equal(g.nan_to_num(0.0), r.nan_to_num(0.0))
    keep = torch.arange(M, device="cuda") != M // 2
    ref64 = ref_linear(x[keep], w, s, b, act)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got[0][keep].double(), ref64, rtol=tol, atol=tol * ref64.abs().max().item())


@pytest.mark.skipif(not _sm90_gemm_runs(), reason="needs the cutlass-sm90 build and a compute capability 9.0 GPU")
def test_int8_linear_sm90_gemm_fallbacks():
    """Calls the fused GEMM cannot take (K % 16 != 0, a static zero point, a strided or an
    expanded weight) run on cuBLASLt with the same result; Int8Linear and torch.compile use
    it too, and so do unaligned views of the scales and bias (copied)."""
    x = torch.randn(2, 40, 33, device="cuda", dtype=torch.bfloat16)
    w = rand_i8(24, 33, device="cuda")
    s = torch.rand(24, device="cuda") * 0.01 + 1e-3
    act, zp = torch.tensor(0.02, device="cuda"), torch.tensor(3, device="cuda")
    x48 = torch.randn(70, 48, device="cuda")
    w48 = rand_i8(48, 96, device="cuda")[:, ::2]  # row stride 96, not K-contiguous
    lin = Int8Linear.from_float(nn.Linear(64, 40).cuda())
    x64 = torch.randn(3, 50, 64, device="cuda")
    # Scales and bias that start 4 bytes off a 16-byte boundary (the fused GEMM copies them).
    w64, sb = rand_i8(40, 64, device="cuda"), torch.rand(2, 41, device="cuda") * 0.01 + 1e-3
    cases = [lambda: ops.int8_linear(x, w, s, None), lambda: ops.int8_linear(x, w, s, None, act, zp, -128, 127),
             lambda: ops.int8_linear(x48, w48, s[:48].repeat(2)[:48], None), lambda: lin(x64),
             lambda: torch.compile(lin, fullgraph=True)(x64),
             lambda: ops.int8_linear(x64, w64, sb[0, 1:], sb[1, 1:]),
             lambda: ops.int8_linear(x64, w64[:1].expand(40, 64), sb[0, :40], None)]  # row stride 0
    try:
        qlib.set_int8_cuda_gemm("cublaslt")
        ref = [f() for f in cases]
        qlib.set_int8_cuda_gemm("cutlass-sm90")
        got = [f() for f in cases]
    finally:
        qlib.set_int8_cuda_gemm("auto")
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


@pytest.mark.skipif(not (torch.cuda.is_available() and "cutlass-sm90" in qlib.int8_cuda_gemms()
                         and torch.cuda.get_device_capability() != (9, 0)),
                    reason="needs the cutlass-sm90 build and a GPU other than compute capability 9.0")
def test_int8_linear_sm90_gemm_off_hopper():
    """Off Hopper, "auto" runs cuBLASLt (same bits as naming it) and the fused GEMM by name raises."""
    x = torch.randn(40, 64, device="cuda")
    w = rand_i8(24, 64, device="cuda")
    s = torch.rand(24, device="cuda") * 0.01 + 1e-3
    try:
        qlib.set_int8_cuda_gemm("cublaslt")
        ref = ops.int8_linear(x, w, s, None)
        qlib.set_int8_cuda_gemm("auto")
        assert torch.equal(ops.int8_linear(x, w, s, None), ref)
        qlib.set_int8_cuda_gemm("cutlass-sm90")
        with pytest.raises(RuntimeError, match="runs only on compute capability 9.0"):
            ops.int8_linear(x, w, s, None)
    finally:
        qlib.set_int8_cuda_gemm("auto")


@pytest.mark.parametrize("convert", [qlib.quantize_dynamic, lambda m: qlib.quantize_weight_only(m, "nf4", 8)],
                         ids=["int8", "nf4"])
def test_linear_modules_trace_a_dynamic_batch(convert):
    """Int8Linear and Linear4bit with gradients on (their C++ autograd) keep a traced batch
    symbolic: torch.export takes a dynamic batch, torch.compile(dynamic=True) one graph."""
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)))
    batch = torch.export.Dim("batch", min=2, max=1024)
    x = torch.randn(9, 16, requires_grad=True)
    program = torch.export.export(model, (torch.randn(4, 16, requires_grad=True),), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(program.module()(x), model(x))
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    for n in (3, 5, 11):
        xs = torch.randn(n, 16, requires_grad=True)
        compiled(xs).sum().backward()
        g = xs.grad
        xs.grad = None
        model(xs).sum().backward()
        torch.testing.assert_close(g, xs.grad)
    assert counts["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- torch.func and swapped tensors
def test_int8linear_under_functional_call_uses_the_given_weight():
    """functional_call with new weights: each call packs the weight it is given (a new tensor
    may reuse a freed one's memory at version 0: the packed copy of the old one was used)."""
    m = Int8Linear.from_float(nn.Linear(256, 128))
    x = torch.randn(40, 256)
    for seed in range(6):
        w = torch.randint(-127, 128, (128, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
        got = torch.func.functional_call(m, {"weight": w}, (x,))
        assert torch.equal(got, qlib.int8_linear(x, w, m.weight_scale, m.bias))
        del w, got
    assert torch.equal(m(x), qlib.int8_linear(x, m.weight, m.weight_scale, m.bias))


def test_int8linear_static_functional_call_and_vmap():
    """A static state given through functional_call is read (its code range too); vmap over
    stacked Int8Linears runs (no packing of a batch of weights)."""
    lin = nn.Linear(64, 48)
    a = Int8Linear.from_float(lin, activation="static", act_scale=0.05)
    b = Int8Linear.from_float(lin, activation="static", act_scale=0.05)
    a.act_zero_point.fill_(5)
    a.act_quant_range.copy_(torch.tensor([-128, 127]))
    Int8Linear._sync_act_range(a)
    x = torch.randn(7, 64)
    assert torch.equal(torch.func.functional_call(b, dict(a.state_dict()), (x,)), a(x))
    assert torch.equal(b(x), Int8Linear.from_float(lin, "static", 0.05)(x))  # its own state again
    mods = [Int8Linear.from_float(nn.Linear(16, 8)) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(mods)
    xs = torch.randn(3, 5, 16)
    with torch.no_grad():
        ys = torch.vmap(lambda p, bf, xi: torch.func.functional_call(mods[0], (p, bf), (xi,)))(params, buffers, xs)
    for i, m in enumerate(mods):
        torch.testing.assert_close(ys[i], m(xs[i]), rtol=0, atol=0)


@pytest.mark.parametrize("layer", ["int8", "int8 static", "4bit"])
def test_per_sample_gradients_through_a_frozen_quantized_layer(layer):
    """torch.func through the frozen int8 / 4-bit Linears (DP-SGD of an adapter before them, as
    Opacus' functorch mode): grad equals autograd's bit for bit, and vmap of grad a loop of it
    (a batched GEMM rounds as its own kernel: float tolerance)."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    frozen = {"int8": lambda: Int8Linear.from_float(lin),
              "int8 static": lambda: Int8Linear.from_float(lin, activation="static", act_scale=0.05),
              "4bit": lambda: qlib.nn.Linear4bit.from_float(lin, block_size=8)}[layer]()
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), frozen)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    x, y = torch.randn(5, 12), torch.randint(0, 10, (5,))
    loss = lambda p, xb, yb: nn.functional.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb)
    got = torch.func.grad(loss)(params, x, y)
    model.zero_grad()
    loss(dict(model.named_parameters()), x, y).backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(got[k], p.grad), k
    per_sample = torch.func.vmap(torch.func.grad(lambda p, xi, yi: loss(p, xi[None], yi[None])), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        one = torch.func.grad(loss)(params, x[i:i + 1], y[i:i + 1])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], one[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vmap_rules_of_the_frozen_linears_equal_a_loop(device, dtype):
    """The frozen Linears' batching rule (csrc/vmap_rules.cpp). x alone batched: one call, the
    batch one more leading dim of x (per-token or static activation scales: the same codes); it
    equals a loop over the samples (the 4-bit kernel's float sums may round per row count:
    float tolerance). A batched bias, weight or activation scale: a call per sample. Batch dims
    anywhere, 1-D samples, nested vmaps, an empty batch, and errors naming the op and the batch."""
    torch.manual_seed(0)
    B, K, N = 5, 40, 24
    lin = nn.Linear(K, N).to(device)
    w_scale = lin.weight.detach().abs().amax(1) / 127
    w8 = torch.round(lin.weight.detach() / w_scale[:, None]).to(torch.int8)
    q4 = qlib.nn.Linear4bit.from_float(lin, block_size=8)
    act_scale, act_zp = torch.tensor(0.03, device=device), torch.tensor(2, dtype=torch.int32, device=device)
    linears = {  # (x, bias, int8 weight) -> y
        "int8": lambda x, b, w: ops.int8_linear(x, w, w_scale, b),
        "int8 static": lambda x, b, w: ops.int8_linear(x, w, w_scale, b, act_scale, act_zp, -128, 127),
        "int8 packed": lambda x, b, w: ops.int8_linear_packed(x, ops.int8_pack_weight(w), w, w_scale, b),
        "4bit": lambda x, b, w: ops.linear_4bit(x, q4.packed, q4.absmax, q4.codebook, 8, b),
    }
    xs = torch.randn(B, 3, K, device=device).to(dtype)
    biases = torch.randn(B, N, device=device)
    w8s = torch.stack([w8, -w8, w8.flip(1), w8, w8.flip(0)])

    def check(name, got, want):
        if name == "4bit" and dtype != torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        elif name == "4bit":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want), name

    for name, f in linears.items():
        loop = lambda pick: torch.stack([f(*pick(i)) for i in range(B)])
        got = torch.vmap(f, in_dims=(0, None, None))(xs, lin.bias, w8)
        check(name, got, loop(lambda i: (xs[i], lin.bias, w8)))
        got = torch.vmap(f, in_dims=(1, None, None))(xs.transpose(0, 1), None, w8)  # (batch dim 1)
        check(name, got, loop(lambda i: (xs[i], None, w8)))
        got = torch.vmap(f, in_dims=(0, None, None))(xs[:, 0], lin.bias, w8)  # (1-D samples)
        check(name, got, loop(lambda i: (xs[i, 0], lin.bias, w8)))
        got = torch.vmap(f, in_dims=(0, 0, None))(xs, biases, w8)  # (a call per sample)
        assert torch.equal(got, loop(lambda i: (xs[i], biases[i], w8))), name
        got = torch.vmap(f, in_dims=(None, 0, None))(xs[0], biases, w8)
        assert torch.equal(got, loop(lambda i: (xs[0], biases[i], w8))), name
        if name != "4bit":
            got = torch.vmap(f, in_dims=(0, None, 0))(xs, lin.bias, w8s)
            assert torch.equal(got, loop(lambda i: (xs[i], lin.bias, w8s[i]))), name
        # Nested: x batched by the inner vmap, the bias by the outer one.
        got = torch.vmap(torch.vmap(f, in_dims=(0, None, None)), in_dims=(None, 0, None))(xs, biases[:2], w8)
        want = torch.stack([loop(lambda i: (xs[i], biases[j], w8)) for j in range(2)])
        check(name, got, want)
        empty = torch.vmap(f, in_dims=(0, None, None))(xs[:0], lin.bias, w8)
        assert empty.shape == (0, 3, N) and empty.dtype == dtype
        with pytest.raises(RuntimeError, match=r"qlib::\w+: under torch.vmap, an empty batch"):
            torch.vmap(f, in_dims=(0, 0, None))(xs[:0], biases[:0], w8)
        with pytest.raises(RuntimeError, match=r"qlib::\w+: .*37.*\(under torch.vmap: the shapes"):
            torch.vmap(f, in_dims=(0, None, None))(xs[..., 3:], None, w8)
    # Stacked dynamic Int8Linears (stack_module_state: batched weights) equal each module.
    mods = [Int8Linear.from_float(nn.Linear(K, N)).to(device) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(mods)
    x = torch.randn(4, K, device=device).to(dtype)
    got = torch.vmap(lambda p, b: torch.func.functional_call(mods[0], (p, b), (x,)))(params, buffers)
    assert torch.equal(got, torch.stack([m(x) for m in mods]))


def test_int8linear_static_stacked_code_range_under_vmap_names_the_buffer():
    """Stacked static Int8Linears (stack_module_state): the code range, read in Python, is batched;
    the error names it (it was "Cannot access data pointer of Tensor that doesn't have storage")."""
    mods = [Int8Linear.from_float(nn.Linear(16, 8), activation="static", act_scale=0.05) for _ in range(2)]
    params, buffers = torch.func.stack_module_state(mods)
    with pytest.raises(RuntimeError, match="Int8Linear: its buffer 'act_quant_range' is a torch.func transform's"):
        torch.vmap(lambda b, x: torch.func.functional_call(mods[0], b, (x,)), in_dims=(0, None))(buffers, torch.randn(5, 16))


def test_int8linear_bias_as_a_parameter():
    """A bias made a Parameter (to train it, or parametrized) is used and gets its gradient."""
    m = Int8Linear.from_float(nn.Linear(32, 8))
    x = torch.randn(4, 32)
    ref = m(x)
    m.bias = nn.Parameter(m.bias.clone())
    y = m(x)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert torch.equal(m.bias.grad, torch.full((8,), 4.0))


def test_int8linear_refuses_a_float_weight_and_stays_whole():
    """Weight tying after the swap (lm_head.weight = embed.weight, as transformers' tie_weights
    does) assigned a Parameter: nn.Module dropped the int8 weight buffer, then failed with
    "attribute 'weight' already exists", and where the module keeps its plain weight
    (QLIB_INT8_PACKED_COPY=0, amx, CUDA) every later forward and state_dict raised KeyError. It is
    refused first, naming the module, and the module runs as before."""
    m = Int8Linear.from_float(nn.Linear(32, 8))
    x = torch.randn(4, 32)
    ref, keys = m(x), list(m.state_dict())
    for value in (nn.Parameter(torch.randn(8, 32)), torch.randn(8, 32),
                  nn.Parameter(m.weight.clone(), requires_grad=False)):
        with pytest.raises(TypeError, match=r"Int8Linear \(in_features=32.*weight holds int8 codes"):
            m.weight = value
        assert torch.equal(m(x), ref) and list(m.state_dict()) == keys and not list(m.parameters())
    m.weight = m.weight.clone()  # int8 codes: still taken
    assert torch.equal(m(x), ref)


def test_weight_loaded_into_an_exported_graph_is_not_run_from_the_old_packing():
    """Where Int8Linear keeps its weight packed (CPU kernels other than amx), an exported graph
    holds the packing, not the weight: loading a state into it is refused by name. Elsewhere
    the packing is not in the state_dict, so loading a state into an exported graph (or swapping
    buffers under a compiled module) leaves the old packing: the op compares w's fingerprint
    with the packed one and runs unpacked (with a warning), not on stale codes."""
    torch.manual_seed(0)
    m, m2 = (qlib.quantize_dynamic(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))) for _ in range(2))
    x = torch.randn(40, 64)
    gm = torch.export.export(m, (x,)).module()
    assert torch.equal(gm(x), m(x))
    if qlib.build_info()["int8_packed_copy"]:
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "0.weight", "2.weight"'):
            gm.load_state_dict(m2.state_dict())
    else:
        gm.load_state_dict(m2.state_dict())
        assert torch.equal(gm(x), m2(x))
    w = m[0].weight
    packed = ops.int8_pack_weight(w)
    with torch.no_grad():
        w2 = w.clone()
        w2[0, 0] = -w2[0, 0] if w2[0, 0] != 0 else 1  # one value: sampled (the first)
    s = m[0].weight_scale
    assert torch.equal(ops.int8_linear_packed(x, packed, w2, s, None), ops.int8_linear(x, w2, s, None))


def test_int8linear_pickled_before_stop_30_runs():
    """A whole model pickled before the forward's mirrors of buffer objects existed still runs."""
    import pickle
    m = Int8Linear.from_float(nn.Linear(16, 8), activation="static", act_scale=0.1)
    x = torch.randn(3, 16)
    ref = m(x)
    for name in ("_act_range_of", "_pack_state"):
        m.__dict__.pop(name, None)
    m._packed_version, m._packed_ref = None, None  # (stop 30-31's mirrors)
    old = pickle.loads(pickle.dumps(m))
    old.__dict__.pop("_pack_state", None)
    assert torch.equal(old(x), ref)


def test_int8linear_act_quant_range_edited_in_place_is_seen():
    """An in-place edit of act_quant_range (as of the weight) is read by the next eager forward:
    the forward, extra_repr and a reload of the state_dict agree."""
    torch.manual_seed(0)
    m = Int8Linear.from_float(nn.Linear(16, 4), "static", 0.05)
    x = torch.randn(3, 16)
    m(x)
    m.act_quant_range.copy_(torch.tensor([-8, 7]))
    fresh = Int8Linear(16, 4, True, "static")
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(m(x), fresh(x))
    assert "[-8, 7]" in repr(m)
    m.act_quant_range.copy_(torch.tensor([10, 20]))  # zero point 0 now outside: raises, not silent
    with pytest.raises(RuntimeError, match="lies outside act_quant_range"):
        m(x)
