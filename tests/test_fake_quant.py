"""fake_quant: exactness against PyTorch's own ops, granularity, gradients, dtypes."""
import math
import os
import subprocess
import sys

import pytest
import torch

import qlib

ops = torch.ops.qlib
RANGES = [(-128, 127), (0, 255), (-8, 7), (-127, 127), (-32768, 32767), (0, 15)]


def tricky_input(shape, scale, device, qmin=-128, qmax=127):
    """Random values plus exact rounding ties and values past both clamp edges."""
    x = torch.randn(shape, device=device) * scale * (qmax - qmin) / 4
    flat = x.view(-1)
    n = flat.numel()
    ties = (torch.randint(qmin, qmax, (n,), device=device).float() + 0.5) * scale
    pick = torch.rand(n, device=device)
    flat[pick < 0.2] = ties[pick < 0.2]
    flat[(pick > 0.9)] *= 1000.0  # far past the clamp edges
    return x


def tricky_input_per_block(shape, scale, device, qmin=-128, qmax=127):
    """tricky_input for a scale of any block shape: exact rounding ties of each block's own
    scale (tricky_input's ties are of one scale only, so none with per-channel scales) and
    values past both clamp edges."""
    s = expand_blocks(scale, torch.empty(shape, device=device)).expand(shape)
    x = torch.randn(shape, device=device) * s * (qmax - qmin) / 4
    ties = (torch.randint(qmin, qmax, shape, device=device).float() + 0.5) * s
    pick = torch.rand(shape, device=device)
    x = torch.where(pick < 0.3, ties, x)
    return torch.where(pick > 0.9, x * 1000.0, x)


def count_ties(x, scale):
    """How many x * (1 / scale) land exactly on a .5 (what the op rounds, half to even)."""
    v = x.float() * (1.0 / expand_blocks(scale, x))
    return int(((v - v.floor()) == 0.5).sum())


def expand_blocks(t, x):
    """t (a scale or zero point shaped like the blocks of x) as float32, repeated to x's shape."""
    t = t.float()
    if t.dim() == x.dim():
        for d in range(x.dim()):
            if t.size(d) != x.size(d):
                t = t.repeat_interleave(x.size(d) // t.size(d), d)
    return t


def ref_fake_quant(x, scale, zero_point, qmin, qmax):
    """Plain torch ops, the same float32 order of operations; scale/zp expanded to x."""
    s, z = expand_blocks(scale, x), expand_blocks(zero_point, x)
    xf = x.float()
    q = torch.clamp(torch.round(xf * (1.0 / s)) + z, qmin, qmax)
    return ((q - z) * s).to(x.dtype)


@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("n", [1, 17, 1025, 8193])
@pytest.mark.parametrize("leaf", [True, False], ids=["leaf", "activation"])
def test_per_tensor_matches_torch(device, qmin, qmax, n, leaf):
    """A leaf x (a weight) and an activation (whose STE rides on a saved mask) alike."""
    scale = torch.tensor([0.0371], device=device)
    zp = torch.tensor([(qmin + qmax) // 3], dtype=torch.int32, device=device)
    x = tricky_input((n,), 0.0371, device, qmin, qmax).requires_grad_()
    y = ops.fake_quant(x if leaf else x * 1, scale, zp, qmin, qmax)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.fake_quantize_per_tensor_affine(x_ref, scale, zp, qmin, qmax)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


def test_big_outputs_match_torch(device):
    """Outputs over 8 MB get the CPU huge-page hint; the values must not care."""
    n = 3_000_017  # 12 MB of float32, ends off a 2 MB boundary
    scale = torch.tensor([0.0371], device=device)
    zp = torch.tensor([5], dtype=torch.int32, device=device)
    x = tricky_input((n,), 0.0371, device).requires_grad_()
    y = ops.fake_quant(x, scale, zp, -128, 127)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.fake_quantize_per_tensor_affine(x_ref, scale, zp, -128, 127)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    q = ops.quantize(x.detach(), scale, zp, -128, 127, torch.int8)
    # The codes fake_quant rounds to. (torch.quantize_per_tensor rounds ties with a
    # nonzero zero point its own way in some torch versions: 2.13 differs on ties here.)
    q_ref = torch.clamp(torch.round(x.detach() * (1.0 / scale)) + zp, -128, 127)
    assert torch.equal(q.float(), q_ref)
    assert torch.equal(ops.dequantize(q, scale, zp, torch.float32), y.detach())


def test_huge_page_hint_can_be_turned_off():
    """QLIB_HUGE_PAGES=0 (read once per process) leaves the results alone."""
    code = (
        "import torch, qlib; x = torch.randn(3_000_017); s = torch.tensor([0.02]); z = torch.tensor([3]);"
        "assert torch.equal(qlib.fake_quant(x, s, z), torch.fake_quantize_per_tensor_affine(x, s, z, -128, 127))"
    )
    env = dict(os.environ, QLIB_HUGE_PAGES="0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7), (-32768, 32767), (0, 15)])
@pytest.mark.parametrize("leaf", [True, False], ids=["leaf", "activation"])
def test_per_channel_matches_torch(device, axis, qmin, qmax, leaf):
    shape = [5, 17, 33]
    C = shape[axis]
    scale = torch.rand(C, device=device) * 0.1 + 0.005
    zp = torch.randint(qmin, qmax + 1, (C,), dtype=torch.int32, device=device)
    view = [1, 1, 1]
    view[axis] = C
    x = tricky_input_per_block(shape, scale.view(view), device, qmin, qmax)
    assert count_ties(x, scale.view(view)) > x.numel() // 10  # rounding ties in every channel's scale
    x.requires_grad_()
    y = ops.fake_quant(x if leaf else x * 1, scale.view(view), zp.view(view), qmin, qmax)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.fake_quantize_per_channel_affine(x_ref, scale, zp, axis, qmin, qmax)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize(
    "x_shape,s_shape",
    [
        ((64, 96), (64, 3)),  # per-group, group 32
        ((7, 17, 40), (7, 17, 5)),  # per-group on the last dim of 3-D
        ((9, 33), (9, 1)),  # per-token
        ((1, 33), (1, 33)),  # one scale per element
        ((64, 96), (4, 6)),  # 2-D blocks 16 x 16
        ((6, 10, 12), (3, 1, 4)),  # blocks on two non-adjacent dims
        ((4, 6, 8), (1, 6, 1)),  # channel in the middle
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocks_match_reference(device, x_shape, s_shape, dtype):
    scale = torch.rand(s_shape, device=device) * 0.1 + 0.01
    x = tricky_input_per_block(x_shape, scale, device)
    assert count_ties(x, scale) > x.numel() // 10
    x = x.to(dtype)
    zp = torch.randint(-20, 20, s_shape, dtype=torch.int32, device=device)
    y = ops.fake_quant(x, scale, zp, -128, 127)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, ref_fake_quant(x, scale, zp, -128, 127))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_equals_float32_math_cast_back(device, dtype):
    x = tricky_input((1025, 9), 0.02, device).to(dtype)
    scale = torch.tensor([0.02], device=device)
    zp = torch.tensor([5], dtype=torch.int32, device=device)
    y = ops.fake_quant(x, scale, zp, -128, 127)
    expect = torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, -128, 127).to(dtype)
    assert torch.equal(y, expect)
    # Per-channel too, through torch's per-channel op on float32 (ties of each channel's scale).
    sc = torch.rand(9, device=device) * 0.05 + 0.01
    zc = torch.randint(-3, 3, (9,), dtype=torch.int32, device=device)
    x = tricky_input_per_block((1025, 9), sc.view(1, 9), device).to(dtype)
    y = ops.fake_quant(x, sc.view(1, 9), zc.view(1, 9), -128, 127)
    expect = torch.fake_quantize_per_channel_affine(x.float(), sc, zc, 1, -128, 127).to(dtype)
    assert torch.equal(y, expect)


def test_against_float64_reference(device):
    # Away from ties, float32 math rounds to the same codes as exact math.
    x = torch.randn(4097, device=device, dtype=torch.float64)
    scale = 0.013
    q = torch.clamp(torch.round(x / scale) + 3, -128, 127)
    exact = (q - 3) * scale
    frac = (x / scale) - torch.floor(x / scale)
    safe = (frac - 0.5).abs() > 1e-3
    y = ops.fake_quant(
        x.float(), torch.tensor([scale], device=device), torch.tensor([3], device=device), -128, 127
    )
    assert torch.allclose(y.double()[safe], exact[safe], rtol=0, atol=1e-6)


def test_non_contiguous_and_empty(device):
    base = torch.randn(33, 18, device=device)
    x = base.t()  # non-contiguous [18, 33]
    scale = torch.rand(18, 1, device=device) * 0.05 + 0.01
    zp = torch.zeros(18, 1, dtype=torch.int32, device=device)
    y = ops.fake_quant(x, scale, zp, -128, 127)
    assert torch.equal(y, ops.fake_quant(x.contiguous(), scale, zp, -128, 127))
    x = base[:, ::2]
    y = ops.fake_quant(x, torch.tensor([0.1], device=device), torch.tensor([0], device=device), -8, 7)
    assert torch.equal(y, ref_fake_quant(x, torch.tensor(0.1, device=device), torch.tensor(0, device=device), -8, 7))
    e = torch.empty(0, 7, device=device, requires_grad=True)
    out = ops.fake_quant(e, torch.tensor([0.1], device=device), torch.tensor([0], device=device), -8, 7)
    assert out.shape == (0, 7)
    out.sum().backward()
    assert e.grad.shape == (0, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_qparams_of_an_empty_batch(device, dtype):
    """Zero tokens (routed tokens none of which were picked, an empty batch): choose_qparams gives
    per-token qparams of shape [0, 1], which block an x of [0, K] (no blocks). Every affine op
    gives empty outputs and gradients of the qparams' shape (STE, LSQ, LSQ+, dequantize's),
    under opcheck, torch.func and torch.compile; an empty scale for an x with elements still
    raises, naming the op (torch's per-channel fake quant raises on both)."""
    x = torch.empty(0, 8, device=device, dtype=dtype, requires_grad=True)
    amax = x.detach().float().abs().amax(1, keepdim=True)
    s, z = qlib.choose_qparams(-amax, amax, -127, 127, True)
    assert s.shape == (0, 1) and z.shape == (0, 1)
    y = qlib.fake_quant(x, s, z, -127, 127)
    assert y.shape == (0, 8) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    q = qlib.quantize(x.detach(), s, z, -127, 127, torch.int8)
    assert q.shape == (0, 8) and q.dtype == torch.int8 and qlib.dequantize(q, s, z).shape == (0, 8)
    ls, lz = s.clone().requires_grad_(), z.float().requires_grad_()
    for op in (lambda: ops.fake_quant(x, ls, lz, -127, 127),
               lambda: ops.lsq_fake_quant(x, ls, lz, -127, 127, None, 1e-4),
               lambda: ops.dequantize(q, ls, lz, torch.float32)):
        ls.grad = lz.grad = None
        op().sum().backward()
        assert ls.grad.shape == (0, 1) and lz.grad.shape == (0, 1)
    y, mask = ops.fake_quant_with_mask(x.detach(), s, z, -127, 127)
    assert y.shape == mask.shape == (0, 8)
    g = torch.func.grad(lambda sc: ops.fake_quant(x.detach(), sc, z.float(), -127, 127).sum())(s)
    assert g.shape == (0, 1)
    # Per-group qparams of zero rows block too.
    assert ops.fake_quant(x.detach(), torch.ones(0, 2, device=device), torch.zeros(0, 2, device=device), -8, 7).shape == (0, 8)
    for args in ((x.detach(), s, z, -127, 127), (x.detach(), ls.detach(), lz.detach(), -127, 127)):
        torch.library.opcheck(ops.fake_quant.default, args)
    torch.library.opcheck(ops.quantize.default, (x.detach(), s, z, -127, 127, torch.int8))
    torch.library.opcheck(ops.dequantize.default, (q, s, z, torch.float32))
    compiled = torch.compile(lambda a, b, c: qlib.fake_quant(a, b, c, -127, 127), fullgraph=True, dynamic=True)
    assert compiled(x.detach(), s, z).shape == (0, 8)
    # A range without 0 (the stand-ins' zero point is 0: their checks raised an IndexError): eager,
    # CUDA's checked path, torch.func (qparams spread over the empty x) and an empty vmap batch.
    zp1 = torch.full((0, 1), 128, dtype=torch.int32, device=device)
    assert ops.fake_quant(x.detach(), s, zp1, 1, 255).shape == (0, 8)
    assert ops.quantize(x.detach(), s, zp1, 1, 255, torch.uint8).shape == (0, 8)
    if device == "cuda":
        qlib.set_cuda_value_checks(True)
        try:
            assert ops.fake_quant(x.detach(), s, zp1, 1, 255).shape == (0, 8)
        finally:
            qlib.set_cuda_value_checks(False)
    one_s, one_z = torch.tensor([0.1], device=device), torch.tensor([128.0], device=device)
    g = torch.func.grad(lambda sc: ops.fake_quant(x.detach(), sc, one_z, 1, 255).sum())(one_s)
    assert g.shape == (1,) and g.item() == 0
    per_sample = torch.vmap(lambda a, b, c: ops.fake_quant(a, b, c, 1, 255))
    assert per_sample(x.detach().view(0, 1, 8), s.view(0, 1, 1), zp1.view(0, 1, 1)).shape == (0, 1, 8)
    for xs, ss in (((3, 8), (0, 1)), ((2, 8), (0, 8))):
        with pytest.raises(RuntimeError, match=r"qlib::fake_quant: scale is empty but x of shape \[\d, 8\] is not"):
            qlib.fake_quant(torch.randn(xs, device=device), torch.ones(ss, device=device),
                            torch.zeros(ss, dtype=torch.int32, device=device), -8, 7)


def _dense_layouts(device):
    """(x, scale shape) pairs: x dense in another dim order, or not dense at all."""
    t = torch.randn(40, 24, device=device).t()  # [24, 40], transposed
    cl = torch.randn(2, 6, 5, 7, device=device).to(memory_format=torch.channels_last)
    heads = torch.randn(3, 9, 4, 16, device=device).transpose(1, 2)  # [3, 4, 9, 16]
    sliced_cl = torch.randn(2, 6, 5, 14, device=device).to(memory_format=torch.channels_last)[..., ::2]
    return [
        (t, (1,)), (t, (24, 1)), (t, (1, 40)), (t, (24, 5)), (t, (6, 10)),
        (cl, (1, 6, 1, 1)), (cl, (2, 1, 1, 1)), (cl, (1, 3, 5, 1)),
        (heads, (3, 4, 1, 1)), (heads, (1, 1, 1, 16)), (heads, (3, 4, 9, 2)),
        (sliced_cl, (1, 6, 1, 1)), (t[:, None], (24, 1, 8)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_layouts_read_in_place(device, dtype):
    """x.t(), channels_last and permuted heads are read without a copy: every op's output has
    the strides of torch.empty_like(x) (what the fakes say) and the bits of the contiguous x's,
    gradients included."""
    for base, sshape in _dense_layouts(device):
        x = base.to(dtype) * 3
        scale = torch.rand(sshape, device=device) * 0.1 + 0.02
        zp = torch.randint(-3, 4, sshape, dtype=torch.int32, device=device)
        like = torch.empty_like(x).stride()
        y = ops.fake_quant(x, scale, zp, -8, 7)
        assert y.stride() == like and torch.equal(y, ops.fake_quant(x.contiguous(), scale, zp, -8, 7))
        q = ops.quantize(x, scale, zp, -8, 7, torch.int8)
        assert q.stride() == like and torch.equal(q, ops.quantize(x.contiguous(), scale, zp, -8, 7, torch.int8))
        back = ops.dequantize(q, scale, zp, dtype)
        assert back.stride() == q.stride() and torch.equal(back, y)
        grads = []
        for xi in (x, x.contiguous()):
            g = torch.linspace(-1, 1, x.numel(), device=device).view(x.shape).to(dtype)
            gx, gs, gz = ops.fake_quant_backward(g, xi, scale, zp.float(), -8, 7, True, True)
            assert gx.stride() == torch.empty_like(xi).stride() and gs.is_contiguous() and gz.shape == zp.shape
            grads.append((gx, gs, gz))
        (gx, gs, gz), (rx, rs, rz) = grads
        assert torch.equal(gx, rx)
        torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-5)  # block sums in another order
        torch.testing.assert_close(gz, rz, rtol=1e-5, atol=1e-5)


def test_dense_layouts_opcheck(device):
    for base, sshape in _dense_layouts(device)[::3]:
        x = base.detach().requires_grad_()
        scale = (torch.rand(sshape, device=device) * 0.1 + 0.02).requires_grad_()
        zp = torch.zeros(sshape, device=device)
        torch.library.opcheck(ops.fake_quant, (x, scale, zp, -8, 7))
        torch.library.opcheck(ops.quantize, (x.detach(), scale.detach(), zp.int(), -8, 7, torch.int8))


def _offset_by_one(t):
    """The same values one element into a new storage: dense in t's order, off 16 bytes."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    perm = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    inv = [perm.index(i) for i in range(t.dim())]
    out = buf[1:].view([t.shape[p] for p in perm]).permute(inv)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dense_layouts_unaligned_and_packs(device, dtype):
    """Dense layouts, views off a 16-byte boundary and (CUDA) 1, 2 or 4 packs a thread: fake_quant,
    fake_quant_with_mask and the backward (both LSQ terms, or one) give the contiguous x's bits."""
    for base, sshape in _dense_layouts(device):
        x = (base * 3).to(dtype)
        scale = torch.rand(sshape, device=device) * 0.1 + 0.02
        zp = torch.randint(-3, 4, sshape, device=device).float()
        g = torch.linspace(-1, 1, x.numel(), device=device).view(x.shape).to(dtype)
        ref = ops.fake_quant(x.contiguous(), scale, zp, -8, 7)
        rgx, rgs, rgz = ops.fake_quant_backward(g.contiguous(), x.contiguous(), scale, zp, -8, 7, True, True)
        ref_mask = ops.fake_quant_with_mask(x.contiguous(), scale, zp, -8, 7)[1]
        xo = _offset_by_one(x)
        assert xo.data_ptr() % 16 and torch.equal(xo, x)
        for xi, gi in ((x, g), (xo, g), (x, _offset_by_one(g.contiguous()))):
            for packs in ((1, 2, 4) if device == "cuda" else (1,)):
                qlib._C.set_fake_quant_cuda_packs(packs)
                try:
                    y = ops.fake_quant(xi, scale, zp, -8, 7)
                    ym, mask = ops.fake_quant_with_mask(xi, scale, zp, -8, 7)
                    gx, gs, gz = ops.fake_quant_backward(gi, xi, scale, zp, -8, 7, True, True)
                    # (one LSQ term asked for: the CUDA kernel stores one per-element buffer)
                    gs_alone = ops.fake_quant_backward(gi, xi, scale, zp, -8, 7, True, False)[1]
                    gz_alone = ops.fake_quant_backward(gi, xi, scale, zp, -8, 7, False, True)[2]
                finally:
                    qlib._C.set_fake_quant_cuda_packs(1)
                assert torch.equal(y, ref) and y.stride() == torch.empty_like(xi).stride()
                assert torch.equal(ym, ref) and torch.equal(mask, ref_mask)
                assert torch.equal(gs_alone, gs) and torch.equal(gz_alone, gz)
                assert torch.equal(gx, rgx)
                torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(gz, rgz, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_computes_only_the_lsq_gradients_asked_for(device, dtype):
    """scale_grad / zero_point_grad alone give the same sums as both together, and an empty
    tensor for the other (the CUDA kernel then stores one per-element buffer, not two)."""
    x = (torch.randn(37, 24, device=device) * 3).to(dtype)
    g = torch.randn(37, 24, device=device).to(dtype)
    for sshape in [(1,), (37, 1), (37, 3)]:
        scale = torch.rand(sshape, device=device) * 0.1 + 0.02
        zp = torch.randint(-3, 4, sshape, device=device).float()
        rgx, rgs, rgz = ops.fake_quant_backward(g, x, scale, zp, -8, 7, True, True)
        for scale_grad, zp_grad in [(True, False), (False, True), (False, False)]:
            gx, gs, gz = ops.fake_quant_backward(g, x, scale, zp, -8, 7, scale_grad, zp_grad)
            assert torch.equal(gx, rgx)
            for got, want, asked in ((gs, rgs, scale_grad), (gz, rgz, zp_grad)):
                if asked:
                    assert torch.equal(got, want)
                else:
                    assert got.numel() == 0


def test_cuda_bad_block_nan_with_dense_layout(device):
    if device != "cuda":
        pytest.skip("the CPU raises")
    x = torch.randn(40, 24, device=device).t()  # [24, 40], dims [1, 0]
    scale = torch.rand(24, 1, device=device) * 0.1 + 0.02
    scale[5] = 0.0
    zp = torch.zeros(24, 1, dtype=torch.int32, device=device)
    y = ops.fake_quant(x, scale, zp, -8, 7)
    assert y[5].isnan().all() and not y[torch.arange(24, device=device) != 5].isnan().any()


def test_nan_and_inf(device):
    scale = torch.tensor([0.5], device=device)
    zp = torch.tensor([3], dtype=torch.int32, device=device)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], device=device, requires_grad=True)
    y = ops.fake_quant(x, scale, zp, -128, 127)
    assert torch.isnan(y[0])
    assert y[1].item() == (127 - 3) * 0.5
    assert y[2].item() == (-128 - 3) * 0.5
    assert y[3].item() == 1.0
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0]
    for dtype in (torch.float16, torch.bfloat16):
        yl = ops.fake_quant(x.detach().to(dtype), scale, zp, -128, 127)
        assert torch.isnan(yl[0]) and yl[1].item() == 62.0 and yl[2].item() == -65.5
    # Inside the vector bodies and tails, per-tensor and per block, every dtype: each block's
    # own (quant_max - zp) * scale and (quant_min - zp) * scale.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for xshape, sshape in (((3, 1000), (1,)), ((4, 37), (4, 1)), ((4, 37), (1, 37)), ((8, 64), (2, 4))):
            x = (torch.randn(xshape, device=device) * 0.1).to(dtype)
            flat = x.view(-1)
            flat[::5], flat[1::5], flat[2::5] = float("nan"), float("inf"), -float("inf")
            s = torch.rand(sshape, device=device) * 0.1 + 0.02
            z = torch.randint(-5, 5, sshape, dtype=torch.int32, device=device)
            xg = x.clone().requires_grad_()
            y = ops.fake_quant(xg, s, z, -8, 7)
            se, ze = (expand_blocks(t, x).expand(xshape) for t in (s, z))
            pos, neg = x == float("inf"), x == -float("inf")
            assert torch.equal(y.isnan(), x.isnan()), (dtype, sshape)
            assert torch.equal(y[pos], ((7 - ze) * se).to(dtype)[pos]), (dtype, sshape)
            assert torch.equal(y[neg], ((-8 - ze) * se).to(dtype)[neg]), (dtype, sshape)
            y.backward(torch.ones_like(y))
            assert (xg.grad[~x.isfinite()] == 0).all()


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_match_torch_learnable(device, per_channel):
    qmin, qmax = -128, 127
    # No exact ties here: torch's learnable backward rounds x/scale + zp as
    # one sum, so at ties with an odd zero point its mask disagrees with its
    # own forward (and with torch.fake_quantize_per_tensor_affine); qlib
    # follows the forward.
    x = (torch.randn(31, 17, device=device) * 4).requires_grad_()
    if per_channel:
        s = (torch.rand(17, device=device) * 0.05 + 0.02).requires_grad_()
        z = torch.randint(-10, 10, (17,), device=device).float().requires_grad_()
        y = ops.fake_quant(x, s.view(1, 17), z.view(1, 17), qmin, qmax)
    else:
        s = torch.tensor([0.05], device=device, requires_grad=True)
        z = torch.tensor([3.0], device=device, requires_grad=True)
        y = ops.fake_quant(x, s, z, qmin, qmax)
    x2, s2, z2 = (t.detach().clone().requires_grad_() for t in (x, s, z))
    if per_channel:
        y2 = torch._fake_quantize_learnable_per_channel_affine(x2, s2, z2, 1, qmin, qmax, 1.0)
    else:
        y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, z2, qmin, qmax, 1.0)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(x.grad, x2.grad)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_of_nan_match_torch(device, per_channel):
    # A NaN code is neither inside nor above: torch's kernels count it as clipped low.
    # (+Inf is left out: torch's backward counts it low too, against its own forward.)
    x = torch.randn(5, 67, device=device) * 3
    x[:, ::7] = float("nan")
    x[:, 5::13] = -float("inf")
    if per_channel:
        s = torch.rand(5, device=device) * 0.05 + 0.02
        z = torch.randint(-10, 10, (5,), device=device).float()
    else:
        s = torch.tensor([0.05], device=device)
        z = torch.tensor([3.0], device=device)
    g = torch.randn(5, 67, device=device)
    grads = []
    for use_torch in (False, True):
        # torch's reference on the CPU: its CUDA per-channel kernel maps -Inf to quant_max's value
        # (torch 2.11, seen on an H200; its CPU kernel and its per-tensor one give quant_min's).
        xi, si, zi = (t.to("cpu" if use_torch else device).clone().requires_grad_() for t in (x, s, z))
        if not use_torch:
            y = ops.lsq_fake_quant(xi, si.view(-1, 1) if per_channel else si, zi.view(-1, 1) if per_channel else zi, -8, 7, 0.5, 1e-6)
        elif per_channel:
            y = torch._fake_quantize_learnable_per_channel_affine(xi, si, zi, 0, -8, 7, 0.5)
        else:
            y = torch._fake_quantize_learnable_per_tensor_affine(xi, si, zi, -8, 7, 0.5)
        y.backward(g.to(y.device))
        grads.append(tuple(t.cpu() for t in (y, xi.grad, si.grad.flatten(), zi.grad.flatten())))
    (y, gx, gs, gz), (y2, gx2, gs2, gz2) = grads
    x = x.cpu()
    # The forward differs at NaN by design: qlib keeps NaN, torch gives quant_min's value.
    assert torch.equal(y.isnan(), x.isnan()) and torch.equal(y[~x.isnan()], y2[~x.isnan()])
    assert torch.equal(gx, gx2)
    assert gs.isfinite().all() and gz.isfinite().all()
    torch.testing.assert_close(gs, gs2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gz, gz2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "xshape,sshape,dtype",
    [
        ((8, 12), (8, 3), torch.float32),  # groups of 4: every run a tail
        ((300, 1001), (1, 1), torch.float32),  # one block over many threads' chunks
        ((300, 1001), (300, 1), torch.bfloat16),  # a block per row
        ((300, 1001), (1, 1001), torch.float32),  # a block per column: runs step through them
        ((6, 40, 24), (6, 40, 3), torch.float16),
        ((700, 1001), (700, 1001), torch.float32),  # a scale per value: the CPU's sums on fewer threads
    ],
)
def test_lsq_gradients_float64_reference(device, xshape, sshape, dtype):
    """scale / zero_point grads: the LSQ+ formulas in float64, summed per block."""
    x = (torch.randn(xshape, device=device) * 2).to(dtype).requires_grad_()
    s = (torch.rand(sshape, device=device) * 0.05 + 0.02).requires_grad_()
    z = torch.randint(-2, 3, sshape, device=device).float().requires_grad_()
    y = ops.fake_quant(x, s, z, -8, 7)
    g = torch.randn_like(y)
    y.backward(g)
    xd, gd = x.detach().double(), g.double()
    se, ze = expand_blocks(s.detach(), xd), expand_blocks(z.detach(), xd)
    q = (torch.round(x.detach().float() * (1.0 / se)) + ze).double()  # float32, as the op
    se, ze = se.double(), ze.double()
    inside = (q >= -8) & (q <= 7)
    xh = (q.clamp(-8, 7) - ze) * se
    ds = torch.where(inside, (xh - xd) / se, torch.where(q < -8, -8 - ze, 7 - ze)) * gd
    dz = torch.where(inside, 0.0, -se) * gd

    def block_sums(t):
        split = [n for ns, nx in zip(sshape, xshape) for n in (ns, nx // ns)]
        return t.reshape(split).sum(tuple(range(1, 2 * len(sshape), 2)))

    # float32 math per element, float64 sums: relative to the sum of magnitudes.
    tol = dict(rtol=1e-4, atol=1e-4 * block_sums(ds.abs()).max().item())
    torch.testing.assert_close(s.grad.double(), block_sums(ds), **tol)
    torch.testing.assert_close(z.grad.double(), block_sums(dz), rtol=1e-4, atol=1e-4 * block_sums(dz.abs()).max().item())
    assert torch.equal(x.grad, (g * inside).to(dtype))


def _lsq_reference(x, scale, zero_point, qmin, qmax, factor, eps):
    """lsq_fake_quant written with torch ops and fake_quant: the clamps, with a gradient of 1
    everywhere (straight through; torch's own clamp gives 0 past and, since 2.14, on the bounds),
    and LSQ's gradient scale (value t + 0, gradient times factor); float16 / bfloat16 qparams in
    float32 (their gradient rounded once, by .float()'s backward)."""
    def wide(t):
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    scale, zero_point = wide(scale), wide(zero_point)

    def scaled_grad(t):
        scaled = t * factor
        return t.detach() + (scaled - scaled.detach())

    def clamped(t, lo, hi):
        return t.detach().clamp(lo, hi) + (t - t.detach())

    s = clamped(scaled_grad(scale), eps, math.inf)
    z = clamped(scaled_grad(zero_point), qmin, qmax) if zero_point.requires_grad else zero_point.clamp(qmin, qmax)
    return ops.fake_quant(x, s, z, qmin, qmax)


@pytest.mark.parametrize("xshape,sshape", [((37,), (1,)), ((13, 22), (13, 1)), ((6, 4, 20), (6, 4, 5))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("learn_zp", [False, True])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_lsq_fake_quant_equals_its_torch_ops_form(device, xshape, sshape, dtype, learn_zp, qdtype):
    """Output and every gradient bit for bit, with scales below eps and zero points outside the
    range among the blocks (their gradients are taken at the clamped values), for qparams of
    any floating dtype."""
    qmin, qmax, eps = 0, 15, 1e-3
    base = (torch.randn(*xshape[:-1], 2 * xshape[-1], device=device) * 2)[..., ::2]  # not contiguous
    s0 = torch.rand(sshape, device=device) * 0.3 + 0.05
    z0 = torch.randint(-1, 17, sshape, device=device).float() + 0.25 * (torch.rand(sshape, device=device) > 0.5)
    s0.view(-1)[0] = 1e-5  # below eps
    z0.view(-1)[-1] = 19.0  # past quant_max
    if z0.numel() > 3:
        z0.view(-1)[1:3] = torch.tensor([qmin, qmax])  # on the bounds
    factor = 1.0 / (base.numel() * qmax) ** 0.5
    grads = []
    for fn in (ops.lsq_fake_quant, _lsq_reference):
        x = base.to(dtype).requires_grad_()
        s = s0.to(qdtype).requires_grad_()
        z = z0.to(qdtype).requires_grad_(learn_zp)
        y = fn(x, s, z, qmin, qmax, factor, eps)
        y.backward(torch.ones_like(y) * torch.linspace(-1, 2, y.numel(), device=device).view(y.shape).to(dtype))
        grads.append((y, x.grad, s.grad, z.grad))
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.equal(a, b)
    assert grads[0][2].view(-1)[0] != 0 and (not learn_zp or grads[0][3].view(-1)[-1] != 0)


def test_lsq_default_grad_factor_is_lsqs(device):
    """grad_factor None: 1 / sqrt(x.numel() * quant_max), bit for bit, computed in the op (1 for
    an empty x)."""
    x = torch.randn(7, 12, device=device)
    grads = []
    for factor in (None, 1.0 / math.sqrt(x.numel() * 15)):
        s = torch.tensor([0.2], device=device, requires_grad=True)
        z = torch.tensor([3.0], device=device, requires_grad=True)
        ops.lsq_fake_quant(x, s, z, 0, 15, factor, 1e-6).backward(torch.linspace(-1, 1, 84, device=device).view(7, 12))
        grads.append((s.grad, z.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    s = torch.tensor([0.2], device=device, requires_grad=True)
    ops.lsq_fake_quant(torch.empty(0, 3, device=device), s, torch.tensor([3.0], device=device), 0, 15, None, 1e-6).sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_learnable_fake_quantize_traces_a_dynamic_batch():
    """No shape is specialised by LSQ's gradient scale: torch.export takes a dynamic batch, and
    torch.compile(dynamic=True) compiles once for every batch size."""
    torch.manual_seed(0)
    fq = qlib.nn.FakeQuantize(qlib.observers.MinMaxObserver(symmetric=False), learnable=True)
    fq(torch.randn(5, 16))
    fq.disable_observer()
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(fq, (torch.randn(5, 16),), dynamic_shapes=({0: batch},))
    x = torch.randn(9, 16)
    assert torch.equal(program.module()(x), fq(x))
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(fq, backend="aot_eager", dynamic=True)
    for n in (3, 4, 6, 11):
        xs = torch.randn(n, 16, requires_grad=True)
        compiled(xs).sum().backward()
        s_grad = fq.scale.grad.clone()
        fq.scale.grad = None
        fq(xs).sum().backward()
        assert torch.equal(s_grad, fq.scale.grad)
        fq.scale.grad = None
    assert counts["stats"]["unique_graphs"] == 1


def test_lsq_scale_pushed_below_eps_recovers():
    """A learnable scale that an optimizer step pushed below eps (or below 0) still gets the
    gradient at eps and learns its way back, as with torch.ao's learnable fake quant."""
    x = torch.rand(64, 16) * 4
    fq = qlib.nn.FakeQuantize(qlib.observers.MinMaxObserver(symmetric=False), learnable=True)
    fq(x)
    fq.disable_observer()
    with torch.no_grad():
        fq.scale.fill_(-0.01)
    opt = torch.optim.SGD(fq.parameters(), lr=0.05)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = (fq(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert fq.scale.item() > 0 and losses[-1] < 0.01 * losses[0]


def test_double_backward_through_the_ste_matches_torch(device):
    """A gradient penalty (create_graph=True) differentiates grad * mask again, as torch's own
    fake quant op; with LSQ gradients asked for it raises."""
    x0 = torch.randn(33, device=device) * 2
    x0[:3] = torch.tensor([5.0, -5.0, 0.05])  # two clipped, one inside
    results = []
    fq_qlib = lambda t: ops.fake_quant(t, torch.tensor([0.1], device=device), torch.tensor([0], device=device), -8, 7)
    for fq in (lambda t: torch.fake_quantize_per_tensor_affine(t, 0.1, 0, -8, 7), fq_qlib,
               lambda t: fq_qlib(t * 1)):  # (an activation: the saved mask's path)
        x = x0.clone().requires_grad_()
        w = torch.linspace(0.5, 2, 33, device=device, requires_grad=True)
        gx, = torch.autograd.grad((w * fq(x)).sum(), x, create_graph=True)
        gw, = torch.autograd.grad((gx ** 2).sum(), w)
        results.append((gx.detach(), gw))
    for gx, gw in results[1:]:
        assert torch.equal(gx, results[0][0]) and torch.equal(gw, results[0][1])
    s = torch.tensor([0.1], device=device, requires_grad=True)
    x = x0.clone().requires_grad_()
    for op, args in ((ops.fake_quant, ()), (ops.lsq_fake_quant, (1.0, 1e-6))):
        y = op(x, s, torch.tensor([0.0], device=device), -8, 7, *args)
        with pytest.raises(RuntimeError, match=op._qualified_op_name.replace("::", "::") + ": a double backward"):
            torch.autograd.grad(y.sum(), (x, s), create_graph=True)


def _saved_while(fn):
    """fn()'s result and the (dtype, shape) of each tensor autograd saved while it ran."""
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), saved


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7)])
@pytest.mark.parametrize("n", [1, 17, 1025, 8193])
def test_with_mask_matches_torch_cachemask(device, qmin, qmax, n):
    """fake_quant_with_mask gives torch's *_cachemask output and mask, per tensor and per
    channel; NaN and +-Inf are outside the mask (where y is NaN, torch's a finite value)."""
    x = tricky_input((3, n), 0.0371, device, qmin, qmax)
    x[0, : min(n, 3)] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)[: min(n, 3)]
    finite = x.isfinite()
    zp = (qmin + qmax) // 3
    y, m = ops.fake_quant_with_mask(x, torch.tensor([0.0371], device=device),
                                    torch.tensor([zp], dtype=torch.int32, device=device), qmin, qmax)
    ty, tm = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, 0.0371, zp, qmin, qmax)
    assert m.dtype == torch.bool and torch.equal(m, tm) and torch.equal(y[finite], ty[finite])
    assert y[~x.isfinite()].isnan().sum() == (x.isnan()).sum()
    scale = torch.rand(3, device=device) * 0.1 + 0.005
    zps = torch.randint(qmin, qmax + 1, (3,), dtype=torch.int32, device=device)
    y, m = ops.fake_quant_with_mask(x, scale.view(3, 1), zps.view(3, 1), qmin, qmax)
    ty, tm = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, zps, 0, qmin, qmax)
    assert torch.equal(m, tm) and torch.equal(y[finite], ty[finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_activation_gradient_rides_on_a_one_byte_mask(device, dtype):
    """fake_quant of an x that is not a leaf (an activation) saves a bool mask, not x (as torch's
    fake quant ops); a leaf (a weight) saves itself. Values and gradients are the x path's, bit
    for bit, in every layout and granularity."""
    cases = _dense_layouts(device) + [(torch.randn(9, 33, device=device), (9, 1)),
                                      (torch.randn(64, 96, device=device), (64, 3)),
                                      (torch.randn(1025, device=device), (1,))]
    for base, sshape in cases:
        x0 = base.to(dtype) * 3
        scale = torch.rand(sshape, device=device) * 0.1 + 0.02
        zp = torch.randint(-3, 4, sshape, dtype=torch.int32, device=device)
        g = torch.randn(x0.shape, device=device).to(dtype)
        leaf = x0.detach().requires_grad_()
        y_leaf, saved = _saved_while(lambda: ops.fake_quant(leaf, scale, zp, -8, 7))
        assert (dtype, tuple(x0.shape)) in saved and all(d != torch.bool for d, _ in saved)
        y_leaf.backward(g)
        src = x0.detach().requires_grad_()
        act = src.clone()  # (clone keeps a dense x's strides)
        y, saved = _saved_while(lambda: ops.fake_quant(act, scale, zp, -8, 7))
        assert saved == [(torch.bool, tuple(x0.shape))]
        assert y.stride() == torch.empty_like(act).stride() and torch.equal(y, y_leaf)
        y.backward(g)
        assert torch.equal(src.grad, leaf.grad)
    # Straight to the ops: the mask is what fake_quant_backward's STE multiplies by.
    x = torch.randn(37, 11, device=device).to(dtype) * 3
    s, z = torch.rand(37, 1, device=device) * 0.05 + 0.01, torch.zeros(37, 1, device=device)
    y, m = ops.fake_quant_with_mask(x, s, z, -8, 7)
    assert torch.equal(y, ops.fake_quant(x, s, z, -8, 7))
    g = torch.randn(37, 11, device=device).to(dtype)
    assert torch.equal(ops.fake_quant_mask_backward(g, m),
                       ops.fake_quant_backward(g, x, s, z, -8, 7, False, False)[0])
    gt = torch.randn(11, 37, device=device).to(dtype).t()  # a grad in another layout
    assert torch.equal(ops.fake_quant_mask_backward(gt, m), ops.fake_quant_mask_backward(gt.contiguous(), m))
    # A NaN or Inf grad stays NaN where masked (grad * mask, as torch's).
    bad = torch.full_like(g, float("inf"))
    assert torch.equal(ops.fake_quant_mask_backward(bad, m).isnan(), ~m)


def test_with_mask_differentiates_x_only(device):
    x = (torch.randn(6, 9, device=device) * 3).requires_grad_()
    s = torch.tensor([0.1], device=device, requires_grad=True)
    z = torch.tensor([0], dtype=torch.int32, device=device)
    y, m = ops.fake_quant_with_mask(x, s.detach(), z, -8, 7)
    assert y.requires_grad and not m.requires_grad
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx, m.float())
    with pytest.raises(RuntimeError, match="qlib::fake_quant_with_mask: gives no gradient for scale or zero_point"):
        ops.fake_quant_with_mask(x, s, z, -8, 7)
    with torch.no_grad():
        ops.fake_quant_with_mask(x, s, z, -8, 7)  # (no gradient asked for)


def test_inference_mode_qparams_train_an_x_that_needs_a_gradient(device):
    """qparams (or codes) made under inference_mode, used in training: torch's fake quant ops
    (which save only a mask) take them; qlib's saved them and raised "Inference tensors cannot be
    saved for backward". A copy of their values is saved now (plain tensors keep the version check)."""
    with torch.inference_mode():
        s, z = torch.tensor([0.05], device=device), torch.tensor([3], dtype=torch.int32, device=device)
        sc, zc = torch.rand(4, device=device) + 0.01, torch.zeros(4, dtype=torch.int32, device=device)
        q = torch.randint(-9, 9, (4, 8), dtype=torch.int8, device=device)
    x0 = torch.randn(4, 8, device=device) * 5
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ops.fake_quant(x, s, z, -128, 127).sum().backward()
    torch.fake_quantize_per_tensor_affine(xr, s, z, -128, 127).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ops.fake_quant(x, sc.view(4, 1), zc.view(4, 1), -8, 7).sum().backward()
    torch.fake_quantize_per_channel_affine(xr, sc, zc, 0, -8, 7).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ops.lsq_fake_quant(x, s, z, -8, 7, 1.0, 1e-6).sum().backward()  # (an integer zero point is saved as is)
    torch.fake_quantize_per_tensor_affine(xr, s, z, -8, 7).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    t = torch.tensor(0.05, device=device, requires_grad=True)
    ops.dequantize(q, t, torch.tensor(2, device=device), torch.float32).sum().backward()
    assert t.grad.item() == (q.float() - 2).sum().item()


def test_lsq_zero_point_on_its_bound_still_trains(device):
    """A zero point at quant_min (post-ReLU activations start there) keeps its gradient: it is
    fake_quant's, times grad_factor, as inside the range and past it."""
    x = torch.linspace(-2, 3, 101, device=device)
    s = torch.tensor([0.1], device=device, requires_grad=True)
    z = torch.tensor([0.0], device=device, requires_grad=True)
    ops.lsq_fake_quant(x, s, z, 0, 15, 0.5, 1e-6).sum().backward()
    _, gs, gz = ops.fake_quant_backward(torch.ones_like(x), x, s.detach(), z.detach(), 0, 15, True, True)
    assert gz.item() != 0 and torch.equal(z.grad, gz * 0.5) and torch.equal(s.grad, gs * 0.5)


def test_lsq_fake_quant_opcheck_and_errors(device):
    x = torch.randn(9, 12, device=device, requires_grad=True)
    s = (torch.rand(9, 1, device=device) * 0.1 + 0.01).requires_grad_()
    z = torch.randn(9, 1, device=device).mul(3).add(8).requires_grad_()
    torch.library.opcheck(ops.lsq_fake_quant, (x, s, z, 0, 15, 0.05, 1e-6))
    torch.library.opcheck(ops.lsq_fake_quant, (x.detach().half(), s.detach()[:1], torch.zeros(1, device=device), -8, 7, 1.0, 1e-8))
    for args, message in [
        ((0, 15, 0.05, 0.0), r"qlib::lsq_fake_quant: eps must be positive and finite in float32, at least .*, got 0"),
        ((0, 15, float("nan"), 1e-6), r"qlib::lsq_fake_quant: grad_factor must be positive and finite, got nan"),
        ((0, 15, -1.0, 1e-6), r"qlib::lsq_fake_quant: grad_factor must be positive and finite, got -1"),
        ((15, 0, 0.05, 1e-6), r"qlib::lsq_fake_quant: quant_min \(15\) must be less than quant_max \(0\)"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            ops.lsq_fake_quant(x, s, z, *args)
    with pytest.raises(RuntimeError, match=r"qlib::lsq_fake_quant: scale must be floating, got Int"):
        ops.lsq_fake_quant(x, torch.ones(9, 1, dtype=torch.int32, device=device), z, 0, 15, 0.05, 1e-6)
    # The checks fake_quant runs under it name lsq_fake_quant too, with and without autograd.
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for bad_x, bad_s, bad_z, message, reads_values in [
                (x.double(), s, z, r"x must be float32, float16 or bfloat16, got Double", False),
                (x, s[:4], z[:4], r"scale of shape \[4, 1\] does not block x of shape \[9, 12\]", False),
                (x, s.detach().clone().fill_(float("nan")), z, r"scale must be positive and finite.*got nan", True),
                (x, s, torch.full((9, 1), 16, dtype=torch.int32, device=device), r"zero_point must lie in", True),
            ]:
                if reads_values and device == "cuda":
                    continue  # (CUDA reads values only with qlib.set_cuda_value_checks(True))
                with pytest.raises(RuntimeError, match="qlib::lsq_fake_quant: " + message):
                    ops.lsq_fake_quant(bad_x, bad_s, bad_z, 0, 15, 0.05, 1e-6)
                if not reads_values:  # (traced: the fake, or the composite on fake tensors)
                    meta = [t.detach().to("meta") for t in (bad_x, bad_s, bad_z)]
                    with pytest.raises(RuntimeError, match="qlib::lsq_fake_quant: " + message):
                        ops.lsq_fake_quant(*meta, 0, 15, 0.05, 1e-6)


def test_lsq_fake_quant_takes_float8_qparams(device):
    """float8 qparams are taken in float32 (as float16 / bfloat16: a clamp in float8 had no CPU
    kernel); the output equals the op on the same values in float32, gradients included."""
    x = torch.randn(6, 10, device=device)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        s8 = torch.tensor([0.125], device=device).to(dtype).requires_grad_()
        s32 = s8.detach().float().requires_grad_()
        z = torch.zeros(1, device=device)
        y8 = ops.lsq_fake_quant(x, s8, z, -8, 7, None, 1e-6)
        y32 = ops.lsq_fake_quant(x, s32, z, -8, 7, None, 1e-6)
        assert torch.equal(y8, y32)
        y8.sum().backward()
        y32.sum().backward()
        assert s8.grad.dtype == dtype and torch.equal(s8.grad, s32.grad.to(dtype))


def test_python_wrapper_and_quant_range(device):
    x = torch.randn(10, device=device)
    assert torch.equal(qlib.fake_quant(x, 0.1), ops.fake_quant(x, torch.tensor(0.1, device=device), torch.tensor(0, device=device), -128, 127))
    assert qlib.quant_range(8) == (-128, 127)
    assert qlib.quant_range(8, narrow=True) == (-127, 127)
    assert qlib.quant_range(8, signed=False) == (0, 255)
    assert qlib.quant_range(4) == (-8, 7)
    with pytest.raises(ValueError, match="bits"):
        qlib.quant_range(17)


def test_autograd_records_only_what_needs_grad(device):
    """A graph node exactly when x, scale or a floating zero point requires grad and grad
    mode is on; the values are the same either way."""
    x = torch.randn(33, device=device)
    s, zi = torch.tensor(0.05, device=device), torch.tensor(3, device=device)
    zf = torch.tensor(3.0, device=device)
    plain = ops.fake_quant(x, s, zi, -128, 127)
    assert plain.grad_fn is None and not plain.requires_grad
    for args in ((x.requires_grad_(), s, zi), (x.detach(), s.clone().requires_grad_(), zi),
                 (x.detach(), s, zf.clone().requires_grad_())):
        y = ops.fake_quant(*args, -128, 127)
        assert y.requires_grad and y.grad_fn is not None
        assert torch.equal(y.detach(), plain)
        y.sum().backward()
        assert any(a.grad is not None for a in args if a.requires_grad)
        with torch.no_grad():
            assert ops.fake_quant(*args, -128, 127).grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_packs_per_thread_give_the_same_bits(device, dtype):
    """qlib._C.set_fake_quant_cuda_packs (a tuning knob of the CUDA kernels) changes how many
    16-byte packs a thread loads at once, never a value: forward, grad_x and the LSQ sums
    match packs = 1 for per-tensor, per-row, per-column and group blocks, with tails."""
    with pytest.raises(RuntimeError, match="set_fake_quant_cuda_packs: packs must be 1, 2 or 4, got 3"):
        qlib._C.set_fake_quant_cuda_packs(3)
    assert qlib._C.fake_quant_cuda_packs() == 1
    # Blocks a multiple of the pack (rows of 1000, groups of 8) or not (groups of 7, columns),
    # and a last pack cut short (257 * 1001 elements).
    cases = [((257, 1001), (1, 1)), ((257, 1001), (1, 1001)), ((257, 1001), (257, 143)),
             ((257, 1000), (257, 1)), ((257, 1000), (257, 125))]

    def run(x, g, s, z):
        s, z, xr = s.clone().requires_grad_(), z.clone().requires_grad_(), x.clone().requires_grad_()
        y = ops.fake_quant(xr, s, z, -128, 127)
        y.backward(g)
        return y.detach(), xr.grad, s.grad, z.grad

    for xshape, sshape in cases:
        x = tricky_input(xshape, 0.03, device).to(dtype)
        g = torch.randn_like(x)
        s = torch.rand(sshape, device=device) * 0.05 + 0.01
        z = torch.randint(-3, 4, sshape, device=device).float()
        base = run(x, g, s, z)
        for packs in (2, 4):
            try:
                qlib._C.set_fake_quant_cuda_packs(packs)
                got = run(x, g, s, z)
            finally:
                qlib._C.set_fake_quant_cuda_packs(1)
            for a, b in zip(base, got):
                assert torch.equal(a, b), (sshape, packs)


@pytest.mark.skipif(os.environ.get("QLIB_BIG_TESTS") != "1",
                    reason="big-memory test (about 14 GiB); set QLIB_BIG_TESTS=1 to run")
def test_past_2_31_elements():
    """x of 2^31 + 2^16 bfloat16 elements, per-group scales [R, K / 128] (R * K past 2^31, each
    dim small): fake_quant, its LSQ backward and quantize near the start, across 2^31 and at
    the end, against a float32 reference of those rows."""
    R, K, G = 2**16 + 2, 2**15, 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, K, generator=gen).to(torch.bfloat16).repeat(R // 64 + 1, 1)[:R]
    s = torch.rand(R, K // G, generator=gen) * 0.05 + 0.01
    z = torch.randint(-10, 10, (R, K // G), generator=gen).float()
    rows = [0, 2**16 - 1, 2**16, R - 1]  # row 2^16 starts at flat index 2^31

    def ref(r):
        xr, sr, zr = x[r].float().view(-1, G), s[r].view(-1, 1), z[r].view(-1, 1)
        q = torch.round(xr * (1.0 / sr)) + zr
        return q, sr, zr

    y = ops.fake_quant(x, s, z, -128, 127)
    for r in rows:
        q, sr, zr = ref(r)
        assert torch.equal(y[r], ((q.clamp(-128, 127) - zr) * sr).view(-1).to(torch.bfloat16))
    del y
    q8 = ops.quantize(x, s, z, -128, 127, torch.int8)
    for r in rows:
        assert torch.equal(q8[r], ref(r)[0].clamp(-128, 127).view(-1).to(torch.int8))
    del q8
    gx, gs, gz = ops.fake_quant_backward(torch.ones_like(x), x, s, z, -128, 127, True, True)
    for r in rows:
        q, sr, zr = ref(r)
        inside = (q >= -128) & (q <= 127)
        assert torch.equal(gx[r], inside.view(-1).to(torch.bfloat16))
        x_hat = (q.clamp(-128, 127) - zr) * sr
        d_s = torch.where(inside, (x_hat - x[r].float().view(-1, G)) * (1.0 / sr),
                          torch.where(q < -128, -128 - zr, 127 - zr))
        torch.testing.assert_close(gs[r].double(), d_s.double().sum(1), rtol=0, atol=1e-3)
        torch.testing.assert_close(gz[r].double(), torch.where(inside, 0.0, -sr).double().sum(1),
                                   rtol=1e-6, atol=1e-6)
