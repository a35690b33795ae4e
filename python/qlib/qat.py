"""prepare_qat: swap nn.Linear modules for QATLinear."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .config import QATConfig
from .nn.qat_linear import QATLinear
from .swap import FilterFn, swap_linears


def prepare_qat(model: nn.Module, config: Optional[QATConfig] = None,
                filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Swaps (in place) each selected nn.Linear for a QATLinear sharing its
    parameters; filter_fn(module, fqn) -> bool chooses which. Returns model."""
    config = config or QATConfig()

    def make(linear: nn.Linear, fqn: str) -> QATLinear:
        config.check_linear(linear.in_features, fqn)
        return QATLinear.from_float(linear, config)

    return swap_linears(model, make, filter_fn)
