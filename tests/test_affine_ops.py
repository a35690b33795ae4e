"""quantize / dequantize / choose_qparams, the seeds' worked examples, opcheck,
torch.compile / torch.export, and bad input."""
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch

import qlib

ops = torch.ops.qlib
EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize(
    "dtype,qmin,qmax", [(torch.int8, -128, 127), (torch.uint8, 0, 255), (torch.int16, -32768, 32767), (torch.int32, -8, 7)]
)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sshape", [(37, 1), (37, 11), (1, 1)])  # per-channel, per-element steps, per-tensor
def test_quantize_dequantize_equal_fake_quant(device, dtype, qmin, qmax, xdtype, sshape):
    x = (torch.randn(37, 11, device=device) * 3).to(xdtype)
    scale = torch.rand(sshape, device=device) * 0.05 + 0.01
    zp = torch.randint(qmin, qmax + 1, sshape, dtype=torch.int32, device=device)
    q = ops.quantize(x, scale, zp, qmin, qmax, dtype)
    assert q.dtype == dtype and q.shape == x.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    xf = x.float()
    ref = torch.clamp(torch.round(xf * (1.0 / scale)) + zp, qmin, qmax)
    assert torch.equal(q.long(), ref.long())
    back = ops.dequantize(q, scale, zp, xdtype)
    assert back.dtype == xdtype
    assert torch.equal(back, ops.fake_quant(x, scale, zp, qmin, qmax))


@pytest.mark.parametrize(
    "dtype,qmin,qmax",
    [(torch.int8, -128, 127), (torch.uint8, 0, 255), (torch.int16, -32768, 32767), (torch.int32, -(2**31), 2**31 - 1)],
)
@pytest.mark.parametrize("sshape", [(6, 1), (1, 1), (1, 131)])
def test_quantize_simd_body_full_range(device, dtype, qmin, qmax, sshape):
    """Runs long enough for the SIMD body (and its tail), every code dtype over its
    whole range, with NaN, +-Inf and values past both edges inside the body."""
    span = float(qmax) - float(qmin)
    if span >= 2**16:  # int32: the 16-bit limit of the ops
        qmin, qmax = -(2**15), 2**15 - 1
        span = float(qmax - qmin)
    x = torch.randn(6, 131, device=device) * span / 8
    x[0, 40], x[1, 70], x[2, 33] = float("nan"), float("inf"), -float("inf")
    x[3, 50], x[4, 90] = 1e30, -1e30
    scale = torch.rand(sshape, device=device) + 0.5
    zp = torch.randint(qmin, qmax + 1, sshape, dtype=torch.int32, device=device)
    q = ops.quantize(x, scale, zp, qmin, qmax, dtype)
    ref = torch.clamp(torch.round(x * (1.0 / scale)) + zp, qmin, qmax)  # float32, as the op
    ref = torch.where(x.isnan(), zp.float().expand_as(ref), ref)
    assert torch.equal(q.long(), ref.long())
    back = ops.dequantize(q, scale, zp, torch.float32)
    ok = ~x.isnan()
    assert torch.equal(back[ok], ops.fake_quant(x, scale, zp, qmin, qmax)[ok])
    assert (back[~ok] == 0).all()


def test_quantize_matches_torch_quantize_per_tensor(device):
    x = torch.randn(1025, device=device) * 2
    q = qlib.quantize(x, 0.02, 3)
    ref = torch.quantize_per_tensor(x.cpu(), 0.02, 3, torch.qint8).int_repr()
    # torch's quantizer may use x / scale instead of x * (1 / scale): allow an
    # off-by-one on ties only.
    assert (q.cpu().int() - ref.int()).abs().max() <= 1
    assert (q.cpu() == ref).float().mean() > 0.99


def test_quantize_nan_inf(device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.26], device=device)
    q = qlib.quantize(x, 0.1, 5)
    assert q.tolist() == [5, 127, -128, 8]


def test_dequantize_int32_codes_past_2_24_match_torch(device):
    # float32 cannot hold every int32 code: the zero point is subtracted exactly first, as torch.
    q = torch.tensor([16777217, 16777219, -16777217, 2**31 - 1, -2**31, 5, 123456789], dtype=torch.int32)
    for zp in (1, -3, 0, 2**24 - 1):
        for scale in (1.0, 0.37):
            got = ops.dequantize(q.to(device), torch.tensor([scale], device=device),
                                 torch.tensor([zp], device=device), torch.float32).cpu()
            exact = (q.long() - zp).float() * scale
            assert torch.equal(got, exact), (zp, scale)
            # torch's int32 subtraction wraps where q - zp leaves int32; elsewhere the same bits.
            fits = (q.long() - zp).abs() < 2**31
            ref = torch._make_per_tensor_quantized_tensor(q, scale, zp).dequantize()
            assert torch.equal(got[fits], ref[fits]), (zp, scale)
    # Per-channel, long enough for the CPU's vector body and tail.
    # Vectors of small codes (exact in float32) and vectors holding a large one.
    qc = torch.randint(-2**20, 2**20, (3, 37), dtype=torch.int32)
    qc[:, 3::16] = torch.randint(-2**31 + 16, 2**31 - 16, (3, 3), dtype=torch.int32)
    sc, zc = torch.tensor([0.5, 1.0, 3.0]), torch.tensor([7, -11, 0])
    got = ops.dequantize(qc.to(device), sc.view(3, 1).to(device), zc.view(3, 1).to(device), torch.float32)
    assert torch.equal(got.cpu(), (qc.long() - zc[:, None]).float() * sc[:, None])


@pytest.mark.parametrize("zdtype,qmin,qmax", [(torch.uint8, -128, 127), (torch.int8, 0, 255),
                                               (torch.int16, 0, 65535), (torch.int8, -8, 7)])
def test_lsq_fake_quant_integer_zero_points_of_any_dtype(device, zdtype, qmin, qmax):
    # An integer zero point is not clamped in its own dtype (uint8 wrapped -128 to 128).
    x = torch.randn(5, 33, device=device) * 3
    s = torch.tensor([0.05], device=device)
    z = torch.tensor([5], dtype=zdtype, device=device)
    y = ops.lsq_fake_quant(x, s, z, qmin, qmax, None, 1e-6)
    assert torch.equal(y, ops.fake_quant(x, s, z.int(), qmin, qmax))
    bad = torch.tensor([100], dtype=zdtype, device=device)
    with pytest.raises(RuntimeError, match=r"zero_point must lie in \[quant_min, quant_max\] = \[-8, 7\], got 100"):
        qlib.set_cuda_value_checks(True)
        try:
            ops.lsq_fake_quant(x, s, bad, -8, 7, None, 1e-6)
        finally:
            qlib.set_cuda_value_checks(False)


@pytest.mark.parametrize("rank", [9, 12])
def test_many_dims_match_torch(device, rank):
    # Dims of size 1 drop and neighbours merge: only the merged segments are limited.
    shape = [2, 1, 3, 2, 1, 2, 3, 2, 2, 1, 2, 3][:rank]
    x = torch.randn(shape, device=device) * 2
    ref = torch.fake_quantize_per_tensor_affine(x, 0.05, 2, -128, 127)
    assert torch.equal(qlib.fake_quant(x, 0.05, 2), ref)
    for axis in (0, 2, rank - 1):
        s = torch.rand(shape[axis], device=device) * 0.1 + 0.02
        z = torch.randint(-5, 5, (shape[axis],), device=device, dtype=torch.int32)
        view = [1] * rank
        view[axis] = shape[axis]
        got = ops.fake_quant(x.transpose(0, 1), s.view(view).transpose(0, 1), z.view(view).transpose(0, 1), -128, 127)
        assert torch.equal(got.transpose(0, 1), torch.fake_quantize_per_channel_affine(x, s, z, axis, -128, 127))
    # Blocks on every other dim: more alternating runs than a layout holds.
    x = torch.randn([2] * 17, device=device)
    s = torch.ones([2, 1] * 8 + [2], device=device)
    with pytest.raises(RuntimeError, match=r"in more than 16 alternating runs of blocked and unblocked dims"):
        ops.fake_quant(x, s, torch.zeros_like(s), -128, 127)


def test_python_wrappers_name_an_out_of_range_zero_point():
    with pytest.raises(RuntimeError, match=r"qlib::fake_quant: zero_point must lie in \[quant_min, quant_max\] = \[-128, 127\], got 2147483648 at flat index 0"):
        qlib.fake_quant(torch.randn(4), 0.1, 2**31)


def test_python_wrappers_refuse_what_is_not_an_int_zero_point():
    """A float zero point was truncated (1.7 -> 1) where the op rounds a floating tensor; other
    bad Python qparams raised errors that named neither qlib nor the argument."""
    x = torch.randn(6)
    for call in (lambda zp: qlib.fake_quant(x, 0.1, zp), lambda zp: qlib.quantize(x, 0.1, zp),
                 lambda zp: qlib.dequantize(torch.zeros(3, dtype=torch.int8), 0.1, zp)):
        for zp in (1.7, 2.0, math.nan, "3"):
            with pytest.raises(TypeError, match=r"qlib.(fake_quant|quantize|dequantize): zero_point must be an int, a Tensor or None"):
                call(zp)
        with pytest.raises(ValueError, match=r"qlib.(fake_quant|quantize|dequantize): zero_point 1180591620717411303424 is out of range"):
            call(2**70)
    for scale in (None, [0.1], True):
        with pytest.raises(TypeError, match=r"qlib.quantize: scale must be a Tensor or a float"):
            qlib.quantize(x, scale)
    with pytest.raises(TypeError, match=r"qlib.fake_quant: x must be a Tensor, got list"):
        qlib.fake_quant([1.0, 2.0], 0.1)
    assert torch.equal(qlib.quantize(x, np.float32(0.1), np.int64(3)), qlib.quantize(x, 0.1, 3))


def test_fake_quant_backward_zero_point_grad_needs_a_floating_zero_point(device):
    x, g = torch.randn(9, device=device), torch.randn(9, device=device)
    s = torch.tensor([0.1], device=device)
    with pytest.raises(RuntimeError, match=r"qlib::fake_quant_backward: zero_point_grad needs a floating zero_point \(LSQ\+\), got Int"):
        ops.fake_quant_backward(g, x, s, torch.zeros(1, dtype=torch.int32, device=device), -8, 7, True, True)


def test_python_wrappers_take_an_int_zero_point_with_any_scale(device):
    """An int zero point is one value for every block (as None is zeros), per-channel too."""
    x = torch.randn(5, 9, device=device)
    s = torch.rand(5, 1, device=device) * 0.05 + 0.01
    z = torch.full((5, 1), 3, dtype=torch.int32, device=device)
    assert torch.equal(qlib.fake_quant(x, s, 3), qlib.fake_quant(x, s, z))
    q = qlib.quantize(x, s, 3, dtype=torch.int8)
    assert torch.equal(q, qlib.quantize(x, s, z, dtype=torch.int8))
    assert torch.equal(qlib.dequantize(q, s, 3), qlib.dequantize(q, s, z))
    expected = torch.fake_quantize_per_channel_affine(x, s.view(5), z.view(5), 0, -128, 127)
    assert torch.equal(qlib.fake_quant(x, s, 3), expected)


# ---------------------------------------------------------------- choose_qparams
def ao_qparams(min_val, max_val, qmin, qmax, symmetric, dtype):
    ob = torch.ao.quantization.observer.MinMaxObserver(
        dtype=dtype,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        quant_min=qmin,
        quant_max=qmax,
    )
    return ob._calculate_qparams(min_val, max_val)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype,qmin,qmax", [(torch.qint8, -128, 127), (torch.quint8, 0, 255), (torch.qint8, -8, 7)])
def test_choose_qparams_matches_torch_ao(device, symmetric, dtype, qmin, qmax):
    for _ in range(20):
        lo = -torch.rand(1) * 5
        hi = torch.rand(1) * 3
        if torch.rand(1) < 0.3:
            hi = lo + torch.rand(1)  # all-negative range
        s_ao, z_ao = ao_qparams(lo, hi, qmin, qmax, symmetric, dtype)
        if symmetric and qmin == 0:
            z_ao = torch.full_like(z_ao, (qmin + qmax + 1) // 2)  # torch.ao: 128 for uint8
        s, z = ops.choose_qparams(lo.to(device), hi.to(device), qmin, qmax, symmetric, EPS)
        assert torch.equal(s.cpu(), s_ao.float()), (lo, hi)
        assert torch.equal(z.cpu().long(), z_ao.long()), (lo, hi)


def test_choose_qparams_zero_exact_and_constant(device):
    lo = torch.tensor([-1.3, 0.0, 2.0, -4.0, 0.0], device=device)
    hi = torch.tensor([2.7, 0.0, 2.0, -4.0, 1e-12], device=device)
    for sym in (True, False):
        s, z = qlib.choose_qparams(lo, hi, -128, 127, sym)
        assert (s > 0).all() and torch.isfinite(s).all()
        zero = qlib.fake_quant(torch.zeros_like(lo), s, z)
        assert torch.equal(zero, torch.zeros_like(lo))
        # The observed range (widened to 0) is covered to within half a step.
        for v in (lo, hi):
            assert ((qlib.fake_quant(v, s, z) - v).abs() <= s / 2 + 1e-6).all()


def test_choose_qparams_checks_min_max_as_float32(device):
    """float64 min / max are checked as the float32 values the math uses, on every device."""
    lo = torch.tensor([1 + 1e-12, -2.0], dtype=torch.float64, device=device)
    hi = torch.tensor([1.0, 3.0], dtype=torch.float64, device=device)  # min > max, equal in float32
    s, z = qlib.choose_qparams(lo, hi, -128, 127, False)
    s_ref, z_ref = qlib.choose_qparams(lo.float().cpu(), hi.float().cpu(), -128, 127, False)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(z.cpu(), z_ref)
    with pytest.raises(RuntimeError, match="need finite min <= max"):
        qlib.choose_qparams(torch.tensor([-1e39], dtype=torch.float64, device=device),
                            torch.tensor([1.0], dtype=torch.float64, device=device), -128, 127, False)


# ---------------------------------------------------------------- the seeds' examples
SEED_MATRIX = [[13.5, 14.3, 8.5], [-4.7, -3.2, -6.4], [-0.4, 1.3, 3.73]]


def test_seed_fp32_to_int8_36_bytes_become_9():
    w = torch.tensor(SEED_MATRIX)
    q = qlib.quantize(w, 1.0)  # scale 1: plain rounding, half to even
    assert w.numel() * w.element_size() == 36
    assert q.numel() * q.element_size() == 9
    # The slides show 13 for 13.5; half to even gives 14 (as torch.round).
    assert q.tolist() == [[14, 14, 8], [-5, -3, -6], [0, 1, 4]]
    err = (w - qlib.dequantize(q, 1.0)).abs()
    assert err.max() <= 0.5


def test_seed_absmax_quantization():
    x = torch.tensor(SEED_MATRIX)
    amax = x.abs().max()
    # The seeds' absmax_quantize: round(127 / amax * x).
    seeds_q = (127 / amax * x).round()
    scale = amax / 127
    q = qlib.quantize(x, scale.reshape(1), None, -127, 127)
    assert torch.equal(q.float(), seeds_q)
    assert (qlib.dequantize(q, scale.reshape(1)) - x).abs().max() <= scale / 2 + 1e-6
    # The seeds' X_dequant = X_quant / (127 / amax), to float rounding.
    torch.testing.assert_close(qlib.dequantize(q, scale.reshape(1)), seeds_q / (127 / amax), rtol=1e-6, atol=1e-6)


def test_seed_zero_point_quantization():
    x = torch.tensor(SEED_MATRIX)
    # The seeds' zeropoint_quantize: scale = range / 255 and a zero point that
    # maps min to -128 (their sign convention is the negative of ours).
    scale, zp = qlib.choose_qparams(x.min().reshape(1), x.max().reshape(1), -128, 127, symmetric=False)
    seed_scale = (x.max() - x.min()) / 255
    assert torch.allclose(scale, seed_scale.reshape(1))
    seed_zp = (x.min() / seed_scale).round() + 128
    assert int(seed_zp) == 49 and int(zp) == -int(seed_zp)
    q = qlib.quantize(x, scale, zp)
    assert q.min() == -128 and q.max() <= 127
    # The seeds' codes, Int(r / S) - Z: r_min -> -128 (no value of this matrix sits on a tie).
    assert torch.equal(q.float(), (x / seed_scale).round() - seed_zp)
    assert (qlib.dequantize(q, scale, zp) - x).abs().max() <= scale / 2 + 1e-6


# ---------------------------------------------------------------- opcheck, compile, export
def _opcheck_cases(device):
    x = torch.randn(7, 12, device=device)
    s1 = torch.tensor([0.05], device=device)
    z1 = torch.tensor([2], dtype=torch.int32, device=device)
    sg = torch.rand(7, 3, device=device) * 0.1 + 0.01
    zg = torch.randint(-3, 3, (7, 3), device=device).float()
    yield ops.fake_quant.default, (x, s1, z1, -128, 127)
    yield ops.fake_quant.default, (x.requires_grad_(), sg.requires_grad_(), zg.requires_grad_(), -8, 7)
    yield ops.fake_quant.default, (x.detach().bfloat16().requires_grad_(), sg.detach(), zg.detach(), -8, 7)
    yield ops.fake_quant_backward.default, (torch.randn(7, 12, device=device), x.detach(), sg.detach(), zg.detach(), -8, 7, True, True)
    yield ops.fake_quant_backward.default, (torch.randn(7, 12, device=device), x.detach(), s1, z1, -8, 7, False, False)
    yield ops.fake_quant.default, (x.detach() * 1, s1, z1, -8, 7)
    yield ops.fake_quant_with_mask.default, (x.detach(), sg.detach(), zg.detach(), -8, 7)
    yield ops.fake_quant_with_mask.default, (x.detach().t().half().requires_grad_(), s1, z1, -8, 7)
    mask = x.detach() > 0.5
    yield ops.fake_quant_mask_backward.default, (torch.randn(7, 12, device=device), mask)
    yield ops.fake_quant_mask_backward.default, (torch.randn(7, 6, device=device).bfloat16().t(), mask[:, ::2].t())
    yield ops.quantize.default, (x.detach(), sg.detach(), zg.detach().int(), -8, 7, torch.int8)
    yield ops.dequantize.default, (torch.randint(-8, 8, (7, 12), dtype=torch.int8, device=device), sg.detach(), zg.detach().int(), torch.float16)
    yield ops.choose_qparams.default, (-torch.rand(5, 1, device=device), torch.rand(5, 1, device=device), -128, 127, False, EPS)
    # With gradients: dequantize's scale / float zero point; choose_qparams' (none) and quantize's codes.
    q = torch.randint(-8, 8, (7, 12), dtype=torch.int8, device=device)
    yield ops.dequantize.default, (q, sg.detach().requires_grad_(), zg.detach().requires_grad_(), torch.float32)
    yield ops.dequantize.default, (q, s1.clone().requires_grad_(), z1, torch.bfloat16)
    yield ops.choose_qparams.default, (-torch.rand(5, 1, device=device).requires_grad_(), torch.rand(5, 1, device=device), -128, 127, False, EPS)
    yield ops.quantize.default, (x.detach().requires_grad_(), sg.detach(), zg.detach().int(), -8, 7, torch.int8)


def test_dequantize_gradients_match_plain_torch(device):
    """(q - zero_point) * scale: d/dscale = sum over each block of grad * (q - zero_point),
    d/dzero_point = -sum of grad * scale (straight through a float zero point's rounding).
    Per-tensor, per-channel and per-group, against autograd of the same formula in float64."""
    for shape, sshape in [((6, 10), ()), ((6, 10), (6, 1)), ((6, 10), (6, 5)), ((3, 4, 6), (1, 4, 2))]:
        q = torch.randint(-100, 100, shape, dtype=torch.int8, device=device)
        s = (torch.rand(sshape, device=device) * 0.1 + 0.01).requires_grad_()
        z = torch.randint(-5, 5, sshape, device=device).float().requires_grad_()
        g = torch.randn(shape, device=device)
        y = ops.dequantize(q, s, z, torch.float32)
        gs, gz = torch.autograd.grad(y, (s, z), g)
        expand = [n // max(m, 1) for n, m in zip(shape, s.shape)] if s.dim() else None

        def spread(t):
            t = t.double()
            for d, r in enumerate(expand or []):
                t = t.repeat_interleave(r, d)
            return t
        sd, zd = s.detach().double().requires_grad_(), z.detach().double().requires_grad_()
        ref = (q.double() - spread(zd)) * spread(sd)
        rs, rz = torch.autograd.grad(ref, (sd, zd), g.double())
        torch.testing.assert_close(gs.double(), rs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gz.double(), rz, rtol=1e-5, atol=1e-5)
        assert gs.dtype == s.dtype and gz.dtype == z.dtype


def test_qparams_and_codes_carry_no_gradient(device):
    """choose_qparams' and quantize's outputs never require grad (torch's fallback marked the
    float ones as requiring grad and gave min / max None, with a warning)."""
    lo = -torch.rand(4, device=device, requires_grad=True)
    scale, zp = ops.choose_qparams(lo, lo.detach() + 1, -128, 127, False, EPS)
    assert not scale.requires_grad and not zp.requires_grad
    x = torch.randn(4, 6, device=device, requires_grad=True)
    assert not ops.quantize(x, scale.view(4, 1), zp.view(4, 1), -128, 127, torch.int8).requires_grad
    q, s = ops.quantize_per_token(x)
    assert not s.requires_grad
    # fake_quant_backward too (fake_quant's double backward differentiates grad * mask instead):
    # on torch's fallback a grad that required grad got None back, silently but for a warning.
    g = torch.ones(4, 6, device=device, requires_grad=True)
    args = (g, x.detach(), scale.view(4, 1), zp.view(4, 1).float(), -128, 127, True, True)
    assert not any(t.requires_grad for t in ops.fake_quant_backward(*args))
    torch.library.opcheck(ops.fake_quant_backward.default, args)


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


class QModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)
        self.scale = torch.nn.Parameter(torch.full((8, 1), 0.02))
        self.register_buffer("zp", torch.zeros(8, 1, dtype=torch.int32))

    def forward(self, x):
        w = ops.fake_quant(self.lin.weight, self.scale, self.zp, -8, 7)
        x = ops.fake_quant(x, torch.ones(1, device=x.device) * 0.05, torch.zeros(1, dtype=torch.int32, device=x.device), -128, 127)
        return torch.nn.functional.linear(x, w, self.lin.bias)


def test_compile_training_step_fullgraph(device):
    torch._dynamo.reset()
    model = QModule().to(device)
    ref = QModule().to(device)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 16, device=device)
    compiled = torch.compile(model, fullgraph=True)  # a graph break would raise
    loss_c = compiled(x).pow(2).mean()
    loss_c.backward()
    loss_e = ref(x).pow(2).mean()
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e)
    assert torch.allclose(model.scale.grad, ref.scale.grad, atol=1e-6)
    assert torch.allclose(model.lin.weight.grad, ref.lin.weight.grad, atol=1e-6)


def test_export(device):
    model = QModule().to(device).eval()
    x = torch.randn(4, 16, device=device)
    ep = torch.export.export(model, (x,))
    assert any("qlib.fake_quant" in str(n.target) for n in ep.graph.nodes)
    assert torch.allclose(ep.module()(x), model(x))


# ---------------------------------------------------------------- bad input
def _bad_cases(device):
    x = torch.randn(4, 6, device=device)
    s = torch.tensor([0.1], device=device)
    z = torch.tensor([0], dtype=torch.int32, device=device)
    fq = ops.fake_quant
    yield lambda: fq(x.int(), s, z, -128, 127), "qlib::fake_quant: x must be float32, float16 or bfloat16, got Int"
    yield lambda: fq(x.double(), s, z, -128, 127), "x must be float32, float16 or bfloat16, got Double"
    yield lambda: fq(x, s.int(), z, -128, 127), "scale must be a floating tensor, got Int"
    yield lambda: fq(x, s * 0, z, -128, 127), r"scale must be positive and finite, at least .*, got 0"
    yield lambda: fq(x, -s, z, -128, 127), r"scale must be positive and finite, at least .*, got -0.1"
    yield lambda: fq(x, s * float("nan"), z, -128, 127), "scale must be positive and finite, at least .*, got nan"
    yield lambda: fq(x, s * float("inf"), z, -128, 127), "scale must be positive and finite, at least .*, got inf"
    # Below the smallest normal float32 1 / scale is infinite (0 gave NaN, the rest saturated).
    yield lambda: fq(x, s * 0 + 1e-39, z, -128, 127), "scale must be positive and finite, at least 1.17549e-38 .*, got 1e-39"
    yield lambda: fq(x, torch.ones(4, 4, device=device), torch.zeros(4, 4, device=device), -128, 127), r"scale of shape \[4, 4\] does not block x of shape \[4, 6\] \(dim 1: 6 is not a multiple of 4\)"
    yield lambda: fq(x, torch.ones(4, device=device), torch.zeros(4, device=device), -128, 127), r"scale of shape \[4\] does not block x of shape \[4, 6\]"
    yield lambda: fq(x, torch.ones(4, 1, device=device), torch.zeros(1, 4, device=device), -128, 127), r"zero_point of shape \[1, 4\] differs from scale of shape \[4, 1\]"
    yield lambda: fq(x, s, z + 200, -128, 127), r"zero_point must lie in \[quant_min, quant_max\] = \[-128, 127\], got 200"
    yield lambda: fq(x, s, z, 5, 5), r"quant_min \(5\) must be less than quant_max \(5\)"
    yield lambda: fq(x, s, z, 0, 70000), r"the range \[0, 70000\] is wider than 16 bits"
    # 16 bits wide but past 2^24, where float32 codes round (they came back out of range);
    # a zero point of 2^24 + 1 would have been read as 2^24.
    top = 2**31 - 1
    yield lambda: ops.quantize(x, s, z + top - 50, top - 100, top, torch.int32), r"qlib::quantize: the range \[2147483547, 2147483647\] reaches past \+-\(2\^24 - 1\)"
    yield lambda: ops.dequantize(x.int(), s, z + 2**24 + 1, torch.float32), r"qlib::dequantize: zero_point must lie in the range of q's dtype = \[-16777215, 16777215\] \(int32: the codes float32 holds exactly\), got 16777217"
    if torch.cuda.is_available():
        other = "cpu" if device != "cpu" else "cuda"
        yield lambda: fq(x, s.to(other), z, -128, 127), r"x \(.*\), scale \(.*\) and zero_point \(.*\) must be on the same device"
    fqm = ops.fake_quant_with_mask
    yield lambda: fqm(x.int(), s, z, -128, 127), "qlib::fake_quant_with_mask: x must be float32, float16 or bfloat16, got Int"
    yield lambda: fqm(x, -s, z, -128, 127), r"qlib::fake_quant_with_mask: scale must be positive and finite, at least .*, got -0.1"
    yield lambda: fqm(x, s, z, 7, -8), r"qlib::fake_quant_with_mask: quant_min \(7\) must be less than quant_max \(-8\)"
    mask = x > 0
    yield lambda: ops.fake_quant_mask_backward(x, mask.float()), "qlib::fake_quant_mask_backward: mask must be bool, got Float"
    yield lambda: ops.fake_quant_mask_backward(x.int(), mask), "qlib::fake_quant_mask_backward: grad must be float32, float16 or bfloat16, got Int"
    yield lambda: ops.fake_quant_mask_backward(x, mask[:, :5]), r"qlib::fake_quant_mask_backward: grad \(\[4, 6\] on .*\) must match mask \(\[4, 5\] on .*\)"
    yield lambda: ops.quantize(x, -s, z, -128, 127, torch.int8), r"qlib::quantize: scale must be positive and finite, at least .*, got -0.1"
    yield lambda: ops.dequantize(x.to(torch.int8), s, z + 200, torch.float32), r"qlib::dequantize: zero_point must lie in the range of q's dtype = \[-128, 127\], got 200"
    yield lambda: ops.quantize(x, s, z, -128, 127, torch.float32), "qlib::quantize: dtype must be int8, uint8, int16 or int32, got Float"
    yield lambda: ops.quantize(x, s, z, -128, 255, torch.int8), r"the range \[-128, 255\] does not fit in Char"
    yield lambda: ops.dequantize(x, s, z, torch.float32), "qlib::dequantize: q must be int8, uint8, int16 or int32, got Float"
    yield lambda: ops.choose_qparams(torch.zeros(3, device=device), torch.zeros(4, device=device), -128, 127, True, EPS), r"min of shape \[3\] differs from max of shape \[4\]"
    yield lambda: ops.choose_qparams(torch.ones(1, device=device), torch.zeros(1, device=device), -128, 127, True, EPS), "need finite min <= max, got min = 1, max = 0"
    yield lambda: ops.choose_qparams(torch.zeros(1, device=device), torch.full((1,), float("inf"), device=device), -128, 127, True, EPS), "need finite min <= max"
    yield lambda: ops.choose_qparams(torch.zeros(1, device=device), torch.ones(1, device=device), -128, 127, True, 0.0), "eps must be positive"
    # eps is float32 in the kernels: 1e-50 was 0 there (scale 0, zero point INT32_MIN).
    for op in (ops.choose_qparams, ops.observer_qparams):
        for eps in (1e-50, 1e-40, 1e39):
            yield (lambda op=op, eps=eps: op(torch.zeros(1, device=device), torch.zeros(1, device=device), 0, 255, False, eps),
                   "eps must be positive and finite in float32, at least 1.17549e-38")
    # Asymmetric, the span max - min overflows float32 (symmetric would be fine).
    wide = (torch.full((1,), -3e38, device=device), torch.full((1,), 3e38, device=device))
    yield lambda: ops.choose_qparams(*wide, -128, 127, False, EPS), r"the range \[-3e\+38, 3e\+38\] at flat index 0 is too wide for a float32 scale"
    # Symmetric over a range one step wide: max / 0.5 overflows (the CPU and CUDA checks alike).
    yield lambda: ops.choose_qparams(torch.zeros(1, device=device), wide[1], 0, 1, True, EPS), r"the range \[0, 3e\+38\] at flat index 0 is too wide for a float32 scale over \[0, 1\]"


@pytest.fixture
def cuda_value_checks():
    qlib.set_cuda_value_checks(True)
    yield
    qlib.set_cuda_value_checks(False)


def test_bad_input_errors(device, cuda_value_checks):
    """Each error names the op (every message starts with it, not only those whose pattern
    spells it out), the argument and the value."""
    ops_named = {s.name[len("qlib::"):] for s in torch._C._jit_get_all_schemas() if s.name.startswith("qlib::")}
    for call, message in _bad_cases(device):
        with pytest.raises(RuntimeError, match=message) as info:
            call()
        named = re.match(r"qlib::(\w+): ", str(info.value))
        assert named and named.group(1) in ops_named, str(info.value)


def test_fakes_raise_the_kernels_errors_that_need_no_values():
    """On meta tensors (the fakes, as torch.compile and torch.export run them) every bad call
    of _bad_cases raises the kernels' error, but those that read values (the CUDA kernels skip
    them too unless asked); and an invalid call fails at export, not when the program runs."""
    reads_values = ("scale must be positive", "zero_point must lie", "need finite min", "too wide for a float32")
    for call, message in _bad_cases("meta"):
        try:
            call()
        except RuntimeError as e:
            assert re.search(message, str(e)), (message, str(e))
        else:
            assert any(v in message for v in reads_values), message

    class Bad(torch.nn.Module):
        def forward(self, x):
            return ops.quantize(x, torch.tensor(0.1), torch.tensor(0), 0, 255, torch.int8)

    with pytest.raises(RuntimeError, match=r"qlib::quantize: the range \[0, 255\] does not fit in Char"):
        torch.export.export(Bad(), (torch.randn(4),))

    class Groups(torch.nn.Module):  # groups of 2 rows along a dynamic dim: it must stay even
        def forward(self, x):
            s = torch.full((x.shape[0] // 2, 1), 0.1)
            return ops.fake_quant(x, s, torch.zeros_like(s), -8, 7)

    ep = torch.export.export(Groups(), (torch.randn(6, 5),), dynamic_shapes={"x": {0: 2 * torch.export.Dim("b")}})
    x = torch.randn(10, 5)
    assert torch.equal(ep.module()(x), ops.fake_quant(x, torch.full((5, 1), 0.1), torch.zeros(5, 1), -8, 7))

    def per_token(x):  # a data-dependent row count (routed tokens): checked without a guard
        x = x[x[:, 0] > 0]
        amax = x.abs().amax(1, keepdim=True)
        s, z = qlib.choose_qparams(-amax, amax, -127, 127, True)
        return qlib.fake_quant(x, s, z, -127, 127)

    torch._dynamo.reset()
    x = torch.randn(16, 8)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(per_token, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), per_token(x))
        assert compiled(-x.abs()).shape == (0, 8)  # (no row picked: [0, 1] qparams)


def test_cuda_bad_qparams_give_nan_without_sync(device):
    """On CUDA, fake_quant checks each block on the device: a bad block is NaN, the rest exact."""
    if device != "cuda":
        pytest.skip("the CPU raises (test_bad_input_errors)")
    x = torch.randn(6, 37, device=device, requires_grad=True)
    scale = torch.tensor([0.1, 0.0, -0.1, float("nan"), float("inf"), 0.1], device=device).view(6, 1)
    zp = torch.tensor([3, 0, 0, 0, 0, 200], dtype=torch.int32, device=device).view(6, 1)
    bad = torch.tensor([False, True, True, True, True, True], device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ops.fake_quant(x, scale, zp, -128, 127)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        # An activation's STE rides on the mask, false in a bad block: its gradient is 0 there.
        ym, mask = ops.fake_quant_with_mask(x.detach(), scale, zp, -128, 127)
        (ga,) = torch.autograd.grad(ops.fake_quant(x * 1, scale, zp, -128, 127), x, torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y[bad].isnan().all() and gx[bad].isnan().all()
    assert torch.equal(ym.isnan(), y.isnan()) and not mask[bad].any() and (ga[bad] == 0).all()
    assert torch.equal(ga[0], gx[0]) and torch.equal(mask[0], gx[0] == 1)
    # torch.func's composite likewise: 0 in a bad block (its NaN STE was cast to bool: true).
    gf = torch.func.grad(lambda t: ops.fake_quant(t, scale, zp, -128, 127).sum())(x.detach())
    assert torch.equal(gf, ga)
    ref = torch.fake_quantize_per_tensor_affine(x[0].detach(), 0.1, 3, -128, 127)
    assert torch.equal(y[0], ref)
    y_ok = ops.fake_quant(x.detach()[:1], scale[:1], zp[:1], -128, 127)
    assert torch.equal(y[:1], y_ok)
    for s, z in ((torch.tensor([0.0], device=device), torch.tensor([0], device=device)),
                 (torch.tensor([0.1], device=device), torch.tensor([-129.0], device=device))):
        assert ops.fake_quant(x.detach(), s, z, -128, 127).isnan().all()
    qlib.set_cuda_value_checks(True)
    try:
        with pytest.raises(RuntimeError, match="qlib::fake_quant: scale must be positive and finite"):
            ops.fake_quant(x.detach(), scale, zp, -128, 127)
    finally:
        qlib.set_cuda_value_checks(False)


def test_extension_reports_build():
    info = qlib.build_info()
    assert info["cpu_isa"] in ("avx2", "default")
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_import_without_the_extension_fails_loudly(tmp_path):
    """A copy of the package without _C*.so (or without its _build_config.py) fails to import,
    saying so and how to build it."""
    import shutil
    import subprocess
    import sys

    src = os.path.dirname(qlib.__file__)
    shutil.copytree(src, tmp_path / "qlib", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = lambda: subprocess.run([sys.executable, "-c", "import qlib"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
    out = run()
    assert out.returncode != 0 and "qlib's compiled extension is not built: no " in out.stderr
    assert "pip install --no-build-isolation -e ." in out.stderr
    (tmp_path / "qlib" / "_build_config.py").unlink()
    out = run()
    assert out.returncode != 0 and "qlib is not built: python/qlib/_build_config.py is missing" in out.stderr


def test_extension_built_for_another_torch_names_both_versions(tmp_path):
    """An _C that fails to load (here: not a shared object) under a torch other than the one it was
    built against (an installed wheel, then torch upgraded) says which torch each is."""
    import importlib.machinery
    import shutil
    import subprocess
    import sys

    src = os.path.dirname(qlib.__file__)
    shutil.copytree(src, tmp_path / "qlib", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    (tmp_path / "qlib" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not an ELF file")
    (tmp_path / "qlib" / "_build_config.py").write_text(
        "CPU_ISA = 'default'\nWITH_CUDA = False\nCUDA_ARCHS = ''\nTORCH_VERSION = '0.0.1'\n")
    out = subprocess.run([sys.executable, "-c", "import qlib"], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"it was built against torch 0.0.1, but torch {torch.__version__} is imported" in out.stderr


def test_a_meta_tensor_among_cpu_ones_raises():
    """A meta tensor dispatches to the op's fake, which checks devices (it would otherwise hand
    back an uninitialised CPU tensor)."""
    meta = torch.device("meta")
    x, s, z = torch.randn(4, 8), torch.rand(1) + 0.1, torch.zeros(1, dtype=torch.int32)
    w = torch.randint(-127, 128, (6, 8), dtype=torch.int8)
    cb = qlib.codebook_4bit("nf4", "cpu")
    packed, absmax = ops.quantize_4bit(torch.randn(6, 8), cb, 4)
    calls = {
        "qlib::fake_quant": lambda: ops.fake_quant(x, s.to(meta), z, -8, 7),
        "qlib::quantize": lambda: ops.quantize(x, s, z.to(meta), -8, 7, torch.int8),
        "qlib::int8_linear": lambda: ops.int8_linear(x, w, torch.rand(6).to(meta), None),
        "qlib::linear_4bit": lambda: ops.linear_4bit(x, packed, absmax.to(meta), cb, 4, None),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{name}: expected all tensors on one device, got cpu, .*meta"):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_mode_ad(device, dtype):
    """Forward-mode AD (torch.func.jvp, forward_ad dual tensors) runs the ops' composites: the op's
    values bit for bit and the tangents of their gradients (the STE's where(mask, t, 0), LSQ's and
    dequantize's J t to float tolerance against jacrev, the frozen Linears' t @ W_hat^T + t_bias
    bit for bit). A tangent on an argument that gets no gradient raises (it was dropped)."""
    torch.manual_seed(0)
    x = (torch.randn(4, 8, device=device) * 3).to(dtype)
    tx = torch.randn(4, 8, device=device).to(dtype)
    s, z = torch.rand(4, 1, device=device) * 0.3 + 0.05, torch.randint(-2, 3, (4, 1), device=device).float()
    ts, tz = torch.randn(4, 1, device=device), torch.randn(4, 1, device=device)
    mask = ops.fake_quant_with_mask(x, s, z, -8, 7)[1]
    fwad = torch.autograd.forward_ad

    def dual_call(f, primals, tangents):
        with fwad.dual_level():
            out = f(*(fwad.make_dual(p, t) if t is not None else p for p, t in zip(primals, tangents)))
            return fwad.unpack_dual(out).primal, fwad.unpack_dual(out).tangent

    for fq in (lambda a: ops.fake_quant(a, s, z, -8, 7), lambda a: ops.fake_quant_with_mask(a, s, z, -8, 7)[0]):
        for how in (lambda: torch.func.jvp(fq, (x,), (tx,)), lambda: dual_call(fq, (x,), (tx,))):
            y, ty = how()
            assert torch.equal(y, fq(x)) and torch.equal(ty, torch.where(mask, tx, 0))
    # LSQ / LSQ+ and dequantize: J t, J from reverse mode.
    q = torch.randint(-127, 128, (4, 8), dtype=torch.int8, device=device)
    calls = {
        "lsq": lambda a, b: ops.lsq_fake_quant(x, a, b, -8, 7, None, 1e-4),
        "fake_quant": lambda a, b: ops.fake_quant(x, a, b, -8, 7),
        "dequantize": lambda a, b: ops.dequantize(q, a, b, dtype),
    }
    for name, f in calls.items():
        want_y = f(s, z)
        J_s, J_z = torch.func.jacrev(lambda a, b: f(a, b).float(), argnums=(0, 1))(s, z)
        want_t = ((J_s * ts).sum((-2, -1)) + (J_z * tz).sum((-2, -1))).to(dtype)
        for how in (lambda: torch.func.jvp(f, (s, z), (ts, tz)), lambda: dual_call(f, (s, z), (ts, tz))):
            y, ty = how()
            assert torch.equal(y, want_y), name
            torch.testing.assert_close(ty, want_t, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5, msg=name)
    # The frozen Linears: x's and the bias's tangents.
    w, ws, bias, tb = (torch.randint(-127, 128, (6, 8), dtype=torch.int8, device=device), torch.rand(6, device=device) * 0.01,
                       torch.randn(6, device=device), torch.randn(6, device=device))
    cb = qlib.codebook_4bit("nf4", device)
    packed, absmax = ops.quantize_4bit(torch.randn(6, 8, device=device), cb, 4)
    linears = {
        "qlib::int8_linear": (lambda a, b: ops.int8_linear(a, w, ws, b), (w.float() * ws[:, None]).to(dtype)),
        "qlib::linear_4bit": (lambda a, b: ops.linear_4bit(a, packed, absmax, cb, 4, b),
                              ops.dequantize_4bit(packed, absmax, cb, 8, 4, dtype)),
    }
    for name, (f, w_hat) in linears.items():
        y, ty = torch.func.jvp(f, (x, bias), (tx, tb))
        assert torch.equal(y, f(x, bias)), name
        assert torch.equal(ty, (torch.matmul(tx, w_hat.t()) + tb.to(dtype)).to(ty.dtype)), name
    # A tangent where no gradient is given raises, naming the op.
    dual = lambda t: fwad.make_dual(t, torch.ones_like(t))
    raising = {
        "qlib::dequantize_4bit": [lambda: ops.dequantize_4bit(packed, dual(absmax), cb, 8, 4, torch.float32),
                                  lambda: ops.dequantize_4bit(packed, absmax, dual(cb), 8, 4, torch.float32)],
        "qlib::linear_4bit": [lambda: ops.linear_4bit(x, packed, absmax, dual(cb), 4, None)],
        "qlib::int8_linear": [lambda: ops.int8_linear(x, w, dual(ws), None),
                              lambda: ops.int8_linear(x, w, ws, None, dual(torch.tensor(0.05, device=device)))],
    }
    for name, cases in raising.items():
        for call in cases:
            with fwad.dual_level(), pytest.raises(RuntimeError, match=f"{name}: forward-mode AD .* gives no derivative"):
                call()
    with fwad.dual_level(), pytest.raises(RuntimeError, match="qlib::fake_quant_with_mask: gives no gradient for scale"):
        ops.fake_quant_with_mask(x, dual(s), z, -8, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_func_differentiates_fake_quant(device, dtype):
    """torch.func.grad / vjp / jacrev and per-sample gradients (vmap of grad) of fake_quant's STE:
    under the transforms it is a composite of ATen ops (they take no C++ Function), with the
    op's values and torch's gradients, bit for bit."""
    x = (torch.randn(6, 10, device=device) * 3).to(dtype)
    w = torch.randn(10, 4, device=device).to(dtype)
    for sshape in ((1,), (6, 1), (1, 10)):
        s = torch.rand(sshape, device=device) * 0.1 + 0.05
        z = torch.randint(-2, 3, sshape, dtype=torch.int32, device=device)
        fq = lambda t: ops.fake_quant(t, s, z, -8, 7)

        def loss(t):
            return (fq(t).float() * torch.arange(10, device=device)).sum()

        xr = x.clone().requires_grad_()
        ref_y = fq(xr * 1)  # (the saved-mask path; compared with torch's ops elsewhere)
        (ref_g,) = torch.autograd.grad(loss(xr * 1), xr)
        assert torch.equal(torch.func.grad(loss)(x), ref_g)
        mask = ops.fake_quant_with_mask(x, s, z, -8, 7)[1]
        y, vjp = torch.func.vjp(fq, x)
        assert torch.equal(y, ref_y) and torch.equal(vjp(torch.ones_like(y))[0], mask.to(dtype))
        y, vjp = torch.func.vjp(lambda t: ops.fake_quant_with_mask(t, s, z, -8, 7)[0], x)
        assert torch.equal(y, ref_y) and torch.equal(vjp(torch.ones_like(y))[0], mask.to(dtype))
        if sshape == (1,):
            J = torch.func.jacrev(fq)(x[0])
            assert torch.equal(J, torch.diag(mask[0].to(dtype)))
            # Per-sample gradients of a weight (DP-SGD style): a loop of autograd's.
            per_sample = torch.func.vmap(torch.func.grad(lambda w_, xi: fq(xi @ w_).float().pow(2).sum()), in_dims=(None, 0))(w, x)
            for i in range(x.shape[0]):
                wr = w.clone().requires_grad_()
                (gi,) = torch.autograd.grad(fq(x[i] @ wr).float().pow(2).sum(), wr)
                assert torch.equal(per_sample[i], gi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_func_differentiates_lsq_and_dequantize(device, dtype):
    """LSQ / LSQ+ (lsq_fake_quant, fake_quant with a scale or floating zero point that requires
    grad) and dequantize's qparam gradients under torch.func: a composite of ATen ops with the
    op's values bit for bit and the C++ Functions' gradients (autograd's) to float tolerance,
    every granularity, scales past LSQ's clamps; per-sample scale gradients (vmap of grad) equal
    a loop of them."""
    torch.manual_seed(0)
    x = (torch.randn(6, 12, device=device) * 3).to(dtype)
    weights = torch.randn(6, 12, device=device)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    for sshape in ((), (1,), (6, 1), (1, 12), (3, 4), (6, 12)):
        s = torch.rand(sshape, device=device) * 0.3 + 0.05
        if s.numel() > 1:
            s.view(-1)[0] = -0.1  # (LSQ clamps it to eps; its gradient goes straight through)
        zf = torch.randint(-3, 3, sshape, device=device).float() + 0.3
        calls = {
            "lsq": lambda s_, z_: ops.lsq_fake_quant(x, s_, z_, -8, 7, None, 1e-4),
            "lsq factor": lambda s_, z_: ops.lsq_fake_quant(x, s_.half(), z_, -128, 127, 0.5, 1e-4),
            "fake_quant": lambda s_, z_: ops.fake_quant(x, s_.abs() + 0.01, z_.round().clamp(-8, 7), -8, 7),
            "fake_quant int zp": lambda s_, z_: ops.fake_quant(x, s_.abs() + 0.01, z_.round().int(), -8, 7),
        }
        for name, call in calls.items():
            loss = lambda s_, z_: (call(s_, z_).float().nan_to_num(0.0, 0.0, 0.0) * weights).sum()
            for argnums in (0, 1, (0, 1)):
                if name == "fake_quant int zp" and argnums != 0:
                    continue
                got = torch.func.grad(loss, argnums=argnums)(s, zf)
                sr, zr = s.clone().requires_grad_(argnums != 1), zf.clone().requires_grad_(argnums != 0)
                loss(sr, zr).backward()
                want = {0: sr.grad, 1: zr.grad, (0, 1): (sr.grad, zr.grad)}[argnums]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} {sshape} {argnums}")
            y, _ = torch.func.vjp(call, s, zf)
            assert torch.equal(y.nan_to_num(), call(s, zf).nan_to_num()) and y.isnan().sum() == 1, (name, sshape)
    # Empty and non-dense x.
    for xe, se in ((x[:0], torch.tensor([0.1])), (x.t()[::2], torch.rand(3, 2) + 0.1)):
        se, ze = se.to(device), torch.zeros_like(se, device=device)
        loss = lambda s_, z_: (ops.lsq_fake_quant(xe, s_, z_, -8, 7, None, 1e-4).float().nan_to_num(0.0, 0.0, 0.0) ** 2).sum()
        got = torch.func.grad(loss, argnums=(0, 1))(se, ze)
        sr, zr = se.clone().requires_grad_(), ze.clone().requires_grad_()
        loss(sr, zr).backward()
        torch.testing.assert_close(got, (sr.grad, zr.grad), rtol=1e-5, atol=1e-5)
    # Per-sample scale gradients.
    s, z = torch.tensor([0.1], device=device), torch.tensor([0.0], device=device)
    per_sample_loss = lambda s_, xi: ops.lsq_fake_quant(xi, s_, z, -8, 7, None, 1e-6).float().pow(2).sum()
    ps = torch.func.vmap(torch.func.grad(per_sample_loss), in_dims=(None, 0))(s, x[1:])
    for i in range(5):
        sr = s.clone().requires_grad_()
        per_sample_loss(sr, x[i + 1]).backward()
        torch.testing.assert_close(ps[i], sr.grad)
    # dequantize: d/dscale = q - zero_point, d/dzero_point = -scale, summed per block.
    q = torch.randint(-127, 128, (6, 12), dtype=torch.int8, device=device)
    for sshape in ((1,), (6, 1), (2, 3)):
        s, z = torch.rand(sshape, device=device) + 0.1, torch.randn(sshape, device=device)
        deq = lambda s_, z_: ops.dequantize(q, s_, z_, dtype)
        loss = lambda s_, z_: (deq(s_, z_).float() * weights).sum()
        got = torch.func.grad(loss, argnums=(0, 1))(s, z)
        sr, zr = s.clone().requires_grad_(), z.clone().requires_grad_()
        loss(sr, zr).backward()
        torch.testing.assert_close(got, (sr.grad, zr.grad), rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.func.vjp(deq, s, z)[0], deq(s, z))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_func_differentiates_the_frozen_linears(device, dtype):
    """int8_linear, int8_linear_packed and linear_4bit under torch.func (grad, vjp, vmap of grad):
    the op's values and its C++ Function's gradients for x (grad @ W_hat) and bias, bit for bit."""
    torch.manual_seed(0)
    x, b = (torch.randn(5, 3, 32, device=device) * 2).to(dtype), torch.randn(6, device=device)
    w, ws = torch.randint(-127, 128, (6, 32), dtype=torch.int8, device=device), torch.rand(6, device=device) * 0.01
    cb = qlib.codebook_4bit("nf4", device)
    packed4, absmax = ops.quantize_4bit(torch.randn(6, 32, device=device), cb, 16)
    calls = {
        "int8_linear": lambda t, bb: ops.int8_linear(t, w, ws, bb),
        "int8_linear static": lambda t, bb: ops.int8_linear(t, w, ws, bb, torch.tensor(0.05, device=device), torch.tensor(3, device=device), -128, 127),
        "linear_4bit": lambda t, bb: ops.linear_4bit(t, packed4, absmax, cb, 16, bb),
    }
    if device == "cpu":  # (the packed layout is the CPU kernels')
        wp = ops.int8_pack_weight(w)
        calls["int8_linear_packed"] = lambda t, bb: ops.int8_linear_packed(t, wp, None, ws, bb, None, None, -127, 127)
    weights = torch.randn(6, device=device)
    for name, call in calls.items():
        loss = lambda t, bb: (call(t, bb).float() * weights).sum()
        got = torch.func.grad(loss, argnums=(0, 1))(x, b)
        xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
        loss(xr, br).backward()
        assert torch.equal(got[0], xr.grad) and torch.equal(got[1], br.grad), name
        y, vjp = torch.func.vjp(call, x, b)
        assert torch.equal(y, call(x, b)), name
        # Per-sample bias gradients: a loop of autograd's.
        per_sample = torch.func.vmap(torch.func.grad(lambda bb, xi: loss(xi, bb), argnums=0), in_dims=(None, 0))(b, x)
        for i in range(x.shape[0]):
            br = b.clone().requires_grad_()
            loss(x[i], br).backward()
            assert torch.equal(per_sample[i], br.grad), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vmap_rules_equal_a_loop(device, dtype):
    """The fake-quant ops' batching rules (csrc/vmap_rules.cpp: one call on the batch) equal
    a loop over the samples, for every granularity, with x, the qparams or all batched, batch
    dims anywhere; fake_quant_backward's qparam sums per sample (shared qparams too);
    lsq_fake_quant with LSQ's factor from one sample's size (no functorch fallback warning)."""
    torch.manual_seed(0)
    B = 4
    xs = (torch.randn(B, 6, 10, device=device) * 3).to(dtype)
    gs = torch.randn(B, 6, 10, device=device).to(dtype)
    for sshape in ((), (1,), (6, 1), (1, 10), (3, 5)):
        ss = torch.rand(B, *sshape, device=device) * 0.2 + 0.05
        zs = torch.randint(-3, 4, (B, *sshape), device=device).float()
        for x_b, q_b in ((True, False), (False, True), (True, True)):
            x = xs if x_b else xs[0]
            s, z = (ss, zs) if q_b else (ss[0], zs[0])
            pick = lambda t, batched, i: t[i] if batched else t
            dims = (0 if x_b else None, 0 if q_b else None, 0 if q_b else None)
            for name, op in (("fake_quant", ops.fake_quant), ("fake_quant_with_mask", ops.fake_quant_with_mask)):
                got = torch.vmap(lambda a, b, c: op(a, b, c, -8, 7), in_dims=dims)(x, s, z)
                for i in range(B):
                    want = op(pick(x, x_b, i), pick(s, q_b, i), pick(z, q_b, i), -8, 7)
                    for g_, w_ in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                        assert torch.equal(g_[i], w_), (name, sshape, x_b, q_b)
            for sg, zg in ((False, False), (True, False), (True, True)):
                bw = lambda gr, a, b, c: ops.fake_quant_backward(gr, a, b, c, -8, 7, sg, zg)
                got = torch.vmap(bw, in_dims=(0,) + dims)(gs, x, s, z)
                for i in range(B):
                    want = bw(gs[i], pick(x, x_b, i), pick(s, q_b, i), pick(z, q_b, i))
                    assert torch.equal(got[0][i], want[0])
                    for k, asked in ((1, sg), (2, zg)):
                        if asked:
                            torch.testing.assert_close(got[k][i], want[k], rtol=1e-6, atol=1e-6)
            lsq = lambda a, b, c: ops.lsq_fake_quant(a, b, c, -8, 7, None, 1e-4)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # (functorch's fallback warns)
                got = torch.vmap(lsq, in_dims=dims)(x, s, z)
                # Per-sample LSQ gradients: vmap(grad), the scale's and zero point's own factor.
                lsq_grads = torch.func.grad(lambda a, b, c: (lsq(a, b, c).float() * a.float()).sum(), argnums=(0, 1, 2))
                got_grads = torch.vmap(lsq_grads, in_dims=dims)(x, s, z)
            for i in range(B):
                assert torch.equal(got[i], lsq(pick(x, x_b, i), pick(s, q_b, i), pick(z, q_b, i)))
                want = lsq_grads(pick(x, x_b, i), pick(s, q_b, i), pick(z, q_b, i))
                for g_, w_ in zip(got_grads, want):
                    torch.testing.assert_close(g_[i], w_, rtol=1e-5, atol=1e-6)
    # A batch dim inside x and the mask backward.
    got = torch.vmap(lambda a: ops.fake_quant(a, ss[0, 0:1], zs[0, 0:1].int(), -8, 7), in_dims=1)(xs.transpose(0, 1))
    assert torch.equal(got, torch.stack([ops.fake_quant(xs[i], ss[0, 0:1], zs[0, 0:1].int(), -8, 7) for i in range(B)]))
    mask = torch.rand(6, 10, device=device) > 0.3
    got = torch.vmap(ops.fake_quant_mask_backward, in_dims=(0, None))(gs, mask)
    assert torch.equal(got, torch.stack([ops.fake_quant_mask_backward(gs[i], mask) for i in range(B)]))
    # Nested vmaps: scale batched by the outer one only, by the inner one only, x by the outer one only.
    X, zero = xs[:3, :4].unsqueeze(2), torch.zeros(1, dtype=torch.int32, device=device)
    S_out, S_in = torch.rand(3, 1, device=device) + 0.05, torch.rand(4, 1, device=device) + 0.05
    fq = lambda a, b: ops.fake_quant(a, b, zero, -8, 7)
    loop = lambda sx: torch.stack([torch.stack([fq(X[i, j], sx(i, j)) for j in range(4)]) for i in range(3)])
    assert torch.equal(torch.vmap(torch.vmap(fq, in_dims=(0, None)))(X, S_out), loop(lambda i, j: S_out[i]))
    assert torch.equal(torch.vmap(torch.vmap(fq), in_dims=(0, None))(X, S_in), loop(lambda i, j: S_in[j]))
    assert torch.equal(torch.vmap(lambda a: torch.vmap(lambda b: fq(a, b))(S_in))(X[:, 0]),
                       torch.stack([torch.stack([fq(X[i, 0], S_in[j]) for j in range(4)]) for i in range(3)]))
    with pytest.raises(RuntimeError, match=r"does not block x of shape \[4, 6, 10\] .*\(under torch.vmap: the shapes"):
        torch.vmap(lambda a: ops.fake_quant(a, ss[0, :, :3], zs[0, :, :3], -8, 7))(xs)


def test_outputs_of_non_dense_views_have_empty_likes_strides():
    """A non-dense view whose dims are not in row-major order (a strided slice of a transposed
    matrix) gives outputs with torch.empty_like's strides, as the fakes say (the kernels copied it
    row-major: torch.compile then failed its stride assertion)."""
    s, z = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    x = torch.randn(33, 8).t()[:, ::3]  # (8, 11), strides (1, 24)
    q = ops.quantize(x, s, z, -128, 127, torch.int8)
    for y in (ops.fake_quant(x, s, z, -128, 127), q, ops.dequantize(q, s, z, torch.float32),
              ops.fake_quant_backward(x, x, s, z, -128, 127, False, False)[0]):
        assert y.stride() == torch.empty_like(x).stride()
    assert torch.equal(ops.fake_quant(x, s, z, -128, 127), torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127))
    compiled = torch.compile(lambda t: ops.fake_quant(t, s, z, -128, 127), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ops.fake_quant(x, s, z, -128, 127))
