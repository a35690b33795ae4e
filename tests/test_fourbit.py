"""4-bit weights: quantize_4bit / dequantize_4bit / linear_4bit, Linear4bit, quantize_weight_only.

References are written here with plain torch ops (float32 where the scheme fixes float32
math, float64 for the matmul)."""
import copy
import io
import math
import os

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import qlib
from qlib._fourbit_ops import INT4, NF4
from qlib.nn import Linear4bit

ops = torch.ops.qlib
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ref_quantize(w, codebook, block_size):
    """(codes int64 [N, K], absmax float32 [N, KB]) by the documented scheme."""
    w = w.float()
    n, k = w.shape
    kb = -(-k // block_size)
    padded = torch.zeros(n, kb * block_size, device=w.device)
    padded[:, :k] = w
    absmax = padded.abs().view(n, kb, block_size).amax(-1)
    a = absmax.repeat_interleave(block_size, 1)[:, :k]
    v = torch.where(a > 0, w / a, torch.zeros_like(w))
    cb = codebook.float()
    mid = 0.5 * cb[:-1] + 0.5 * cb[1:]
    codes = (v.unsqueeze(-1) > mid).sum(-1)
    return codes, absmax


def pack(codes):
    n, k = codes.shape
    padded = torch.zeros(n, k + k % 2, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).to(torch.uint8)


def ref_dequantize(codes, absmax, codebook, block_size):
    k = codes.shape[1]
    return codebook.float()[codes] * absmax.repeat_interleave(block_size, 1)[:, :k]


def codebooks(device):
    custom = torch.sort(torch.randn(16)).values.to(device)  # e.g. a k-means codebook
    return {"nf4": qlib.codebook_4bit("nf4", device), "int4": qlib.codebook_4bit("int4", device), "custom": custom}


def test_nf4_is_the_normal_quantile_map():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) and 0, over the max."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(torch.tensor(NF4, dtype=torch.float64), v / v.max(), rtol=0, atol=2e-7)
    assert INT4 == tuple(k / 7 for k in range(-8, 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 7, 16, 64, 128])
@pytest.mark.parametrize("K", [1, 33, 128, 1000])
def test_quantize_and_dequantize_match_the_scheme(device, dtype, block_size, K):
    w = (torch.randn(19, K, device=device) * 3).to(dtype)
    w[3, : min(K, block_size)] = 0.0  # an all-zero block
    w[5, : min(K, block_size)] *= 1e-41  # a block of subnormals (float32; zero in half)
    w[5, 0] = 0.0
    for name, cb in codebooks(device).items():
        packed, absmax = ops.quantize_4bit(w, cb, block_size)
        codes, ref_absmax = ref_quantize(w, cb, block_size)
        assert packed.dtype == torch.uint8 and packed.shape == (19, (K + 1) // 2)
        assert torch.equal(absmax, ref_absmax), name
        assert torch.equal(packed, pack(codes)), name
        ref = ref_dequantize(codes, absmax, cb, block_size)
        for out_dtype in DTYPES:
            got = ops.dequantize_4bit(packed, absmax, cb, K, block_size, out_dtype)
            assert got.dtype == out_dtype and torch.equal(got, ref.to(out_dtype)), (name, out_dtype)


@pytest.mark.parametrize("name", ["nf4", "int4", "custom"])
def test_error_is_within_half_a_codebook_gap(device, name):
    """Float64: each weight lands on its nearest codebook value (times absmax)."""
    w = torch.randn(64, 256, device=device, dtype=torch.float64)
    cb = codebooks(device)[name]
    packed, absmax = ops.quantize_4bit(w.float(), cb, 64)
    w_hat = ops.dequantize_4bit(packed, absmax, cb, 256, 64, torch.float32).double()
    a = absmax.double().repeat_interleave(64, 1)
    v = w / a
    nearest = (v.unsqueeze(-1) - cb.double()).abs().min(-1).values
    err = (w_hat / a - v).abs()
    assert (err <= nearest + 1e-6).all()
    if name != "custom":  # values in [-1, 1] span the block: at most half the widest gap
        assert (err <= (cb[1:] - cb[:-1]).max().item() / 2 + 1e-6).all()


def test_int4_codes_are_rounded_scaled_weights(device):
    """With the int4 codebook, code - 8 = round(7 w / absmax) (ties excepted) and the weights
    equal torch's fake_quantize_per_channel_affine with scale absmax / 7 per block."""
    w = torch.randn(40, 64, device=device)
    packed, absmax = ops.quantize_4bit(w, qlib.codebook_4bit("int4", device), 64)
    codes, _ = ref_quantize(w, qlib.codebook_4bit("int4", device), 64)
    scaled = 7 * w.double() / absmax.double()
    far_from_tie = ((scaled - scaled.floor()) - 0.5).abs() > 1e-4
    assert torch.equal((codes - 8)[far_from_tie], scaled.round().long()[far_from_tie])
    w_hat = ops.dequantize_4bit(packed, absmax, qlib.codebook_4bit("int4", device), 64, 64, torch.float32)
    fq = torch.fake_quantize_per_channel_affine(w, absmax.view(-1) / 7, torch.zeros(40, dtype=torch.int32,
                                                device=device), 0, -8, 7)
    torch.testing.assert_close(w_hat[far_from_tie.all(1)], fq[far_from_tie.all(1)], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 4, 5, 17, 64])
@pytest.mark.parametrize("block_size", [16, 48, 64, 96, 7])
def test_linear_matches_float64(device, dtype, M, block_size):
    K, N = 200, 37
    w = torch.randn(N, K, device=device)
    cb = qlib.codebook_4bit("nf4", device)
    packed, absmax = ops.quantize_4bit(w, cb, block_size)
    w_hat = ops.dequantize_4bit(packed, absmax, cb, K, block_size, torch.float32).double()
    x = torch.randn(M, 2 * K, device=device).to(dtype)[:, ::2]  # non-contiguous
    for bias in (torch.randn(N, device=device), None):
        y = ops.linear_4bit(x, packed, absmax, cb, block_size, bias)
        ref = x.double() @ w_hat.T + (0 if bias is None else bias.double())
        assert y.dtype == dtype and y.shape == (M, N)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    # leading dims
    y3 = ops.linear_4bit(x.reshape(1, M, K), packed, absmax, cb, block_size, None)
    assert y3.shape == (1, M, N)
    torch.testing.assert_close(y3[0], ops.linear_4bit(x.contiguous(), packed, absmax, cb, block_size, None))


@pytest.mark.parametrize("block_size", [64, 48])  # 48: no bfloat16 dots on the CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_alone_equal_rows_in_a_batch(device, dtype, block_size):
    """The fused small-M paths (CPU: up to 32 rows, 16 with bfloat16 dots; CUDA: 4) and the
    batched ones multiply the same W_hat (in bfloat16 for a bfloat16 x where the batch runs a
    bfloat16 GEMM): the same numbers up to summation order and the output's rounding."""
    K, N = 4096, 64
    w = torch.randn(N, K, device=device)
    cb = qlib.codebook_4bit("nf4", device)
    packed, absmax = ops.quantize_4bit(w, cb, block_size)
    x = torch.randn(64, K, device=device).to(dtype)
    if device == "cuda":  # cuBLAS may otherwise add split-K partial sums in bfloat16
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        batch = ops.linear_4bit(x, packed, absmax, cb, block_size, None)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (8e-3, 1e-2)}[dtype]
    for m in (1, 4, 5, 9, 16, 17, 32, 33, 48, 49):
        torch.testing.assert_close(ops.linear_4bit(x[:m], packed, absmax, cb, block_size, None), batch[:m],
                                   rtol=tol[0], atol=tol[1])


def test_linear_autograd(device):
    K, N = 50, 30
    w = torch.randn(N, K, device=device)
    cb = qlib.codebook_4bit("int4", device)
    packed, absmax = ops.quantize_4bit(w, cb, 16)
    w_hat = ops.dequantize_4bit(packed, absmax, cb, K, 16, torch.float32)
    x = torch.randn(3, 5, K, device=device, requires_grad=True)
    bias = torch.randn(N, device=device, requires_grad=True)
    g = torch.randn(3, 5, N, device=device)
    gx, gb = torch.autograd.grad(ops.linear_4bit(x, packed, absmax, cb, 16, bias), (x, bias), g)
    torch.testing.assert_close(gx, g @ w_hat)
    torch.testing.assert_close(gb, g.sum((0, 1)))
    # Each input alone: x without a bias, the bias of an x that needs no gradient.
    (gx_only,) = torch.autograd.grad(ops.linear_4bit(x, packed, absmax, cb, 16, None), (x,), g)
    torch.testing.assert_close(gx_only, g @ w_hat)
    (gb_only,) = torch.autograd.grad(ops.linear_4bit(x.detach(), packed, absmax, cb, 16, bias), (bias,), g)
    torch.testing.assert_close(gb_only, g.sum((0, 1)))
    # A bfloat16 bias gets a bfloat16 gradient; no graph under no_grad.
    bias16 = bias.detach().bfloat16().requires_grad_()
    (gb16,) = torch.autograd.grad(ops.linear_4bit(x.detach(), packed, absmax, cb, 16, bias16), (bias16,), g)
    assert gb16.dtype == torch.bfloat16
    with torch.no_grad():
        assert ops.linear_4bit(x, packed, absmax, cb, 16, bias).grad_fn is None
    # A 1-D x: the bias gradient is grad itself (a sum over no dims summed them all).
    x1 = torch.randn(K, device=device, requires_grad=True)
    g1 = torch.randn(N, device=device)
    gx1, gb1 = torch.autograd.grad(ops.linear_4bit(x1, packed, absmax, cb, 16, bias), (x1, bias), g1)
    torch.testing.assert_close(gx1, g1 @ w_hat)
    assert torch.equal(gb1, g1)
    # A scalar x gets the op's own message with gradients on too.
    with pytest.raises(RuntimeError, match="qlib::linear_4bit: x must have at least one dimension"):
        ops.linear_4bit(torch.tensor(1.0, device=device, requires_grad=True), packed, absmax, cb, 16, bias)


def test_empty_shapes(device):
    cb = qlib.codebook_4bit("nf4", device)
    for n, k in ((0, 8), (5, 0), (0, 0)):
        packed, absmax = ops.quantize_4bit(torch.randn(n, k, device=device), cb, 4)
        assert packed.shape == (n, (k + 1) // 2) and absmax.shape == (n, (k + 3) // 4)
        assert ops.dequantize_4bit(packed, absmax, cb, k, 4, torch.float16).shape == (n, k)
        bias = torch.randn(n, device=device)
        for m in (3, 1, 0):
            y = ops.linear_4bit(torch.randn(m, k, device=device), packed, absmax, cb, 4, bias)
            assert y.shape == (m, n) and torch.equal(y, bias.expand(m, n) if k == 0 else y)
            if y.numel():
                assert y.data_ptr() != bias.data_ptr()  # a copy of the bias, never a view
        torch.library.opcheck(ops.linear_4bit, (torch.randn(1, k, device=device), packed, absmax, cb, 4, bias))


def test_bad_inputs(device):
    cb = qlib.codebook_4bit("nf4", device)
    w = torch.randn(4, 10, device=device)
    packed, absmax = ops.quantize_4bit(w, cb, 4)
    x = torch.randn(2, 10, device=device)
    cases = [
        (lambda: ops.quantize_4bit(w[0], cb, 4), r"qlib::quantize_4bit: w must be 2-D"),
        (lambda: ops.quantize_4bit(w.int(), cb, 4), r"qlib::quantize_4bit: w must be float32, float16 or bfloat16, got Int"),
        (lambda: ops.quantize_4bit(w, cb, 0), r"qlib::quantize_4bit: block_size must be in \[1, 2\^24\], got 0"),
        (lambda: ops.quantize_4bit(w, cb[:8], 4), r"codebook must be float32 of shape \[16\], got Float of shape \[8\]"),
        (lambda: ops.quantize_4bit(w, cb.double(), 4), r"codebook must be float32 of shape \[16\], got Double"),
        (lambda: ops.quantize_4bit(w, cb.flip(0), 4), r"codebook must be finite and strictly increasing, got \[1, 0\.\d+, [^\n]*, -1\]$"),
        (lambda: ops.quantize_4bit(torch.where(w > 1e9, w, w.new_tensor(math.nan)), cb, 4),
         r"qlib::quantize_4bit: w must be finite, got nan at \[0, 0\]"),
        (lambda: ops.dequantize_4bit(packed, absmax, cb, 12, 4, torch.float32),
         r"qlib::dequantize_4bit: packed of shape \[4, 5\] does not hold in_features = 12"),
        (lambda: ops.dequantize_4bit(packed, absmax, cb, 10, 2, torch.float32),
         r"absmax must be float32 \[4, 5\] .*block_size = 2\), got Float of shape \[4, 3\]"),
        (lambda: ops.dequantize_4bit(packed, absmax, cb, 10, 4, torch.int8), r"dtype must be float32, float16 or bfloat16, got Char"),
        (lambda: ops.dequantize_4bit(packed.to(torch.int8), absmax, cb, 10, 4, torch.float32), r"packed must be uint8"),
        (lambda: ops.linear_4bit(x[:, :8], packed, absmax, cb, 4, None), r"qlib::linear_4bit: packed of shape \[4, 5\] does not hold in_features = 8"),
        (lambda: ops.linear_4bit(x.int(), packed, absmax, cb, 4, None), r"qlib::linear_4bit: x must be float32, float16 or bfloat16, got Int"),
        (lambda: ops.linear_4bit(x, packed, absmax, cb, 4, torch.zeros(5, device=device)), r"bias must be floating of shape \[4\], got Float of shape \[5\]"),
        (lambda: ops.linear_4bit(x, packed, absmax.double(), cb, 4, None), r"absmax must be float32"),
    ]
    if torch.cuda.is_available():
        other = "cpu" if device != "cpu" else "cuda"
        cases.append((lambda: ops.linear_4bit(x.to(other), packed, absmax, cb, 4, None), r"x is on .* but packed is on"))
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(ValueError, match="unknown codebook 'fp5'"):
        qlib.codebook_4bit("fp5")
    # The first non-finite weight by index is named, in a block's vector part or its tail.
    for block in (64, 7):
        big = torch.randn(300, 130, device=device)
        big[200, 129], big[7, 70], big[150, 3] = math.inf, math.nan, -math.inf
        with pytest.raises(RuntimeError, match=r"w must be finite, got nan at \[7, 70\]"):
            ops.quantize_4bit(big, cb, block)


def test_fakes_check_the_arguments():
    """On meta tensors (the fakes, as torch.compile and torch.export run them) the 4-bit ops
    raise the kernels' argument errors (quantize_4bit: those that read no values)."""
    m = dict(device="meta")
    cb, x = torch.zeros(16, **m), torch.randn(3, 8, **m)
    p, a = torch.zeros(5, 4, dtype=torch.uint8, **m), torch.zeros(5, 2, **m)
    cases = [
        (lambda: ops.linear_4bit(x.int(), p, a, cb, 4, None), "qlib::linear_4bit: x must be float32"),
        (lambda: ops.linear_4bit(x, p.float(), a, cb, 4, None), "qlib::linear_4bit: packed must be uint8"),
        (lambda: ops.linear_4bit(x, p, a[:, :1], cb, 4, None), r"absmax must be float32 \[5, 2\]"),
        (lambda: ops.linear_4bit(x, p, a, cb[:8], 4, None), r"codebook must be float32 of shape \[16\]"),
        (lambda: ops.linear_4bit(x, p, a, cb, 4, torch.zeros(3, **m)), r"bias must be floating of shape \[5\]"),
        (lambda: ops.linear_4bit(x[:, :6], p, a, cb, 4, None), "does not hold in_features = 6"),
        (lambda: ops.dequantize_4bit(p, a, cb, 9, 4, torch.float32), "qlib::dequantize_4bit: .*in_features = 9"),
        (lambda: ops.dequantize_4bit(p, a, cb, 8, 4, torch.int8), "qlib::dequantize_4bit: dtype must be float32, float16 or bfloat16, got Char"),
        (lambda: ops.quantize_4bit(x.int(), cb, 4), "qlib::quantize_4bit: w must be float32, float16 or bfloat16, got Int"),
        (lambda: ops.quantize_4bit(x[0], cb, 4), r"qlib::quantize_4bit: w must be 2-D"),
        (lambda: ops.quantize_4bit(x, cb[:8], 4), r"qlib::quantize_4bit: codebook must be float32 of shape \[16\]"),
        (lambda: ops.quantize_4bit(x, cb, 2**25), r"qlib::quantize_4bit: block_size must be in \[1, 2\^24\], got 33554432"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert ops.linear_4bit(x, p, a, cb, 4, None).shape == (3, 5)


def test_opcheck(device):
    cb = qlib.codebook_4bit("nf4", device)
    w = torch.randn(24, 41, device=device)
    packed, absmax = ops.quantize_4bit(w, cb, 8)
    torch.library.opcheck(ops.quantize_4bit, (w, cb, 8))
    torch.library.opcheck(ops.quantize_4bit, (w.bfloat16(), cb, 5))
    torch.library.opcheck(ops.dequantize_4bit, (packed, absmax, cb, 41, 8, torch.float16))
    x = torch.randn(3, 41, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)
    torch.library.opcheck(ops.linear_4bit, (x, packed, absmax, cb, 8, b))
    torch.library.opcheck(ops.linear_4bit, (torch.randn(2, 9, 41, device=device).bfloat16(), packed, absmax, cb, 8, None))


def test_ops_keep_weight_shapes_symbolic():
    """linear_4bit / dequantize_4bit's fakes read the weight's N and x's K as sym sizes: one
    compiled function runs 4-bit weights of several shapes without a recompile, and torch.export
    takes a dynamic N (found by a compile audit: each weight shape was a new graph, and export
    refused Dim("N"), "specialized it to be a constant")."""
    from torch._dynamo.utils import counters
    from torch.export import Dim

    cb = qlib.codebook_4bit("nf4")

    def f(x, p, a, b):
        return ops.linear_4bit(x, p, a, cb, 32, b), ops.dequantize_4bit(p, a, cb, x.shape[-1], 32, torch.float32)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda x, p, a, b: ops.linear_4bit(x, p, a, cb, 32, b), fullgraph=True, dynamic=True,
                             backend="eager")
    for n, k in ((20, 64), (24, 64), (40, 96)):  # (N not 16: duck sizing would tie it to the codebook)
        p, a = ops.quantize_4bit(torch.randn(n, k), cb, 32)
        x, b = torch.randn(5, k), torch.randn(n)
        assert torch.equal(compiled(x, p, a, b), ops.linear_4bit(x, p, a, cb, 32, b))
    assert counters["stats"]["unique_graphs"] == 1

    class Layer(nn.Module):
        def forward(self, x, p, a, b):
            return f(x, p, a, b)

    p, a = ops.quantize_4bit(torch.randn(20, 64), cb, 32)
    n, m = Dim("N", min=2, max=4096), Dim("M", min=1, max=4096)
    ep = torch.export.export(Layer(), (torch.randn(5, 64), p, a, torch.randn(20)),
                             dynamic_shapes=({0: m}, {0: n}, {0: n}, {0: n}))
    p, a = ops.quantize_4bit(torch.randn(33, 64), cb, 32)
    x, b = torch.randn(7, 64), torch.randn(33)
    for want, got in zip(f(x, p, a, b), ep.module()(x, p, a, b)):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match=r"qlib::linear_4bit: absmax must be float32 \[20, 2\]"):
        meta = [t.to("meta") for t in (torch.randn(5, 64), p[:20], a[:19], cb)]
        ops.linear_4bit(*meta, 32, None)


# ---------------------------------------------------------------- Linear4bit
@pytest.mark.parametrize("codebook", ["nf4", "int4"])
def test_linear4bit_module(device, codebook):
    lin = nn.Linear(96, 40).to(device)
    q = Linear4bit.from_float(lin, codebook=codebook, block_size=32)
    assert codebook in repr(q) and "block_size=32" in repr(q)
    assert q.weight_bytes() == 40 * 48 + 4 * 40 * 3 + 64  # 4 bits a weight + absmax + codebook
    x = torch.randn(3, 7, 96, device=device)
    w_hat = q.dequantized_weight().double()
    torch.testing.assert_close(q(x).double(), x.double() @ w_hat.T + lin.bias.double(), rtol=1e-5, atol=1e-5)
    rel = (w_hat - lin.weight.double()).norm() / lin.weight.double().norm()
    assert rel < {"nf4": 0.12, "int4": 0.15}[codebook]
    # bf16 model: buffers keep their dtype, the bias follows, outputs in bf16
    qb = Linear4bit.from_float(lin, codebook=codebook, block_size=32).bfloat16()
    assert qb.absmax.dtype == torch.float32 and qb.codebook.dtype == torch.float32 and qb.bias.dtype == torch.bfloat16
    assert qb(x.bfloat16()).dtype == torch.bfloat16


def test_linear4bit_without_bias(device, tmp_path):
    """A bias-free Linear (most LLM projections) through every way to a Linear4bit."""
    lin = nn.Linear(48, 24, bias=False).to(device)
    x = torch.randn(5, 48, device=device)
    model = nn.Sequential(nn.Linear(48, 48, bias=False), nn.ReLU(), nn.Linear(48, 24, bias=False)).to(device)
    qat = qlib.prepare_qat(copy.deepcopy(model), qlib.QATConfig(weight_bits=4, activation_bits=None))
    qat(x)
    for q in (Linear4bit.from_float(lin, block_size=16), qlib.quantize_weight_only(copy.deepcopy(model), "int4", 16)[2],
              qlib.gptq_quantize(copy.deepcopy(model), [x], group_size=16, progress=False)[2], qlib.convert(qat)[2]):
        assert q.bias is None and "bias=False" in repr(q) and "bias" not in q.state_dict()
        w_hat = q.dequantized_weight().double()
        xin = torch.randn(3, 48, device=device)
        torch.testing.assert_close(q(xin).double(), xin.double() @ w_hat.T, rtol=1e-5, atol=1e-5)
    q = Linear4bit.from_float(lin, block_size=16)
    torch.save(q.state_dict(), tmp_path / "q.pt")
    fresh = Linear4bit(48, 24, bias=False, block_size=16, device=device)
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert torch.equal(fresh(x), q(x))


def test_linear4bit_state_dict(device, tmp_path):
    q = Linear4bit.from_float(nn.Linear(33, 20).to(device), codebook=torch.linspace(-1, 1, 16), block_size=8)
    assert "custom" in repr(q)
    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert set(sd) == {"packed", "absmax", "codebook", "bias", "_extra_state"}
    assert sd["_extra_state"].tolist() == [33, 8]
    fresh = Linear4bit(33, 20, block_size=8, device=device)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 33, device=device)
    assert torch.equal(fresh(x), q(x))
    bad = [
        (dict(sd, packed=sd["packed"][:, :-1]), r"state_dict\['packed'\] is torch.uint8 of shape \(20, 16\), expected torch.uint8 of shape \(20, 17\)"),
        (dict(sd, absmax=sd["absmax"].double()), r"state_dict\['absmax'\] is torch.float64"),
        (dict(sd, absmax=-sd["absmax"]), r"negative, NaN or Inf absmax"),
        (dict(sd, codebook=sd["codebook"].flip(0)), r"16 finite, increasing values"),
    ]
    for state, message in bad:
        with pytest.raises(RuntimeError, match=message):
            Linear4bit(33, 20, block_size=8, device=device).load_state_dict(state)
    # Another in_features or block_size with buffers of the same shapes: K = 34 packs into 17 bytes
    # too, and blocks of 7 make 5 blocks too.
    for other in (Linear4bit(34, 20, block_size=8, device=device), Linear4bit(33, 20, block_size=7, device=device)):
        with pytest.raises(RuntimeError, match=r"state_dict\['_extra_state'\] \(in_features, block_size\) is \[33, 8\], expected"):
            other.load_state_dict(sd)
    # A state_dict without it (saved before qlib wrote it) still loads, strictly.
    fresh = Linear4bit(33, 20, block_size=8, device=device)
    fresh.load_state_dict({k: v for k, v in sd.items() if k != "_extra_state"})
    assert torch.equal(fresh(x), q(x))


def test_linear4bit_checks_in_features_and_its_arguments(device):
    q = Linear4bit.from_float(nn.Linear(64, 8).to(device))
    # K = 63 fills the 32 bytes of K = 64 too: the op alone cannot tell them apart.
    with pytest.raises(RuntimeError, match=r"x of shape \(2, 63\) has 63 features, expected 64"):
        q(torch.randn(2, 63, device=device))
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 2.7"):
        Linear4bit(64, 8, block_size=2.7)
    assert Linear4bit(64, 8, block_size=32.0).block_size == 32
    codes = torch.randint(-8, 8, (8, 16), device=device)
    with pytest.raises(ValueError, match="codes must be a 2-D integer tensor, got torch.float32"):
        Linear4bit.from_codes(codes.float() + 0.5, torch.ones(8, 2, device=device), 8)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scales must be finite and >= 0"):
            Linear4bit.from_codes(codes, torch.full((8, 2), bad, device=device), 8)
    # torch.fx traces the check as a call (a Proxy's shape cannot be compared).
    model = qlib.quantize_weight_only(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(device))
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(torch.fx.symbolic_trace(model[0])(torch.ones(2, 64, device=device)), model[0](torch.ones(2, 64, device=device)))
    x = torch.randn(3, 64, device=device)
    assert torch.equal(traced(x), model(x))
    with pytest.raises(RuntimeError, match="has 63 features, expected 64"):
        traced(torch.randn(3, 63, device=device))
    with pytest.raises(ValueError, match="qlib.fit_codebook_4bit: w is on the meta device"):
        Linear4bit.from_float(nn.Linear(64, 8, device="meta"), "kmeans")


def test_quantize_weight_only_compiles_and_exports(device):
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 10)).to(device)
    x = torch.randn(6, 64, device=device)
    ref = model(x)
    qlib.quantize_weight_only(model, filter_fn=lambda m, fqn: fqn != "2")
    assert isinstance(model[0], Linear4bit) and isinstance(model[2], nn.Linear)
    y = model(x)
    assert (y - ref).norm() / ref.norm() < 0.1
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), y)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), y)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() < 64 * 48 * 4  # well below the float32 weights alone


def test_weight_sizes_stay_symbolic_when_traced():
    """dequantize_4bit's in_features and int8_unpack_weight's N, K are SymInts: traced with a
    dynamic K (a function over weights of several shapes) they stay symbolic, one graph for every
    K (an int argument specialised them: a recompile per K, and export refused a dynamic K)."""
    cb = qlib.codebook_4bit("nf4")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    deq = torch.compile(lambda p, a, k: ops.dequantize_4bit(p, a, cb, k, 8, torch.float32),
                        fullgraph=True, dynamic=True, backend=counter)
    unpack = torch.compile(lambda p, n, k: ops.int8_unpack_weight(p, n, k), fullgraph=True, dynamic=True,
                           backend=counter)
    for k in (40, 56, 72):
        w = torch.randn(24, k)
        packed, absmax = ops.quantize_4bit(w, cb, 8)
        assert torch.equal(deq(packed, absmax, k), ops.dequantize_4bit(packed, absmax, cb, k, 8, torch.float32))
        w8 = torch.randint(-127, 128, (k, 24), dtype=torch.int8)
        assert torch.equal(unpack(ops.int8_pack_weight(w8), k, 24), w8)
    assert counter.frame_count == 2

    class Dequant(nn.Module):
        def forward(self, p, a):
            return ops.dequantize_4bit(p, a, cb, 2 * p.shape[1], 8, torch.float32)

    packed, absmax = ops.quantize_4bit(torch.randn(24, 64), cb, 8)
    blocks = torch.export.Dim("blocks", min=2, max=1000)
    ep = torch.export.export(Dequant(), (packed, absmax), dynamic_shapes=({1: 4 * blocks}, {1: blocks}))
    packed, absmax = ops.quantize_4bit(torch.randn(24, 96), cb, 8)
    assert torch.equal(ep.module()(packed, absmax), ops.dequantize_4bit(packed, absmax, cb, 96, 8, torch.float32))


@pytest.mark.parametrize("M", [1, 3, 9, 40])
def test_bfloat16_linear_sums_bfloat16_weights(device, M):
    """A bfloat16 x multiplies W_hat rounded to bfloat16 (the CPU's bf16 dot products and its
    bf16 GEMM, CUDA's GEMM at M > 4) or W_hat itself (the float32 kernels): either way the
    float32 sum of exact products, within the output's rounding of both references."""
    if device == "cuda":  # cuBLAS may otherwise add split-K partial sums in bfloat16
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    K, N = 1000, 48  # blocks of 64 and a short last one (1000 = 15 * 64 + 40)
    w = torch.randn(N, K, device=device)
    cb = qlib.codebook_4bit("nf4", device)
    packed, absmax = ops.quantize_4bit(w, cb, 64)
    w_hat = ops.dequantize_4bit(packed, absmax, cb, K, 64, torch.float32)
    x = torch.randn(M, K, device=device).bfloat16()
    try:
        y = ops.linear_4bit(x, packed, absmax, cb, 64, None).double()
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    refs = [x.double() @ w_hat.double().T, x.double() @ w_hat.bfloat16().double().T]
    gap = (refs[0] - refs[1]).abs()
    err = torch.minimum((y - refs[0]).abs(), (y - refs[1]).abs())
    assert (err <= 2**-8 * refs[1].abs() + 1e-3 * gap.max() + 1e-4).all()


def test_compute_dtype_runs_a_float32_x_in_bfloat16(device):
    lin = nn.Linear(256, 40).to(device)
    q = Linear4bit.from_float(lin, block_size=64, compute_dtype=torch.bfloat16)
    plain = Linear4bit.from_float(lin, block_size=64)
    assert "compute_dtype=torch.bfloat16" in repr(q)
    for m in (1, 50):
        x = torch.randn(m, 256, device=device)
        y = q(x)
        assert y.dtype == torch.float32
        assert torch.equal(y, plain(x.bfloat16()).float())
    with pytest.raises(ValueError, match="compute_dtype must be None, float32, float16 or bfloat16"):
        Linear4bit(4, 4, compute_dtype=torch.int8)
    assert isinstance(qlib.quantize_weight_only(nn.Linear(8, 8), compute_dtype=torch.bfloat16), Linear4bit)


# ---------------------------------------------------------------- k-means codebooks
def ref_kmeans_codebook(w, block_size, iters=200):
    """Weighted Lloyd in float64 on every value w / absmax (weight absmax^2), from NF4."""
    codes, absmax = ref_quantize(w, torch.tensor(NF4), block_size)
    a = absmax.double().repeat_interleave(block_size, 1)[:, :w.shape[1]]
    keep = a > 0
    v = (w.float() / a.float()).double()[keep]
    weight = (a * a)[keep]
    c = torch.tensor(NF4, dtype=torch.float64)
    for _ in range(iters):
        cluster = torch.bucketize(v, 0.5 * (c[:-1] + c[1:]))
        total = torch.zeros(16, dtype=torch.float64).index_add_(0, cluster, weight)
        new = torch.where(total > 0, torch.zeros(16, dtype=torch.float64).index_add_(0, cluster, weight * v) / total, c)
        if torch.equal(new, c):
            break
        c = new
    return c.float()


def weight_error(w, codebook, block_size):
    codes, absmax = ref_quantize(w, codebook, block_size)
    return (ref_dequantize(codes, absmax, codebook, block_size) - w.float()).pow(2).sum().item()


@pytest.mark.parametrize("dist", ["normal", "laplace", "student-t3"])
def test_kmeans_codebook_beats_nf4_and_int4(dist):
    torch.manual_seed(0)
    shape = (300, 257)  # an odd K: the last block of each row is short
    w = {"normal": torch.randn(shape), "laplace": torch.distributions.Laplace(0.0, 1.0).sample(shape),
         "student-t3": torch.distributions.StudentT(3.0).sample(shape)}[dist]
    cb = qlib.fit_codebook_4bit(w, 64)
    assert cb.dtype == torch.float32 and cb.shape == (16,) and bool((cb[1:] > cb[:-1]).all())
    err = weight_error(w, cb, 64)
    assert err < 0.97 * weight_error(w, torch.tensor(NF4), 64)
    assert err < 0.8 * weight_error(w, torch.tensor(INT4), 64)
    # The binned fit is as good as Lloyd on every value, to a fraction of a percent.
    assert err <= 1.01 * weight_error(w, ref_kmeans_codebook(w, 64), 64)


def test_kmeans_codebook_edge_cases(device):
    w = torch.randn(6, 40, device=device)
    w[2] = 0  # all-zero blocks carry no weight
    assert qlib.fit_codebook_4bit(w, 8).device == w.device
    assert torch.equal(qlib.fit_codebook_4bit(torch.zeros(3, 5, device=device)), torch.tensor(NF4, device=device))
    # Few distinct values: empty clusters keep their start, and the result stays increasing.
    cb = qlib.fit_codebook_4bit(torch.tensor([[1.0, -1.0, 0.5, 0.5]], device=device), 4)
    assert bool((cb[1:] > cb[:-1]).all())
    assert torch.equal(qlib.fit_codebook_4bit(torch.empty(0, 4, device=device)), torch.tensor(NF4, device=device))
    for bad, message in [(torch.randn(4), "2-D floating"), (torch.ones(2, 3, dtype=torch.int32), "2-D floating")]:
        with pytest.raises(ValueError, match="qlib.fit_codebook_4bit: .*" + message):
            qlib.fit_codebook_4bit(bad.to(device))
    # Scale-free: the block weights absmax^2 in float64 (in float32 they overflowed past 1.8e19,
    # giving a NaN codebook, and underflowed below 1e-23).
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) ** 3
    fit = qlib.fit_codebook_4bit(g.to(device))
    for factor in (1e20, 1e-24):
        torch.testing.assert_close(qlib.fit_codebook_4bit((g * factor).to(device)), fit, rtol=0, atol=1e-6)
    w[4, 7] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite value \(nan\) at \[4, 7\]"):
        qlib.fit_codebook_4bit(w)


def test_strided_codebook(device):
    """A codebook view (stride 2, or stride 0) reads as its values: quantize_4bit read 16 floats
    from its data pointer (the wrong ones, or past a one-float allocation); the module keeps its
    own copy."""
    w = torch.randn(4, 64, device=device)
    big = torch.linspace(-1, 1, 32, device=device)
    p1, a1 = qlib.quantize_4bit(w, big[::2], 32)
    p2, a2 = qlib.quantize_4bit(w, big[::2].contiguous(), 32)
    assert torch.equal(p1, p2) and torch.equal(a1, a2)
    assert torch.equal(ops.quantize_4bit(w, big[::2], 32)[0], p2)
    with pytest.raises(RuntimeError, match=r"codebook must be finite and strictly increasing, got \[0.5, 0.5"):
        ops.quantize_4bit(w, torch.tensor(0.5, device=device).expand(16), 32)
    lin = nn.Linear(64, 4).to(device)
    m = Linear4bit.from_float(lin, codebook=big[::2], block_size=32)
    assert m.codebook.is_contiguous() and m.codebook.data_ptr() != big.data_ptr()
    torch.testing.assert_close(m.codebook, big[::2])


def test_frozen_absmax_and_codebook_raise_when_they_ask_for_grad(device):
    """dequantize_4bit and linear_4bit give no gradient to absmax or codebook: asking for one
    raises (torch's fallback gave None with a warning); no_grad runs."""
    lin = Linear4bit.from_float(nn.Linear(64, 4).to(device), block_size=32)
    args = [lin.packed, lin.absmax.clone().requires_grad_(), lin.codebook]
    x = torch.randn(3, 64, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="qlib::dequantize_4bit: absmax and codebook get no gradient"):
        ops.dequantize_4bit(*args, 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="qlib::linear_4bit: absmax and codebook get no gradient"):
        ops.linear_4bit(x, *args, 32, None)
    args[1], args[2] = lin.absmax, lin.codebook.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="qlib::linear_4bit: absmax and codebook get no gradient"):
        ops.linear_4bit(x, *args, 32, None)
    with torch.no_grad():
        assert torch.equal(ops.linear_4bit(x, *args, 32, lin.bias), lin(x))
        assert not ops.dequantize_4bit(*args, 64, 32, torch.float32).requires_grad


def test_kmeans_linear4bit_and_quantize_weight_only(device):
    torch.manual_seed(0)
    lin = nn.Linear(200, 48).to(device)
    km = Linear4bit.from_float(lin, codebook="kmeans", block_size=32)
    nf4 = Linear4bit.from_float(lin, codebook="nf4", block_size=32)
    assert "custom" in repr(km)
    assert torch.equal(km.codebook, qlib.fit_codebook_4bit(lin.weight.detach(), 32))
    err = {name: (m.dequantized_weight() - lin.weight).pow(2).sum().item() for name, m in (("km", km), ("nf4", nf4))}
    assert err["km"] < err["nf4"]
    model = qlib.quantize_weight_only(nn.Sequential(nn.Linear(200, 48), nn.ReLU(), lin).to(device), "kmeans", 32)
    assert torch.equal(model[2].codebook, km.codebook) and not torch.equal(model[0].codebook, km.codebook)


def test_lora_adapters_train_on_a_frozen_4bit_layer(device):
    """QLoRA-style: the 4-bit base is frozen, gradients reach x and a low-rank adapter, which
    learns a rank-4 change of the layer."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 32).to(device)
    base = Linear4bit.from_float(dense, "nf4", 32)
    delta = torch.randn(32, 4, device=device) @ torch.randn(4, 64, device=device) * 0.05
    x = torch.randn(256, 64, device=device, requires_grad=True)
    with torch.no_grad():
        target = dense(x) + x @ delta.T
    a = nn.Parameter(torch.randn(4, 64, device=device) * 0.1)
    b = nn.Parameter(torch.zeros(32, 4, device=device))
    opt = torch.optim.Adam([a, b], lr=2e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = (base(x) + x @ a.T @ b.T - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(not t.requires_grad for t in base.buffers())


def test_linear4bit_state_dict_saves_with_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    q = qlib.quantize_weight_only(nn.Sequential(nn.Linear(64, 16)), "nf4")
    st.save_file(q.state_dict(), tmp_path / "q.safetensors")
    fresh = qlib.quantize_weight_only(nn.Sequential(nn.Linear(64, 16)), "nf4")
    fresh.load_state_dict(st.load_file(tmp_path / "q.safetensors"))
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), q(x))


def test_codes_decided_by_float32_midpoints():
    """The documented scheme: codes come from the float32 midpoints (bitsandbytes' NF4 thresholds),
    so within an ulp of a midpoint the rounded midpoint decides, not the exact nearest value."""
    cb = qlib.codebook_4bit("nf4")
    mid = (0.5 * cb[12] + 0.5 * cb[13]).item()  # float32, above the exact midpoint here
    exact = 0.5 * cb[12].double() + 0.5 * cb[13].double()
    assert mid > exact
    for v, code in ((mid, 12), (torch.tensor(mid).nextafter(torch.tensor(2.0)).item(), 13)):
        packed, _ = qlib.quantize_4bit(torch.tensor([[v, 1.0]]), "nf4", 64)
        assert int(packed[0, 0]) & 15 == code


def test_python_wrappers_raise_for_a_codebook_that_asks_for_a_gradient():
    """qlib.linear_4bit / qlib.dequantize_4bit detached a tensor codebook (codebook_4bit's copy),
    so a codebook requiring grad silently got none; README: the ops raise."""
    packed, absmax = qlib.quantize_4bit(torch.randn(4, 64))
    cb = qlib.codebook_4bit("nf4").requires_grad_()
    with pytest.raises(RuntimeError, match="absmax and codebook get no gradient"):
        qlib.linear_4bit(torch.randn(2, 64), packed, absmax, cb, 64)
    with pytest.raises(RuntimeError, match="absmax and codebook get no gradient"):
        qlib.dequantize_4bit(packed, absmax, cb, 64, 64)
    with torch.no_grad():  # (no gradient asked for: runs)
        assert qlib.linear_4bit(torch.randn(2, 64), packed, absmax, cb, 64).shape == (2, 4)


@pytest.mark.parametrize("bad", [1e39, -1e39, 1e-50])
def test_from_codes_checks_scales_in_float32(bad):
    """A float64 scale past float32's range became an Inf absmax (NaN outputs, and a state_dict
    that Linear4bit refuses to load); one below it became 0."""
    codes = torch.randint(-8, 8, (3, 8))
    with pytest.raises(ValueError, match="from_codes"):
        Linear4bit.from_codes(codes, torch.full((3, 1), bad, dtype=torch.float64), 8)
    m = Linear4bit.from_codes(codes, torch.full((3, 1), 0.25, dtype=torch.float64), 8)
    assert torch.equal(m.dequantized_weight(), codes.float() * 0.25)


def test_meta_state_dict_loads_into_a_meta_skeleton():
    """The absmax / codebook checks read values: a meta state raised 'Tensor.item() cannot be
    called on meta tensors' (nn.Linear loads one)."""
    with torch.device("meta"):
        skel = Linear4bit(67, 9, True, "nf4", 32)
    skel.load_state_dict(copy.deepcopy(skel).state_dict(), assign=True)
    assert skel.absmax.is_meta


def test_linear4bit_refuses_an_assigned_weight():
    """lm_head.weight = embed.weight (weight tying, transformers' tie_weights) on a Linear4bit
    added a `weight` Parameter that forward never read: the output stayed the old 4-bit weight's
    while the model reported the tied one. It is refused, naming the module."""
    torch.manual_seed(0)
    m = Linear4bit.from_float(nn.Linear(32, 8))
    x = torch.randn(4, 32)
    ref = m(x)
    for value in (nn.Parameter(torch.randn(8, 32)), torch.randn(8, 32), None):
        with pytest.raises(TypeError, match=r"Linear4bit \(in_features=32.*forward would not read"):
            m.weight = value
    assert not hasattr(m, "weight") and [n for n, _ in m.named_parameters()] == ["bias"]
    assert torch.equal(m(x), ref)


def test_swaps_keep_a_frozen_bias_frozen(device):
    """QLoRA recipe: freeze the base, swap to 4 bits, train what requires grad. The swaps made a
    fresh, trainable bias, so an optimizer over the trainable parameters updated the base's biases."""
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
    qat = qlib.prepare_qat(copy.deepcopy(base), qlib.QATConfig(weight_bits=4, activation_bits=None))
    qat(torch.randn(4, 64, device=device))
    for frozen in (True, False):
        src = copy.deepcopy(base).requires_grad_(not frozen)
        frozen_qat = copy.deepcopy(qat).requires_grad_(not frozen)
        codes = torch.randint(-8, 8, (32, 64), device=device)
        swapped = [qlib.quantize_weight_only(copy.deepcopy(src), "nf4", 32)[0], Linear4bit.from_float(src[0], "int4", 32),
                   Linear4bit.from_codes(codes, torch.rand(32, 2, device=device), 32, src[0].bias),
                   qlib.convert(frozen_qat)[0]]
        for q in swapped:
            assert isinstance(q.bias, nn.Parameter) and q.bias.requires_grad == (not frozen)
            assert torch.equal(q.bias.detach(), src[0].bias.detach())
        assert swapped[0].bias is not src[0].bias  # (a copy: training one leaves the other alone)


def test_from_codes_and_init_check_their_arguments():
    codes = torch.randint(0, 8, (4, 16))
    scale = torch.rand(4, 2) + 0.5
    decoded = codes.float() * scale.repeat_interleave(8, 1)
    # uint8 codes 0..7 are in range (`uint8 >= -8` compared against 248 and refused them).
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int64):
        m = Linear4bit.from_codes(codes.to(dtype), scale, 8)
        assert torch.equal(m.dequantized_weight(), decoded)
    with pytest.raises(ValueError, match=r"Linear4bit.from_codes: codes must lie in \[-8, 7\], got values in \[0, 200\]"):
        Linear4bit.from_codes(torch.tensor([[0, 200]], dtype=torch.uint8), torch.ones(1, 1), 8)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\], got values in \[-9, 3\]"):
        Linear4bit.from_codes(torch.tensor([[-9, 3]]), torch.ones(1, 1), 8)
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(ValueError, match=f"Linear4bit.from_codes: block_size must be a positive integer, got {bad!r}"):
            Linear4bit.from_codes(codes, scale, bad)
    for bias, got in ((torch.ones(5), r"torch.float32 of shape \(5,\)"), (torch.ones(4, 1), r"torch.float32 of shape \(4, 1\)"),
                      (torch.ones(4, dtype=torch.int64), r"torch.int64 of shape \(4,\)"), ([1.0] * 4, "list")):
        with pytest.raises(ValueError, match=r"Linear4bit.from_codes: bias must be a floating tensor of shape \(4,\) "
                                             rf"for codes of shape \(4, 16\), got {got}"):
            Linear4bit.from_codes(codes, scale, 8, bias)
    for args, message in (((-1, 4), "in_features must be an integer >= 0, got -1"),
                          ((4, -2), "out_features must be an integer >= 0, got -2"),
                          ((4.5, 4), "in_features must be an integer >= 0, got 4.5"),
                          ((None, 4), "in_features must be an integer >= 0, got None")):
        with pytest.raises(ValueError, match=f"Linear4bit: {message}"):
            Linear4bit(*args)
    assert Linear4bit(0, 4).packed.shape == (4, 0)  # (an empty layer, as nn.Linear(0, 4))


def test_extra_state_of_another_type_is_refused_by_type():
    """A non-tensor _extra_state (a JSON round trip) with the right values was refused as
    '... is [33, 8], expected [33, 8]'."""
    sd = dict(Linear4bit.from_float(nn.Linear(33, 7), "nf4", block_size=8).state_dict())
    for value in ([33, 8], (33, 8)):
        with pytest.raises(RuntimeError, match=r"state_dict\['_extra_state'\] must be a tensor holding "
                                               rf"\(in_features, block_size\) = \[33, 8\], got a {type(value).__name__}"):
            Linear4bit(33, 7, block_size=8).load_state_dict(dict(sd, _extra_state=value))


def test_jit_trace_without_tracer_warnings():
    """torch.jit.trace of a Linear4bit model: the in_features check reads plain sizes (a
    TracerWarning before), the traced module gives the module's outputs at other batches, and a
    wrong width still raises from the check while tracing."""
    import warnings

    torch.manual_seed(0)
    m = qlib.quantize_weight_only(nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8)), "nf4", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, (torch.randn(5, 40),))
    for rows in (5, 1, 9):
        x = torch.randn(rows, 40) * 3
        assert torch.equal(traced(x), m(x))
    with pytest.raises(RuntimeError, match=r"x of shape \(5, 39\) has 39 features, expected 40"):
        torch.jit.trace(m, (torch.randn(5, 39),))


def test_exported_module_loads_a_state_without_extra_state():
    """README: torch.export keeps no module's extra state, so an exported Linear4bit model refuses
    the model's state_dict strictly (its _extra_state keys are unexpected); leaving them out, it
    loads strictly and runs the loaded weights."""
    x = torch.randn(4, 64)
    make = lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))  # noqa: E731
    exported = torch.export.export(qlib.quantize_weight_only(make(), "nf4", 32), (x,)).module()
    other = qlib.quantize_weight_only(make(), "nf4", 32)
    sd = other.state_dict()
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "0._extra_state", "2._extra_state"'):
        exported.load_state_dict(sd)
    exported.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_extra_state")})
    w0, w2 = other[0].dequantized_weight().double(), other[2].dequantized_weight().double()
    ref = torch.relu(x.double() @ w0.T + other[0].bias.double()) @ w2.T + other[2].bias.double()
    torch.testing.assert_close(exported(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(exported(x), other(x))


@pytest.mark.skipif(os.environ.get("QLIB_BIG_TESTS") != "1",
                    reason="big-memory test (about 12 GiB); set QLIB_BIG_TESTS=1 to run")
def test_linear_and_dequantize_past_2_31_bytes():
    """A packed weight of 2^31 + 49152 bytes (2^32 + 98304 weights): linear_4bit at 1, 3 and 40
    rows and dequantize_4bit, on weight rows at the start, across 2^31 bytes and at the end,
    against a float64 reference of those rows."""
    N, K, bs = 2**17 + 3, 2**15, 64
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (256, K // 2), dtype=torch.uint8, generator=gen).repeat(N // 256 + 1, 1)[:N]
    absmax = torch.rand(N, K // bs, generator=gen) + 0.5
    cb = torch.tensor(NF4, dtype=torch.float32)
    cols = [0, 1, 2**16 - 1, 2**16, 2**17, N - 1]  # row 2^17 starts at byte 2^31
    p = packed[cols].long()
    codes = torch.stack([p & 15, p >> 4], -1).view(len(cols), K)
    w_hat = (cb[codes] * absmax[cols].repeat_interleave(bs, 1)).double()
    for M in (1, 3, 40):
        x = torch.randn(M, K, generator=gen)
        y = ops.linear_4bit(x, packed, absmax, cb, bs, None)[:, cols].double()
        torch.testing.assert_close(y, x.double() @ w_hat.T, rtol=0, atol=1e-5 * (x.double().abs() @ w_hat.abs().T).max().item())
    d = ops.dequantize_4bit(packed, absmax, cb, K, bs, torch.bfloat16)
    assert torch.equal(d[cols], w_hat.to(torch.bfloat16))
