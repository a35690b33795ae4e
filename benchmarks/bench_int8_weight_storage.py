"""Int8Linear on the CPU with its weight packed for the kernel and with the plain int8 weight,
beside torch.ao's dynamic quantized Linear (fbgemm).

    python benchmarks/bench_int8_weight_storage.py [--kernel NAME] [--threads N] [--m M ...] [--markdown PATH]

By default only the `amx` kernel reads the int8 weight where it lies; the others keep it packed
for them (`weight_packed`, in place of the plain weight since stop 40: 1 byte a weight either
way). `QLIB_INT8_PACKED_COPY=0` (read at start-up) keeps the plain weight for every kernel,
`=1` packs for every kernel. This script times the process's default beside a child process
started with the other setting, each interleaved with torch.ao in its own process (torch.ao's
column is the parent's; each ratio uses its own process's torch.ao time). M in {1, 4, 8, 16, 128, 1024} (or --m) x
(K, N) in {(768, 768), (768, 3072), (4096, 4096)}: medians (ms) and ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import qlib  # noqa: E402
from qlib.nn import Int8Linear  # noqa: E402
from timing import interleaved_medians_ms  # noqa: E402

SHAPES = [(768, 768), (768, 3072), (4096, 4096)]
MS = [1, 4, 8, 16, 128, 1024]


def measure(ms):
    """{"M K N": (qlib ms, torch.ao ms, bytes of all of the Int8Linear's buffers)} in this process."""
    out = {}
    torch.manual_seed(0)
    for K, N in SHAPES:
        lin = nn.Linear(K, N)
        q = Int8Linear.from_float(lin)
        ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        for M in ms:
            x = torch.randn(M, K)
            with torch.inference_mode():
                tq, ta = interleaved_medians_ms([lambda: q(x), lambda: ao(x)], block=3)
            out[f"{M} {K} {N}"] = (tq, ta, sum(b.numel() * b.element_size() for b in q.buffers()))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="auto", help="qlib.set_int8_cpu_kernel name (default: auto)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--markdown", type=Path, help="write the table as markdown here")
    p.add_argument("--m", type=int, nargs="+", default=MS, help=f"rows of x (default: {MS})")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qlib.set_int8_cpu_kernel(args.kernel)
    if args.child:
        print(json.dumps(measure(args.m)))
        return
    copy_now = qlib.build_info()["int8_packed_copy"]
    if not isinstance(copy_now, bool):  # (a bad QLIB_INT8_PACKED_COPY: the error)
        sys.exit(copy_now)
    child_env = dict(os.environ, QLIB_INT8_PACKED_COPY="0" if copy_now else "1")
    here = measure(args.m)
    cmd = [sys.executable, __file__, "--child", "--kernel", args.kernel, "--m", *map(str, args.m)] + (
        ["--threads", str(args.threads)] if args.threads else [])
    there = json.loads(subprocess.run(cmd, env=child_env, check=True, capture_output=True, text=True).stdout)
    packed, plain = (here, there) if copy_now else (there, here)

    header = ["M", "K", "N", "torch.ao (ms)", "qlib packed (ms)", "qlib plain weight (ms)",
              "packed vs torch.ao", "plain weight vs torch.ao", "plain / packed time",
              "buffer bytes: packed / plain"]
    rows = []
    for key in here:
        M, K, N = key.split()
        tc, ac, bc = packed[key]
        tp, ap, bp = plain[key]
        rows.append([M, K, N, f"{here[key][1]:.3f}", f"{tc:.3f}", f"{tp:.3f}", f"{ac / tc:.2f}x",
                     f"{ap / tp:.2f}x", f"{tp / tc:.2f}", f"{bc} / {bp}"])
    kernel = qlib.build_info()["int8_cpu_kernel"]
    title = (f"int8 CPU kernel {kernel}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if args.markdown:
        md = [title, "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        args.markdown.write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
