"""`python -m qlib report MODEL`: size, output error and latency of a model's quantized forms.

MODEL is a file written by ``torch.save(model)`` (a whole module: loading it runs pickle, so
only load files you trust) or ``package.module:factory``, a callable that returns the model.
The model must take one float tensor; ``--input`` gives its shape (random normal values in
the dtype of the model's parameters). ``--seed`` seeds torch before a factory runs (its random
init) and the input, so a run repeats its numbers.
Each scheme quantizes a copy of every ``nn.Linear`` (and transformers ``Conv1D``) of the model:

- ``int8``: ``qlib.quantize_dynamic`` (int8 weights, dynamic per-token int8 activations);
- ``nf4`` / ``int4`` / ``kmeans``: ``qlib.quantize_weight_only`` (4-bit weights, blocks of 64).

The swaps take modules of exactly type ``nn.Linear``: a subclass (a ``CastedLinear(nn.Linear)``,
a ``QATLinear``, ``nn.MultiheadAttention``'s ``out_proj``) stays float. The report counts the
Linears each scheme swapped: it refuses a model where a scheme swaps none, and warns (and marks
the table) where one leaves some float.
"""
from __future__ import annotations

import copy
import importlib
import os
import statistics
import time
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import qlib
from qlib._state import OP_FLOAT_DTYPES
from qlib.workflows import is_conv1d

SCHEMES: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "int8": lambda m: qlib.quantize_dynamic(m),
    "nf4": lambda m: qlib.quantize_weight_only(m, "nf4"),
    "int4": lambda m: qlib.quantize_weight_only(m, "int4"),
    "kmeans": lambda m: qlib.quantize_weight_only(m, "kmeans"),
}


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict tensors (what torch.save writes, less the pickle): each
    storage once, whole, as torch.save writes it (tied weights, a Linear used twice, views)."""
    storages = {}
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            where = storage.data_ptr() or id(t)  # (meta tensors have no address)
            storages[(t.device, where)] = storage.nbytes()
    return sum(storages.values())


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def named_linears(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """(name, module) of each distinct nn.Linear (subclasses included) or Conv1D of the model."""
    return [(fqn, m) for fqn, m in model.named_modules() if _is_linear(m)]


def _type_counts(linears: Sequence[Tuple[str, nn.Module]]) -> str:
    counts = Counter(type(m).__name__ for _, m in linears)
    return ", ".join(f"{n} {name}" for name, n in counts.items())


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


def load_model(spec: str, seed: Optional[int] = None) -> nn.Module:
    """A module from a torch.save file or from ``package.module:factory``; ``seed``, when given,
    seeds torch (``torch.manual_seed``) before the factory runs, so its random init repeats."""
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
        if seed is not None:
            torch.manual_seed(seed)
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
    """{name: {bytes, rel_error, cosine, ms, linears, quantized, left_float}} for the float model
    and each scheme, on one random input (seeded by ``seed``). ``linears`` counts the model's
    distinct nn.Linear modules (subclasses included), ``quantized`` those the scheme swapped
    (0 for float), ``left_float`` names the others. Raises ValueError when a scheme swaps none;
    warns when one leaves some float."""
    if not schemes:
        raise ValueError(f"qlib report: schemes is empty; choose from {list(SCHEMES)}")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"qlib report: unknown schemes {unknown}; choose from {list(SCHEMES)}")
    if not any(_is_linear(m) for m in model.modules()):
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
    if dtype not in OP_FLOAT_DTYPES:
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
        if ref.numel() == 0:  # (rel. error 0 and cosine 0 of nothing: numbers that say nothing)
            raise ValueError(f"qlib report: the model's output for an input of shape {'x'.join(map(str, shape))} "
                             f"(--input) is empty (shape {tuple(ref.shape)}): there is no error to measure")
        ref = ref.double().flatten()
        linears = named_linears(model)
        models, rows = {}, {}
        for name in ("float", *schemes):
            try:
                m, left = (model, linears) if name == "float" else _quantized_copy(model, name, linears)
                y = m(x).double().flatten()
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"qlib report: the {name} scheme failed on this model: {e}") from e
            if name != "float" and len(left) == len(linears):
                raise ValueError(
                    f"qlib report: the {name} scheme quantizes none of the model's {len(linears)} Linears "
                    f"({_type_counts(linears)}): the schemes swap modules of exactly type nn.Linear, a subclass "
                    f"stays float{_hint(linears)}")
            models[name] = m
            rows[name] = {"bytes": state_bytes(m),
                          "rel_error": ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item(),
                          "cosine": torch.nn.functional.cosine_similarity(y, ref, dim=0).item(),
                          "linears": len(linears), "quantized": len(linears) - len(left),
                          "left_float": [fqn or "(the model)" for fqn, _ in left]}
    _warn_left_float(rows, linears)
    for name, ms in latencies_ms(models, x, repeat).items():
        rows[name]["ms"] = ms
    return rows


def _quantized_copy(model: nn.Module, scheme: str, linears: Sequence[Tuple[str, nn.Linear]]):
    """The scheme's model (made of a copy) and the model's Linears whose copies it left in place."""
    memo = {}  # deepcopy's memo: id(original) -> its copy
    quantized = SCHEMES[scheme](copy.deepcopy(model, memo)).eval()
    present = {id(m) for m in quantized.modules()}

    def left_in_place(fqn: str, linear: nn.Linear) -> bool:
        if id(linear) in memo:
            return id(memo[id(linear)]) in present
        try:  # (a module whose own __deepcopy__ skips the memo: look it up by name)
            return _is_linear(quantized.get_submodule(fqn))
        except AttributeError:
            return False

    return quantized, [(fqn, m) for fqn, m in linears if left_in_place(fqn, m)]


def _hint(linears: Sequence[Tuple[str, nn.Module]]) -> str:
    types = {type(m).__name__ for _, m in linears}
    hints = []
    if "QATLinear" in types:
        hints.append("a QAT-prepared model is quantized by qlib.convert(model)")
    if "NonDynamicallyQuantizableLinear" in types:
        hints.append("nn.MultiheadAttention reads its out_proj's weight directly, so it cannot be swapped")
    if types - {"QATLinear", "NonDynamicallyQuantizableLinear"}:
        hints.append("use plain nn.Linear modules there to report them")
    return "; " + "; ".join(hints) if hints else ""


def _schemes_by_left_float(rows: Dict[str, dict]) -> Dict[tuple, List[str]]:
    """{names of the Linears left float: the schemes that left them}, for schemes that left some."""
    by_left = {}
    for name, row in rows.items():
        if name != "float" and row["left_float"]:
            by_left.setdefault(tuple(row["left_float"]), []).append(name)
    return by_left


def _warn_left_float(rows: Dict[str, dict], linears: Sequence[Tuple[str, nn.Module]]) -> None:
    """One warning per set of Linears some schemes left float."""
    types = {fqn or "(the model)": type(m).__name__ for fqn, m in linears}
    for left, names in _schemes_by_left_float(rows).items():
        shown = ", ".join(f"{fqn} ({types[fqn]})" for fqn in left[:8]) + (", ..." if len(left) > 8 else "")
        warnings.warn(f"qlib report: the {', '.join(names)} scheme{'s' if len(names) > 1 else ''} left "
                      f"{len(left)} of {len(linears)} Linears float (the swaps take exactly nn.Linear): {shown}; "
                      "those rows measure a partly quantized model", stacklevel=4)


def print_report(rows: Dict[str, dict], title: str) -> None:
    """The rows as a table; a scheme that left Linears float is marked * and named below it."""
    base = rows["float"]
    print(title)
    header = (f"{'scheme':8s} {'bytes':>12s} {'vs float':>9s} {'rel. error':>11s} {'cosine':>9s} "
              f"{'ms/batch':>9s} {'speedup':>8s} {'Linears':>8s}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        linears = f"{r['quantized']}/{r['linears']}" + ("*" if name != "float" and r["left_float"] else " ")
        print(f"{name:8s} {r['bytes']:12d} {base['bytes'] / r['bytes']:8.2f}x {r['rel_error']:11.2e} "
              f"{r['cosine']:9.6f} {r['ms']:9.3f} {base['ms'] / r['ms']:7.2f}x {linears:>8s}")
    for left, names in _schemes_by_left_float(rows).items():
        print(f"* {', '.join(names)} left {len(left)} of {base['linears']} Linears float (the swaps take exactly "
              "nn.Linear): " + ", ".join(left[:8]) + (", ..." if len(left) > 8 else ""))


def parse_schemes(text: str) -> list:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    if not schemes:
        raise ValueError(f"qlib report: --schemes names no scheme (got {text!r}); choose from "
                         f"{', '.join(SCHEMES)}")
    return schemes


def main(spec: str, input_shape: str, schemes: str = ",".join(SCHEMES), repeat: int = 60, seed: int = 0) -> int:
    """The CLI's report: ``seed`` seeds the factory's random init and the random input."""
    shape = parse_shape(input_shape)
    scheme_list = parse_schemes(schemes)
    model = load_model(spec, seed)
    rows = report(model, shape, scheme_list, repeat, seed)
    print_report(rows, f"{spec}: input {'x'.join(map(str, shape))}, {torch.get_num_threads()} threads "
                       "(rel. error and cosine of the outputs against the float model; Linears: quantized / all)")
    return 0
