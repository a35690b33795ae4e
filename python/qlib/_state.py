"""Quantization state keeps its dtype when a model is cast (``model.half()``, ``.to(torch.bfloat16)``)."""
from torch import nn


class QuantState(nn.Module):
    """Base of qlib's modules that hold quantization state in buffers: scales, zero points,
    observer statistics, histograms and their float64 ranges, int8 weights.

    ``model.half()``, ``.bfloat16()`` or ``.to(dtype)`` would round that state to the model's
    precision (a float32 scale rounded to bfloat16 moves codes; a float64 histogram range
    rounded moves bins), and the ops refuse it. So these buffers keep their dtype and values;
    device moves still apply. Parameters (learnable scales, QATLinear's weight) follow the
    cast like any parameter, and outputs follow the input's dtype."""

    def _apply(self, fn, recurse=True):
        kept = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
