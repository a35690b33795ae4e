"""Quantization state keeps its dtype when a model is cast (``model.half()``, ``.to(torch.bfloat16)``)."""
import threading

import torch
from torch import Tensor, nn

# The floating dtypes the ops take for x (and activations, weights of the swapped Linears).
OP_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The least scale the ops take (their kMinScale, the smallest normal float32): 1 / scale is finite.
MIN_SCALE = torch.finfo(torch.float32).tiny

# Functions behind torch.compiler.disable (graph breaks for torch.compile), wrapped by the
# first observer or FakeQuantize built or unpickled (make_graph_breaks), not at import: importing
# torch._dynamo takes ~0.9 s, 30x the rest of `import qlib`. Callers look them up by their module
# global's name at call time, so they get the wrapped function once it exists.
_GRAPH_BREAKS: list = []  # (module globals, name, function, reason)
_GRAPH_BREAKS_LOCK = threading.Lock()


def graph_break(reason: str):
    """Decorator: the function, to be replaced in its module by torch.compiler.disable(function,
    reason=reason) at make_graph_breaks()."""
    def register(fn):
        _GRAPH_BREAKS.append((fn.__globals__, fn.__name__, fn, reason))
        return fn
    return register


def make_graph_breaks() -> None:
    if not _GRAPH_BREAKS:
        return
    with _GRAPH_BREAKS_LOCK:  # (another thread returns once all are wrapped: popped after)
        while _GRAPH_BREAKS:
            namespace, name, fn, reason = _GRAPH_BREAKS[-1]
            namespace[name] = torch.compiler.disable(fn, reason=reason)
            _GRAPH_BREAKS.pop()


def untraced(fn):
    """fn() with torch.jit.trace's recording off (nothing it does is recorded): shape checks read
    plain ints, without TracerWarnings. (A function, not a context manager, so that dynamo
    inlines it; dynamo folds _get_tracing_state to None: nothing to switch under compile.)"""
    tracing = torch._C._get_tracing_state()
    if tracing is None:
        return fn()
    torch._C._set_tracing_state(None)
    try:
        return fn()
    finally:
        torch._C._set_tracing_state(tracing)


def known_empty(x: Tensor) -> bool:
    """x.numel() == 0 where that is known. A data-dependent size under torch.compile / export (rows
    picked by nonzero(), routed tokens) counts as not empty: a guard on it raised ("Could not guard
    on data-dependent expression"). Callers skip work the ops would do to no effect on an empty x."""
    n = x.numel()
    if isinstance(n, int) and not torch.compiler.is_compiling():  # (dynamo calls a SymInt an int)
        return n == 0
    from torch.fx.experimental.symbolic_shapes import guard_or_false  # (imported with dynamo anyway)

    return guard_or_false(n == 0)


def record_in_metadata(destination, prefix: str, key: str, value) -> None:
    """From a _save_to_state_dict: key = value in torch's state_dict metadata of the module at
    prefix (kept by torch.save / torch.load and deepcopy, not by safetensors or a rebuilt dict),
    for its _load_from_state_dict to check (local_metadata)."""
    metadata = getattr(destination, "_metadata", None)
    if metadata is not None and prefix[:-1] in metadata:
        metadata[prefix[:-1]][key] = value


def check_host_readable(who: str, name: str, t: Tensor) -> None:
    """Raises, naming the module and buffer, where a buffer whose value Python reads (a switch, a
    counter, a code range) is a torch.func transform's tensor: vmap over stacked buffers
    (torch.func.stack_module_state) or buffers passed through grad. Its value picks the forward's
    path, one for the whole batch; reading it failed with "Cannot access data pointer of Tensor
    that doesn't have storage"."""
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        raise RuntimeError(
            f"{who}: its buffer {name!r} is a torch.func transform's tensor (vmap over stacked buffers, "
            "e.g. torch.func.stack_module_state, or a buffer passed through grad); its value is read in "
            "Python to choose the forward's path, so it cannot differ across a batch: leave it out of the "
            "buffers given to torch.func.functional_call (the module's own is used)")


def exporting() -> bool:
    """torch.compiler.is_exporting(), right under torch.compile too: torch <= 2.11's dynamo folds
    is_exporting() to True while compiling (pytorch #176347), not the flag export sets."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


class QuantState(nn.Module):
    """Base of qlib's modules that hold quantization state in buffers: scales, zero points,
    observer statistics, histograms and their float64 ranges, int8 weights.

    ``model.half()``, ``.bfloat16()`` or ``.to(dtype)`` would round that state to the model's
    precision (a float32 scale rounded to bfloat16 moves codes; a float64 histogram range
    rounded moves bins), and the ops refuse it. So these buffers keep their dtype and values;
    device moves still apply. Parameters (learnable scales, QATLinear's weight) follow the
    cast like any parameter, and outputs follow the input's dtype."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: say what works instead
        # of a TorchScript compiler error deep in a forward.
        raise RuntimeError(
            f"qlib: {type(self).__name__} cannot be compiled by torch.jit.script; use torch.jit.trace, "
            "torch.compile or torch.export")

    def _apply(self, fn, recurse=True):
        kept = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _loaded_buffers(self, state_dict, prefix):
        """(name, key, value) of each buffer that ``state_dict`` holds, after checking that the
        value is a tensor of the buffer's dtype and shape: a corrupt or foreign state_dict gets
        an error naming the key, not a copy that fails later or silently converts."""
        cls = type(self).__name__
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is None or key not in state_dict:
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor):
                raise RuntimeError(f"{cls}: state_dict[{key!r}] must be a Tensor, got {type(value).__name__}")
            if value.dtype != buf.dtype or value.shape != buf.shape:
                raise RuntimeError(
                    f"{cls} ({self.extra_repr()}): state_dict[{key!r}] is {value.dtype} of shape "
                    f"{tuple(value.shape)}, expected {buf.dtype} of shape {tuple(buf.shape)}")
            yield name, key, value


def weight_zeros(shape, dtype: torch.dtype, device) -> Tensor:
    """torch.zeros for a quantized weight buffer: on the CPU a big one (8 MiB and up) asks for
    2 MiB pages, as the CPU kernels stream it on every call (1.05-1.1x faster at 4096 x 4096 on
    Zen 4). Meta, fake and other devices get plain torch.zeros."""
    probe = torch.empty(0, dtype=dtype, device=device)  # (the default device and modes apply)
    if type(probe) is not Tensor or probe.device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    from . import _C
    return _C.zeros_on_huge_pages(list(shape), dtype)


def check_finite_weight(who: str, w: Tensor) -> None:
    """Raises where a weight [N, K] to quantize holds NaN or Inf (quantize maps NaN to the zero
    point: a silent finite weight)."""
    # (aminmax propagates NaN, and takes no float copy of w as isfinite does: the swaps' peak memory)
    if w.device.type != "meta" and w.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(w))).all()):
        row = int((~torch.isfinite(w)).any(dim=1).nonzero()[0])
        raise ValueError(f"{who}: the weight holds NaN or Inf (output channel {row}); "
                         "only finite weights can be quantized")


def on_nested(who: str, fn, x: Tensor) -> Tensor:
    """fn applied to a nested x (as nn.Linear takes them): a jagged x whose ragged dim is not the
    last runs on its values ([total rows, ..., features]; a view with gaps, torch.nested.narrow's,
    is made contiguous first) and comes back with x's offsets; other nested tensors raise, naming
    the module."""
    if x.layout == torch.jagged and x._ragged_idx < x.dim() - 1:
        if x.lengths() is not None:  # (its values() hold the gaps too)
            x = x.contiguous()
        return torch.nested.nested_tensor_from_jagged(fn(x.values()), x.offsets(), jagged_dim=x._ragged_idx)
    raise TypeError(f"{who}: a nested tensor must have the jagged layout (torch.nested.nested_tensor(..., "
                    f"layout=torch.jagged)) with its ragged dim before the last; got layout {x.layout}. "
                    "Pad it first (x.to_padded_tensor(0.0)) or convert it to torch.jagged")


def refuse_fx_proxy(who: str, x) -> None:
    """Raise for a torch.fx Proxy (torch.fx.symbolic_trace). Fake quant and observers keep state
    that their forward reads on the host, and a trace that ran them on the real weight recorded the
    fake-quantized weight as a constant: training the graph would not move it."""
    if isinstance(x, torch.fx.Proxy):
        raise RuntimeError(
            f"{who}: torch.fx.symbolic_trace cannot trace qlib's fake quant and observers (they keep "
            "state that the forward reads). Use torch.export.export or torch.compile, or a "
            "torch.fx.Tracer whose is_leaf_module keeps qlib.nn modules and observers whole")
