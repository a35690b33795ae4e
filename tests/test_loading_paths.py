"""Big-model loading idioms: meta skeletons, assign=True, mmap / safetensors states, swap_tensors;
exported programs and AOTInductor packages loaded in a fresh process."""

import pytest
import torch
from torch import nn

import qlib
from qlib import observers as O


def _mk():
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))


@pytest.mark.parametrize("cls", [O.MinMaxObserver, O.PercentileObserver])
def test_observer_loaded_from_mmap_observes(tmp_path, cls):
    # A state whose tensors cannot grow (torch.load(mmap=True), safetensors, numpy) loaded with
    # assign=True: the first batch must size the buffers (torch: "storage that is not resizable").
    torch.save(cls(ch_axis=0).state_dict(), tmp_path / "o.pt")
    o = cls(ch_axis=0)
    o.load_state_dict(torch.load(tmp_path / "o.pt", mmap=True, weights_only=True), assign=True)
    x = torch.randn(16, 64)
    o(x)
    ref = cls(ch_axis=0)
    ref(x)
    assert all(torch.equal(a, b) for a, b in zip(o.calculate_qparams(), ref.calculate_qparams()))


def test_meta_skeleton_errors_name_the_state():
    ref = qlib.quantize_weight_only(_mk(), "nf4", block_size=64)
    with torch.device("meta"):
        sk = qlib.quantize_weight_only(_mk(), "nf4", block_size=32)
        st = qlib.nn.Int8Linear(64, 96, activation="static")
    repr(sk), repr(st)
    with pytest.raises(RuntimeError, match="_extra_state"):
        sk.load_state_dict(ref.state_dict(), assign=True)


@pytest.mark.parametrize("assign", [False, True])
def test_int8_loads_with_swap_tensors(assign):
    torch.manual_seed(0)
    ref = qlib.quantize_dynamic(_mk())
    m = qlib.quantize_dynamic(_mk())
    x = torch.randn(8, 64)
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.load_state_dict(ref.state_dict(), assign=assign)
        assert torch.equal(m(x), ref(x))
        sd = m.state_dict()  # (the module holds its plain weight while sd lives: loads still swap)
        m.load_state_dict(ref.state_dict(), assign=assign)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    assert torch.equal(m(x), ref(x))
    del sd


def test_static_int8_meta_skeleton_built_by_hand():
    """README "Big models": convert needs values, so a static int8 skeleton is built by hand."""
    torch.manual_seed(0)
    ref = qlib.convert(qlib.calibrate(qlib.prepare(_mk()), [torch.randn(4, 64)], progress=False))
    with torch.device("meta"):
        sk = _mk()
        sk[0] = qlib.nn.Int8Linear(64, 96, True, "static", device="meta")
        sk[2] = qlib.nn.Int8Linear(96, 32, True, "static", device="meta")
    sk.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(5, 64)
    assert torch.equal(sk(x), ref(x))


def test_module_level_dtype_and_device_mixing():
    """As nn.Linear: other dtypes of x are refused (also when tracing: the fakes check them);
    a meta batch does not move a CPU observer's state to meta; an empty first batch is empty."""
    from qlib.nn import FakeQuantize
    lin = nn.Linear(4, 2)
    four = qlib.nn.Linear4bit.from_float(lin, compute_dtype=torch.bfloat16)
    for x in (torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.bool)):
        with pytest.raises(RuntimeError, match=r"qlib::linear_4bit: x must be float32, float16 or bfloat16"):
            four(x)
    int8 = qlib.nn.Int8Linear.from_float(nn.Linear(64, 32))
    with pytest.raises(Exception, match=r"qlib::int8_linear_packed: x must be float32, float16 or bfloat16"):
        torch.export.export(int8, (torch.randn(4, 64, dtype=torch.float64),))
    fq = FakeQuantize(O.MovingAverageMinMaxObserver())
    with pytest.raises(RuntimeError, match=r"x is on the meta device but this observer's buffers are on cpu"):
        fq(torch.randn(4, 8, device="meta"))
    assert fq.observer.min_val.device.type == "cpu"
    assert fq(torch.randn(0, 8)).shape == (0, 8)
    assert fq(torch.randn(4, 8)).shape == (4, 8)


def test_meta_states_load_with_assign_and_none_values_get_torchs_error():
    """A model's own meta state (a skeleton's) loads into it with assign=True: observers, QAT
    models and Int8Linear skip their value checks for meta tensors (they read .item() and
    failed); a None entry gets torch's named load error (an observer raised AttributeError)."""
    import qlib
    from qlib import observers as O

    for make in (lambda: O.MinMaxObserver(), lambda: qlib.prepare_qat(torch.nn.Sequential(torch.nn.Linear(8, 4))),
                 lambda: qlib.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 4)))):
        with torch.device("meta"):
            skeleton = make()
        state = skeleton.state_dict()
        assert any(t.is_meta for t in state.values())
        skeleton.load_state_dict(state, assign=True)
    for observer, key in ((O.MinMaxObserver(), "min_val"), (O.PercentileObserver(), "hist")):
        observer(torch.randn(4, 6))
        state = observer.state_dict()
        state[key] = None
        with pytest.raises(RuntimeError, match=f"Error\\(s\\) in loading state_dict for {type(observer).__name__}"):
            observer.load_state_dict(state)


# ---------------------------------------------------------------- exported programs in a fresh process
def _export_model():
    """QAT (learnable LSQ scales), dynamic and static Int8Linear, Linear4bit and a per-token
    fake_quant call in one model, with its exported program (dynamic batch and sequence)."""
    torch.manual_seed(0)
    qat = qlib.prepare_qat(nn.Sequential(nn.Linear(64, 64)),
                           qlib.QATConfig(weight_learnable=True, activation_learnable=True))
    qat(torch.randn(8, 64))  # (the first step sets the learnable scales)
    static = qlib.prepare(nn.Sequential(nn.Linear(64, 64)))
    qlib.calibrate(static, [torch.randn(16, 64) for _ in range(3)], progress=False)

    class PerToken(nn.Module):
        def forward(self, x):
            s = x.abs().amax(-1, keepdim=True).clamp_min(1e-6) / 127
            return torch.ops.qlib.fake_quant(x, s, torch.zeros_like(s, dtype=torch.int32), -127, 127)

    model = nn.Sequential(qat, nn.ReLU(), qlib.quantize_dynamic(nn.Sequential(nn.Linear(64, 64))), PerToken(),
                          qlib.convert(static), nn.ReLU(),
                          qlib.quantize_weight_only(nn.Sequential(nn.Linear(64, 16)), "nf4", block_size=32)).eval()
    b, t = torch.export.Dim("b", min=1, max=64), torch.export.Dim("t", min=1, max=512)
    ep = torch.export.export(model, (torch.randn(2, 5, 64),), dynamic_shapes=({0: b, 1: t},))
    xs = [torch.randn(1, 1, 64), torch.randn(3, 17, 64), torch.randn(7, 2, 64)]
    with torch.no_grad():
        return ep, xs, [model(x) for x in xs]


_RELOAD = """
import sys, torch
import qlib  # (before the load: the programs call torch.ops.qlib)
xs, refs = torch.load(sys.argv[2])
run = {run}
with torch.no_grad():
    assert all(torch.equal(run(x), ref) for x, ref in zip(xs, refs))
"""


def _reload_in_fresh_process(tmp_path, run, xs, refs):
    import subprocess
    import sys

    torch.save((xs, refs), tmp_path / "io.pt")
    code = _RELOAD.format(run=run)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ep.pt2"), str(tmp_path / "io.pt")], check=True,
                   timeout=600)


def test_exported_program_saves_and_loads_in_a_fresh_process(tmp_path):
    """torch.export.save / load (after import qlib) of every kind of qlib layer, dynamic batch and
    sequence: the fresh process's outputs equal the eager model's at other sizes, as do
    run_decompositions()'s here."""
    ep, xs, refs = _export_model()
    torch.export.save(ep, tmp_path / "ep.pt2")
    decomposed = ep.run_decompositions().module()
    with torch.no_grad():
        assert all(torch.equal(decomposed(x), ref) for x, ref in zip(xs, refs))
    _reload_in_fresh_process(tmp_path, "torch.export.load(sys.argv[1]).module()", xs, refs)


def test_aoti_package_loads_in_a_fresh_process(tmp_path):
    """AOTInductor (CPU): the custom ops run through torch's proxy executor; the package loads in
    a fresh process after import qlib and gives the eager model's outputs. (~20 s: inductor
    compiles C++.)"""
    ep, xs, refs = _export_model()
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "ep.pt2"))
    _reload_in_fresh_process(tmp_path, "lambda x, r=torch._inductor.aoti_load_package(sys.argv[1]): r(x)", xs, refs)
