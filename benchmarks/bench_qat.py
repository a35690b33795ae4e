"""One QAT training step of a Linear, qlib vs torch.ao, on the CPU: forward + backward of
``QATLinear`` (int8 per-channel symmetric weights, int8 per-tensor activations with a
moving-average observer) against torch.ao's QAT Linear with its default fbgemm qconfig
(the same scheme) plus its activation FakeQuantize, and plain fp32 ``nn.Linear``. Median
microseconds per step, the three timed round-robin; ratio = torch.ao / qlib (> 1: qlib is faster).
A second table trains the scales (LSQ, and LSQ+ zero points for the activations): qlib's
``QATConfig(weight_learnable=True, activation_learnable=True)`` against torch.ao's QAT Linear
with ``_LearnableFakeQuantize`` (``use_grad_scaling=True``), observers off on both sides after
a first step (the learning phase).
A third table runs an MLP block (Linear d -> 4d, GELU, Linear 4d -> d) whose input needs a
gradient, as every layer's but the first does: the bytes autograd keeps for the backward (each
saved storage once, parameters not counted) and the step's time, qlib against torch.ao.
A fourth times per-sample gradients (torch.func.vmap of grad) of a QAT MLP, a fifth those of the
same MLP with learnable scales (against torch.ao's _LearnableFakeQuantize), and a sixth those of
the trainable layers around a frozen quantized base (an int8 or 4-bit Linear), as DP-SGD of
adapters over a quantized model. Its baseline is the fp32 base: torch.ao's dynamic quantized
Linear has no autograd, and its gradients for the layers before it are silently zero.

    .venv/bin/python benchmarks/bench_qat.py [--threads N] [--budget 3]
"""
import argparse
import copy
import platform

import torch
import torch.ao.nn.qat as ao_qat
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

import qlib
from qlib.config import QATConfig
from qlib.nn import QATLinear
from timing import interleaved_medians_ms

SHAPES = [(8, 64, 64), (64, 256, 256), (64, 1024, 1024), (256, 4096, 1024)]  # batch, in, out


def learnable_qconfig(out_features: int) -> tq.QConfig:
    """torch.ao's learnable (LSQ) fake quants for the scheme qlib's learnable QATLinear uses."""
    act = _LearnableFakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0,
                                           quant_max=255, use_grad_scaling=True)
    weight = _LearnableFakeQuantize.with_args(
        observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0, channel_len=out_features, use_grad_scaling=True)
    return tq.QConfig(activation=act, weight=weight)


def time_steps(ours, theirs, act_fq, lin, x, budget):
    """Median us of a forward + backward step: qlib, torch.ao (act_fq then its Linear), fp32."""
    return [t * 1e3 for t in interleaved_medians_ms(
        [lambda: ours(x).sum().backward(), lambda: theirs(act_fq(x)).sum().backward(),
         lambda: lin(x).sum().backward()], budget_s=budget, min_reps=20, max_reps=2000)]


def saved_mib(model, step):
    """MiB of the storages autograd saves during step() (each once), the model's parameters not
    counted (they live on anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def mlp_block_table(qconfig, budget):
    print("\nMLP block (Linear d -> 4d, GELU, Linear 4d -> d), its input needing a gradient: "
          "MiB saved for the backward (parameters not counted) and us per step")
    print("| tokens x d | qlib MiB | torch.ao MiB | fp32 MiB | qlib us | torch.ao us | fp32 us | "
          "torch.ao / qlib (time) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tokens, d in [(64, 256), (512, 768), (2048, 1024)]:
        fp32 = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        ours = qlib.prepare_qat(copy.deepcopy(fp32))
        ao_lin = [copy.deepcopy(fp32[i]) for i in (0, 2)]
        for lin in ao_lin:
            lin.qconfig = qconfig
        # (each QATLinear fake-quantizes its input: torch.ao's activation FakeQuantize before each)
        theirs = nn.Sequential(qconfig.activation(), ao_qat.Linear.from_float(ao_lin[0]), nn.GELU(),
                               qconfig.activation(), ao_qat.Linear.from_float(ao_lin[1]))
        src = torch.randn(tokens, d, requires_grad=True)
        steps = [lambda m=m: m(src * 1).sum().backward() for m in (ours, theirs, fp32)]
        mib = [saved_mib(m, f) for m, f in zip((ours, theirs, fp32), steps)]
        us = [t * 1e3 for t in interleaved_medians_ms(steps, budget_s=budget, min_reps=10, max_reps=500)]
        print(f"| {tokens} x {d} | {mib[0]:.2f} | {mib[1]:.2f} | {mib[2]:.2f} | {us[0]:.0f} | "
              f"{us[1]:.0f} | {us[2]:.0f} | {us[1] / us[0]:.2f}x |")


def per_sample_table(budget, learnable=False):
    """Per-sample gradients (torch.func.vmap of grad, as DP-SGD) of a QAT MLP, observers off:
    qlib, torch.ao's non-fused FakeQuantize (its default fused one has no batching rule for
    _fused_moving_avg_obs_fq_helper and raises under vmap) and fp32. learnable: LSQ scales (their
    per-sample gradients too), against torch.ao's _LearnableFakeQuantize."""
    print(f"\nPer-sample gradients (vmap of grad) of an MLP (d -> d, ReLU, d -> d, ReLU, d -> 10), "
          f"{'learnable (LSQ) scales, ' if learnable else ''}observers off: median ms per batch")
    print("| batch x d | qlib ms | torch.ao ms | fp32 ms | torch.ao / qlib | qlib / fp32 |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    ao_qconfig = tq.QConfig(activation=tq.default_fake_quant, weight=tq.default_per_channel_weight_fake_quant)
    config = QATConfig(weight_learnable=True, activation_learnable=True) if learnable else None
    for batch, d in [(64, 32), (256, 32), (128, 256)]:
        fp32 = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10))
        ours = qlib.prepare_qat(copy.deepcopy(fp32), config)
        theirs = copy.deepcopy(fp32)
        for m in theirs.modules():
            if isinstance(m, nn.Linear):
                m.qconfig = learnable_qconfig(m.out_features) if learnable else ao_qconfig
        theirs = tq.prepare_qat(theirs.train())
        x, y = torch.randn(batch, d), torch.randint(0, 10, (batch,))
        steps = []
        for m in (ours, theirs, fp32):
            m(x)
            m.apply(tq.disable_observer)
            params = {k: v.detach() for k, v in m.named_parameters()}
            loss = lambda p, xi, yi, m=m: nn.functional.cross_entropy(
                torch.func.functional_call(m, p, (xi[None],)), yi[None])
            per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
            steps.append(lambda f=per_sample, p=params: f(p, x, y))
        ms = interleaved_medians_ms(steps, budget_s=budget, min_reps=5, max_reps=200)
        print(f"| {batch} x {d} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {ms[1] / ms[0]:.2f}x | "
              f"{ms[0] / ms[2]:.2f}x |")


def frozen_base_per_sample_table(budget):
    """Per-sample gradients (vmap of grad) of Linear(d, d), ReLU, a frozen base (d -> 4d), ReLU,
    Linear(4d, 10), each sample seq x d: the base as qlib's Int8Linear, qlib's Linear4bit, or fp32."""
    print("\nPer-sample gradients (vmap of grad) around a frozen base d -> 4d (Linear(d, d), ReLU, base, "
          "ReLU, Linear(4d, 10)), samples of seq x d: median ms per batch")
    print("| batch x seq x d | qlib Int8Linear ms | qlib Linear4bit ms | fp32 base ms | Int8Linear / fp32 "
          "| Linear4bit / fp32 |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for batch, seq, d in [(64, 1, 256), (32, 16, 256), (16, 32, 768)]:
        base = nn.Linear(d, 4 * d).requires_grad_(False)
        steps = []
        for frozen in (qlib.nn.Int8Linear.from_float(base), qlib.nn.Linear4bit.from_float(base), base):
            m = nn.Sequential(nn.Linear(d, d), nn.ReLU(), frozen, nn.ReLU(), nn.Linear(4 * d, 10))
            params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
            x, y = torch.randn(batch, seq, d), torch.randint(0, 10, (batch,))
            loss = lambda p, xi, yi, m=m: nn.functional.cross_entropy(
                torch.func.functional_call(m, p, (xi,)).mean(0, keepdim=True), yi[None])
            per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
            steps.append(lambda f=per_sample, p=params, x=x, y=y: f(p, x, y))
        ms = interleaved_medians_ms(steps, budget_s=budget, min_reps=5, max_reps=200)
        print(f"| {batch} x {seq} x {d} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {ms[0] / ms[2]:.2f}x | "
              f"{ms[1] / ms[2]:.2f}x |")


def print_row(batch, k, n, t_ours, t_theirs, t_fp32):
    print(f"| {batch} x {k} x {n} | {t_ours:.0f} | {t_theirs:.0f} | {t_fp32:.0f} | "
          f"{t_theirs / t_ours:.2f}x | {t_ours / t_fp32:.2f}x |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per shape")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qconfig = tq.get_default_qat_qconfig("fbgemm")
    print(f"torch {torch.__version__}, qlib {qlib.build_info()['cpu_isa']}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads; median us per forward + backward step")
    header = ("| batch x in x out | qlib QATLinear | torch.ao QAT Linear | fp32 nn.Linear | torch.ao / qlib "
              "| qlib / fp32 |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    print(header)
    for batch, k, n in SHAPES:
        lin = nn.Linear(k, n)
        ours = QATLinear.from_float(lin)
        lin.qconfig = qconfig
        theirs, act_fq = ao_qat.Linear.from_float(lin), qconfig.activation()
        print_row(batch, k, n, *time_steps(ours, theirs, act_fq, lin, torch.randn(batch, k), args.budget))
    print("\nLearnable scales (LSQ; asymmetric activations with a learned zero point), observers off:")
    print(header)
    for batch, k, n in SHAPES:
        lin = nn.Linear(k, n)
        x = torch.randn(batch, k)
        ours = QATLinear.from_float(lin, QATConfig(weight_learnable=True, activation_learnable=True))
        lin.qconfig = learnable_qconfig(n)
        theirs, act_fq = ao_qat.Linear.from_float(lin), lin.qconfig.activation()
        ours(x)
        theirs(act_fq(x))
        for m in (theirs, act_fq):
            m.apply(tq.disable_observer)
        ours.weight_fake_quant.disable_observer()
        ours.activation_fake_quant.disable_observer()
        print_row(batch, k, n, *time_steps(ours, theirs, act_fq, lin, x, args.budget))
    mlp_block_table(qconfig, args.budget)
    per_sample_table(args.budget)
    per_sample_table(args.budget, learnable=True)
    frozen_base_per_sample_table(args.budget)


if __name__ == "__main__":
    main()
