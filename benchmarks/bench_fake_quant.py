"""fake_quant throughput: qlib vs torch's native op vs the eager composite.

One run prints one side-by-side table: forward, forward+backward, and
forward+backward with a learnable scale and zero point (LSQ, against torch's
_fake_quantize_learnable_* ops), per-tensor / per-channel / per-group, float32
and bfloat16, medians over repeats (on the CPU round-robin), GB/s (bytes read +
written by the op) and ratios against qlib.

    .venv/bin/python benchmarks/bench_fake_quant.py [--device cuda] [--numel 16777216] [--packs-only]

On a GPU it also prints the kernels' bandwidth for 1, 2 and 4 packs per thread.
"""
import argparse

import torch

import qlib
from timing import cuda_graph_median_ms, cuda_median_ms, host_median_s, interleaved_medians_ms

ops = torch.ops.qlib


def composite(x, scale, zp, qmin, qmax):
    """The seeds' fake quantization written with torch ops, STE by autograd trick."""
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale) + zp, qmin, qmax)
    y = ((q - zp) * scale).to(x.dtype)
    return x + (y - x).detach() if x.requires_grad else y


def torch_native(x, scale, zp, qmin, qmax, mode, group):
    if mode == "per-tensor":
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    if mode == "per-channel":
        return torch.fake_quantize_per_channel_affine(x, scale.view(-1), zp.view(-1), 0, qmin, qmax)
    # per-group has no native op: torch users reshape to [N * K / g, g] and go per-channel.
    rows = x.reshape(-1, group)
    return torch.fake_quantize_per_channel_affine(rows, scale.reshape(-1), zp.reshape(-1), 0, qmin, qmax).view_as(x)


def torch_learnable(x, scale, zp, qmin, qmax, mode, group):
    """torch's LSQ ops: scale and a float zero point learnable."""
    if mode == "per-tensor":
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, qmin, qmax, 1.0)
    rows = x if mode == "per-channel" else x.reshape(-1, group)
    return torch._fake_quantize_learnable_per_channel_affine(
        rows, scale.reshape(-1), zp.reshape(-1), 0, qmin, qmax, 1.0).view_as(x)


def timeit(fn, device, repeat, warmup=3):
    """Median seconds per call: CUDA events on a GPU, the host clock on the CPU."""
    if device == "cuda":
        return cuda_median_ms(fn, reps=repeat, warmup=warmup) / 1e3
    return host_median_s(fn, reps=repeat, warmup=warmup)


def time_all(calls, device, repeat):
    """{name: median seconds} of a row's calls. On the CPU round-robin (at least `repeat` rounds):
    a slow phase of the machine, or a fresh process's first touches of its memory (the first
    calls of a row can be 10x slower on a VM), then hits every peer alike, not the first one."""
    if device == "cuda":
        return {k: timeit(f, device, repeat) for k, f in calls.items()}
    ms = interleaved_medians_ms(list(calls.values()), min_reps=repeat)
    return {k: t / 1e3 for k, t in zip(calls, ms)}


def graph_time(fn, repeat):
    """Seconds per call of fn's GPU work alone (CUDA-graph replays); None if not capturable."""
    t = cuda_graph_median_ms(fn, reps=repeat)
    return None if t is None else t / 1e3


def copy_bandwidth(numel, device, repeat):
    """GB/s (read + write) of copying numel elements, per dtype. The issue's target is against
    the device's copy bandwidth (the float32 copy, the larger); the same dtype's copy moves the
    same bytes as that dtype's fake_quant (a smaller copy runs at a lower rate: ramp-up, tail,
    the GPU's L2), shown beside it to tell the kernel from the size."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(numel, device=device).to(dtype)
        y = torch.empty_like(x)
        t = timeit(lambda: y.copy_(x), device, repeat)
        if device == "cuda":
            t = graph_time(lambda: y.copy_(x), repeat)
        out[dtype] = 2 * x.numel() * x.element_size() / t / 1e9
    return out


def packs_sweep(N, K, group, repeat, copy_gbs):
    """CUDA: the fake_quant kernels' GPU time (graph replays) for each number of 16-byte packs
    a thread loads at once (qlib._C.set_fake_quant_cuda_packs), as % of the device's copy bandwidth."""
    choices = (1, 2, 4)
    device_gbs = max(copy_gbs.values())  # the device's copy rate (the float32 copy)
    print("\nkernel GB/s as % of copy, by packs per thread (qlib._C.set_fake_quant_cuda_packs):")
    print(f"{'mode':12s} {'dtype':9s} {'pass':8s}" + "".join(f" {f'packs={u}':>9s}" for u in choices))
    for mode, shape in (("per-tensor", (1,)), ("per-channel", (N, 1)), ("per-group", (N, K // group))):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(N, K, device="cuda").to(dtype)
            g = torch.ones_like(x)
            scale = torch.rand(shape, device="cuda") * 0.02 + 0.01
            zp = torch.zeros(shape, dtype=torch.int32, device="cuda")
            for pass_ in ("fwd", "fwd+bwd"):
                def q_ops():
                    ops.fake_quant(x, scale, zp, -128, 127)
                    if pass_ != "fwd":
                        ops.fake_quant_backward(g, x, scale, zp, -128, 127, False, False)
                nbytes = x.numel() * x.element_size() * (2 if pass_ == "fwd" else 5)
                cells = []
                for u in choices:
                    qlib._C.set_fake_quant_cuda_packs(u)
                    try:
                        cells.append(100 * nbytes / graph_time(q_ops, repeat) / 1e9 / device_gbs)
                    finally:
                        qlib._C.set_fake_quant_cuda_packs(1)
                print(f"{mode:12s} {str(dtype).replace('torch.', ''):9s} {pass_:8s}"
                      + "".join(f" {c:8.0f}%" for c in cells))


def layouts_table(dev, repeat):
    """fake_quant of an x dense in another dim order (x.t(), channels_last), read in place,
    against the same x copied to contiguous first (what qlib did before stop 28) and torch."""
    t = torch.randn(2048, 4096, device=dev).t()
    cl = torch.randn(32, 64, 56, 56, device=dev).to(memory_format=torch.channels_last)
    s1, z1 = torch.tensor([0.02], device=dev), torch.tensor([0], device=dev)
    rows = []
    for name, x, axis in (("x.t() [4096, 2048]", t, 0), ("channels_last [32, 64, 56, 56]", cl, 1)):
        C = x.shape[axis]
        sc = torch.rand(C, device=dev) * 0.05 + 0.01
        zc = torch.zeros(C, dtype=torch.int32, device=dev)
        view = [1] * x.dim()
        view[axis] = C
        rows.append((name + " per-tensor", x, s1, z1, lambda x: torch.fake_quantize_per_tensor_affine(x, 0.02, 0, -128, 127)))
        rows.append((name + " per-channel", x, sc.view(view), zc.view(view),
                     lambda x, sc=sc, zc=zc, axis=axis: torch.fake_quantize_per_channel_affine(x, sc, zc, axis, -128, 127)))
    print(f"\n{'x layout (float32)':42s} {'qlib ms':>8s} {'copy first ms':>14s} {'x':>6s} {'native ms':>10s} {'x':>6s}")
    for name, x, sc, zc, native in rows:
        r = time_all({"q": lambda: ops.fake_quant(x, sc, zc, -128, 127),
                      "copy": lambda: ops.fake_quant(x.contiguous(), sc, zc, -128, 127),
                      "native": lambda: native(x)}, dev, repeat)
        print(f"{name:42s} {r['q'] * 1e3:8.2f} {r['copy'] * 1e3:14.2f} {r['copy'] / r['q']:5.2f}x"
              f" {r['native'] * 1e3:10.2f} {r['native'] / r['q']:5.2f}x")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--packs-only", action="store_true",
                   help="CUDA: only the packs-per-thread sweep of the kernels")
    p.add_argument("--layouts-only", action="store_true",
                   help="only the table of transposed and channels_last inputs")
    args = p.parse_args()
    if args.layouts_only:
        return layouts_table(args.device, args.repeat)
    dev, n = args.device, args.numel
    K = 4096
    N = n // K
    qmin, qmax = -128, 127
    print(f"device={dev} numel={N * K} threads={torch.get_num_threads()} torch={torch.__version__}")
    copy_gbs = copy_bandwidth(N * K, dev, args.repeat)
    print(f"device-to-device copy bandwidth{' (CUDA graph)' if dev == 'cuda' else ''}: "
          + ", ".join(f"{str(d).replace('torch.', '')} {g:.1f} GB/s" for d, g in copy_gbs.items())
          + " (% copy: against the larger; % dtype copy: against the same dtype's)")
    if args.packs_only:
        return packs_sweep(N, K, args.group, args.repeat, copy_gbs)
    header = f"{'mode':12s} {'dtype':9s} {'pass':8s} {'qlib ms':>9s} {'GB/s':>7s} {'native ms':>10s} {'x':>6s} {'composite ms':>13s} {'x':>6s}"
    if dev == "cuda":
        header += f" {'kernel GB/s':>11s} {'% copy':>6s} {'% dtype copy':>12s} {'native kern x':>13s}"
    print(header)
    print("-" * len(header))
    for mode in ("per-tensor", "per-channel", "per-group"):
        for dtype in (torch.float32, torch.bfloat16):
            x0 = torch.randn(N, K, device=dev).to(dtype)
            if mode == "per-tensor":
                shape = (1,)
            elif mode == "per-channel":
                shape = (N, 1)
            else:
                shape = (N, K // args.group)
            scale = torch.rand(shape, device=dev) * 0.02 + 0.01
            zp = torch.zeros(shape, dtype=torch.int32, device=dev)
            zpf = zp.float()
            for pass_ in ("fwd", "fwd+bwd", "act", "lsq"):
                train, lsq = pass_ != "fwd", pass_ == "lsq"
                leaf = x0.detach().requires_grad_(train)
                # "act": x an activation (not a leaf: a view, whose backward is free), the
                # saved-mask path; fwd+bwd: a leaf (a weight), which saves x.
                xin = (lambda: leaf.view_as(leaf)) if pass_ == "act" else (lambda: leaf)
                g = torch.ones_like(x0)
                s_l, z_l = (t.detach().clone().requires_grad_() for t in (scale, zpf))

                def run(f):
                    def call():
                        y = f()
                        if train:
                            y.backward(g)
                            leaf.grad = s_l.grad = z_l.grad = None
                    return call

                qs, qz = (s_l, z_l) if lsq else (scale, zp)
                calls = {"qlib": run(lambda: ops.fake_quant(xin(), qs, qz, qmin, qmax))}
                peer = (lambda: torch_learnable(xin(), s_l, z_l, qmin, qmax, mode, args.group)) if lsq else (
                    lambda: torch_native(xin(), scale, zp, qmin, qmax, mode, args.group))
                if dtype == torch.float32 or dev == "cuda":
                    native_call = run(peer)
                    try:
                        native_call()  # a configuration torch's op refuses: no native column
                        calls["native"] = native_call
                    except RuntimeError:
                        pass
                se = scale if mode != "per-group" else scale.repeat_interleave(args.group, 1)
                ze = zpf if mode != "per-group" else zpf.repeat_interleave(args.group, 1)
                # The composite's STE trick gives no scale gradient: no LSQ peer.
                if not lsq:
                    calls["composite"] = run(lambda: composite(xin(), se, ze, qmin, qmax))
                times = time_all(calls, dev, args.repeat)
                t_q, t_n, t_c = times["qlib"], times.get("native"), times.get("composite")
                nbytes = x0.numel() * x0.element_size() * (2 if not train else 5)
                native = f"{t_n * 1e3:10.2f} {t_n / t_q:5.2f}x" if t_n else f"{'n/a':>10s} {'':>6s}"
                comp = f"{t_c * 1e3:13.2f} {t_c / t_q:5.2f}x" if t_c else f"{'n/a':>13s} {'':>6s}"
                line = (
                    f"{mode:12s} {str(dtype).replace('torch.', ''):9s} {pass_:8s} {t_q * 1e3:9.2f} "
                    f"{nbytes / t_q / 1e9:7.1f} {native} {comp}"
                )
                if dev == "cuda" and lsq:
                    line += f" {'n/a':>11s} {'':>6s} {'':>12s} {'n/a':>13s}"
                elif dev == "cuda":  # the GPU work alone, ops called directly (no autograd)
                    xd = x0
                    if pass_ == "act":
                        def q_ops():
                            _, mask = ops.fake_quant_with_mask(xd, scale, zp, qmin, qmax)
                            ops.fake_quant_mask_backward(g, mask)
                    elif train:
                        def q_ops():
                            ops.fake_quant(xd, scale, zp, qmin, qmax)
                            ops.fake_quant_backward(g, xd, scale, zp, qmin, qmax, False, False)
                    else:
                        def q_ops():
                            ops.fake_quant(xd, scale, zp, qmin, qmax)
                    k_q = graph_time(q_ops, args.repeat)
                    k_n = None  # torch's per-channel op reads zero_point back: not capturable
                    if mode == "per-tensor":
                        k_n = graph_time(run(lambda: torch_native(xin(), scale, zp, qmin, qmax, mode, args.group)), args.repeat)
                    kn = f"{k_n / k_q:12.2f}x" if k_n else f"{'n/a':>13s}"
                    gbs = nbytes / k_q / 1e9
                    line += f" {gbs:11.1f} {100 * gbs / max(copy_gbs.values()):5.0f}% {100 * gbs / copy_gbs[dtype]:11.0f}% {kn}"
                print(line)
    print("x = peer time / qlib time (above 1: qlib is faster). GB/s counts x read + y written"
          " (fwd), plus grad read, x read, grad_x written (bwd). lsq: fwd+bwd with scale and zero"
          " point learnable; native is torch's _fake_quantize_learnable_* op. act: fwd+bwd of an"
          " activation (x not a leaf), qlib's saved-mask path (1 byte an element written, then"
          " read, instead of x read again); its GB/s counts the fwd+bwd bytes.")
    if dev == "cuda":
        print("kernel GB/s, % copy, native kern x: CUDA-graph replays (GPU work alone, no launch or"
              " host overhead); n/a: torch's per-channel op reads values back, so it cannot be captured.")
        packs_sweep(N, K, args.group, args.repeat, copy_gbs)
    layouts_table(dev, args.repeat)


if __name__ == "__main__":
    main()
