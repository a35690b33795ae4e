"""Peak host memory of the workflows on a stack of float32 Linears (Linux: /proc/self/status).

    python benchmarks/bench_workflow_memory.py [--blocks N] [--d D] [--hidden H] [--markdown PATH]

The model: N blocks of Linear(D, H), ReLU, Linear(H, D) (default 4 x 2048 / 8192: 512 MiB of
float32 weights). Each case runs in a fresh process; "peak over model" is VmHWM, reset just
before the workflow, less the RSS then (the float model included). Beside qlib, torch.ao's
quantize_dynamic on the same model. glibc keeps some freed blocks (run to run spread); the
child sets MALLOC_MMAP_THRESHOLD_ so that large frees go back to the system.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

MiB = 2 ** 20
CASES = {
    "quantize_dynamic": "qlib int8 weights, dynamic activations",
    "torch.ao quantize_dynamic": "fbgemm, the peer",
    "quantize_weight_only nf4": "qlib 4-bit",
    "prepare + calibrate + convert": "qlib static int8 (3 batches, min-max)",
    "gptq_quantize": "qlib 4-bit GPTQ (3 batches)",
    "gptq_quantize sequential": "one Linear at a time",
}


def status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def workflow(case: str, model, batches) -> None:
    import torch
    from torch import nn

    import qlib

    if case == "quantize_dynamic":
        qlib.quantize_dynamic(model)
    elif case == "torch.ao quantize_dynamic":
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    elif case == "quantize_weight_only nf4":
        qlib.quantize_weight_only(model, "nf4")
    elif case == "prepare + calibrate + convert":
        qlib.convert(qlib.calibrate(qlib.prepare(model), batches, progress=False))
    elif case.startswith("gptq_quantize"):
        qlib.gptq_quantize(model, batches, sequential=case.endswith("sequential"), progress=False)


def run_case(case: str, blocks: int, d: int, hidden: int) -> dict:
    """In this (child) process: the model, then the workflow; the peak over the RSS before it.
    The same workflow on a small model first: what the first call loads once is not counted."""
    import gc

    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

    def model_and_batches(blocks, d, hidden):
        torch.manual_seed(0)
        return (nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))]),
                [torch.randn(2, 64, d) for _ in range(3)])

    workflow(case, *model_and_batches(1, 64, 128))
    model, batches = model_and_batches(blocks, d, hidden)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    before = status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    workflow(case, model, batches)
    peak = status_bytes("VmHWM:") - before
    gc.collect()
    after = status_bytes("VmRSS:") - before
    return {"float_bytes": float_bytes, "peak": peak, "after": after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--case", help=argparse.SUPPRESS)  # (the child's)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.blocks, args.d, args.hidden)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    rows = []
    for case, what in CASES.items():
        out = subprocess.run([sys.executable, __file__, "--case", case, "--blocks", str(args.blocks), "--d",
                              str(args.d), "--hidden", str(args.hidden)], env=env, check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append((case, what, r))
        print(f"{case}: done", file=sys.stderr)
    float_mib = rows[0][2]["float_bytes"] / MiB
    lines = [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.blocks} x "
             f"({args.d} -> {args.hidden} -> {args.d}) float32 Linears: {float_mib:.0f} MiB of weights", "",
             "| case | what | peak over model (MiB) | / float weights | RSS change after (MiB) |",
             "|---|---|---:|---:|---:|"]
    for case, what, r in rows:
        lines.append(f"| {case} | {what} | {r['peak'] / MiB:.0f} | {r['peak'] / r['float_bytes']:.2f} | "
                     f"{r['after'] / MiB:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
