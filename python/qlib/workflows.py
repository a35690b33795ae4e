"""Model-level workflows: swap the Linears of a model for quantized ones."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .nn.int8_linear import Int8Linear

FilterFn = Callable[[nn.Module, str], bool]


def quantize_dynamic(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` selected by ``filter_fn(module, fqn)``
    (all of them when None) with an :class:`qlib.nn.Int8Linear` (int8 per-channel weights,
    dynamic per-token int8 activations). Returns the model; if ``model`` itself is a selected
    ``nn.Linear``, returns its replacement.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qlib.quantize_dynamic: expected an nn.Module, got {type(model).__name__}")

    def selected(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and (filter_fn is None or bool(filter_fn(module, fqn)))

    if selected(model, ""):
        return Int8Linear.from_float(model)
    swaps = []
    for parent_fqn, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent.named_children():
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            if selected(child, fqn):
                swaps.append((parent, name, child))
    done = {}
    for parent, name, child in swaps:
        # A Linear shared by several parents becomes one shared Int8Linear.
        if id(child) not in done:
            done[id(child)] = Int8Linear.from_float(child)
        setattr(parent, name, done[id(child)])
    return model
