"""qlib.smooth_quant: SmoothQuant's per-input-feature scales (powers of two, >= 1) moved from
the activations into the weights, carried by every qlib Linear made from a smoothed one."""
import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import qlib
from qlib.nn import Int8Linear, Linear4bit, QATLinear
from qlib.nn.smoothing import BUFFER, divide_input, settle_divide_input


def outlier_inputs(n, k, seed=0, outliers=(3, 11), gain=60.0):
    """Activations whose features `outliers` are `gain` times the others (a transformer's)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, list(outliers)] *= gain
    return x


def mlp(k=32, hidden=48, out=20, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, hidden), nn.GELU(), nn.Linear(hidden, out))


def batches(k=32, count=4, seed=1):
    return [outlier_inputs(16, k, seed + i) for i in range(count)]


def divide_hooks(module):
    return [h for h in module._forward_pre_hooks.values() if h is divide_input]


def unsmoothed(layer):
    """A copy of layer that does not divide its input (its weights still scaled)."""
    twin = copy.deepcopy(layer)
    twin._buffers.pop(BUFFER)
    settle_divide_input(twin)
    return twin


def reference_scales(x_amax, w, alpha):
    """float64 reference: s = 2^round(log2(x_amax^alpha / w_amax^(1 - alpha))), at least 1."""
    w_amax = w.double().abs().amax(0)
    s = []
    for a, b in zip(x_amax.double().tolist(), w_amax.tolist()):
        if a <= 0 or b <= 0:
            s.append(1.0)
        else:
            e = round(alpha * math.log2(a) - (1 - alpha) * math.log2(b))
            s.append(2.0 ** min(max(e, 0), 12))
    return torch.tensor(s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_smoothed_float_model_gives_the_same_outputs_bit_for_bit(dtype):
    model = mlp().to(dtype)
    original = copy.deepcopy(model)
    data = [b.to(dtype) for b in batches()]
    qlib.smooth_quant(model, data, progress=False)
    s = model[0]._buffers[BUFFER]
    assert s.dtype == dtype and s.shape == (32,) and bool((s >= 1).all())
    assert bool((torch.log2(s.float()) == torch.log2(s.float()).round()).all())  # powers of two
    assert s[3] > 1 and s[11] > 1  # (the outlier features)
    x = outlier_inputs(9, 32, seed=7).to(dtype)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
        assert torch.equal(model[0](input=x), original[0](x))  # (input= as a keyword)


def test_scales_equal_a_float64_reference():
    model = mlp()
    w = model[0].weight.detach().clone()
    data = batches()
    data[0][2, 5] = float("nan")  # non-finite values are left out of max |x|
    data[1][0, 6] = float("inf")
    qlib.smooth_quant(model, data, alpha=0.5, progress=False)
    x_amax = torch.stack([torch.where(b.isfinite(), b.abs(), 0).amax(0) for b in data]).amax(0)
    assert torch.equal(model[0]._buffers[BUFFER], reference_scales(x_amax, w, 0.5).float())
    assert torch.equal(model[0].weight.detach(), w * model[0]._buffers[BUFFER])


def int8_output_error(model, x, ref):
    with torch.no_grad():
        return ((model(x) - ref).norm() / ref.norm()).item()


def test_smoothing_lowers_the_int8_error_of_outlier_features():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(32, 48)), outlier_inputs(64, 32, seed=9)
    with torch.no_grad():
        ref = model(x)
    plain = int8_output_error(qlib.quantize_dynamic(copy.deepcopy(model)), x, ref)
    smoothed = int8_output_error(qlib.quantize_dynamic(qlib.smooth_quant(copy.deepcopy(model), batches(),
                                                                         progress=False)), x, ref)
    assert smoothed < 0.5 * plain  # (0.0033 against 0.0109 when written)


def test_every_qlib_linear_made_from_a_smoothed_one_divides_its_input_once():
    model = qlib.smooth_quant(mlp(), batches(), progress=False)
    x = outlier_inputs(5, 32, seed=3)
    s = model[0]._buffers[BUFFER]
    # What each quantized layer must compute: its float-layer counterpart on x / s.
    made = {
        "dynamic": qlib.quantize_dynamic(copy.deepcopy(model)),
        "weight-only": qlib.quantize_weight_only(copy.deepcopy(model), "int4"),
        "qat": qlib.prepare_qat(copy.deepcopy(model), qlib.QATConfig(weight_bits=8, activation_bits=8)),
        "gptq": qlib.gptq_quantize(copy.deepcopy(model), batches(), progress=False),
    }
    static = qlib.prepare(copy.deepcopy(model))
    qlib.calibrate(static, batches(), progress=False)
    made["static"] = qlib.convert(static)
    qat = copy.deepcopy(made["qat"])
    for b in batches():
        qat(b)  # (a training step's forward: the observers record)
    made["qat converted"] = qlib.convert(qat)
    kinds = {"dynamic": Int8Linear, "weight-only": Linear4bit, "qat": QATLinear, "gptq": Linear4bit,
             "static": Int8Linear, "qat converted": Int8Linear}
    for name, m in made.items():
        layer = m[0]
        assert isinstance(layer, kinds[name]), name
        assert torch.equal(layer._buffers[BUFFER], s), name
        with torch.no_grad():
            assert torch.equal(layer(x), unsmoothed(layer)(x / s)), name
    # Direct constructors carry it too.
    for layer in (Int8Linear.from_float(model[0]), Linear4bit.from_float(model[0]), QATLinear.from_float(model[0])):
        assert not divide_hooks(layer) and torch.equal(layer._buffers[BUFFER], s)
        with torch.no_grad():
            assert torch.equal(layer(x), unsmoothed(layer)(x / s))


def test_a_replaced_float_linear_the_caller_still_holds_keeps_dividing():
    """A swap hands the qlib Linear the hook dicts of the float one it replaces (so the user's
    handles still remove hooks): the divide hook stays in them, inert on the qlib Linear."""
    model = qlib.smooth_quant(mlp(), batches(), progress=False)
    x = outlier_inputs(5, 32, seed=4)
    old = model[0]
    with torch.no_grad():
        want = old(x)
        assert torch.equal(want, unsmoothed(old)(x / old._buffers[BUFFER]))
    for swap in (qlib.quantize_dynamic, lambda m: qlib.prepare_qat(m, qlib.QATConfig(weight_bits=8, activation_bits=8))):
        model = qlib.smooth_quant(mlp(), batches(), progress=False)
        old = model[0]
        swap(model)
        assert model[0] is not old and model[0]._forward_pre_hooks is old._forward_pre_hooks
        with torch.no_grad():
            assert torch.equal(old(x), want)  # (it lost its division before)
            assert torch.equal(model[0](x), unsmoothed(model[0])(x / old._buffers[BUFFER]))


def test_a_failed_sequential_gptq_puts_back_the_smoothed_linears():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 20), nn.Linear(20, 20))
    model.forward = lambda x: model[2](model[1](model[0](x)))  # (model[3] sees no input)
    qlib.smooth_quant(model, batches(), filter_fn=["0", "2"], progress=False)
    original, x = copy.deepcopy(model), outlier_inputs(5, 32, seed=2)
    with pytest.raises(ValueError, match="saw no calibration input"):
        qlib.gptq_quantize(model, batches(), sequential=True, progress=False)
    assert type(model[0]) is nn.Linear and len(divide_hooks(model[0])) == 1
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_state_dict_round_trip_and_corrupt_scales():
    model = qlib.quantize_dynamic(qlib.smooth_quant(mlp(), batches(), progress=False))
    x = outlier_inputs(6, 32, seed=4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert f"0.{BUFFER}" in state and f"2.{BUFFER}" in state
    # A fresh model: unit scales first (no batches, no weight changed), then the same swaps.
    fresh = mlp(seed=5)
    w = fresh[0].weight.detach().clone()
    qlib.smooth_quant(fresh, progress=False)
    assert torch.equal(fresh[0].weight.detach(), w) and bool((fresh[0]._buffers[BUFFER] == 1).all())
    fresh = qlib.quantize_dynamic(fresh)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # Without the scales' structure the keys are unexpected (strict loading says which).
    with pytest.raises(RuntimeError, match=BUFFER):
        qlib.quantize_dynamic(mlp()).load_state_dict(state)
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        corrupt = dict(state)
        corrupt[f"0.{BUFFER}"] = state[f"0.{BUFFER}"].clone()
        corrupt[f"0.{BUFFER}"][4] = bad
        with pytest.raises(RuntimeError, match=f"0.{BUFFER}.*positive and finite"):
            fresh.load_state_dict(corrupt)
    # A whole-model pickle keeps the hooks.
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_compile_and_export_run_the_division():
    model = qlib.quantize_dynamic(qlib.smooth_quant(mlp(), batches(), progress=False)).eval()
    x = outlier_inputs(7, 32, seed=6)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(torch.compile(model, fullgraph=True)(x), want)
    program = torch.export.export(model, (x,))
    assert any(n.target == torch.ops.aten.div.Tensor for n in program.graph.nodes)
    with torch.no_grad():
        assert torch.equal(program.module()(x), want)


def test_compiling_an_unsmoothed_twin_first_does_not_drop_the_division():
    """torch.compile's guards skip module hooks by default: a graph traced for an unsmoothed twin
    (same classes) was reused for the smoothed model, without its divisions (MiniLM: cosine
    -0.03). The qlib Linears divide in their forward, and smoothing a float Linear turns hook
    guards on."""
    torch._dynamo.reset()
    x = outlier_inputs(7, 32, seed=6)
    for make in (qlib.quantize_dynamic, lambda m: m):
        twin = make(mlp())
        smoothed = make(qlib.smooth_quant(mlp(), batches(), progress=False))
        with torch.no_grad():  # (inductor's float ops part from eager's in the last bits)
            torch.compile(twin)(x)
            torch.testing.assert_close(torch.compile(smoothed)(x), smoothed(x), rtol=1e-2, atol=1e-2)


def test_transformer_encoder_layer_fast_path_is_turned_off():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0).eval()
    original = copy.deepcopy(layer)
    data = [outlier_inputs(10, 32, seed=i).reshape(2, 5, 32) for i in range(3)]
    qlib.smooth_quant(layer, data, progress=False)
    x = outlier_inputs(12, 32, seed=8).reshape(3, 4, 32)
    with torch.no_grad():  # (the fast path would read linear1's smoothed weight without the hook)
        torch.testing.assert_close(layer(x), original(x), rtol=1e-5, atol=1e-5)


def test_filter_fn_and_layers_that_saw_no_input():
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8), "unused": nn.Linear(8, 8)})
    model.forward = lambda x: model["b"](model["a"](x))
    with pytest.warns(UserWarning, match="1 Linears saw no nonzero finite input.*'unused'"):
        qlib.smooth_quant(model, [torch.randn(4, 8) * torch.arange(1, 9)], filter_fn=["a", "unused"],
                          progress=False)
    assert BUFFER in model["a"]._buffers and BUFFER not in model["b"]._buffers
    assert bool((model["unused"]._buffers[BUFFER] == 1).all())


def test_bad_arguments():
    for alpha in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
            qlib.smooth_quant(mlp(), batches(), alpha=alpha)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        qlib.smooth_quant(lambda x: x, batches())
    with pytest.raises(ValueError, match="gave no batch"):
        qlib.smooth_quant(mlp(), [], progress=False)
    model = qlib.smooth_quant(mlp(), batches(), progress=False)
    with pytest.raises(ValueError, match="smoothed already"):
        qlib.smooth_quant(model, batches(), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qlib.smooth_quant(nn.Sequential(nn.ReLU()), batches(), progress=False)
    assert any("holds no nn.Linear" in str(w.message) for w in caught)
    # A non-float input, or one of the wrong width, reaches the layer's own checks undivided.
    smoothed = qlib.smooth_quant(mlp(), batches(), progress=False)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        smoothed[0](torch.randn(2, 31))
    layer = qlib.quantize_dynamic(smoothed)[0]
    with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16, got Long"):
        layer(torch.ones(2, 32, dtype=torch.long))
    with pytest.raises(RuntimeError, match="x needs K = 32 features"):
        layer(torch.randn(2, 31))


def _rank_batches(rank):
    return [outlier_inputs(8, 32, seed=100 + rank, gain=20.0 + 40.0 * rank) for _ in range(2)]


def _distributed_worker(rank, world, tmp):
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    model = qlib.smooth_quant(mlp(), _rank_batches(rank), progress=False)
    torch.save([model[0]._buffers[BUFFER], model[2]._buffers[BUFFER]], f"{tmp}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # (no gloo teardown: it can abort at exit, as in test_observers_ddp.py)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ranks_get_the_scales_of_all_their_data(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = qlib.smooth_quant(mlp(), _rank_batches(0) + _rank_batches(1), progress=False)
    for a, b, want in zip(r0, r1, (single[0]._buffers[BUFFER], single[2]._buffers[BUFFER])):
        assert torch.equal(a, b) and torch.equal(a, want)


def test_gpt2_conv1d_smoothed_and_its_tied_head_left_alone():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=97, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    original = copy.deepcopy(model)
    data = [torch.randint(0, 97, (2, 11)) for _ in range(3)]
    with pytest.warns(UserWarning, match="1 Linears share their weight.*'lm_head'.*stay unsmoothed"):
        qlib.smooth_quant(model, data, progress=False)
    assert BUFFER not in model.lm_head._buffers
    attn = model.transformer.h[0].attn.c_attn
    assert type(attn).__name__ == "Conv1D" and attn._buffers[BUFFER].shape == (48,)
    ids = torch.randint(0, 97, (2, 9))
    h = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
        assert torch.equal(attn(x=h), original.transformer.h[0].attn.c_attn(h))  # (Conv1D's keyword)
    qlib.quantize_dynamic(model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Int8Linear)
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(layer(x), unsmoothed(layer)(x / layer._buffers[BUFFER]))
