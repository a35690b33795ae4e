"""CUDA graphs: qlib's CUDA ops and modules read nothing back from the GPU on their hot paths
(value checks are skipped while a graph is captured), so torch.cuda.graph captures them and
torch.compile(mode="reduce-overhead") runs them; each replay, on new data copied into the
captured inputs, gives the bits an eager call gives. GPU only (collected where CUDA is)."""
import copy

import pytest
import torch
from torch import nn

import qlib
from qlib import observers as O
from qlib.nn import Int8Linear, Linear4bit

if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a GPU", allow_module_level=True)
ops = torch.ops.qlib


def captured(fn, *inputs):
    """(graph, outputs) of fn captured on inputs, after warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*inputs)
    return graph, out if isinstance(out, tuple) else (out,)


def assert_replays_match_eager(fn, examples):
    """fn captured on copies of examples[0]; each example copied in, replayed, compared."""
    inputs = [t.clone() for t in examples[0]]
    graph, outs = captured(fn, *inputs)
    for example in examples:
        for dst, src in zip(inputs, example):
            dst.copy_(src)
        graph.replay()
        want = fn(*example)
        want = want if isinstance(want, tuple) else (want,)
        assert len(outs) == len(want)
        for i, (got, ref) in enumerate(zip(outs, want)):
            assert got.dtype == ref.dtype and torch.equal(got, ref), f"output {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel", "per-group"])
def test_cuda_graph_replays_the_affine_ops(dtype, granularity):
    shape = {"per-tensor": (1,), "per-channel": (37, 1), "per-group": (37, 3)}[granularity]
    scale = torch.rand(shape, device="cuda") * 0.05 + 0.01
    zp = torch.randint(-5, 6, shape, device="cuda", dtype=torch.int32)
    lo, hi = -128, 127

    def step(x, g):
        y, mask = ops.fake_quant_with_mask(x, scale, zp, lo, hi)
        gx, gs, _ = ops.fake_quant_backward(g, x, scale, zp, lo, hi, True, False)
        q = ops.quantize(x, scale, zp, lo, hi, torch.int8)
        return (ops.fake_quant(x, scale, zp, lo, hi), y, mask, ops.fake_quant_mask_backward(g, mask),
                gx, gs, q, ops.dequantize(q, scale, zp, dtype))

    examples = [(torch.randn(37, 96, device="cuda").to(dtype) * (k + 1), torch.randn(37, 96, device="cuda").to(dtype))
                for k in range(3)]
    assert_replays_match_eager(step, examples)


def test_cuda_graph_replays_choose_qparams():
    def qparams(lo, hi):
        return ops.choose_qparams(lo, hi, -128, 127, False, 1e-8) + ops.choose_qparams(lo, hi, -127, 127, True, 1e-8)

    examples = [(-torch.rand(29, device="cuda") * (k + 1), torch.rand(29, device="cuda") * (k + 2)) for k in range(3)]
    assert_replays_match_eager(qparams, examples)


@pytest.mark.parametrize("m", [1, 3, 16, 130])
def test_cuda_graph_replays_the_quantized_linears(m):
    torch.manual_seed(m)
    lin = nn.Linear(96, 72, device="cuda")
    layers = {
        "dynamic": Int8Linear.from_float(lin),
        "static": Int8Linear.from_float(lin, activation="static", act_scale=0.03),
        "4-bit": Linear4bit.from_float(lin, block_size=32),
    }
    for name, layer in layers.items():
        for dtype in (torch.float32, torch.bfloat16):
            mod = copy.deepcopy(layer)
            examples = [(torch.randn(m, 96, device="cuda").to(dtype) * (k + 1),) for k in range(3)]
            with torch.no_grad():
                try:
                    assert_replays_match_eager(mod, examples)
                except AssertionError as e:
                    raise AssertionError(f"{name} {dtype}: {e}") from None


@pytest.mark.parametrize("cls", [O.MinMaxObserver, O.MovingAverageMinMaxObserver, O.PercentileObserver,
                                 O.MSEObserver, O.EntropyObserver])
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_cuda_graph_replays_an_observer(cls, ch_axis):
    """Each replay updates the observer's buffers as an eager call updates a twin's."""
    kwargs = {} if ch_axis is None else {"ch_axis": ch_axis}
    obs, twin = cls(**kwargs).cuda(), cls(**kwargs).cuda()
    xs = [torch.randn(6, 301, device="cuda") * (k + 1) for k in range(4)]
    static = xs[0].clone()
    graph, _ = captured(obs, static)  # (three warm-up calls on xs[0])
    for _ in range(3):
        twin(xs[0])
    for x in xs[1:]:
        static.copy_(x)
        graph.replay()
        twin(x)
    for name, buf in twin.named_buffers():
        assert torch.equal(getattr(obs, name), buf), name
    for got, want in zip(obs.calculate_qparams(), twin.calculate_qparams()):
        assert torch.equal(got, want)


def test_cuda_graph_trees_of_torch_compile_reduce_overhead():
    torch.manual_seed(0)
    # (ReLU: exact in any kernel, so the codes the second layer sees are eager's)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40)).cuda().bfloat16()
    qlib.quantize_dynamic(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for k in range(4):
            x = torch.randn(24, 64, device="cuda", dtype=torch.bfloat16) * (k + 1)
            got = compiled(x).clone()  # (the graph's output buffer is reused by the next replay)
            torch.testing.assert_close(got, model(x), rtol=0, atol=0)
