"""The demo run by `python -m qlib demo`."""
import torch

import qlib


def print_build_info():
    for key, value in qlib.build_info().items():
        print(f"  {key:24s} {value}")


def self_check():
    """Fake-quantize the lecture notes' 3x3 matrix and show size and error."""
    w = torch.tensor([[13.5, 14.3, 8.5], [-4.7, -3.2, -6.4], [-0.4, 1.3, 3.73]])
    scale, zp = qlib.choose_qparams(w.min().reshape(1), w.max().reshape(1), -128, 127, symmetric=True)
    q = qlib.quantize(w, scale, zp)
    w_hat = qlib.dequantize(q, scale, zp)
    print(f"fp32 matrix: {w.numel() * w.element_size()} bytes -> int8: {q.numel() * q.element_size()} bytes")
    print(f"absmax scale {scale.item():.5f}; int8 codes:\n{q}")
    print(f"max |error| {(w - w_hat).abs().max().item():.4f} (<= scale / 2 = {scale.item() / 2:.4f})")
    assert torch.equal(w_hat, qlib.fake_quant(w, scale, zp))


def main():
    print("qlib build:")
    print_build_info()
    self_check()
    return 0
