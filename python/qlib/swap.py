"""Swapping the nn.Linear modules of any module tree (shared by the workflows)."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


def swap_linears(model: nn.Module, make: Callable[[nn.Linear, str], nn.Module],
                 filter_fn: Optional[FilterFn] = None, kind: type = nn.Linear) -> nn.Module:
    """Replaces, in place, each module of exactly type `kind` for which
    filter_fn(module, fqn) holds by make(module, fqn). Returns the model."""
    if type(model) is kind:
        raise TypeError(f"pass a model that contains {kind.__name__} modules, not a bare {kind.__name__}")
    targets = [(fqn, m) for fqn, m in model.named_modules()
               if type(m) is kind and (filter_fn is None or filter_fn(m, fqn))]
    for fqn, module in targets:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(module, fqn))
    return model
