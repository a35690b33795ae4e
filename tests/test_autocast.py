"""Under torch.autocast the quantized Linears are matmuls, as F.linear: x is cast to the
autocast dtype and the output comes in it (csrc/autocast.cpp)."""
import pytest
import torch
import torch.nn as nn

import qlib

LOW_DTYPES = [torch.bfloat16, torch.float16]


def _linear(K=37, N=23, bias=True):
    return nn.Linear(K, N, bias=bias)


def _x(device, M=5, K=37):
    return torch.randn(3, M, K, device=device)  # (leading dims, odd sizes)


def _int8_args(device, N=23, K=37):
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    w_scale = torch.rand(N, device=device) / 100 + 1e-3
    bias = torch.randn(N, device=device)
    return w, w_scale, bias


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_casts_x_to_the_autocast_dtype(device, dtype, static):
    x = _x(device)
    w, w_scale, bias = _int8_args(device)
    act = (torch.tensor([0.02], device=device), torch.tensor([3], dtype=torch.int32, device=device),
           -128, 127) if static else ()
    with torch.autocast(device, dtype=dtype):
        y = torch.ops.qlib.int8_linear(x, w, w_scale, bias, *act)
    expected = torch.ops.qlib.int8_linear(x.to(dtype), w, w_scale, bias, *act)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # Outside autocast, and with it disabled inside, x's dtype is kept.
    with torch.autocast(device, dtype=dtype), torch.autocast(device, enabled=False):
        assert torch.ops.qlib.int8_linear(x, w, w_scale, bias, *act).dtype == torch.float32
    assert torch.ops.qlib.int8_linear(x, w, w_scale, bias, *act).dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("make", ["dynamic", "static", "4bit", "4bit-compute-float32"])
def test_quantized_linears_run_in_the_autocast_dtype(device, dtype, make):
    lin = _linear().to(device)
    if make in ("dynamic", "static"):
        m = qlib.nn.Int8Linear.from_float(lin, make, act_scale=0.05 if make == "static" else None)
    else:
        compute = torch.float32 if make == "4bit-compute-float32" else None
        m = qlib.nn.Linear4bit.from_float(lin, "nf4", 16, compute_dtype=compute)
    x = _x(device).transpose(0, 1)  # (non-contiguous)
    with torch.autocast(device, dtype=dtype):
        y = m(x)
    assert y.dtype == dtype
    if make == "4bit-compute-float32":  # (autocast wins over compute_dtype)
        m.compute_dtype = None
    torch.testing.assert_close(y, m(x.to(dtype)), rtol=0, atol=0)
    # Near the float64 Linear (the quantization error dominates the cast's).
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert torch.nn.functional.cosine_similarity(y.double().flatten(), ref.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("make", ["int8", "4bit"])
def test_autocast_gradient_reaches_a_float32_x(device, make):
    lin = _linear().to(device)
    m = (qlib.nn.Int8Linear.from_float(lin) if make == "int8"
         else qlib.nn.Linear4bit.from_float(lin, "nf4", 16))
    x = _x(device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        m(x).float().square().sum().backward()
    assert x.grad.dtype == torch.float32
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    m(xb).float().square().sum().backward()
    torch.testing.assert_close(x.grad, xb.grad.float(), rtol=0, atol=0)


def test_autocast_leaves_float64_alone():
    w, w_scale, bias = _int8_args("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="x must be"):
        torch.ops.qlib.int8_linear(_x("cpu").double(), w, w_scale, bias)


def test_quantized_model_compiles_under_autocast():
    model = nn.Sequential(_linear(), nn.ReLU(), nn.Linear(23, 11))
    model[0] = qlib.nn.Int8Linear.from_float(model[0])
    model[2] = qlib.nn.Linear4bit.from_float(model[2], "nf4", 16)
    x = _x("cpu")

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    eager = run(x)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
