"""qlib Int8Linear (dynamic) vs torch.ao dynamic quantized Linear (fbgemm) vs fp32 F.linear
vs torch._int_mm (ATen's CPU int8 GEMM) with a separate quantize and dequant vs torchao's int8
dynamic Linear (when torchao is importable: it is not in .venv; benchmarks/RESULTS.md says how
the tables with it were run).

    python benchmarks/bench_int8_linear.py [--quick] [--threads N] [--markdown PATH]

Prints medians (ms) and ratios, side by side; the CPU peers are timed interleaved
(round-robin, 3 to 10 calls each per round), so load from other processes hits them alike and
each is timed with its own weight in cache; "1 cold" rows cycle through copies of the layer
so that each call reads its weight from DRAM. CPU: M in {1, 16, 128, 1024} x
(K, N) in {(768, 768), (768, 3072), (4096, 4096)}. GPU section (only when CUDA
is available): qlib int8_linear vs bf16 F.linear vs torch._int_mm + separate
quantize/dequant vs torchao's int8 dynamic Linear (Int8DynamicActivationInt8WeightConfig,
eager; a column of NaN where torchao is not importable), K = N in {4096, 8192} and Llama-3-8B's
projections ((K, N) = (4096, 6144), (4096, 14336), (14336, 4096)), M from 1 to 8192. Each GPU
row also times bf16, `_int_mm` alone and qlib as CUDA-graph replays (the GPU work alone, as
torch.compile's mode="reduce-overhead" runs it): below M = 1024 one call is host-bound.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import platform
import statistics
import timeit
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import qlib  # noqa: E402
from qlib.nn import Int8Linear  # noqa: E402
from timing import cuda_graph_median_ms, cuda_median_ms, interleaved_medians_ms  # noqa: E402


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def torchao_int8_dynamic(lin):
    """torchao's int8 dynamic-activation, int8-weight Linear (eager), or None without torchao."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception:  # not installed, or not importable with this torch
        return None
    m = nn.Sequential(copy.deepcopy(lin))
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return m


def peers(lin):
    """(fp32, torch.ao, qlib, _int_mm path[, torchao]) forward functions of one nn.Linear."""
    ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    q = Int8Linear.from_float(lin)
    w_t = q.weight.clone().t()  # (a clone: q keeps only its packing, as a user's would)

    def int_mm_path(x):  # ATen's int8 GEMM (oneDNN) with qlib's quantize and a torch dequant
        xq, xs = torch.ops.qlib.quantize_per_token(x)
        return torch._int_mm(xq, w_t).float() * xs * q.weight_scale + q.bias

    tao = torchao_int8_dynamic(lin)
    return [lambda x: F.linear(x, lin.weight, lin.bias), ao, q, int_mm_path] + ([tao] if tao is not None else [])


@torch.inference_mode()
def bench_cpu(quick):
    """Rows (M, K, N, fp32, torch.ao, qlib, _int_mm path, torchao or NaN) in ms. Each peer runs 3 calls in a row
    per round (10 at M <= 16; the first untimed), so each is timed with its own weight in
    cache. M = 1 also
    gets a "cold" row, as in LLM decoding: every call uses the next of several copies of the
    layer (96 MB of int8 weights in all, more than the last-level cache), so its weight comes
    from DRAM while the code stays hot."""
    torch.manual_seed(0)
    rows = []
    shapes = [(768, 768), (768, 3072), (4096, 4096)]
    ms = [1, 16, 128, 1024]
    if quick:
        shapes, ms = shapes[:2], [1, 128]
    for K, N in shapes:
        lin = nn.Linear(K, N)
        fns = peers(lin)
        for M in ms:
            x = torch.randn(M, K)
            # Small M streams the weight: more calls a round let it settle in cache.
            block = 10 if M <= 16 else 3
            timings = [(str(M), interleaved_medians_ms([lambda f=f: f(x) for f in fns], block=block))]
            if M == 1:
                copies = [peers(nn.Linear(K, N)) for _ in range(-(-96 * 2**20 // (K * N)))]
                cycles = [itertools.cycle([c[i] for c in copies]) for i in range(len(fns))]
                timings.append(("1 cold", interleaved_medians_ms(
                    [lambda it=it: next(it)(x) for it in cycles], min_reps=2 * len(copies))))
                del copies, cycles
            for label, (t_fp, t_ao, t_q, t_mm, *t_tao) in timings:
                t_tao = t_tao[0] if t_tao else float("nan")
                rows.append((label, K, N, t_fp, t_ao, t_q, t_mm, t_tao))
                print(f"M={label:>6} K={K:5d} N={N:5d}  fp32 {t_fp:9.3f} ms  torch.ao {t_ao:9.3f} ms  "
                      f"_int_mm path {t_mm:9.3f} ms  torchao {t_tao:9.3f} ms  qlib {t_q:9.3f} ms  | qlib vs ao "
                      f"{t_ao / t_q:5.2f}x  vs fp32 {t_fp / t_q:5.2f}x  vs _int_mm path {t_mm / t_q:5.2f}x  "
                      f"vs torchao {t_tao / t_q:5.2f}x", flush=True)
    return rows


def weight_ram():
    """A line on what an Int8Linear of each shape holds in RAM (all its buffers) against the
    float32 weight."""
    parts = []
    for K, N in [(768, 768), (768, 3072), (4096, 4096)]:
        m = Int8Linear.from_float(nn.Linear(K, N))
        held = sum(b.numel() * b.element_size() for b in m.buffers())
        parts.append(f"{K} x {N} {held / 2**20:.2f} MiB ({4 * K * N / held:.2f}x below fp32's weight)")
    return "qlib Int8Linear's buffers in RAM: " + ", ".join(parts)


def state_dict_table():
    """Markdown: Int8Linear.state_dict() (which unpacks the weight where only its packing is
    kept) beside torch.ao's dynamic Linear state_dict() (which unpacks fbgemm's), median of 15."""
    out = ["| K x N | qlib state_dict (ms) | torch.ao state_dict (ms) | qlib speed-up |", "|---|---:|---:|---:|"]
    for K, N in [(768, 3072), (4096, 4096)]:
        lin = nn.Linear(K, N)
        q = Int8Linear.from_float(lin)
        ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        t_q, t_ao = (statistics.median(timeit.repeat(f, number=1, repeat=15)) * 1e3
                     for f in (q.state_dict, ao.state_dict))
        out.append(f"| {K} x {N} | {t_q:.3f} | {t_ao:.3f} | {t_ao / t_q:.1f}x |")
    return "\n".join(out)


def cpu_table(rows):
    out = ["| M | K | N | fp32 F.linear (ms) | torch.ao dynamic (ms) | _int_mm + quant + dequant (ms) "
           "| torchao int8 dynamic (ms) | qlib Int8Linear (ms) | qlib speed-up vs torch.ao | qlib speed-up vs fp32 "
           "| vs _int_mm path | vs torchao |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for M, K, N, t_fp, t_ao, t_q, t_mm, t_tao in rows:
        out.append(f"| {M} | {K} | {N} | {t_fp:.3f} | {t_ao:.3f} | {t_mm:.3f} | {t_tao:.3f} | {t_q:.3f} "
                   f"| {t_ao / t_q:.2f}x | {t_fp / t_q:.2f}x | {t_mm / t_q:.2f}x | {t_tao / t_q:.2f}x |")
    return "\n".join(out)


@torch.inference_mode()
def bench_cuda(quick):
    rows = []
    # On a Hopper GPU the default ("auto") is the fused sm90 GEMM; cuBLASLt's path is timed beside it.
    other_gemm = ("cutlass-sm90" in qlib.int8_cuda_gemms()
                  and torch.cuda.get_device_capability() == (9, 0))
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (8192, 8192), (4096, 6144), (4096, 14336), (14336, 4096)]
    ms = [1, 16, 128, 1024, 8192] if not quick else [1, 1024]
    for K, N in shapes:
        lin = nn.Linear(K, N, device="cuda")
        q = Int8Linear.from_float(lin)
        lin_bf16 = copy.deepcopy(lin).bfloat16()
        ao = torchao_int8_dynamic(lin_bf16)
        w_t = q.weight.clone().t()  # (a clone: q keeps only its packing, as a user's would)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

            def int_mm_path():
                xq, xs = torch.ops.qlib.quantize_per_token(x)
                xp = xq if M > 16 else F.pad(xq, (0, 0, 0, 17 - M))
                c = torch._int_mm(xp, w_t)[:M]
                return (c.float() * xs * q.weight_scale + q.bias).bfloat16()

            xq_pad = F.pad(torch.ops.qlib.quantize_per_token(x)[0], (0, 0, 0, max(0, 17 - M)))
            with torch.no_grad():
                t_q = cuda_median_ms(lambda: q(x))
                t_other, note = float("nan"), ""
                if other_gemm:
                    y_default = q(x)
                    qlib.set_int8_cuda_gemm("cublaslt")
                    try:
                        t_other = cuda_median_ms(lambda: q(x))
                        # The two GEMMs agree bit for bit (tests/test_int8.py): a time for wrong
                        # numbers is no time.
                        if not torch.equal(q(x), y_default):
                            note = " THE GEMMS' OUTPUTS DIFFER"
                    finally:
                        qlib.set_int8_cuda_gemm("auto")
                t_bf = cuda_median_ms(lambda: lin_bf16(x))
                t_mm = cuda_median_ms(int_mm_path)
                t_raw = cuda_median_ms(lambda: torch._int_mm(xq_pad, w_t))
                t_ao = cuda_median_ms(lambda: ao(x)) if ao is not None else float("nan")
                # The GPU work alone (CUDA-graph replays: no launch or host cost), as
                # torch.compile(mode="reduce-overhead") runs it; nan where it cannot be captured.
                g_bf, g_raw, g_q = (cuda_graph_median_ms(f) or float("nan") for f in
                                    (lambda: lin_bf16(x), lambda: torch._int_mm(xq_pad, w_t), lambda: q(x)))
            rows.append((M, K, N, t_bf, t_raw, t_mm, t_ao, t_q, t_other, g_bf, g_raw, g_q))
            print(f"[cuda] M={M:5d} K={K} N={N}  bf16 {t_bf:8.3f} ms  _int_mm alone {t_raw:8.3f} ms  "
                  f"_int_mm+quant+dequant {t_mm:8.3f} ms  torchao {t_ao:8.3f} ms  qlib {t_q:8.3f} ms | "
                  f"vs bf16 {t_bf / t_q:5.2f}x  vs _int_mm alone {t_raw / t_q:5.2f}x  "
                  f"vs _int_mm+quant+dequant {t_mm / t_q:5.2f}x  vs torchao {t_ao / t_q:5.2f}x  "
                  f"({2 * M * K * N / t_q / 1e9:7.1f} TOPS) | on cuBLASLt {t_other:8.3f} ms: vs bf16 "
                  f"{t_bf / t_other:5.2f}x, vs _int_mm alone {t_raw / t_other:5.2f}x{note} | CUDA graph: bf16 "
                  f"{g_bf:8.4f} ms  _int_mm alone {g_raw:8.4f} ms  qlib {g_q:8.4f} ms: vs bf16 {g_bf / g_q:5.2f}x, "
                  f"vs _int_mm alone {g_raw / g_q:5.2f}x", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--markdown", type=Path, help="write the CPU table (and GPU, if any) as markdown here")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--no-cpu", action="store_true", help="GPU section only")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU section")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU: {cpu_model()}, "
          f"qlib {qlib.build_info().get('cpu_isa', '')}, int8 CPU kernel {qlib.build_info()['int8_cpu_kernel']} "
          f"(weight kept packed: {qlib.build_info()['int8_packed_copy']})")
    rows = [] if args.no_cpu else bench_cpu(args.quick)
    ram = "" if args.no_cpu else weight_ram() + "\n\n" + state_dict_table()
    print(ram)
    gpu = bench_cuda(args.quick) if torch.cuda.is_available() and not args.no_cuda else []
    if args.markdown:
        text = [f"Device: {cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
                f"date {datetime.date.today().isoformat()}",
                f"Command: `python benchmarks/bench_int8_linear.py{' --quick' if args.quick else ''}"
                f"{f' --threads {args.threads}' if args.threads else ''}`", "",
                cpu_table(rows) if rows else "", "", ram]
        if gpu:
            text += ["", f"GPU: {torch.cuda.get_device_name()}; qlib's GEMM: {qlib.build_info()['int8_cuda_gemm']}", "",
                     "| M | K | N | bf16 F.linear (ms) | _int_mm alone (ms) | _int_mm + quant + dequant (ms) "
                     "| torchao int8 dynamic (ms) | qlib Int8Linear (ms) | vs bf16 | vs _int_mm alone | vs torchao "
                     "| qlib TOPS | qlib on cuBLASLt (ms) | vs bf16 | vs _int_mm alone "
                     "| graphs: qlib (ms) | vs bf16 | vs _int_mm alone |",
                     "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            text += [f"| {M} | {K} | {N} | {bf:.3f} | {raw:.3f} | {mm:.3f} | {ao:.3f} | {t:.3f} | {bf / t:.2f}x | "
                     f"{raw / t:.2f}x | {ao / t:.2f}x | {2 * M * K * N / t / 1e9:.0f} | {tc:.3f} | {bf / tc:.2f}x | "
                     f"{raw / tc:.2f}x | {gq:.4f} | {gbf / gq:.2f}x | {graw / gq:.2f}x |"
                     for M, K, N, bf, raw, mm, ao, t, tc, gbf, graw, gq in gpu]
        args.markdown.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
