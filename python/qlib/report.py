"""`python -m qlib report MODEL`: size, output error and latency of a model's quantized forms.

MODEL is a file written by ``torch.save(model)`` (a whole module: loading it runs pickle, so
only load files you trust) or ``package.module:factory``, a callable that returns the model.
The model must take one float tensor; ``--input`` gives its shape (random normal values in
the dtype of the model's parameters).
Each scheme quantizes a copy of every ``nn.Linear`` of the model:

- ``int8``: ``qlib.quantize_dynamic`` (int8 weights, dynamic per-token int8 activations);
- ``nf4`` / ``int4`` / ``kmeans``: ``qlib.quantize_weight_only`` (4-bit weights, blocks of 64).
"""
from __future__ import annotations

import copy
import importlib
import os
import statistics
import time
from typing import Callable, Dict, Sequence

import torch
from torch import nn

import qlib

SCHEMES: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "int8": lambda m: qlib.quantize_dynamic(m),
    "nf4": lambda m: qlib.quantize_weight_only(m, "nf4"),
    "int4": lambda m: qlib.quantize_weight_only(m, "int4"),
    "kmeans": lambda m: qlib.quantize_weight_only(m, "kmeans"),
}


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict tensors (what torch.save writes, less the pickle)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def latencies_ms(models: dict, x: torch.Tensor, repeat: int = 60) -> dict:
    """Median ms per batch of each model, timed round-robin so that machine noise
    hits every model alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(repeat):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def load_model(spec: str) -> nn.Module:
    """A module from a torch.save file or from ``package.module:factory``."""
    if os.path.isfile(spec):
        try:
            model = torch.load(spec, weights_only=False, map_location="cpu")
        except (AttributeError, ModuleNotFoundError) as e:  # (unpickling the model's own class)
            raise ValueError(f"qlib report: cannot load {spec!r}: {e}. The model's class must be importable "
                             "here: run from the folder of the code that defines it (or put that folder on "
                             "PYTHONPATH); a class defined in a script's __main__ cannot be found, use "
                             "package.module:factory then") from e
        except Exception as e:
            raise ValueError(f"qlib report: cannot load {spec!r} with torch.load (a file of torch.save(model) "
                             f"is needed): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if isinstance(model, torch.jit.ScriptModule):
            raise ValueError(f"qlib report: {spec!r} holds a TorchScript module, whose Linears are not nn.Linear "
                             "modules; give the torch.save file of the eager model, or package.module:factory")
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"qlib report: cannot import {spec!r}: {e}") from e
        try:
            model = factory()
        except TypeError as e:
            raise ValueError(f"qlib report: {spec!r} must be callable with no arguments: {e}") from e
    else:
        raise ValueError(f"qlib report: {spec!r} is neither a file nor package.module:factory")
    if not isinstance(model, nn.Module):
        raise ValueError(f"qlib report: {spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"qlib report: --input must look like 8x768 (positive sizes), got {text!r}")
    return shape


def report(model: nn.Module, shape: Sequence[int], schemes: Sequence[str] = tuple(SCHEMES),
           repeat: int = 60, seed: int = 0) -> Dict[str, dict]:
    """{name: {bytes, rel_error, cosine, ms}} for the float model and each scheme, on one random input."""
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"qlib report: unknown schemes {unknown}; choose from {list(SCHEMES)}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError("qlib report: the model has no nn.Linear to quantize")
    modes = [(m, m.training) for m in model.modules()]  # restored at the end (as gptq_quantize does)
    try:
        return _report(model.eval(), shape, schemes, repeat, seed)
    finally:
        for m, training in modes:
            m.training = training


def _report(model: nn.Module, shape: Sequence[int], schemes: Sequence[str], repeat: int,
            seed: int) -> Dict[str, dict]:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"qlib report: the model's parameters are {dtype}; the schemes take float32, float16 "
                         "or bfloat16 models (cast it, e.g. model.float())")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        try:
            ref = model(x)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"qlib report: the model does not take one float tensor of shape "
                             f"{'x'.join(map(str, shape))} (--input): {e}") from e
        if not isinstance(ref, torch.Tensor):
            raise ValueError(f"qlib report: the model must return one tensor, got a {type(ref).__name__} "
                             "(wrap it in a module that returns the output to compare)")
        ref = ref.double().flatten()
        models, rows = {}, {}
        for name in ("float", *schemes):
            try:
                m = model if name == "float" else SCHEMES[name](copy.deepcopy(model)).eval()
                y = m(x).double().flatten()
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"qlib report: the {name} scheme failed on this model: {e}") from e
            models[name] = m
            rows[name] = {"bytes": state_bytes(m),
                          "rel_error": ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item(),
                          "cosine": torch.nn.functional.cosine_similarity(y, ref, dim=0).item()}
    for name, ms in latencies_ms(models, x, repeat).items():
        rows[name]["ms"] = ms
    return rows


def print_report(rows: Dict[str, dict], title: str) -> None:
    base = rows["float"]
    print(title)
    header = f"{'scheme':8s} {'bytes':>12s} {'vs float':>9s} {'rel. error':>11s} {'cosine':>9s} {'ms/batch':>9s} {'speedup':>8s}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(f"{name:8s} {r['bytes']:12d} {base['bytes'] / r['bytes']:8.2f}x {r['rel_error']:11.2e} "
              f"{r['cosine']:9.6f} {r['ms']:9.3f} {base['ms'] / r['ms']:7.2f}x")


def main(spec: str, input_shape: str, schemes: str = ",".join(SCHEMES), repeat: int = 60) -> int:
    shape = parse_shape(input_shape)
    model = load_model(spec)
    rows = report(model, shape, [s for s in schemes.split(",") if s], repeat)
    print_report(rows, f"{spec}: input {'x'.join(map(str, shape))}, {torch.get_num_threads()} threads "
                       "(rel. error and cosine of the outputs against the float model)")
    return 0
