"""Observers: record statistics of tensors and turn them into (scale, zero_point).

Every observer is an ``nn.Module`` taking

* ``bits`` (2..16) and ``symmetric``: ``symmetric=True`` quantizes to the
  signed range ``[-2^(bits-1), 2^(bits-1) - 1]`` with zero_point 0;
  ``symmetric=False`` (asymmetric, with a zero point) to the unsigned range
  ``[0, 2^bits - 1]``, the range always widened to contain 0 so that 0 is
  exact. ``quant_min`` / ``quant_max`` expose the range.
* a granularity: ``ch_axis`` (per-channel along that axis) or ``group_size``
  (per-group of that many consecutive elements along the last dim); neither
  means per-tensor.

``forward(x)`` records ``x`` and returns it unchanged (NaN and +-Inf are
ignored and counted in the ``nonfinite`` buffer; an empty tensor changes
nothing; on CUDA no host sync). ``calculate_qparams()`` returns
``(scale float32, zero_point int32)`` with keepdim shapes for ``fake_quant``
on the observed tensor (``[C, 1]`` per-channel of a ``[C, K]`` weight,
``[N, K // g]`` per-group, all ones per-tensor). ``reset()`` clears. All
state is in buffers (``state_dict`` round-trips, and loads with
``torch.load(weights_only=True)``); buffers are updated in place. When
``torch.distributed`` is initialised, ``calculate_qparams()`` all-reduces the
statistics so that every rank gets the same qparams.

The histogram observers (percentile, MSE, entropy) keep an int64 histogram
per block on a canonical power-of-two grid (see csrc/quant_math.h): growing
the range re-bins exactly, so the histogram, and hence the qparams, equal
those of one observer that saw all the data, in any order and on any number
of ranks. Symmetric histogram observers histogram ``|x|``. Like any linear
histogram (torch.ao's HistogramObserver too), the resolution is the data
range over ``bins``: one huge outlier squeezes the bulk of the data into a
few bins (raise ``bins`` then). A new block count after the first
observation raises; a different shape with the same block count is not
detected (that would need a device read) -- call ``reset()`` between
tensors of different shapes.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import _C
from . import _observer_ops  # noqa: F401  (registers the fakes)
from ._ops import quant_range
from ._state import (OP_FLOAT_DTYPES, QuantState, check_host_readable, exporting, graph_break, known_empty,
                     make_graph_breaks, record_in_metadata, refuse_fx_proxy, untraced)

ops = torch.ops.qlib
_ALLOCATE_LOCK = threading.Lock()

__all__ = [
    "ObserverBase",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
]

_EPS = torch.finfo(torch.float32).eps


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _has_forward_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks
                or _module._global_forward_hooks or _module._global_forward_pre_hooks)


NOTHING_RECORDED = ("its observer has recorded nothing yet (its qparams would be scale eps); run data "
                    "through it with the observer enabled, or load a calibrated state_dict, first")


class ObserverBase(QuantState):
    """Shared machinery: granularity, counters, buffers, all-reduce, qparams."""

    # name -> initial fill value of the per-block statistic buffers
    _stat_buffers: Dict[str, float] = {}
    # The torch.func wrappers of x ("grad", "vmap") the in-place update of the statistics runs
    # under: the observe ops under grad; a vmapped x would have every sample update the one
    # set of statistics.
    _observes_under: frozenset = frozenset()

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        ch_axis: Optional[int] = None,
        group_size: Optional[int] = None,
        eps: float = _EPS,
    ) -> None:
        super().__init__()
        make_graph_breaks()
        name = type(self).__name__
        if not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"qlib.observers.{name}: bits must be an int in [2, 16], got {bits!r}")
        if ch_axis is not None and group_size is not None:
            raise ValueError(
                f"qlib.observers.{name}: give ch_axis ({ch_axis}) or group_size ({group_size}), not both"
            )
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"qlib.observers.{name}: group_size must be a positive int, got {group_size!r}")
        if ch_axis is not None and (not isinstance(ch_axis, int) or isinstance(ch_axis, bool)):
            raise ValueError(f"qlib.observers.{name}: ch_axis must be an int, got {ch_axis!r}")
        self.bits = bits
        self.symmetric = bool(symmetric)
        self.ch_axis = ch_axis
        self.group_size = group_size
        _C.check_eps(f"qlib.observers.{name}", eps)  # (here, not at the first forward)
        self.eps = float(eps)
        self.quant_min, self.quant_max = quant_range(bits, signed=self.symmetric)
        # Finite values recorded, and NaN/Inf values seen (and ignored).
        self.register_buffer("observed", torch.zeros((), dtype=torch.int64))
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.int64))
        # [1, *keepdim shape of the qparams]; empty until the first observation
        # (so that "observed yet?" is a shape, not a value: no device read).
        self.register_buffer("qparams_shape", torch.zeros((0,), dtype=torch.int64))
        self._init_stats(0, torch.device("cpu"))
        # (x.shape, block axis, qparams shape, blocks) of the last observed x (eager, untraced only).
        self._layout = None

    # ------------------------------------------------------------ layout
    def _qparams_shape(self, x: Tensor) -> List[int]:
        """The keepdim qparams shape for x (checks that the granularity fits x)."""
        name = type(self).__name__
        if self.ch_axis is not None:
            if x.dim() == 0:
                raise ValueError(f"qlib.observers.{name}: ch_axis={self.ch_axis} needs a tensor with dims, got a scalar")
            if not -x.dim() <= self.ch_axis < x.dim():
                raise ValueError(
                    f"qlib.observers.{name}: ch_axis {self.ch_axis} is out of range for x of shape {tuple(x.shape)}"
                )
            shape = [1] * x.dim()
            shape[self.ch_axis] = x.shape[self.ch_axis]
            return shape
        if self.group_size is not None:
            k = x.shape[-1] if x.dim() > 0 else 1
            if x.dim() == 0 or k % self.group_size != 0:
                raise ValueError(
                    f"qlib.observers.{name}: group_size {self.group_size} does not divide the last dim "
                    f"of x of shape {tuple(x.shape)}"
                )
            return [*x.shape[:-1], k // self.group_size]
        return [1] * x.dim()

    def _rows(self, x: Tensor) -> Tuple[Tensor, List[int]]:
        """x as [blocks, elements per block], and the keepdim qparams shape."""
        shape = self._qparams_shape(x)
        if self.ch_axis is not None:
            a = self.ch_axis % x.dim()
            rows = x if a == 0 else x.movedim(a, 0)  # (movedim costs ~1.5 us a call)
            return rows.reshape(x.shape[a], -1), shape
        if self.group_size is not None:
            return x.reshape(-1, self.group_size), shape
        return x.reshape(1, -1), shape

    def _init_stats(self, blocks: int, device) -> None:
        for name in self._stat_buffers:
            self.register_buffer(name, self._new_stat(name, blocks, device))

    def _new_stat(self, name: str, blocks: int, device) -> Tensor:
        return torch.full((blocks,), self._stat_buffers[name], dtype=torch.float32, device=device)

    def _prepare(self, x: Tensor) -> Optional[Tensor]:
        """The rows of x to record, with the buffers set up; None for an empty x."""
        if not isinstance(x, Tensor):
            refuse_fx_proxy(f"qlib.observers.{type(self).__name__}", x)
            raise TypeError(f"qlib.observers.{type(self).__name__}: x must be a Tensor, got {type(x).__name__}")
        x = x.detach()
        # (untraced: torch.jit.trace's sizes as plain ints, no TracerWarnings)
        # (an empty x changes no state: a size that may be 0, as rows from nonzero(), is observed)
        empty, unsized = untraced(lambda: (known_empty(x), self._buffers["qparams_shape"].numel() == 0))
        if empty:
            return None
        if not x.is_floating_point():
            raise TypeError(f"qlib.observers.{type(self).__name__}: x must be floating, got {x.dtype}")
        if x.dtype not in OP_FLOAT_DTYPES:
            x = x.float()
        rows, shape = self._rows(x)
        if unsized:
            # (An exported or traced graph would size, and so clear, the statistics every call.)
            if exporting() or torch.jit.is_tracing():
                raise RuntimeError(
                    f"qlib.observers.{type(self).__name__}: its buffers are not sized yet (nothing observed "
                    f"since construction or reset()); call allocate({untraced(lambda: tuple(x.shape))}) or run "
                    f"one eager batch before torch.export or torch.jit.trace")
            if x.is_meta and not self._buffers["observed"].is_meta:  # (would leave its state without values)
                raise RuntimeError(
                    f"qlib.observers.{type(self).__name__}: x is on the meta device but this observer's "
                    f"buffers are on {self._buffers['observed'].device}; move the module with .to('meta') first")
            _allocate_eagerly(self, rows.shape[0], shape, x.device)
        if untraced(lambda: rows.shape[0] != self._blocks()):  # (another thread may have sized it first)
            raise ValueError(
                f"qlib.observers.{type(self).__name__}: x of shape {tuple(x.shape)} has {rows.shape[0]} blocks "
                f"(qparams of shape {shape}), but this observer has recorded {self._blocks()}; call reset() first"
            )
        if not (torch.compiler.is_compiling() or torch._C._is_tracing()):  # (traced sizes are not ints)
            axis = self.ch_axis % x.dim() if self.ch_axis is not None else 0
            self._layout = (x.shape, axis, shape, rows.shape[0])
        return rows

    def _resize(self, name: str, shape, observing: bool = False) -> Tensor:
        """Buffer `name` resized in place to `shape`. torch cannot grow a storage in shared memory
        (``model.share_memory()``; resize_ crashes): loading a state gives it a new shared
        buffer; observing raises, as a new buffer would not reach the other processes. Nor one
        loaded with assign=True from torch.load(mmap=True), safetensors or numpy: no other process
        sees it, so it gets a new buffer."""
        buf = self._buffers[name]
        need = (buf.storage_offset() + math.prod(shape)) * buf.element_size()
        if buf.device.type != "cpu" or buf.untyped_storage().nbytes() >= need:
            return buf.resize_(shape)
        if buf.is_shared():
            if observing:
                raise RuntimeError(
                    f"qlib.observers.{type(self).__name__}: its statistics are in shared memory "
                    f"(share_memory()), which cannot grow to this input's blocks; call "
                    f"allocate(x_shape) before share_memory()")
            buf = self._buffers[name] = buf.new_empty(shape).share_memory_()
        elif not buf.untyped_storage().resizable():
            buf = self._buffers[name] = buf.new_empty(shape)
        return buf.resize_(shape)

    def _allocate(self, blocks: int, shape: List[int], device) -> None:
        """Sizes the buffers (in place) for `blocks` blocks on `device`."""
        for name in self._stat_buffers:
            buf = getattr(self, name)
            new = self._new_stat(name, blocks, device)
            if buf.device != device:
                setattr(self, name, new)
            else:
                self._resize(name, new.shape, observing=True).copy_(new)
        for name in ("observed", "nonfinite", "qparams_shape"):
            if getattr(self, name).device != device:
                setattr(self, name, getattr(self, name).to(device))
        self._resize("qparams_shape", (len(shape) + 1,), observing=True).copy_(
            torch.tensor([1, *shape], dtype=torch.int64))

    def allocate(self, x_shape, device=None) -> "ObserverBase":
        """Sizes the buffers for tensors of shape x_shape now, instead of at
        the first observation, so that a compiled forward never resizes. A size of 0 may stand
        for any batch where the blocks do not depend on it (per-tensor; per-channel along another
        axis); x_shape with no blocks raises (a per-channel axis or per-group rows of size 0)."""
        x_shape = tuple(x_shape)
        shape = self._qparams_shape(torch.empty(x_shape, device="meta"))
        blocks = math.prod(shape)  # (as _rows gives; its reshape(-1) cannot size an empty x)
        if blocks == 0:
            raise ValueError(
                f"qlib.observers.{type(self).__name__}.allocate: x_shape {x_shape} has no blocks to size "
                f"(qparams of shape {shape}, {self.extra_repr()}); give the shape of a batch with data")
        if self.qparams_shape.numel() == 0:
            self._allocate(blocks, shape, torch.device(device) if device is not None else self.observed.device)
        return self

    def _blocks(self) -> int:
        return self._buffers[next(iter(self._stat_buffers))].shape[0]

    # ------------------------------------------------------------ API
    def forward(self, x: Tensor) -> Tensor:
        if torch._C._are_functorch_transforms_active():
            self._check_transforms(x)
        rows = self._prepare(x)
        if rows is not None:
            self._observe(rows)
        return x

    def _observe(self, rows: Tensor) -> None:
        raise NotImplementedError

    def _check_transforms(self, x: Tensor) -> None:
        F, wrappers = torch._C._functorch, set()
        while F.is_functorch_wrapped_tensor(x):
            wrappers |= {"vmap"} if F.is_batchedtensor(x) else {"grad"} if F.is_gradtrackingtensor(x) else set()
            x = F.get_unwrapped(x)
        refused = sorted(wrappers - self._observes_under)
        if refused:
            raise RuntimeError(
                f"qlib.observers.{type(self).__name__}: cannot observe under torch.func's "
                f"{' / '.join(refused)}: the statistics are the module's state, updated in place by "
                "each call. Turn the observers off first (FakeQuantize.disable_observer(), or "
                "model.apply(torch.ao.quantization.disable_observer)), or observe outside the transform")

    def _observe_fake_quant(self, x: Tensor, observe: bool = True) -> Optional[Tensor]:
        """forward(x) (when observe), then fake_quant(x) with the qparams, in one op; None
        where this observer or this x has no such op (FakeQuantize then takes the general path)."""
        return None

    def _synced_stats(self) -> Dict[str, Tensor]:
        """Copies of the statistics, all-reduced across ranks when distributed."""
        raise NotImplementedError

    def _range(self, stats: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        """(scale, zero_point) shaped for fake_quant on the observed tensor."""
        observed = self.observed.clone()
        if _distributed():
            dist.all_reduce(observed)
            # A rank that observed nothing has no buffers sized yet: size them (empty statistics)
            # as the ranks that did, or the statistics' all-reduce below mismatches in size.
            # (On the buffers' device: NCCL all-reduces CUDA tensors only.)
            qs, device = self.qparams_shape, self.observed.device
            dims = torch.tensor([qs.numel()], dtype=torch.int64, device=device)
            dist.all_reduce(dims, op=dist.ReduceOp.MAX)
            if int(dims) > 0:
                padded = torch.zeros(int(dims), dtype=torch.int64, device=device)
                padded[: qs.numel()] = qs
                dist.all_reduce(padded, op=dist.ReduceOp.MAX)
                if qs.numel() == 0:
                    shape = padded.tolist()[1:]
                    self._allocate(math.prod(shape), shape, device)
        shape = self.qparams_shape.tolist()[1:]
        if self.qparams_shape.numel() == 0 or observed.item() == 0:
            raise RuntimeError(
                f"qlib.observers.{type(self).__name__}.calculate_qparams: the observer has not recorded "
                f"any finite value (observed={observed.item()}, nonfinite={self.nonfinite.item()}); "
                f"call it on data first"
            )
        if math.prod(shape) != self._blocks():
            raise RuntimeError(
                f"qlib.observers.{type(self).__name__}.calculate_qparams: the buffer qparams_shape holds "
                f"{self.qparams_shape.tolist()}, but the statistics hold {self._blocks()} blocks: it was "
                "overwritten (an EMA averaging integer buffers in float truncates them, as timm's ModelEmaV2 "
                "does: use ModelEmaV3, or copy integer buffers)")
        return self._qparams(shape)

    def qparams_for(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(scale, zero_point) shaped for fake_quant on x, without the checks of
        calculate_qparams: no host read (FakeQuantize's hot path). Reads only x's shape
        and the observer's buffers, which need no grad: no graph is recorded. An x with no
        blocks (empty along the block axes: a per-channel x of no channels, a per-group x of no
        rows) gets empty qparams of its shape, which fake_quant takes for an empty x."""
        shape = self._qparams_shape(x)  # (traced by jit.trace: its sizes follow x's)
        if torch._C._get_tracing_state() is None:
            n, blocks = math.prod(shape), self._blocks()
        else:  # (plain ints)
            n, blocks = untraced(lambda: (math.prod(self._qparams_shape(x)), self._blocks()))
        if n == blocks:
            return self._qparams(shape)
        if n != 0 or blocks == 0:
            raise ValueError(
                f"qlib.observers.{type(self).__name__}: x of shape {untraced(lambda: tuple(x.shape))} has {n} "
                f"blocks (qparams of shape {shape}), but this observer has recorded {blocks}; call reset() first")
        scale, zero_point = self._qparams([blocks])  # (under DDP: the all-reduce every rank runs)
        return scale[:0].reshape(shape), zero_point[:0].reshape(shape)

    def _qparams(self, shape: List[int]) -> Tuple[Tensor, Tensor]:
        lo, hi = self._range(self._synced_stats())
        # Blocks that saw no finite value get the range [0, 0] (scale eps); one op, no host read.
        scale, zero_point = ops.observer_qparams(lo, hi, self.quant_min, self.quant_max, self.symmetric, self.eps)
        return scale.reshape(shape), zero_point.reshape(shape)

    def _check_recorded(self, who: str) -> None:
        """Raises unless a finite value was recorded: qparams from nothing are scale eps (a block
        without data gets [0, 0]). A host read once per `observed` buffer while the answer is yes;
        skipped under DDP (the rank's own count is not the global one)."""
        observed = self._buffers["observed"]
        if self.__dict__.get("_recorded_in") is observed or observed.is_meta or _distributed():
            return  # (meta: no values; shape inference runs)
        check_host_readable(f"qlib.observers.{type(self).__name__}", "observed", observed)
        if self._buffers["qparams_shape"].numel() == 0 or not bool(observed):
            raise RuntimeError(f"{who}: {NOTHING_RECORDED}")
        self._recorded_in = observed

    def reset(self) -> None:
        """Forget everything recorded (the buffers keep their identity)."""
        self.__dict__.pop("_recorded_in", None)
        with torch.no_grad():
            self.observed.zero_()
            self.nonfinite.zero_()
            self.qparams_shape.resize_(0)
            for name in self._stat_buffers:
                buf = getattr(self, name)
                buf.resize_(self._new_stat(name, 0, buf.device).shape)

    def _check_loaded_layout(self, state_dict, prefix) -> None:
        """A state that does not fit this observer (another granularity or bin count, stats of
        disagreeing sizes, negative counters) raises here, naming the key, not at a later call."""
        who = f"qlib.observers.{type(self).__name__}.load_state_dict"
        got = {n: state_dict.get(prefix + n) for n in [*self._stat_buffers, "qparams_shape", "observed", "nonfinite"]}
        for name, v in got.items():
            if v is not None and not isinstance(v, Tensor):
                raise ValueError(f"{who}: state_dict[{prefix + name!r}] must be a Tensor, got {type(v).__name__}")
        for name in ("observed", "nonfinite"):
            if got[name] is not None and (got[name].numel() != 1 or int(got[name]) < 0):
                raise ValueError(f"{who}: state_dict[{prefix + name!r}] must be one count >= 0, got {got[name].tolist()}")
        qs = got["qparams_shape"]
        if qs is None:
            return
        shape = qs.tolist()
        if qs.dim() != 1 or (shape and (shape[0] != 1 or min(shape) < 1)):
            raise ValueError(f"{who}: state_dict[{prefix + 'qparams_shape'!r}] must be empty or [1, *qparams "
                             f"shape] with sizes >= 1, got {shape}")
        blocks = math.prod(shape[1:]) if shape else 0
        if shape and self.ch_axis is None and self.group_size is None and blocks != 1:
            raise ValueError(f"{who}: the state holds qparams of shape {shape[1:]}, but this observer is "
                             f"per-tensor ({self.extra_repr()})")
        if shape and self.ch_axis is not None and (
                not -len(shape[1:]) <= self.ch_axis < len(shape[1:]) or shape[1:][self.ch_axis] != blocks):
            raise ValueError(f"{who}: the state holds qparams of shape {shape[1:]}, which is not per-channel "
                             f"along ch_axis={self.ch_axis} ({self.extra_repr()})")
        # Sized for how many blocks: the statistics' shape, not qparams_shape's values, which
        # to_empty() (meta init, then load) leaves uninitialized.
        own = self._buffers["qparams_shape"]
        if shape and own.numel() > 0 and self._blocks() != blocks:
            raise ValueError(f"{who}: the state holds qparams of shape {shape[1:]} ({blocks} blocks), but this "
                             f"observer is sized for {self._blocks()} blocks (by allocate() or its first batch, as "
                             f"a QATLinear's weight observer is); call reset() first to load another layout")
        for name in self._stat_buffers:
            v = got[name]
            if v is not None and (v.dim() == 0 or v.shape[0] != blocks):
                raise ValueError(f"{who}: state_dict[{prefix + name!r}] of shape {tuple(v.shape)} does not hold "
                                 f"the {blocks} blocks of qparams_shape {shape}")
        hist = got.get("hist")
        if hist is not None and (hist.dim() != 2 or hist.shape[1] != self.bins):
            raise ValueError(f"{who}: state_dict[{prefix + 'hist'!r}] of shape {tuple(hist.shape)} does not have "
                             f"this observer's {self.bins} bins")

    def _check_loaded_values(self, state_dict, prefix) -> None:
        """Per kind of observer: statistics a state_dict may not hold (after the layout check)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.__dict__.pop("_recorded_in", None)
        ours = [state_dict.get(prefix + n) for n in self._buffers]
        if not any(isinstance(v, Tensor) and v.is_meta for v in ours):  # (a meta state: no values to check)
            self._check_loaded_layout(state_dict, prefix)
            self._check_loaded_values(state_dict, prefix)
        # The statistic buffers are sized by the data: take the saved sizes. (Not a tensor: torch's
        # loader names it.)
        for name in list(self._stat_buffers) + ["qparams_shape"]:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                self._resize(name, value.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state):
        super().__setstate__(state)
        make_graph_breaks()  # (torch.load of a pickled model, copy.deepcopy: no __init__)

    def extra_repr(self) -> str:
        g = f"ch_axis={self.ch_axis}" if self.ch_axis is not None else (
            f"group_size={self.group_size}" if self.group_size is not None else "per_tensor")
        return f"bits={self.bits}, symmetric={self.symmetric}, {g}, range=[{self.quant_min}, {self.quant_max}]"


@graph_break("a qlib observer sizes its buffers on the first batch it sees (resize_ of "
             "a buffer): call observer.allocate(x_shape) or run one eager batch before "
             "torch.compile(fullgraph=True)")
def _allocate_eagerly(observer: ObserverBase, blocks: int, shape: List[int], device) -> None:
    with _ALLOCATE_LOCK:  # threads sharing a fresh observer: one sizes it (concurrent resize_ crashed)
        if observer._buffers["qparams_shape"].numel() == 0:
            observer._allocate(blocks, shape, device)


class MinMaxObserver(ObserverBase):
    """Running min and max (as torch.ao's MinMaxObserver / PerChannelMinMaxObserver)."""

    _stat_buffers = {"min_val": math.inf, "max_val": -math.inf}
    _observes_under = frozenset({"grad"})
    averaging_constant: Optional[float] = None  # (MovingAverageMinMaxObserver's)

    def _observe(self, rows: Tensor) -> None:
        # One op updates min_val, max_val and the counters in place.
        b = self._buffers  # (per batch: nn.Module.__getattr__ costs about 0.7 us a name)
        ops.minmax_observe(rows, b["min_val"], b["max_val"], b["observed"], b["nonfinite"], self.averaging_constant)

    def _observe_fake_quant(self, x: Tensor, observe: bool = True) -> Optional[Tensor]:
        # Only where it does what forward + qparams_for + fake_quant would: x shaped as the
        # last observed one (its layout checked then), no hooks or overrides to run, no
        # all-reduce of the statistics, eager mode.
        # (is_compiling first: comparing a traced x's shape would specialise a dynamic batch;
        # jit.trace: one graph for every call, not the fused op only where the layout matches.)
        # (torch.func transforms: vmap has no batching rule for an op that writes its
        # arguments in place, even with the observer off; the separate ops batch.)
        if torch.compiler.is_compiling() or torch._C._is_tracing() or torch._C._are_functorch_transforms_active():
            return None
        lay, b = self.__dict__.get("_layout"), self._buffers
        if (lay is None or x.shape != lay[0] or x.dtype not in OP_FLOAT_DTYPES
                or b["qparams_shape"].numel() == 0 or b["min_val"].shape[0] != lay[3]
                or not _overrides_nothing(type(self)) or _has_forward_hooks(self) or _distributed()):
            return None
        return ops.minmax_fake_quant(x, b["min_val"], b["max_val"], b["observed"], b["nonfinite"],
                                     self.averaging_constant, lay[1], lay[2], self.quant_min,
                                     self.quant_max, self.symmetric, self.eps, observe)

    def _synced_stats(self) -> Dict[str, Tensor]:
        if not _distributed():  # read-only use downstream: no copies needed
            return {"min": self._buffers["min_val"], "max": self._buffers["max_val"]}
        lo, hi = self.min_val.clone(), self.max_val.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return {"min": lo, "max": hi}

    def _range(self, stats):
        return stats["min"], stats["max"]

    def _check_loaded_values(self, state_dict, prefix) -> None:
        lo, hi = state_dict.get(prefix + "min_val"), state_dict.get(prefix + "max_val")
        if isinstance(lo, Tensor) and isinstance(hi, Tensor) and lo.shape == hi.shape:
            lo, hi = lo.detach().cpu(), hi.detach().cpu()
            # Each block: finite min <= max, or (inf, -inf) before any finite value. (A moving
            # average can leave min a rounding step above max, as torch.ao's: there the qparams
            # raise max to min.)
            ordered = (lo <= hi) if self.averaging_constant is None else True
            ok = (lo.isfinite() & hi.isfinite() & ordered) | ((lo == math.inf) & (hi == -math.inf))
            if not bool(ok.all()):
                b = int((~ok).nonzero()[0, 0])
                raise ValueError(
                    f"qlib.observers.{type(self).__name__}.load_state_dict: block {b} has min_val "
                    f"{lo[b].item()} and max_val {hi[b].item()}; expected finite "
                    f"min_val <= max_val, or (inf, -inf) for a block with no data (a corrupt state_dict?)"
                )


_ONE_OP_METHODS = ("forward", "_prepare", "_observe", "_observe_fake_quant", "qparams_for", "_qparams", "_range")
_overrides_nothing_of = {}  # observer class -> bool


def _overrides_nothing(cls: type) -> bool:
    """Whether cls runs MinMaxObserver's own observe and qparams code (minmax_fake_quant's)."""
    ok = _overrides_nothing_of.get(cls)
    if ok is None:
        ok = _overrides_nothing_of[cls] = all(getattr(cls, n) is getattr(MinMaxObserver, n) for n in _ONE_OP_METHODS)
    return ok


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the batch min and max (as torch.ao's
    MovingAverageMinMaxObserver / MovingAveragePerChannelMinMaxObserver):
    ``min = min + averaging_constant * (batch_min - min)``, the first batch
    taken as is. Under torch.distributed the averages are averaged over ranks."""

    def __init__(self, averaging_constant: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(
                f"qlib.observers.MovingAverageMinMaxObserver: averaging_constant must lie in (0, 1], "
                f"got {averaging_constant}"
            )
        self.averaging_constant = float(averaging_constant)

    def _synced_stats(self) -> Dict[str, Tensor]:
        if not _distributed():
            return {"min": self._buffers["min_val"], "max": self._buffers["max_val"]}
        out = {}
        for key, buf in (("min", self.min_val), ("max", self.max_val)):
            finite = torch.isfinite(buf)
            total = torch.where(finite, buf, torch.zeros_like(buf)).double()
            count = finite.double()
            dist.all_reduce(total)
            dist.all_reduce(count)
            out[key] = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan)).float()
        return out


class _HistogramObserver(ObserverBase):
    """Keeps an int64 histogram of ``bins`` bins per block (of |x| when symmetric)."""

    _stat_buffers = {"hist": 0, "hist_range": 0}
    _observes_under = frozenset({"grad"})

    def __init__(self, bins: int = 2048, **kwargs) -> None:
        if not isinstance(bins, int) or not 2 <= bins <= 65536:
            # (The cap keeps a per-channel histogram from asking for tens of GB by a typo.)
            raise ValueError(f"qlib.observers.{type(self).__name__}: bins must be an int in [2, 65536], got {bins!r}")
        self.bins = bins
        super().__init__(**kwargs)

    def _new_stat(self, name: str, blocks: int, device) -> Tensor:
        if name == "hist":
            return torch.zeros((blocks, self.bins), dtype=torch.int64, device=device)
        t = torch.empty((blocks, 2), dtype=torch.float64, device=device)
        t[:, 0] = math.inf
        t[:, 1] = -math.inf
        return t

    def _observe(self, rows: Tensor) -> None:
        b = self._buffers
        ops.histogram_observe_in_place(rows, b["hist"], b["hist_range"], b["observed"], b["nonfinite"],
                                       self.symmetric)

    def _synced_stats(self) -> Dict[str, Tensor]:
        hist, rng = self.hist, self.hist_range  # only read downstream
        if _distributed():
            # clone, not contiguous(): a [1]-row column is already "contiguous" and
            # would alias rng.
            lo, hi = rng[:, 0].clone(), rng[:, 1].clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            new_rng = torch.stack([lo, hi], dim=1)
            hist = ops.histogram_rebin(hist, rng, new_rng)  # a new tensor
            dist.all_reduce(hist)
            rng = new_rng
        return {"hist": hist, "range": rng}

    # A symmetric observer's histogram is of |x|, an asymmetric one's of x: the same buffers, read
    # differently. state_dict() records which, and a load checks it.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        record_in_metadata(destination, prefix, "qlib_absolute", self.symmetric)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        absolute = (local_metadata or {}).get("qlib_absolute")
        observed = state_dict.get(prefix + "observed")
        if absolute is not None and bool(absolute) != self.symmetric and isinstance(observed, Tensor) \
                and not observed.is_meta and observed.numel() == 1 and int(observed) > 0:
            kind = {True: "symmetric (it histograms |x|)", False: "asymmetric (it histograms x)"}
            raise ValueError(
                f"qlib.observers.{type(self).__name__}.load_state_dict: state_dict[{prefix + 'hist'!r}] was "
                f"recorded by an observer that is {kind[bool(absolute)]}, but this one is {kind[self.symmetric]} "
                f"({self.extra_repr()}): its qparams would be wrong. Load it into an observer of the config "
                f"that saved it, or load without this observer's keys (strict=False) and calibrate it again")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _check_loaded_values(self, state_dict, prefix) -> None:
        hist, rng = state_dict.get(prefix + "hist"), state_dict.get(prefix + "hist_range")
        if isinstance(hist, Tensor) and isinstance(rng, Tensor):
            # A corrupt histogram (NaN/Inf range, negative counts) raises here, by name.
            _C.check_histogram(f"qlib.observers.{type(self).__name__}.load_state_dict", hist, rng)

    def _symmetric_range(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        if self.symmetric:
            t = torch.maximum(lo.abs(), hi.abs())
            return -t, t
        return lo, hi


class PercentileObserver(_HistogramObserver):
    """Clips at a percentile of the data: |x| when symmetric, else the
    (100 - p)th and pth percentiles. Read from the histogram (linear within
    a bin): no sort."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"qlib.observers.PercentileObserver: percentile must lie in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        super().__init__(**kwargs)

    def _range(self, stats):
        q = self.percentile / 100.0
        hi = ops.histogram_quantile(stats["hist"], stats["range"], q)
        if self.symmetric:
            return -hi, hi
        lo = ops.histogram_quantile(stats["hist"], stats["range"], 1.0 - q)
        return lo, hi


class MSEObserver(_HistogramObserver):
    """Grid search of the clipping range minimising the fake-quant MSE.

    Candidates shrink the data range (symmetric: [-amax, amax]; else [min, max]
    widened to 0) by c / num_candidates; each is scored by the expected
    fake-quant squared error over the histogram (uniform within a bin), every
    candidate in one pass over the bins."""

    def __init__(self, num_candidates: int = 128, **kwargs) -> None:
        if not isinstance(num_candidates, int) or not 1 <= num_candidates <= 1024:
            raise ValueError(
                f"qlib.observers.MSEObserver: num_candidates must be an int in [1, 1024], got {num_candidates!r}"
            )
        self.num_candidates = num_candidates
        super().__init__(**kwargs)

    def _range(self, stats):
        return ops.histogram_mse_search(
            stats["hist"], stats["range"], self.quant_min, self.quant_max, self.symmetric, self.num_candidates
        )


class EntropyObserver(_HistogramObserver):
    """TensorRT's entropy calibration: the window of the histogram whose
    quantization to 2^(bits-1) (symmetric, on |x|) or 2^bits levels minimises
    KL(P || Q); see ``histogram_entropy_search`` in csrc/quant_math.h."""

    def _range(self, stats):
        levels = 2 ** (self.bits - 1) if self.symmetric else 2**self.bits
        lo, hi = ops.histogram_entropy_search(stats["hist"], stats["range"], levels)
        return self._symmetric_range(lo, hi)
