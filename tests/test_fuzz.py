"""Seeded random calls to every op.

- Odd inputs (wrong dtypes and shapes, strided and expanded views, NaN/Inf, zero, negative
  and huge scales, out-of-range zero points and quant ranges, corrupt histograms and packed
  weights, 4-bit codebooks and block sizes): each call returns or raises an error that names the qlib op. The cases run in a
  child process with a deadline, so a crash or a hang fails the test instead of pytest.
- Valid calls on random shapes, block layouts, strides, dtypes and ranges: fake_quant (and
  its STE gradient), quantize / dequantize, int8_gemm and int8_linear against plain-torch
  references.
"""
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import qlib  # noqa: F401

ops = torch.ops.qlib
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_fake_quant import expand_blocks, ref_fake_quant  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ODD_DTYPES = FLOATS * 3 + [torch.float64, torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8,
                           torch.complex64]
SHAPES = [(), (0,), (1,), (5,), (3, 7), (2, 3, 5), (1, 1), (0, 4), (4, 0), (1000,), (2, 4099), (17, 33),
          (3, 1, 8)]
SPECIAL = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e38, -3.4e38, 1e-45, 65504.0]
RANGES = [(-128, 127), (0, 255), (0, 1), (-2**15, 2**15 - 1), (-2**31, 2**31 - 1), (5, 5), (10, -10),
          (0, 2**16), (-2**63, 2**63 - 1), (-8, 7), (-127, 127), (-1, 0)]


def _odd_tensor(r, device, shape=None, dtype=None):
    shape = shape if shape is not None else r.choice(SHAPES)
    dtype = dtype or r.choice(ODD_DTYPES)
    if dtype.is_complex:
        t = torch.randn(shape, dtype=dtype)
    elif dtype == torch.bool:
        t = torch.rand(shape) > 0.5
    elif dtype.is_floating_point:
        t = (torch.randn(shape) * r.choice([1.0, 100.0, 1e-3, 1e30])).to(dtype)
        if t.numel() and r.random() < 0.3:
            t.view(-1)[r.randrange(t.numel())] = r.choice(SPECIAL)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -300), min(info.max, 300) + 1, shape, dtype=dtype)
    t = t.to(device)
    m = r.random()
    if t.dim() >= 2 and m < 0.2:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)
    elif t.dim() >= 1 and t.shape[-1] > 1 and m < 0.3:
        t = torch.cat([t, t], -1)[..., ::2]
    elif t.dim() >= 1 and t.shape[0] == 1 and m < 0.35:
        t = t.expand(3, *t.shape[1:])
    return t


def _odd_scale(r, x, device):
    kind = r.random()
    if kind < 0.4:
        shape = ()
    elif kind < 0.7 and x.dim() > 0:
        shape = [1] * x.dim()
        a = r.randrange(x.dim())
        shape[a] = x.shape[a]
    elif kind < 0.85 and x.dim() > 0:
        shape = list(x.shape)
        if shape[-1] > 1 and shape[-1] % 2 == 0:
            shape[-1] //= 2
    else:
        shape = r.choice(SHAPES)
    s = (torch.rand(shape) * 0.1 + 1e-3).to(r.choice([torch.float32] * 5 + [torch.float64, torch.float16, torch.int32]))
    if s.numel() and s.is_floating_point() and r.random() < 0.3:
        s.view(-1)[r.randrange(s.numel())] = r.choice([0.0, -1.0, math.nan, math.inf, 1e-45, 1e38])
    return s.to(device)


def _odd_zero_point(r, s, qmin, qmax):
    lo, hi = max(min(qmin, qmax), -1000), min(max(qmin, qmax), 1000)
    dtype = r.choice([torch.int32] * 4 + [torch.int64, torch.float32, torch.int8, torch.float64])
    z = torch.randint(lo, hi + 1, s.shape if r.random() < 0.85 else r.choice(SHAPES)).to(dtype)
    if z.numel() and r.random() < 0.15:
        z.view(-1)[0] = r.choice([-100, 100])
    return z.to(s.device)


def _odd_call(r, device):
    """One random call; returns normally or raises."""
    op = r.choice(["fake_quant", "fake_quant_backward", "fake_quant_with_mask", "quantize", "dequantize",
                   "choose_qparams",
                   "observer_qparams",
                   "quantize_per_token", "int8_gemm", "int8_linear", "int8_linear", "int8_linear_packed",
                   "block_minmax", "minmax_observe", "histogram_observe", "histogram_observe_in_place",
                   "histogram_rebin",
                   "histogram_quantile", "histogram_mse_search", "histogram_entropy_search",
                   "quantize_4bit", "dequantize_4bit", "linear_4bit"])
    if op.endswith("_4bit"):
        _odd_4bit_call(r, device, op)
        return
    if op in ("fake_quant", "fake_quant_backward", "fake_quant_with_mask", "quantize", "dequantize"):
        x = _odd_tensor(r, device)
        s = _odd_scale(r, x, device)
        qmin, qmax = r.choice(RANGES)
        z = _odd_zero_point(r, s, qmin, qmax)
        if op == "fake_quant" and x.is_floating_point() and r.random() < 0.5:
            x = x.detach().requires_grad_()
            if s.is_floating_point() and r.random() < 0.5:
                s.requires_grad_()
            ops.fake_quant(x if r.random() < 0.5 else x * 1, s, z, qmin, qmax).sum().backward()
        elif op == "fake_quant_with_mask":
            y, mask = ops.fake_quant_with_mask(x, s, z, qmin, qmax)
            g = _odd_tensor(r, device, mask.shape if r.random() < 0.8 else x.shape[:-1], r.choice(FLOATS))
            ops.fake_quant_mask_backward(g, mask if r.random() < 0.9 else mask.float())
        elif op == "fake_quant":
            ops.fake_quant(x, s, z, qmin, qmax)
        elif op == "fake_quant_backward":
            g = _odd_tensor(r, device, x.shape, r.choice(FLOATS))
            ops.fake_quant_backward(g, x, s, z, qmin, qmax, r.random() < 0.5, r.random() < 0.5)
        elif op == "quantize":
            ops.quantize(x, s, z, qmin, qmax, r.choice([torch.int8, torch.uint8, torch.int16, torch.int32,
                                                        torch.int64, torch.float32, torch.bool]))
        else:
            q = _odd_tensor(r, device, x.shape, r.choice([torch.int8, torch.uint8, torch.int16, torch.int32,
                                                         torch.int64, torch.float32]))
            ops.dequantize(q, s, z, r.choice(FLOATS + [torch.float64, torch.int8]))
    elif op in ("choose_qparams", "observer_qparams"):
        shape = r.choice(SHAPES)
        mn = _odd_tensor(r, device, shape, r.choice(FLOATS + [torch.float64, torch.int32]))
        mx = _odd_tensor(r, device, r.choice([shape, shape, ()]), torch.float32)
        qmin, qmax = r.choice(RANGES)
        getattr(ops, op)(mn, mx, qmin, qmax, r.random() < 0.5, r.choice([1e-8, 0.0, -1.0, math.nan, math.inf]))
    elif op == "quantize_per_token":
        ops.quantize_per_token(_odd_tensor(r, device))
    elif op == "int8_gemm":
        K = r.choice([0, 1, 7, 16, 33, 64, 300])
        a = _odd_tensor(r, device, (r.choice([0, 1, 3, 17, 70]), K if r.random() < 0.9 else K + 1),
                        r.choice([torch.int8] * 4 + [torch.uint8, torch.float32]))
        b = _odd_tensor(r, device, (r.choice([0, 1, 5, 24, 33]), K), r.choice([torch.int8] * 4 + [torch.int32]))
        ops.int8_gemm(a, b)
    elif op in ("int8_linear", "int8_linear_packed"):
        K, N = r.choice([0, 1, 7, 16, 33, 64, 300]), r.choice([0, 1, 5, 24, 33])
        lead = r.choice([(), (1,), (3,), (2, 5), (0,), (17,), (70,)])
        x = _odd_tensor(r, device, (*lead, K if r.random() < 0.9 else K + 3),
                        r.choice(FLOATS * 3 + [torch.float64, torch.int8]))
        w = _odd_tensor(r, device, (N, K) if r.random() < 0.9 else (K, N),
                        r.choice([torch.int8] * 5 + [torch.uint8, torch.float32]))
        ws = (torch.rand(N) * 0.01 + 1e-4).to(r.choice([torch.float32] * 4 + [torch.float16, torch.float64]))
        if r.random() < 0.3:
            ws = _odd_scale(r, w, "cpu")
        if ws.numel() and ws.is_floating_point() and r.random() < 0.2:
            ws.view(-1)[0] = r.choice([0.0, -1.0, math.nan, math.inf])
        ws = ws.to(device)
        bias = None if r.random() < 0.4 else _odd_tensor(
            r, device, r.choice([(N,), (N,), (N + 1,), (1, N), ()]), r.choice(FLOATS + [torch.float64, torch.int32]))
        extra = []
        if r.random() < 0.5:
            act_scale = torch.tensor(r.choice([0.02, 0.02, 0.0, -1.0, math.nan, math.inf, 1e-45, 1e30]))
            if r.random() < 0.2:
                act_scale = torch.rand(r.choice(SHAPES))
            extra.append(act_scale.to(device))
            if r.random() < 0.5:
                qmin, qmax = r.choice(RANGES)
                zp = torch.tensor(r.choice([0, 3, -5, 127, -128, 300, -1000]))
                extra += [zp.to(r.choice([torch.int32, torch.int64, torch.float32])).to(device), qmin, qmax]
        if op == "int8_linear":
            ops.int8_linear(x, w, ws, bias, *extra)
            return
        src = w if r.random() < 0.7 else _odd_tensor(r, device, (N, K + 16), torch.int8)
        packed = ops.int8_pack_weight(src)
        if packed.numel() and r.random() < 0.3:  # a corrupt byte
            packed = packed.clone()
            packed.view(-1)[r.randrange(packed.numel())] = r.randrange(-128, 128)
        if packed.dim() == 1 and r.random() < 0.15:  # truncated
            packed = packed[: max(packed.numel() - r.choice([1, 4, 64]), 0)]
        if r.random() < 0.1:  # not a packed weight at all
            packed = _odd_tensor(r, device, (r.randrange(0, 5000),), torch.int8)
        ops.int8_linear_packed(x, packed, w, ws, bias, *extra)
    elif op in ("block_minmax", "minmax_observe"):
        x = _odd_tensor(r, device, r.choice([(3, 7), (1, 1000), (0, 5), (5, 0), (2, 4099), (7,), ()]))
        if op == "block_minmax":
            ops.block_minmax(x)
            return
        rows = (x.shape[0] if x.dim() else 1) + (1 if r.random() < 0.15 else 0)
        mn = _odd_tensor(r, device, (rows,), r.choice([torch.float32] * 5 + [torch.float64]))
        mx = _odd_tensor(r, device, (rows,), torch.float32)
        observed = torch.tensor(r.choice([0, 5, -1]), dtype=r.choice([torch.int64] * 4 + [torch.int32]), device=device)
        nonfinite = torch.tensor(0, dtype=torch.int64, device=device)
        ops.minmax_observe(x, mn, mx, observed, nonfinite, r.choice([None, 0.01, 0.0, 1.0, -0.5, math.nan, 2.0]))
    else:
        rows, bins = r.choice([1, 3]), r.choice([2, 16, 2048, 1])
        hist = torch.randint(0, 50, (rows, bins), dtype=torch.int64)
        if r.random() < 0.15:
            hist[0, 0] = r.choice([-1, 2**62])
        if r.random() < 0.2:
            hist = hist.to(r.choice([torch.int32, torch.float32]))
        lo = torch.randn(rows, dtype=torch.float64) - 1
        rng = torch.stack([lo, lo + torch.rand(rows, dtype=torch.float64) * 10], 1)
        if r.random() < 0.3:
            rng[0, r.randrange(2)] = r.choice([math.nan, math.inf, -math.inf, 1e300, -1e300, 5.0])
        if r.random() < 0.1:
            rng = torch.tensor([[math.inf, -math.inf]] * rows, dtype=torch.float64)
        if r.random() < 0.1:
            rng = rng.float()
        if r.random() < 0.1:
            rng = rng[:, :1]
        hist, rng = hist.to(device), rng.to(device)
        if op.startswith("histogram_observe"):
            # (70001: rows of several parallel chunks)
            x = _odd_tensor(r, device, (rows + (1 if r.random() < 0.1 else 0), r.choice([0, 1, 9, 4099, 70001])))
            if op == "histogram_observe":
                ops.histogram_observe(x, hist, rng, r.random() < 0.5)
            else:
                counters = [torch.zeros(r.choice([(), (1,), (2,)]), dtype=r.choice([torch.int64, torch.int32]),
                                        device=device) for _ in range(2)]
                ops.histogram_observe_in_place(x, hist, rng, *counters, r.random() < 0.5)
        elif op == "histogram_rebin":
            new = rng.clone()
            if new.shape[-1] == 2:
                new[:, 0] -= r.choice([0.0, 1.0, -1.0, math.nan])
                new[:, 1] += r.choice([0.0, 1e300, -5.0])
            ops.histogram_rebin(hist, rng, new)
        elif op == "histogram_quantile":
            ops.histogram_quantile(hist, rng, r.choice([0.5, 0.0, 1.0, 1.5, -0.1, math.nan, 0.9999]))
        elif op == "histogram_mse_search":
            qmin, qmax = r.choice(RANGES)
            ops.histogram_mse_search(hist, rng, qmin, qmax, r.random() < 0.5, r.choice([1, 128, 0, -3, 10**6]))
        else:
            ops.histogram_entropy_search(hist, rng, r.choice([2, 128, 1, 0, -5, 10**6, 2**40]))


def _odd_4bit_call(r, device, op):
    N, K = r.choice([(0, 8), (5, 0), (3, 7), (17, 33), (16, 128), (2, 4099)])
    block = r.choice([1, 7, 16, 64, 64, 2**24, 2**25, 0, -3])
    cb = qlib.codebook_4bit(r.choice(["nf4", "int4"]), device)
    m = r.random()
    if m < 0.1:
        cb = cb.flip(0)
    elif m < 0.2:
        cb = _odd_tensor(r, device, r.choice([(16,), (8,), (4, 4)]))
    elif m < 0.3:
        cb = cb.clone()
        cb[r.randrange(16)] = r.choice(SPECIAL)
    if op == "quantize_4bit":
        ops.quantize_4bit(_odd_tensor(r, device, r.choice([(N, K), (K,), (N, K, 2)])), cb, block)
        return
    w = torch.randn(N, K, device=device) * r.choice([1.0, 1e-41, 1e30])
    packed, absmax = ops.quantize_4bit(w, qlib.codebook_4bit("nf4", device), max(1, min(block, 2**24)))
    if r.random() < 0.2:
        packed = _odd_tensor(r, device, (N, r.choice([(K + 1) // 2, K, 0])), r.choice([torch.uint8] * 3 + [torch.int8]))
    if r.random() < 0.2:
        absmax = _odd_tensor(r, device, (N, r.choice([1, 2, 5])), torch.float32)
    if r.random() < 0.1:
        absmax = absmax.clone().fill_(r.choice(SPECIAL))
    if op == "dequantize_4bit":
        ops.dequantize_4bit(packed, absmax, cb, r.choice([K, K + 1, -1, 0]), block,
                            r.choice(FLOATS + [torch.float64, torch.int8]))
        return
    x = _odd_tensor(r, device, r.choice([(3, K), (K,), (2, 0, K), (1, K + 1), (40, K)]))
    bias = r.choice([None, None, torch.randn(N, device=device), _odd_tensor(r, device, (N + 1,))])
    ops.linear_4bit(x, packed, absmax, cb, block, bias)


def _run_odd_calls(device, start, count):
    """Child process: prints one line per call that raised an error not naming qlib."""
    if device == "cuda":
        qlib.set_cuda_value_checks(True)  # bad qparam values raise instead of giving NaN
    for seed in range(start, start + count):
        print(f"seed {seed}", file=sys.stderr, flush=True)  # the last one names a hang or crash
        r = random.Random(seed)
        torch.manual_seed(seed)
        try:
            _odd_call(r, device)
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
            if "qlib" not in str(e):
                print(f"seed {seed}: {type(e).__name__} without the op's name: {str(e)[:300]}", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()  # a kernel fault surfaces here at the latest
    print("finished", flush=True)


def test_odd_inputs_raise_named_errors_never_crash(device):
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_fuzz; test_fuzz._run_odd_calls({device!r}, 0, 400)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"a call hung (no end in 400 s); the child's last lines: {err[-500:]}")
    assert out.returncode == 0, f"child died (rc {out.returncode}): {out.stderr[-3000:]}"
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1] == "finished", out.stdout[-3000:]
    assert lines == ["finished"], "\n".join(lines[:20])


def _layout(r, t):
    """t, or the same values in permuted or strided storage."""
    m = r.random()
    if t.dim() >= 2 and m < 0.3:
        p = list(range(t.dim()))
        r.shuffle(p)
        return t.permute(p).contiguous().permute([p.index(i) for i in range(t.dim())])
    if t.dim() >= 1 and m < 0.5:
        return torch.stack([t, t], -1)[..., 0]
    return t


@pytest.mark.parametrize("start", [0, 100])
def test_random_layouts_match_references(device, start):
    for seed in range(start, start + 100):
        r = random.Random(seed)
        torch.manual_seed(seed)
        shape = [r.choice([1, 2, 3, 5, 7, 16, 33, 64, 130]) for _ in range(r.randrange(0, 5))]
        if math.prod(shape) > 300_000:
            continue
        # Each dim of scale: 1, the whole dim, or a divisor of it (blocks).
        sshape = [r.choice([d for d in range(1, n + 1) if n % d == 0]) if r.random() < 0.4
                  else (1 if r.random() < 0.6 else n) for n in shape]
        qmin, qmax = r.choice([(-128, 127), (0, 255), (-8, 7), (-127, 127), (-32768, 32767), (0, 15), (-2, 1), (0, 1)])
        dtype = r.choice(FLOATS)
        scale = torch.rand(sshape) * r.choice([0.1, 1e-3, 10.0]) + 1e-4
        zp = torch.randint(qmin, qmax + 1, scale.shape, dtype=r.choice([torch.int32, torch.int64]))
        x = torch.randn(shape) * float(scale.max()) * (qmax - qmin) / r.choice([1, 4, 16])
        if x.numel():  # a share of exact rounding ties
            flat, pick = x.view(-1), torch.rand(x.numel()) < 0.15
            flat[pick] = ((torch.randint(qmin, qmax, (x.numel(),)).float() + 0.5) * float(scale.reshape(-1)[0]))[pick]
        x = _layout(r, x.to(dtype)).to(device)
        scale, zp = scale.to(device), zp.to(device)
        what = f"seed {seed}: x {tuple(x.shape)} {x.stride()} {dtype}, scale {tuple(scale.shape)}, [{qmin}, {qmax}]"

        xg = x.clone().requires_grad_()
        y = ops.fake_quant(xg, scale, zp, qmin, qmax)
        assert torch.equal(y, ref_fake_quant(x, scale, zp, qmin, qmax).reshape(y.shape)), what
        g = torch.randn(shape, device=device).to(dtype)
        y.backward(g)
        q = torch.round(x.float() * (1.0 / expand_blocks(scale, x))) + expand_blocks(zp, x)
        assert torch.equal(xg.grad, torch.where((q >= qmin) & (q <= qmax), g, torch.zeros_like(g))), what

        if dtype == torch.float32:  # quantize then dequantize is fake_quant
            qdt = torch.int16 if qmin < -128 else (torch.uint8 if qmax > 127 else torch.int8)
            codes = ops.quantize(x, scale, zp, qmin, qmax, qdt)
            assert torch.equal(ops.dequantize(codes, scale, zp, torch.float32), y), what

        M, K, N = r.choice([1, 2, 3, 5, 17, 40]), r.choice([1, 7, 16, 33, 64, 200]), r.choice([1, 5, 16, 33, 70])
        a = _layout(r, torch.randint(-128, 128, (M, K), dtype=torch.int8)).to(device)
        b = _layout(r, torch.randint(-128, 128, (N, K), dtype=torch.int8)).to(device)
        assert torch.equal(ops.int8_gemm(a, b).cpu(), (a.cpu().long() @ b.cpu().long().t()).int()), (seed, M, K, N)

        xl = (torch.randn(M, K) * 3).to(dtype).to(device)
        ws = (torch.rand(N) * 0.01 + 1e-3).to(device)
        bias = torch.randn(N, device=device) if r.random() < 0.5 else None
        out = ops.int8_linear(xl, b, ws, bias)
        xs = xl.float().abs().amax(1, keepdim=True) / 127
        xq = torch.clamp(torch.round(xl.float() * (1.0 / torch.where(xs > 0, xs, torch.ones_like(xs)))), -127, 127)
        ref = (xq.double() @ b.double().t()) * xs.double() * ws.double() + (0 if bias is None else bias.double())
        tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1),
                                   msg=f"seed {seed}: int8_linear M={M} K={K} N={N} {dtype}")
        if device == "cpu":
            assert torch.equal(ops.int8_linear_packed(xl, ops.int8_pack_weight(b), b, ws, bias), out), seed
