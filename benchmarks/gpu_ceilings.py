"""The GPU's two ceilings, measured once: device-to-device copy bandwidth and the
bf16 / int8 matmul rates (torch.mm, torch._int_mm at 8192^3), on random data.

    python benchmarks/gpu_ceilings.py
"""
import torch

from timing import cuda_median_ms as median_ms


def main():
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    for mib in (64, 256, 1024):
        x = torch.randn(mib * 2**18, device=dev)
        y = torch.empty_like(x)
        t = median_ms(lambda: y.copy_(x))
        print(f"copy {mib:5d} MiB float32: {t * 1e3:8.1f} us  {2 * x.numel() * 4 / t / 1e6:7.1f} GB/s (read + write)")
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = median_ms(lambda: torch.mm(a, b))
    print(f"torch.mm bf16 {n}^3: {t:.3f} ms  {2 * n**3 / t / 1e9:.0f} TFLOP/s")
    ai = torch.randint(-128, 128, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-128, 128, (n, n), device=dev, dtype=torch.int8)
    t = median_ms(lambda: torch._int_mm(ai, bi))
    print(f"torch._int_mm int8 {n}^3 (B row-major): {t:.3f} ms  {2 * n**3 / t / 1e9:.0f} TOPS")
    bt = bi.t().contiguous().t()
    t = median_ms(lambda: torch._int_mm(ai, bt))
    print(f"torch._int_mm int8 {n}^3 (B column-major): {t:.3f} ms  {2 * n**3 / t / 1e9:.0f} TOPS")


if __name__ == "__main__":
    main()
