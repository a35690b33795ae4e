"""Nested differentiation with the ops' torch.func composites: gradients taken outside vmap,
second derivatives across levels (hessian, forward-over-reverse), autograd around a transform,
and vmap rules under grad with captured tensors batched by an outer vmap. Each was a silent
wrong number, a misleading error or an internal assert before (two audits' reproducers)."""
import itertools

import pytest
import torch
import torch._dynamo.testing
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import grad, hessian, jvp, vjp, vmap
import torch.ao.quantization as tq

import qlib

ops = torch.ops.qlib


def _lsq(x, s, z, gf=None):
    return ops.lsq_fake_quant(x, s, z, -8, 7, gf, 1e-4)


def test_lsq_differentiated_outside_vmap_keeps_lsq_gradients():
    """grad(vmap(lsq)) and autograd over vmap(lsq): LSQ's grad_factor and its straight-through
    clamps, as a loop of autograd's."""
    torch.manual_seed(0)
    xs = torch.randn(3, 8) * 3
    for s0, z0, gf in ((0.2, 0.3, None), (0.2, 0.3, 0.5), (-0.1, 0.3, 1.0), (0.2, 9.5, 1.0)):
        s, z = torch.tensor([s0]), torch.tensor([z0])
        sr, zr = s.clone().requires_grad_(), z.clone().requires_grad_()
        sum(_lsq(xs[i], sr, zr, gf).sum() for i in range(3)).backward()
        got = torch.func.grad(lambda a, b: torch.vmap(lambda x: _lsq(x, a, b, gf))(xs).sum(), argnums=(0, 1))(s, z)
        torch.testing.assert_close(got, (sr.grad, zr.grad), rtol=1e-5, atol=1e-6)
        sr2, zr2 = s.clone().requires_grad_(), z.clone().requires_grad_()
        torch.vmap(lambda x: _lsq(x, sr2, zr2, gf))(xs).sum().backward()
        torch.testing.assert_close((sr2.grad, zr2.grad), (sr.grad, zr.grad), rtol=1e-5, atol=1e-6)


def test_model_ensemble_of_learnable_qat_models():
    """stack_module_state + vmap + grad (model ensembling) of LSQ models: each model's gradients."""
    torch.manual_seed(0)
    cfg = qlib.QATConfig(weight_learnable=True, activation_learnable=True)
    models = [qlib.prepare_qat(nn.Sequential(nn.Linear(9, 12), nn.ReLU(), nn.Linear(12, 3)), cfg) for _ in range(2)]
    x, y = torch.randn(6, 9), torch.randint(0, 3, (6,))
    for m in models:
        m(x)
        m.apply(tq.disable_observer)
    params, _ = torch.func.stack_module_state(models)
    buffers = dict(models[0].named_buffers())

    def loss(p):
        out = torch.vmap(lambda p_, xb: torch.func.functional_call(models[0], (p_, buffers), (xb,)), in_dims=(0, None))(p, x)
        return sum(nn.functional.cross_entropy(out[i], y) for i in range(2))

    g = torch.func.grad(loss)(params)
    for i, m in enumerate(models):
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(g[k][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{i} {k}")


def test_second_order_through_the_composites_equals_autograd():
    """hessian / forward-over-reverse of the STE and the frozen Linears: autograd's (create_graph)."""
    torch.manual_seed(0)
    s, z = torch.tensor([0.1]), torch.zeros(1, dtype=torch.int32)
    w, ws = torch.randint(-127, 128, (3, 8), dtype=torch.int8), torch.rand(3) * 0.01 + 0.01
    cb = qlib.codebook_4bit("nf4", "cpu")
    p4, am = ops.quantize_4bit(torch.randn(3, 8), cb, 8)
    x = torch.randn(8) * 0.3
    for name, f in {"fake_quant": lambda t: ops.fake_quant(t, s, z, -8, 7),
                    "int8_linear": lambda t: ops.int8_linear(t, w, ws, None),
                    "linear_4bit": lambda t: ops.linear_4bit(t, p4, am, cb, 8, None)}.items():
        L = lambda t: (f(t) ** 2).sum()
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(L(xr), xr, create_graph=True)
        want = torch.stack([torch.autograd.grad(g[i], xr, retain_graph=True)[0] for i in range(8)])
        torch.testing.assert_close(torch.func.hessian(L)(x), want, msg=name)


def test_primal_of_torch_func_vjp_backpropagates_like_the_op():
    """The output of torch.func.vjp / jvp, backpropagated by plain autograd to tensors outside
    the transform: the op's gradients (not doubled, not dropped)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 2
    s, z = torch.tensor([0.1]), torch.zeros(1, dtype=torch.int32)
    f = lambda t: ops.fake_quant(t, s, z, -8, 7)
    a, b = torch.ones(4, 6, requires_grad=True), torch.ones(4, 6, requires_grad=True)
    f(x * a).sum().backward()
    torch.func.vjp(f, x * b)[0].sum().backward()
    assert torch.equal(b.grad, a.grad)
    # A scale learned by the autograd around the transform (it was dropped, or raised naming
    # fake_quant_with_mask): autograd's gradients.
    w = torch.randn(4, 6)
    for f in (lambda t, a: _lsq(t, a, torch.zeros(1)), lambda t, a: ops.fake_quant(t, a, z, -8, 7)):
        sr = torch.tensor([0.1], requires_grad=True)
        (f(x, sr) * w).sum().backward()
        for transform in (lambda g: torch.func.vjp(g, x)[0], lambda g: torch.func.jvp(g, (x,), (torch.ones_like(x),))[0]):
            s2 = torch.tensor([0.1], requires_grad=True)
            (transform(lambda t: f(t, s2)) * w).sum().backward()
            torch.testing.assert_close(s2.grad, sr.grad)


def test_dequantize_mixed_second_derivative():
    """d2/dscale dzero_point of dequantize, (q - z) * s: -1 per element (autograd's double backward
    gives it)."""
    torch.manual_seed(0)
    q = torch.randint(-100, 100, (2, 3), dtype=torch.int8)
    w = torch.randn(2, 3)
    loss = lambda a, b: (ops.dequantize(q, a, b, torch.float32) * w).sum()
    H = torch.func.hessian(loss, argnums=(0, 1))(torch.tensor([0.1]), torch.tensor([0.5]))
    torch.testing.assert_close(H[0][1], -w.sum().reshape(1, 1))


def _lsq_reference(x, s, z, qmin, qmax):
    """The STE in plain torch ops (round_pass-style LSQ code), the clamp decided on the exact code
    round(v) + z (the round_pass form clamps a code 7 computed as 7 + 1 ulp)."""
    v = x * (1 / s)
    qr = (v.round() + z).detach()
    inside = (qr >= qmin) & (qr <= qmax)
    q = torch.where(inside, (v.round() - v).detach() + v + z, qr.clamp(qmin, qmax))
    return (q - z) * s


def test_lsq_second_derivatives_are_the_stes():
    """Under torch.func LSQ / LSQ+'s second derivatives are those of the STE (round_pass-style
    code): 0 in the scale and in the zero point, and d2 / dscale dzero_point = -1 per element
    outside the range, each times LSQ's factor (which scales each first derivative once).
    (Autograd's create_graph raises for LSQ.)"""
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 2
    w = torch.randn(4, 6)
    s, z = torch.tensor([0.13]), torch.tensor([2.0])  # (LSQ rounds a float zero point, as torch)
    ref = torch.func.hessian(lambda a, b: (_lsq_reference(x, a, b, -8, 7) * w).sum(), argnums=(0, 1))(s, z)
    assert ref[0][1].abs().sum() > 0  # (some x past the range)
    for gf in (1.0, 0.5):
        got = torch.func.hessian(lambda a, b: (_lsq(x, a, b, gf) * w).sum(), argnums=(0, 1))(s, z)
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(got[i][j], gf * ref[i][j], msg=f"{gf} {i} {j}")
    # fake_quant with a learnable scale and floating zero point: the same, factor 1.
    got = torch.func.hessian(lambda a, b: (ops.fake_quant(x, a, b, -8, 7) * w).sum(), argnums=(0, 1))(s, z)
    torch.testing.assert_close(got, ref)


def test_vmap_rule_with_an_outer_batched_capture_under_grad():
    """An x batched by an outer vmap, captured inside grad and an inner vmap: a loop's result
    (aten ops in its place work), not functorch's INTERNAL ASSERT."""
    torch.manual_seed(0)
    xs, us = torch.randn(3, 8) * 3, torch.randn(4)
    s, z = torch.tensor([0.2]), torch.tensor([0], dtype=torch.int32)

    def inner(x):
        return torch.func.grad(lambda a: torch.vmap(lambda u: (ops.fake_quant(x, a, z, -8, 7) * u).sum())(us).sum())(s)

    torch.testing.assert_close(torch.vmap(inner)(xs), torch.stack([inner(xs[i]) for i in range(3)]))


def _int8_overflowing_fp16():
    torch.manual_seed(0)
    N, K = 4, 32
    wi = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    wi[:, 0] = 127
    ws = torch.full((N,), 600.0)  # W_hat = w_int8 * w_scale reaches 76200 > float16's max
    x = (torch.randn(2, K) * 1e-3).half()
    return x, wi, ws


@pytest.mark.parametrize("packed", [False, True])
def test_int8_linear_value_under_transforms_when_w_hat_overflows_x_dtype(packed):
    """The op's value under vjp / jvp equals eager's (finite here), not NaN."""
    x, wi, ws = _int8_overflowing_fp16()
    if packed:
        wp = ops.int8_pack_weight(wi)
        f = lambda a: ops.int8_linear_packed(a, wp, None, ws, None)
    else:
        f = lambda a: ops.int8_linear(a, wi, ws, None)
    y = f(x)
    assert y.isfinite().all()
    assert torch.equal(vjp(f, x)[0], y)
    assert torch.equal(jvp(f, (x,), (torch.ones_like(x),))[0], y)


def test_vmap_grad_of_shared_scale_over_an_empty_batch():
    """vmap(grad wrt a shared scale) over zero samples: an empty result, as vmap(grad wrt x)
    over the same batch gives (it raised 'qlib::fake_quant_backward: scale is empty')."""
    s, z = torch.tensor([0.2]), torch.tensor([0.0])
    x0 = torch.randn(0, 4, 6)
    L = lambda a, b: ops.fake_quant(a, b, z, -8, 7).sum()
    assert vmap(grad(L), in_dims=(0, None))(x0, s).shape == (0, 4, 6)  # (works)
    assert vmap(grad(L, argnums=1), in_dims=(0, None))(x0, s).shape == (0, 1)


def test_forward_ad_dual_with_reverse_mode_around_it_equals_the_reference():
    """forward_ad dual tensors on one argument, eager autograd on another (reverse of the
    tangent): the STE reference's second derivatives, for fake_quant and LSQ (grad_factor 1)."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 4) * 2, torch.randn(3, 4)
    s, z = torch.tensor([0.3]), torch.tensor([1.0])
    fs = {"ref": lambda a, b, c: _lsq_reference(a, b, c, -8, 7),
          "fq": lambda a, b, c: ops.fake_quant(a, b, c, -8, 7),
          "lsq": lambda a, b, c: ops.lsq_fake_quant(a, b, c, -8, 7, 1.0, 1e-4)}
    got = {}
    for name, f in fs.items():
        for i, j in itertools.product(range(3), range(3)):
            args = [x, s, z]
            t = torch.randn(args[i].shape, generator=torch.Generator().manual_seed(10 * i + j))
            req = [a.clone().requires_grad_() for a in args]
            with fwAD.dual_level():
                dargs = list(req)
                dargs[i] = fwAD.make_dual(req[i], t)
                p, tan = fwAD.unpack_dual(((f(*dargs) ** 2) * w).sum())
                g1 = torch.autograd.grad(p, req[j], retain_graph=True)[0]
                g2 = torch.autograd.grad(tan, req[j], allow_unused=True)[0]
            got[name, i, j] = (g1, torch.zeros_like(args[j]) if g2 is None else g2)
    for (name, i, j), (g1, g2) in got.items():
        torch.testing.assert_close(g1, got["ref", i, j][0], msg=f"{name} {i} {j}")
        torch.testing.assert_close(g2, got["ref", i, j][1], rtol=1e-4, atol=1e-4, msg=f"{name} {i} {j}")


def test_outer_vmap_over_qparams_around_grad_around_inner_vmap():
    """qparams batched by an outer vmap, captured under hessian / jvp over the scale with an
    inner vmap over x: a loop's results."""
    torch.manual_seed(0)
    xs = torch.randn(5, 4, 6) * 2
    s, z = torch.tensor([0.2]), torch.tensor([0.0])
    zz = torch.stack([z, z + 1, z - 1])
    for f in (lambda a, b, c: ops.fake_quant(a, b, c, -8, 7),
              lambda a, b, c: ops.lsq_fake_quant(a, b, c, -8, 7, None, 1e-4)):
        h = lambda c: hessian(lambda b: (vmap(lambda a: f(a, b, c))(xs) ** 2).sum())(s)
        torch.testing.assert_close(vmap(h)(zz), torch.stack([h(zz[k]) for k in range(3)]))
        j = lambda c: jvp(lambda b: vmap(lambda a: f(a, b, c))(xs), (s,), (torch.ones_like(s),))[1]
        torch.testing.assert_close(vmap(j)(zz), torch.stack([j(zz[k]) for k in range(3)]))


@pytest.mark.parametrize("op", ["fake_quant", "lsq_fake_quant"])
def test_compiled_per_sample_gradients_with_a_symbolic_batch(op):
    """torch.compile(fullgraph, dynamic=True) of vmap(grad): the batching rules keep the batch
    symbolic (they called numel() on symbolic sizes: an error), one graph for every batch size."""
    torch.manual_seed(0)
    fq = (lambda a, b, c: ops.fake_quant(a, b, c, -8, 7)) if op == "fake_quant" else (lambda a, b, c: _lsq(a, b, c))
    per_sample = torch.vmap(torch.func.grad(lambda a, b, c: (fq(a, b, c) * a).sum(), argnums=(0, 1, 2)), in_dims=(0, None, None))
    s, z = torch.rand(6, 1) * 0.2 + 0.05, torch.randint(-3, 4, (6, 1)).float()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(per_sample, fullgraph=True, dynamic=True, backend=counter)
    for b in (3, 5, 4):
        x = torch.randn(b, 6, 10) * 3
        for got, want in zip(compiled(x, s, z), per_sample(x, s, z)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
