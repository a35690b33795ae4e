"""GPTQ: 4-bit weights chosen with the calibration inputs' second moments (qlib.gptq_quantize)."""
import copy

import pytest
import torch
from torch import nn

import qlib
from qlib.gptq import _Hessian as Hessian, gptq_weight
from qlib.nn import Linear4bit


def correlated_inputs(n, k, rank=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


def rtn_weight(w, bits, group_size):
    """Round-to-nearest with the min-max observer's symmetric per-group scales (float64)."""
    qmax = 2 ** (bits - 1) - 1
    out = []
    for g in range(0, w.shape[1], group_size):
        group = w[:, g:g + group_size].double()
        scale = group.abs().amax(1, keepdim=True) / (qmax + 0.5)
        out.append(torch.clamp(torch.round(group / scale), -qmax - 1, qmax) * scale)
    return torch.cat(out, 1)


def output_error(x, w, w_hat):
    ref = x.double() @ w.double().T
    return ((x.double() @ w_hat.double().T - ref).norm() / ref.norm()).item()


def reference_gptq(w, h, bits, group_size, damp):
    """Codes of GPTQ one column at a time in float64, no blocks (the paper's Algorithm 1)."""
    qmax = 2 ** (bits - 1) - 1
    w = w.double().clone()
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    k = w.shape[1]
    codes = torch.empty_like(w)
    for col in range(k):
        if col % group_size == 0:
            scale = w[:, col:col + group_size].abs().amax(1) / (qmax + 0.5)
        codes[:, col] = torch.clamp(torch.round(w[:, col] / scale), -qmax - 1, qmax)
        e = (w[:, col] - codes[:, col] * scale) / u[col, col]
        w[:, col:] -= e.unsqueeze(1) * u[col, col:].unsqueeze(0)
    return codes


@pytest.mark.parametrize("bits,group_size,K", [(4, 64, 256), (4, 32, 200), (3, 128, 256), (2, 16, 96)])
def test_gptq_beats_round_to_nearest(device, bits, group_size, K):
    """On inputs of unequal sizes (ratios when written: GPTQ 0.25-0.75x the round-to-nearest
    output error, act_order 0.06-0.26x)."""
    torch.manual_seed(0)
    N = 48
    x = correlated_inputs(1024, K).to(device) * torch.rand(K).to(device) * 4
    lin = nn.Linear(K, N).to(device)
    batches = [x[i:i + 128] for i in range(0, 1024, 128)]
    err_rtn = output_error(x, lin.weight, rtn_weight(lin.weight, bits, group_size))
    err = {}
    for act_order in (False, True):
        g = qlib.gptq_quantize(copy.deepcopy(lin), batches, bits, group_size, act_order=act_order, progress=False)
        assert isinstance(g, Linear4bit) and g.block_size == group_size and "int-grid" in repr(g)
        w_hat = g.dequantized_weight()
        err[act_order] = output_error(x, lin.weight, w_hat)
        # Every weight is a code in range times its group's scale.
        scale = g.absmax.repeat_interleave(group_size, 1)[:, :K]
        codes = torch.round(w_hat / scale)
        assert torch.equal(codes * scale, w_hat)
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert err[False] < 0.8 * err_rtn and err[True] < 0.6 * err[False]


def test_gptq_matches_a_float64_reference():
    """Blocks of columns and lazy updates change only rounding, not the method."""
    torch.manual_seed(1)
    K, N = 192, 24
    x = correlated_inputs(512, K, seed=1)
    w = torch.randn(N, K)
    h = 2 * x.T @ x / x.shape[0]
    codes, scales = gptq_weight(w, h, 4, 64, 0.01, block=64)
    ref_codes = reference_gptq(w, h, 4, 64, 0.01)
    # The float32 run may round a few weights to the neighbouring code; the result is as good.
    assert (codes.double() != ref_codes).double().mean() < 0.02
    ref_scales = torch.stack([w[:, g:g + 64].double().abs().amax(1) / 7.5 for g in range(0, K, 64)], 1)
    ours = output_error(x, w, codes.float() * scales.repeat_interleave(64, 1))
    assert ours < 1.02 * output_error(x, w, ref_codes * ref_scales.repeat_interleave(64, 1))


def test_gptq_model_swap_dead_inputs_and_state_dict(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 10))
    x = correlated_inputs(256, 64)
    x[:, 5] = 0  # a dead input: its H row is 0
    with torch.no_grad():
        ref = model(x)
    q = qlib.gptq_quantize(copy.deepcopy(model), [(x[i:i + 64],) for i in range(0, 256, 64)],
                           filter_fn=["0", "2"], progress=False)
    assert isinstance(q[0], Linear4bit) and isinstance(q[2], Linear4bit) and type(q[4]) is nn.Linear
    assert q[0].dequantized_weight()[:, 5].abs().max() == 0
    with torch.no_grad():
        y = q(x)
    assert torch.isfinite(y).all() and ((y - ref).norm() / ref.norm()) < 0.1
    bf = qlib.gptq_quantize(copy.deepcopy(model), [x[:64]], filter_fn=["0", "2"], compute_dtype=torch.bfloat16,
                            progress=False)
    assert bf[0].compute_dtype == torch.bfloat16 and bf(x).dtype == torch.float32
    torch.save(q.state_dict(), tmp_path / "q.pt")
    # Any Linear4bit skeleton of the same block size loads it (the codebook is state too).
    again = qlib.quantize_weight_only(copy.deepcopy(model), "nf4", 64, filter_fn=["0", "2"])
    again.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert "int-grid" in repr(again[0])
    with torch.no_grad():
        assert torch.equal(again(x), y)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("k,n", [(0, 5), (5, 0)])
def test_gptq_empty_layers(k, n):
    lin = nn.Linear(k, n)
    q = qlib.gptq_quantize(lin, [torch.randn(3, k)], progress=False)
    assert isinstance(q, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(q(torch.randn(3, k)), lin(torch.randn(3, k)))  # the bias (or nothing)


def three_linears_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 10))
    x = correlated_inputs(256, 64)
    return model, [x[i:i + 64] for i in range(0, 256, 64)]


def gptq_counting_passes(model, batches, **kwargs):
    """gptq_quantize of a copy of model, and the number of forward passes it ran."""
    calls = []
    counted = copy.deepcopy(model)
    counted.register_forward_pre_hook(lambda mod, args: calls.append(1))
    return qlib.gptq_quantize(counted, batches, progress=False, **kwargs), len(calls)


def test_gptq_in_groups_under_a_hessian_budget():
    """max_hessian_bytes: the same layers as one pass, from one calibration pass a group."""
    model, batches = three_linears_and_batches()
    one = qlib.gptq_quantize(copy.deepcopy(model), batches, progress=False)
    grouped, passes = gptq_counting_passes(model, batches, max_hessian_bytes=4 * 96 * 96)
    assert passes == 3 * len(batches)  # groups {0}, {2}, {4}: 64^2 + 96^2 floats pass the budget
    for i in (0, 2, 4):
        assert torch.equal(grouped[i].packed, one[i].packed) and torch.equal(grouped[i].absmax, one[i].absmax)
    with pytest.raises(ValueError, match="needs 3 passes over the batches; pass a list"):
        qlib.gptq_quantize(copy.deepcopy(model), iter(batches), max_hessian_bytes=4 * 96 * 96, progress=False)


def test_gptq_sequential_calibrates_on_the_quantized_layers_before():
    """sequential=True: each Linear's H comes from the model with the earlier Linears already 4-bit."""
    model, batches = three_linears_and_batches()
    one_pass = qlib.gptq_quantize(copy.deepcopy(model), batches, progress=False)
    seq, passes = gptq_counting_passes(model, batches, sequential=True)
    assert passes == 3 * len(batches)
    assert torch.equal(seq[0].packed, one_pass[0].packed)  # the first Linear sees float inputs either way
    for i in (2, 4):
        h = Hessian(model[i].in_features, "cpu")
        with torch.no_grad():
            for b in batches:
                h.add(seq[:i](b))  # through the 4-bit Linears before it
        codes, scales = gptq_weight(model[i].weight, h.h)
        expected = Linear4bit.from_codes(codes, scales, 64, model[i].bias)
        assert torch.equal(seq[i].packed, expected.packed) and torch.equal(seq[i].absmax, expected.absmax)
        assert not torch.equal(seq[i].packed, one_pass[i].packed)
    with pytest.raises(ValueError, match="sequential=True needs 3 passes over the batches; pass a list"):
        qlib.gptq_quantize(copy.deepcopy(model), iter(batches), sequential=True, progress=False)
    alone = nn.Linear(16, 8)  # the model itself is the one Linear: an iterator is fine
    assert isinstance(qlib.gptq_quantize(alone, iter([torch.randn(4, 16)]), sequential=True, progress=False),
                      Linear4bit)


def test_gptq_bad_arguments():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    for kwargs, message in [(dict(bits=5), "bits must be 2, 3 or 4, got 5"), (dict(bits=8), "got 8"),
                            (dict(group_size=0), "group_size must be a positive int, got 0"),
                            (dict(damp=-1.0), "damp must be >= 0"),
                            (dict(filter_fn=lambda m, fqn: False), "no nn.Linear selected")]:
        with pytest.raises(ValueError, match=message):
            qlib.gptq_quantize(copy.deepcopy(lin), [x], progress=False, **kwargs)
    with pytest.raises(ValueError, match="saw no calibration input"):
        qlib.gptq_quantize(copy.deepcopy(lin), [], progress=False)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="calibration inputs of the Linear hold NaN or Inf"):
        qlib.gptq_quantize(copy.deepcopy(lin), [bad], progress=False)
    with pytest.raises(ValueError, match="not positive definite; raise damp"):
        qlib.gptq_quantize(copy.deepcopy(lin), [torch.ones(4, 16)], damp=0.0, progress=False)
    with pytest.raises(RuntimeError, match=r"qlib.gptq_quantize: module '0': weight must be float32, float16 or "
                                           r"bfloat16, got torch.float64; cast the model first"):
        qlib.gptq_quantize(nn.Sequential(nn.Linear(16, 8).double()), [x.double()], progress=False)
    with pytest.raises(ValueError, match="qlib.gptq_quantize: '0' has a meta weight"):
        qlib.gptq_quantize(nn.Sequential(nn.Linear(16, 8, device="meta")), [torch.ones(4, 16)], progress=False)
    with pytest.raises(ValueError, match="do not match codes"):
        Linear4bit.from_codes(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 3), 8)
    with pytest.raises(ValueError, match="codes must lie in \\[-8, 7\\]"):
        Linear4bit.from_codes(torch.full((8, 16), 9, dtype=torch.int8), torch.ones(8, 2), 8)


def test_gptq_under_autocast_and_keeps_each_modules_mode():
    """Called under autocast, GPTQ's own math stays float32 (the same codes); each module keeps
    its train / eval mode (a frozen BatchNorm in a training model stays frozen)."""
    model = nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.Linear(48, 8))
    model.train()
    model[1].eval()
    batches = [correlated_inputs(32, 64, seed=s) for s in range(3)]
    plain = qlib.gptq_quantize(copy.deepcopy(model), batches, group_size=16, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = qlib.gptq_quantize(copy.deepcopy(model), batches, group_size=16, progress=False)
    # (The first Linear sees the same inputs; the later ones see the autocast model's.)
    assert torch.equal(cast[0].packed, plain[0].packed) and torch.equal(cast[0].absmax, plain[0].absmax)
    assert [m.training for m in plain.modules()] == [True, True, False, True]


@pytest.mark.parametrize("default", [torch.float16, torch.float64])
def test_gptq_does_not_depend_on_the_default_dtype(default):
    """GPTQ's H, scales and errors are float32 under any torch.set_default_dtype (under float16
    it raised: cholesky_cpu not implemented for 'Half'; under float64 H took float64)."""
    model = nn.Sequential(nn.Linear(64, 48, dtype=torch.float32))
    batches = [correlated_inputs(32, 64, seed=s) for s in range(2)]
    plain = qlib.gptq_quantize(copy.deepcopy(model), batches, group_size=16, progress=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        other = qlib.gptq_quantize(copy.deepcopy(model), batches, group_size=16, progress=False)
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(other[0].packed, plain[0].packed) and torch.equal(other[0].absmax, plain[0].absmax)


def test_sequential_gptq_progress_is_one_bar(capsys):
    """Several passes show the Linears bar alone: a nested calibration bar a pass left two lines
    each (with cursor-up codes) in a non-TTY log."""
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
    qlib.gptq_quantize(m, [torch.randn(4, 32) for _ in range(2)], group_size=32, sequential=True)
    err = capsys.readouterr().err
    assert "calibrating" not in err and "\x1b[A" not in err and "GPTQ (Linears)" in err


def gptq_codes(lin, batches, **kwargs):
    """(codes [N, K] as float64, Linear4bit) of gptq_quantize of a copy of lin (int-grid: index - 8)."""
    q = qlib.gptq_quantize(copy.deepcopy(lin), batches, progress=False, **kwargs)
    scale = q.absmax.double().repeat_interleave(q.block_size, 1)[:, :lin.in_features]
    return q.dequantized_weight().double() / scale, q


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_does_not_depend_on_the_weights_scale(act_order):
    """The group scales were floored at float32 eps (choose_qparams' default): weights ~1e-6 lost
    most of their codes (53% output error against 7% round-to-nearest), ~3e-7 all of them. Floored at
    the smallest normal float32 (as quantize takes), the codes are those of the unscaled weights."""
    torch.manual_seed(0)
    K, N = 128, 24
    x = correlated_inputs(512, K)
    lin = nn.Linear(K, N, bias=False)
    codes, q = gptq_codes(lin, [x], group_size=64, act_order=act_order)
    err = output_error(x, lin.weight, q.dequantized_weight())
    for s in (2.0 ** -20, 2.0 ** -40, 2.0 ** -100):  # (powers of two: the same codes, scales times s)
        small = copy.deepcopy(lin)
        with torch.no_grad():
            small.weight.mul_(s)
        small_codes, small_q = gptq_codes(small, [x], group_size=64, act_order=act_order)
        assert torch.equal(small_codes, codes) and torch.equal(small_q.absmax, q.absmax * s)
    for s in (1e-6, 3e-7, 1e-12, 1e-30):
        small = copy.deepcopy(lin)
        with torch.no_grad():
            small.weight.mul_(s)
        _, small_q = gptq_codes(small, [x], group_size=64, act_order=act_order)
        small_err = output_error(x, small.weight, small_q.dequantized_weight())
        rtn_err = output_error(x, small.weight, rtn_weight(small.weight, 4, 64))
        assert abs(small_err - err) < 0.05 * err and small_err < 0.8 * rtn_err, (s, small_err, err, rtn_err)


def test_gptq_does_not_depend_on_the_inputs_scale(device):
    """H summed in float32 limited the inputs: ~1e-20 made it 'not positive definite', ~1e-25
    underflowed it to 0 (every input 'dead': all weights silently 0), ~1e20 overflowed it ('the
    calibration inputs hold NaN or Inf'). Batches are now scaled by powers of two before summing."""
    torch.manual_seed(0)
    K, N = 96, 16
    x = (correlated_inputs(384, K) * torch.rand(K) * 4).to(device)
    x[:, 7] = 0  # a dead input
    lin = nn.Linear(K, N).to(device)
    batches = [x[i:i + 96] * (1 + i) for i in range(0, 384, 96)]  # (batches of unequal sizes too)
    codes, q = gptq_codes(lin, batches, group_size=32)
    assert q.dequantized_weight()[:, 7].abs().max() == 0
    err = output_error(x, lin.weight, q.dequantized_weight())
    assert err < 0.8 * output_error(x, lin.weight, rtn_weight(lin.weight, 4, 32))
    for s in (2.0 ** -70, 2.0 ** -100, 2.0 ** 66, 2.0 ** 100):  # (powers of two: the same codes exactly)
        scaled_codes, scaled = gptq_codes(lin, [b * s for b in batches], group_size=32)
        assert torch.equal(scaled_codes, codes) and torch.equal(scaled.absmax, q.absmax), s
    # Other factors round H differently, and GPTQ carries each rounding on (on these ill-conditioned
    # inputs about 40% of the codes move even at x * 3, its error by up to 7%): as good as unscaled.
    zeros = torch.zeros(8, K, device=device)
    for scaled_batches in ([b * 1e-25 for b in batches], [b * 1e-20 for b in batches], [b * 1e20 for b in batches],
                           [b * 1e30 for b in batches], [zeros] + batches[:2] + [zeros] + batches[2:]):
        _, scaled = gptq_codes(lin, scaled_batches, group_size=32)
        assert scaled.dequantized_weight()[:, 7].abs().max() == 0
        assert abs(output_error(x, lin.weight, scaled.dequantized_weight()) - err) < 0.15 * err
    # Float64 inputs past float32's range are scaled before the cast to float32 (H alone: the
    # swaps refuse a float64 Linear).
    reference = Hessian(K, device)
    for b in batches:
        reference.add(b)
    for s in (2.0 ** -1000, 2.0 ** 900):
        hessian = Hessian(K, device)
        for b in batches:
            hessian.add(b.double() * s)
        assert torch.equal(hessian.h, reference.h), s
    # Only real NaN / Inf inputs are said to hold them, in any batch.
    for bad in (float("nan"), float("inf")):
        poisoned = [b * 2.0 ** -70 for b in batches]
        poisoned[2] = poisoned[2].clone()
        poisoned[2][3, 5] = bad
        with pytest.raises(ValueError, match="calibration inputs of the Linear hold NaN or Inf"):
            qlib.gptq_quantize(copy.deepcopy(lin), poisoned, progress=False)


def test_gptq_with_dead_inputs_does_not_depend_on_hs_scale():
    """A dead input's diagonal is the live columns' mean, not 1.0: with dead columns (ReLU units
    that never fire) and an outlier feature, H times a power of 4 gives the same codes, and GPTQ
    keeps its lead over round-to-nearest (a 1.0 against the normalised H raised the damping
    towards RTN's error; found by a helper's review)."""
    torch.manual_seed(0)
    N, K, g = 64, 256, 64
    w = torch.randn(N, K)
    x = torch.randn(512, K).relu() * (torch.arange(K) % 8 != 0)
    x[:, 1] *= 100.0
    hessian = Hessian(K, "cpu")
    hessian.add(x)

    def output_error(codes, scales):
        w_hat = (codes.float().reshape(N, -1, g) * scales[..., None]).reshape(N, K)
        return ((x.double() @ (w_hat - w).double().T).norm() / (x.double() @ w.double().T).norm()).item()

    codes, scales = gptq_weight(w, hessian.h, 4, g)
    for power in (-10, 10):
        other, _ = gptq_weight(w, hessian.h * 4.0**power, 4, g)
        assert torch.equal(other, codes)
    assert (codes[:, ::8] == 0).all()  # the dead columns' weights
    assert output_error(codes, scales) < 0.8 * output_error(*gptq_weight(w, torch.eye(K), 4, g))


def test_gptq_keeps_a_frozen_bias_frozen():
    """After model.requires_grad_(False) the swap made the biases trainable again (a fresh
    nn.Parameter), so a QLoRA optimizer over what requires grad trained them."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = correlated_inputs(64, 64)
    for trainable in (False, True):
        m = copy.deepcopy(model).requires_grad_(trainable)
        q = qlib.gptq_quantize(copy.deepcopy(m), [x], group_size=32, progress=False)
        for i in (0, 2):
            assert isinstance(q[i], Linear4bit) and q[i].bias.requires_grad == trainable
            assert torch.equal(q[i].bias.detach(), m[i].bias.detach())
        assert [n for n, p in q.named_parameters() if p.requires_grad] == (["0.bias", "2.bias"] if trainable else [])


def test_a_sequential_run_that_fails_late_leaves_the_transformer_fast_path():
    """A sequential gptq_quantize that fails after swapping some Linears puts them back, but the
    swaps had also turned the TransformerEncoderLayer's fast path and its encoder's nested tensors
    off (and hooked the layer): the float model then gave other outputs at padded positions."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
            self.unused = nn.Linear(32, 32)  # (sees no input: the late failure)

        def forward(self, x):
            return self.enc(x)

    model = Model().eval()
    x, mask = torch.randn(2, 5, 32), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        before = model.enc(x, src_key_padding_mask=mask)
    layer = model.enc.layers[0]
    flags = (layer.activation_relu_or_gelu, model.enc.use_nested_tensor, len(layer._forward_hooks),
             len(layer._forward_pre_hooks))
    with pytest.raises(ValueError, match="'unused' saw no calibration input"):
        qlib.gptq_quantize(model, [torch.randn(2, 5, 32)], sequential=True, progress=False)
    assert type(layer.linear1) is nn.Linear and "_qlib_unnests" not in layer.__dict__
    assert (layer.activation_relu_or_gelu, model.enc.use_nested_tensor, len(layer._forward_hooks),
            len(layer._forward_pre_hooks)) == flags
    with torch.no_grad():
        assert torch.equal(model.enc(x, src_key_padding_mask=mask), before)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_holds_one_k_by_k_matrix_per_factorization(monkeypatch, act_order):
    """gptq_quantize hands each H to gptq_weight, which factors it and drops each K x K matrix as the
    next is made: at each factorization only its input is alive (before: the caller's H, its clone and
    the factors, 4-5 K x K float32 at once, 1.2 GB more at K = 8192)."""
    import weakref

    tracked, live_at_calls = [], []

    def tracking(fn):
        def wrapper(a, *args, **kwargs):
            live_at_calls.append(sum(r() is not None for r in tracked) + (not any(r() is a for r in tracked)))
            out = fn(a, *args, **kwargs)
            tracked.extend([weakref.ref(a), weakref.ref(out)])
            return out
        return wrapper

    monkeypatch.setattr(torch.linalg, "cholesky", tracking(torch.linalg.cholesky))
    monkeypatch.setattr(torch, "cholesky_inverse", tracking(torch.cholesky_inverse))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [correlated_inputs(64, 128, seed=s) for s in range(2)]
    reference = copy.deepcopy(model)
    qlib.gptq_quantize(model, batches, act_order=act_order, progress=False)
    assert live_at_calls == [1] * 6, live_at_calls
    # gptq_weight on a caller's H leaves it as it was, and gives the same codes
    h = Hessian(128, "cpu")
    for b in batches:
        h.add(b)
    before = h.h.clone()
    codes, scales = gptq_weight(reference[0].weight, h.h, act_order=act_order)
    assert torch.equal(h.h, before)
    again = Linear4bit.from_codes(codes, scales, 64, reference[0].bias)
    assert torch.equal(again.packed, model[0].packed) and torch.equal(again.absmax, model[0].absmax)
