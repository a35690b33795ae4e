"""qlib with training utilities outside Hugging Face: weight averaging (EMA), timm, Lightning."""
import copy

import pytest

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import qlib
from qlib.nn import FakeQuantize


def qat_net():
    torch.manual_seed(0)
    return qlib.prepare_qat(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))


def ema_v3_update(ema, model, decay=0.999):
    """timm's ModelEmaV3.update (foreach=False): float state lerps, the rest is copied in place."""
    with torch.no_grad():
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            e.lerp_(m, 1 - decay) if e.is_floating_point() else e.copy_(m)


def test_switches_written_in_place_are_followed():
    """An EMA copies the switches buffer in place (timm's ModelEmaV3, AveragedModel's buffers):
    the EMA model froze its observers when the trained one did. Its Python switches kept the old
    values: its forwards (evaluation) went on observing, and observer_enabled said True."""
    model = qat_net()
    model(torch.randn(8, 16))
    ema = copy.deepcopy(model)
    model.apply(torch.ao.quantization.disable_observer)
    ema_v3_update(ema, model)
    fqs = [m for m in ema.modules() if isinstance(m, FakeQuantize)]
    assert all(fq.switches.tolist() == [0, 1] and not fq.observer_enabled for fq in fqs)
    ema.eval()
    before = copy.deepcopy(ema.state_dict())
    ema(torch.randn(8, 16) * 10)  # (a batch past the recorded range)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in before.items())
    assert torch.equal(ema(torch.ones(2, 16)), model.eval()(torch.ones(2, 16)))
    # and back on, in place; enable_* still write the buffer and keep the other switch
    ema_v3_update(ema, model.apply(torch.ao.quantization.enable_observer))
    assert all(fq.observer_enabled for fq in fqs)
    fqs[0].switches[1] = 0
    fqs[0].enable_observer(False)
    assert fqs[0].switches.tolist() == [0, 0] and not fqs[0].fake_quant_enabled


def test_averaged_model_without_buffers_follows_frozen_observers():
    """torch's AveragedModel (use_buffers=False) copies the buffers in place each update."""
    model = qat_net()
    model(torch.randn(8, 16))
    avg = AveragedModel(model)
    model.apply(torch.ao.quantization.disable_observer)
    avg.update_parameters(model)
    avg.eval()
    avg(torch.randn(8, 16) * 10)
    x = torch.randn(4, 16)
    assert torch.equal(avg(x), model.eval()(x))


def test_truncated_qparams_shape_raises_naming_the_buffer():
    """timm's ModelEmaV2 averages every state_dict tensor in float and copies it back: at decay
    0.9999 integer buffers lose 1 where the float sum rounds below (11, 22, 64 - 2, ...). A
    per-group weight observer's qparams_shape [1, 22, 11] became [1, 21, 10]; convert then
    failed in a reshape ("shape '[21, 10]' is invalid for input of size 242")."""
    torch.manual_seed(0)
    config = qlib.QATConfig(weight_bits=4, weight_granularity="per_group", weight_group_size=16)
    model = qlib.prepare_qat(nn.Sequential(nn.Linear(176, 22)), config)
    model(torch.randn(4, 176))
    with torch.no_grad():
        for v in model.state_dict().values():  # (ModelEmaV2.update, the model averaged with itself)
            v.copy_(0.9999 * v + (1 - 0.9999) * v)
    obs = model[0].weight_fake_quant.observer
    assert obs.qparams_shape.tolist() == [1, 21, 10]
    with pytest.raises(RuntimeError, match=r"calculate_qparams: the buffer qparams_shape holds \[1, 21, 10\], "
                                           r"but the statistics hold 242 blocks.*ModelEmaV3"):
        qlib.convert(model)


def test_meta_int8_linear_with_buffers_set_directly_moves():
    """accelerate's load_checkpoint_and_dispatch sets each checkpoint tensor into a meta skeleton
    (set_module_tensor_to_device: module._buffers[name] = value), then dispatch_model calls
    model.to(device): the packing, which no state holds, was still meta and .to() raised
    "Cannot copy out of meta tensor"."""
    from qlib.nn import Int8Linear
    for activation in ("dynamic", "static"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 8))
        if activation == "dynamic":
            src = qlib.quantize_dynamic(net)
        else:
            src = qlib.prepare(net)
            qlib.calibrate(src, [torch.randn(4, 16)])
            src = qlib.convert(src)
        state = src.state_dict()
        skeleton = nn.Sequential(Int8Linear(16, 8, True, activation, device="meta"))
        for key, value in state.items():
            skeleton[0]._buffers[key.split(".", 1)[1]] = value.clone()
        skeleton.to("cpu")
        x = torch.randn(3, 16)
        assert torch.equal(skeleton(x), src(x))


def test_swaps_refuse_a_weight_of_another_librarys_tensor_subclass():
    """torchao's quantize_ leaves nn.Linears whose weight is a tensor subclass (Int8Tensor, ...):
    the swaps took them and failed later, in an observer (prepare, prepare_qat: "Int8Tensor
    dispatch: ... aten.view", at the first batch) or in torchao's dispatch. TwoTensor (torch's
    test subclass) stands in for torchao's."""
    from torch.testing._internal.two_tensor import TwoTensor
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    w = net[0].weight.detach()
    net[0].weight = nn.Parameter(TwoTensor(w, w.clone()))
    swaps = {"quantize_dynamic": lambda m: qlib.quantize_dynamic(m),
             "quantize_weight_only": lambda m: qlib.quantize_weight_only(m, block_size=8),
             "prepare": lambda m: qlib.prepare(m), "prepare_qat": lambda m: qlib.prepare_qat(m),
             "gptq_quantize": lambda m: qlib.gptq_quantize(m, [torch.randn(2, 16)], bits=4, group_size=8)}
    for name, swap in swaps.items():
        with pytest.raises(ValueError, match=rf"qlib.{name}: the weight of 0 is a TwoTensor, a tensor subclass"):
            swap(net)
        assert type(net[0]) is nn.Linear and type(net[2]) is nn.Linear  # (nothing swapped)
    assert type(qlib.prepare_qat(net, filter_fn=lambda m, n: n != "0")[2]).__name__ == "QATLinear"
