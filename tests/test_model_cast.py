"""model.half() / .bfloat16() / .to(dtype) on quantized models: the quantization state
(scales, zero points, observer statistics, histograms and their float64 ranges, int8
weights) keeps its dtype and values; parameters follow the cast; device moves still apply."""
import copy

import pytest
import torch
from torch import nn

import qlib
from qlib import observers as O

CASTS = [
    ("bfloat16", lambda m: m.bfloat16(), torch.bfloat16),
    ("half", lambda m: m.half(), torch.float16),
    ("to", lambda m: m.to(torch.bfloat16), torch.bfloat16),
]


def mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 7)).to(device)


def calibrated(device, observer):
    cfg = qlib.QATConfig(activation_observer=observer, weight_observer=observer)
    m = qlib.prepare(mlp(device), cfg)
    qlib.calibrate(m, [torch.randn(9, 24, device=device) * (k + 1) for k in range(3)], progress=False)
    return m


MODELS = {
    "prepare_qat": lambda d: qlib.prepare_qat(mlp(d)),
    "prepare_qat_learnable": lambda d: qlib.prepare_qat(
        mlp(d), qlib.QATConfig(weight_learnable=True, activation_learnable=True)),
    "calibrated_minmax": lambda d: calibrated(d, "MinMaxObserver"),
    "calibrated_entropy": lambda d: calibrated(d, "EntropyObserver"),
    "converted": lambda d: qlib.convert(calibrated(d, "MSEObserver")),
    "dynamic": lambda d: qlib.quantize_dynamic(mlp(d)),
}


def state(m):
    return {name: b.clone() for name, b in m.named_buffers()}


@pytest.mark.parametrize("cast_name,cast,dtype", CASTS, ids=[c[0] for c in CASTS])
@pytest.mark.parametrize("kind", list(MODELS))
def test_cast_keeps_quant_state(device, kind, cast_name, cast, dtype):
    model = MODELS[kind](device)
    model(torch.randn(5, 24, device=device))  # learnable qparams initialize on the first batch
    before = state(model)
    cast_model = cast(copy.deepcopy(model))
    after = dict(cast_model.named_buffers())
    assert after.keys() == before.keys()
    for name, b in before.items():
        assert after[name].dtype == b.dtype and after[name].device == b.device, name
        assert torch.equal(after[name], b), name
    for name, p in cast_model.named_parameters():
        assert p.dtype == dtype, name  # parameters follow the cast as usual
    x = torch.randn(6, 24, device=device).to(dtype)
    y = cast_model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    if kind in ("converted", "dynamic"):
        # No parameters: the cast model is the same model, whatever the input dtype.
        assert torch.equal(y, model(x))
    # Back to float32: nothing was rounded on the way.
    back = cast_model.float()
    for name, b in back.named_buffers():
        assert torch.equal(b, cast_model.get_buffer(name)), name
    if kind in ("converted", "dynamic"):
        xf = torch.randn(4, 24, device=device)
        assert torch.equal(back(xf), model(xf))


def test_cast_state_dict_loads_both_ways(device):
    model = qlib.convert(calibrated(device, "PercentileObserver"))
    cast_model = copy.deepcopy(model).bfloat16()
    fresh = qlib.convert(calibrated(device, "PercentileObserver"))
    fresh.load_state_dict(cast_model.state_dict())
    cast_model.load_state_dict(model.state_dict())
    x = torch.randn(3, 24, device=device)
    assert torch.equal(fresh(x), model(x))


def test_observer_cast_keeps_float64_histogram_range(device):
    o = O.MSEObserver(bins=256).to(device)
    o(torch.randn(1000, device=device) * 3.3)
    rng = o.hist_range.clone()
    for cast in (o.half, o.double, o.float):
        cast()
        assert o.hist_range.dtype == torch.float64 and torch.equal(o.hist_range, rng)
        assert o.hist.dtype == torch.int64
    o.half()
    o(torch.randn(1000, device=device).half())  # observing half inputs still works
    assert o.observed.item() == 2000


def test_cast_with_cuda_move():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = qlib.convert(calibrated("cpu", "MinMaxObserver"))
    moved = copy.deepcopy(model).to("cuda", torch.bfloat16)
    for name, b in model.named_buffers():
        got = moved.get_buffer(name)
        assert got.device.type == "cuda" and got.dtype == b.dtype, name
        assert torch.equal(got.cpu(), b), name
    for name, m in model.named_modules():  # (the int8 weight moves too, where only the packing was kept)
        if isinstance(m, qlib.nn.Int8Linear):
            assert torch.equal(moved.get_submodule(name).weight.cpu(), m.weight), name
    x = torch.randn(5, 24)
    torch.testing.assert_close(moved(x.cuda().bfloat16()).float().cpu(), model(x.bfloat16()).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("swap", ["quantize_dynamic", "quantize_weight_only", "prepare_qat"])
def test_modules_take_jagged_nested_inputs(swap):
    """As nn.Linear does, qlib's Linears (and QAT's FakeQuantize) take a jagged nested x: its
    rows run as one dense batch. Other nested layouts raise, naming the module."""
    rows = [torch.randn(3, 64), torch.randn(5, 64)]
    model = getattr(qlib, swap)(nn.Sequential(nn.Linear(64, 32)))
    twin = copy.deepcopy(model)
    out = model(torch.nested.nested_tensor(rows, layout=torch.jagged))
    assert out.is_nested and [t.shape for t in out.unbind()] == [(3, 32), (5, 32)]
    assert torch.equal(out.values(), twin(torch.cat(rows)))
    with pytest.raises(TypeError, match=r"(Int8Linear|Linear4bit|FakeQuantize): a nested tensor must have the jagged layout"):
        model(torch.nested.nested_tensor(rows))
    base = torch.full((2, 5, 64), 1000.0)  # a view with gaps (torch.nested.narrow): only the rows count
    base[0, :3], base[1, :5] = rows[0], rows[1]
    gaps = torch.nested.narrow(base, 1, torch.tensor([0, 0]), torch.tensor([3, 5]), layout=torch.jagged)
    assert torch.equal(twin(gaps).values(), out.values())


def test_linears_built_under_inference_mode_run_outside_it():
    """A Linear4bit / Int8Linear made under inference_mode (its buffers inference tensors) runs,
    and trains its bias, outside it, as nn.Linear does: the weight is saved for backward only
    when x needs a gradient."""
    with torch.inference_mode():
        q4 = qlib.quantize_weight_only(nn.Linear(64, 32))
        q8 = qlib.nn.Int8Linear.from_float(nn.Linear(64, 32))
    q8.bias = nn.Parameter(q8.bias.clone())
    x = torch.randn(4, 64)
    for m in (q4, q8):
        assert m.bias.requires_grad
        m(x).sum().backward()
        torch.testing.assert_close(m.bias.grad, torch.full((32,), 4.0))


@pytest.mark.parametrize("swap", ["quantize_dynamic", "prepare_qat", "prepare", "quantize_weight_only"])
def test_swaps_refuse_float64_linears(swap):
    """The ops take float32 / float16 / bfloat16: a float64 Linear is refused at the swap, by name,
    the model left as it was (quantize_dynamic and prepare_qat took it, then every forward
    raised). A float64 Linear that filter_fn leaves out stays float64."""
    workflow = getattr(qlib, swap)
    model = mlp("cpu").double()
    with pytest.raises(RuntimeError, match=rf"^qlib.{swap}: module '0': weight must be float32, float16 or "
                                           r"bfloat16, got torch.float64; cast the model first"):
        workflow(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(RuntimeError, match=rf"^qlib.{swap}: module '\(the model\)': weight must be"):
        workflow(nn.Linear(8, 4).double())
    model[2].float()
    x = torch.randn(5, 40)
    swapped = workflow(model, filter_fn="2")
    assert type(swapped[0]) is nn.Linear and type(swapped[2]) is not nn.Linear
    assert swapped[2](x).shape == (5, 7)
    for dtype in (torch.float16, torch.bfloat16):  # (the ops' dtypes)
        assert type(workflow(mlp("cpu").to(dtype))[0]) is not nn.Linear
