"""The demo run by `python -m qlib demo`.

Trains an MLP on scikit-learn's digits, then compares post-training
quantization (PTQ) with each observer at 8 and 4 bits, 4-bit QAT, real int8
models (dynamic, and converted from the calibrated model) and 4-bit weights (NF4,
weight-only QAT, GPTQ),
in one table of accuracy, model bytes and latency against fp32. Writes two PNGs.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

import qlib
from qlib import digits
from qlib.config import QATConfig
from qlib.report import latencies_ms, state_bytes

OBSERVERS = ["MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
             "EntropyObserver"]


def short_name(observer: str) -> str:
    """An observer class's name in the table: MovingAverageMinMaxObserver -> MovingAvgMinMax."""
    return observer.replace("Observer", "").replace("MovingAverage", "MovingAvg")


def print_build_info():
    for key, value in qlib.build_info().items():
        print(f"  {key:24s} {value}")


def linear_params(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def model_bytes(model: nn.Module, bits: int = 32, weight_scales: str = "per_channel") -> int:
    """bits / 8 x weight params + float32 biases and scales (one per output channel)."""
    total = 0
    for lin in linear_params(model):
        total += lin.weight.numel() * bits // 8
        total += 4 * (lin.bias.numel() if lin.bias is not None else 0)
        if bits < 32:
            total += 4 * (lin.out_features if weight_scales == "per_channel" else 1)
    return total


def ptq(model, data, bits, observer):
    cfg = QATConfig(weight_bits=bits, activation_bits=bits, activation_observer=observer)
    return digits.fake_quant_ptq(model, data, cfg)


def plot_accuracy_vs_bits(rows, fp32_acc, path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in rows.items():
        bits = sorted(pts)
        ax.plot(bits, [pts[b] for b in bits], marker="o", label=label)
    ax.axhline(fp32_acc, color="k", linestyle="--", label=f"fp32 {fp32_acc:.1f}%")
    ax.set_xlabel("bits (weights and activations)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits MLP: accuracy vs bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(out_dir: str = "demo_out") -> int:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    os.makedirs(out_dir, exist_ok=True)
    print("qlib build:")
    print_build_info()

    model, data = digits.train_fp32(seed=0, progress="training fp32 MLP")
    fp32_acc = digits.accuracy(model, data)
    batch = data.x_test[:256]
    fp32_bytes = model_bytes(model)
    rows = [("fp32", "-", 32, fp32_acc, fp32_bytes, None)]

    for bits in (8, 4):
        for obs in OBSERVERS:
            q = ptq(model, data, bits, obs)
            rows.append(("PTQ fake-quant", short_name(obs), bits, digits.accuracy(q, data),
                         model_bytes(model, bits), None))

    qat4 = digits.qat_finetune(model, data, QATConfig(weight_bits=4, activation_bits=4), progress="4-bit QAT")
    rows.append(("QAT fake-quant", "MovingAvgMinMax", 4, digits.accuracy(qat4, data), model_bytes(model, 4), None))

    dyn = qlib.quantize_dynamic(copy.deepcopy(model))
    rows.append(("int8 dynamic", "per-token", 8, digits.accuracy(dyn, data), state_bytes(dyn), None))
    calibrated = qlib.prepare(copy.deepcopy(model), QATConfig(activation_observer="MSEObserver"))
    calib = [xb for xb, _ in digits.batches(data.x_train, data.y_train, 128, seed=5)][:8]
    qlib.calibrate(calibrated, calib)
    static = qlib.convert(calibrated)
    rows.append(("int8 static", "MSE", 8, digits.accuracy(static, data), state_bytes(static), None))
    w4 = qlib.quantize_weight_only(copy.deepcopy(model), "nf4", block_size=64)
    rows.append(("4-bit weights", "NF4, no calib.", 4, digits.accuracy(w4, data), state_bytes(w4), None))
    # Weight-only 4-bit QAT, converted to Linear4bit (the trained codes and group scales).
    w4_cfg = QATConfig(weight_bits=4, weight_group_size=32, activation_bits=None)
    w4_qat = qlib.convert(digits.qat_finetune(model, data, w4_cfg, progress="4-bit weight-only QAT"))
    rows.append(("4-bit w. QAT", "int-grid, g=32", 4, digits.accuracy(w4_qat, data), state_bytes(w4_qat), None))
    w4_gptq = qlib.gptq_quantize(copy.deepcopy(model), calib, group_size=32, progress=False)
    rows.append(("4-bit GPTQ", "int-grid, g=32", 4, digits.accuracy(w4_gptq, data), state_bytes(w4_gptq), None))
    latency = latencies_ms({"fp32": model, "int8 dynamic": dyn, "int8 static": static, "4-bit weights": w4,
                            "4-bit w. QAT": w4_qat, "4-bit GPTQ": w4_gptq}, batch)
    fp32_ms = latency["fp32"]
    rows = [(*row[:5], latency.get(row[0])) for row in rows]

    print(f"\ndigits MLP {[lin.in_features for lin in linear_params(model)]} -> 10, "
          f"{len(data.x_test)} test images, latency per batch of {len(batch)}")
    header = f"{'method':16s} {'observer':16s} {'bits':>4s} {'acc %':>7s} {'vs fp32':>8s} {'bytes':>8s} {'vs fp32':>8s} {'ms/batch':>9s} {'speedup':>8s}"
    print(header)
    print("-" * len(header))
    for method, obs, bits, acc, nbytes, ms in rows:
        lat = f"{ms:9.3f} {fp32_ms / ms:7.2f}x" if ms is not None else f"{'-':>9s} {'-':>8s}"
        print(f"{method:16s} {obs:16s} {bits:4d} {acc:7.2f} {acc - fp32_acc:+8.2f} {nbytes:8d} "
              f"{fp32_bytes / nbytes:7.2f}x {lat}")
    print(f"(4-bit rows are weight-only: at a batch of {len(batch)} they decode the weight and run a float32 "
          "GEMM, so they save memory, not time; they are faster where reading the weight dominates, "
          "a few rows of x at a time: benchmarks/bench_linear_4bit.py)")

    # Accuracy vs bits: min-max PTQ vs QAT.
    curves = {"PTQ min-max": {}, "QAT": {}}
    for bits in (2, 3, 4, 6, 8):
        curves["PTQ min-max"][bits] = digits.accuracy(ptq(model, data, bits, "MinMaxObserver"), data)
        if bits <= 4:
            cfg = QATConfig(weight_bits=bits, activation_bits=bits)
            curves["QAT"][bits] = digits.accuracy(digits.qat_finetune(model, data, cfg, epochs=10,
                                                                      progress=f"{bits}-bit QAT"), data)
    acc_png = os.path.join(out_dir, "accuracy_vs_bits.png")
    plot_accuracy_vs_bits(curves, fp32_acc, acc_png)

    # Calibration ranges of the first hidden layer's activations.
    with torch.no_grad():
        h = model[1](model[0](data.x_train))
    observers = {short_name(name): getattr(qlib.observers, name)(bits=4, symmetric=False)
                 for name in OBSERVERS}
    for ob in observers.values():
        ob(h)
    cal_png = os.path.join(out_dir, "calibration_4bit.png")
    qlib.plot_calibration(h, observers, cal_png)
    print(f"\nwrote {acc_png} and {cal_png}")
    print("accuracy vs bits: " + "; ".join(
        f"{k}: " + ", ".join(f"{b}b {v:.1f}%" for b, v in sorted(pts.items())) for k, pts in curves.items()))
    return 0
