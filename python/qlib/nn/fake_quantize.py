"""FakeQuantize: an observer followed by qlib's fake_quant op."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantizeBase
from torch.nn.utils import parametrize

from .. import _C
from .._state import (OP_FLOAT_DTYPES, QuantState, check_host_readable, exporting, graph_break, known_empty,
                      make_graph_breaks, on_nested, record_in_metadata, refuse_fx_proxy, untraced)
from ..observers import NOTHING_RECORDED, _distributed

ops = torch.ops.qlib


def _blocks(shape: torch.Size) -> tuple:
    """What a qparams shape blocks: one value is per-tensor in any shape; more need x's rank."""
    return () if shape.numel() == 1 else tuple(shape)


class FakeQuantize(QuantState):
    """Observes its input (while the observer is enabled), then fake-quantizes it.

    With ``learnable=True`` the scale (and, for an asymmetric observer, the
    zero point) are ``nn.Parameter``s of shape ``qparams_shape``. They are set
    from the observer on the first observed batch, then trained with LSQ /
    LSQ+ gradients scaled by ``1 / sqrt(numel * quant_max)``; the scale is
    kept positive by clamping it at ``eps``. After ``follow_observer()``
    (``qlib.prepare`` calls it: calibration, where nothing trains them) they
    follow the observer, batch after batch, until fake quant is enabled.
    """

    def __init__(self, observer: nn.Module, learnable: bool = False,
                 qparams_shape: Optional[Sequence[int]] = None, eps: float = 1e-8):
        super().__init__()
        from ..observers import ObserverBase

        if not isinstance(observer, ObserverBase):
            what = f"the class {observer.__name__} (pass an instance)" if isinstance(observer, type) else repr(observer)
            raise TypeError(f"qlib.nn.FakeQuantize: observer must be a qlib.observers observer instance, got {what}")
        self.observer = observer
        self.quant_min = int(observer.quant_min)
        self.quant_max = int(observer.quant_max)
        self.learnable = learnable
        _C.check_eps("qlib.nn.FakeQuantize", eps)  # (here, not at the first forward)
        self.eps = eps
        # The switches are Python bools (torch.compile guards on them, no host read) mirrored in
        # the uint8 buffer `switches` = [observer, fake quant], so a checkpoint keeps them.
        self._observer_enabled = True
        self._fake_quant_enabled = True
        self._follow_observer = False  # (follow_observer())
        self.register_buffer("switches", torch.ones(2, dtype=torch.uint8))
        if learnable:
            shape = tuple(qparams_shape) if qparams_shape is not None else (1,)
            # float32 whatever torch's default dtype (a model cast still moves the Parameters).
            self.scale = nn.Parameter(torch.ones(shape, dtype=torch.float32))
            asym = not getattr(observer, "symmetric", True)
            zp = torch.zeros(shape, dtype=torch.float32)
            if asym:
                self.zero_point = nn.Parameter(zp)
            else:
                self.register_buffer("zero_point", zp)
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
            # Mirrors the buffer as a Python bool, as the switches.
            self._init_done = False
        self._synced = _synced(self._buffers)  # what the bools mirror

    # A learnable scale is trained for its code range: state_dict() records the range, and a
    # load checks it.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.learnable:
            record_in_metadata(destination, prefix, "qlib_quant_range", [self.quant_min, self.quant_max])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        saved = (local_metadata or {}).get("qlib_quant_range")
        initialized = state_dict.get(prefix + "initialized")
        if self.learnable and saved is not None and list(saved) != [self.quant_min, self.quant_max] \
                and prefix + "scale" in state_dict and not (isinstance(initialized, Tensor) and not initialized.is_meta
                                                            and initialized.numel() == 1 and not bool(initialized)):
            raise ValueError(
                f"qlib.nn.FakeQuantize.load_state_dict: state_dict[{prefix + 'scale'!r}] was trained for the code "
                f"range {list(saved)}, but this FakeQuantize quantizes to [{self.quant_min}, {self.quant_max}] "
                "(another bit width or symmetry): the scale would be wrong for it. Load it into a model of the "
                "config that saved it, or load without this FakeQuantize's keys (strict=False) so that it takes "
                "its first scale from data")
        zp = state_dict.get(prefix + "zero_point")
        if self.learnable and "zero_point" in self._buffers and isinstance(zp, Tensor) and not zp.is_meta \
                and bool((zp != 0).any()):  # (symmetric: the zero point is not learned)
            raise ValueError(f"qlib.nn.FakeQuantize.load_state_dict: state_dict[{prefix + 'zero_point'!r}] holds "
                             f"{zp[zp != 0].reshape(-1)[0].item()}, but this FakeQuantize is symmetric (zero "
                             "point 0; a corrupt state_dict, or one of an asymmetric observer?)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        key = prefix + "switches"
        if key not in state_dict and key in missing_keys:  # saved before the switches were kept:
            missing_keys.remove(key)                       # the current ones stay
        FakeQuantize._sync_flags(self)  # (torch.ao's load_observer_state_dict calls only this method)

    @staticmethod
    def _sync_flags(module, incompatible_keys=None):
        b = module._buffers
        if not b["switches"].is_meta:
            # (before _synced takes them: a torch.func wrapper held there outlived the call and
            # broke deepcopy / torch.save / pickle of the model)
            check_host_readable("qlib.nn.FakeQuantize", "switches", b["switches"])
            if module.learnable:
                check_host_readable("qlib.nn.FakeQuantize", "initialized", b["initialized"])
        module._synced = _synced(b)
        if b["switches"].is_meta:  # (no values to read: the bools stay)
            return
        module._observer_enabled, module._fake_quant_enabled = (bool(v) for v in b["switches"].tolist())
        if module.learnable:
            module._init_done = bool(b["initialized"])

    _sync_init_flag = _sync_flags  # (a load hook of models pickled before stop 30)

    def __setstate__(self, state):
        for name in ("observer_enabled", "fake_quant_enabled"):  # plain attributes before stop 31
            if name in state:
                state["_" + name] = state.pop(name)
        state.setdefault("_follow_observer", False)  # (before stop 41)
        super().__setstate__(state)
        make_graph_breaks()
        if "switches" not in self._buffers:  # pickled (torch.save(model)) before stop 30
            device = next(self.buffers(), torch.empty(0)).device
            self.register_buffer("switches", torch.tensor(
                [self._observer_enabled, self._fake_quant_enabled], dtype=torch.uint8, device=device))
        FakeQuantize._sync_flags(self)

    def _resync(self) -> None:
        """Reads the switches again where the buffers were replaced (torch.func.functional_call,
        .to()) or written in place (an EMA's copy_: timm's ModelEmaV3, AveragedModel's buffers)."""
        b, (switches, initialized, version) = self._buffers, self._synced
        if b["switches"] is not switches or b.get("initialized") is not initialized \
                or _version(switches) != version:
            FakeQuantize._sync_flags(self)

    # torch.ao-style switches (torch.ao.quantization's disable_observer etc. call them too)
    @property
    def observer_enabled(self) -> bool:
        if not torch.compiler.is_compiling():
            self._resync()
        return self._observer_enabled

    @observer_enabled.setter
    def observer_enabled(self, enabled: bool) -> None:
        self.enable_observer(enabled)

    @property
    def fake_quant_enabled(self) -> bool:
        if not torch.compiler.is_compiling():
            self._resync()
        return self._fake_quant_enabled

    @fake_quant_enabled.setter
    def fake_quant_enabled(self, enabled: bool) -> None:
        self.enable_fake_quant(enabled)

    def enable_observer(self, enabled: bool = True):
        self._resync()  # (the other switch as the buffer holds it)
        self._observer_enabled = bool(enabled)
        self.switches[0] = self._observer_enabled
        self._synced = _synced(self._buffers)
        return self

    def disable_observer(self):
        return self.enable_observer(False)

    def follow_observer(self):
        """Learnable qparams take the observer's at every observed batch, not only the first,
        until fake quant is enabled (post-training calibration: ``qlib.prepare``)."""
        self._follow_observer = self.learnable
        return self

    def enable_fake_quant(self, enabled: bool = True):
        if enabled:
            self._follow_observer = False  # (from now on the scale trains)
        self._resync()
        self._fake_quant_enabled = bool(enabled)
        self.switches[1] = self._fake_quant_enabled
        self._synced = _synced(self._buffers)
        return self

    def disable_fake_quant(self):
        return self.enable_fake_quant(False)

    def calculate_qparams(self):
        if self.learnable:
            if self._uninitialised():
                # As an observer that saw nothing (its initial 1.0 is no trained scale).
                raise RuntimeError(
                    "qlib.nn.FakeQuantize.calculate_qparams: this learnable FakeQuantize has not taken its "
                    "first scale from data (it is still the initial 1.0): run data through it with the "
                    "observer enabled, or load a trained state_dict, first")
            # As the forward sees them (LSQ's gradients may carry them past the clamps).
            return (self.scale.detach().float().clamp_min(self.eps),
                    self.zero_point.detach().round().clamp(self.quant_min, self.quant_max))
        return self.observer.calculate_qparams()

    def train(self, mode: bool = True) -> "FakeQuantize":
        super().train(mode)
        b = self._buffers
        if self.learnable and not self._init_done and not b["initialized"].is_meta \
                and not torch.compiler.is_compiling():
            # A compiled step takes the first scale on the device: read its flag (a host read
            # only until initialised), so that export / jit.trace after compiled training run.
            self._init_done = bool(b["initialized"])
        return self

    def _uninitialised(self) -> bool:
        """A learnable scale that never took a value from data (still the initial 1.0). Takes the
        `initialized` buffer on the way (set by another process, Hogwild, or a compiled step).
        Host reads only until initialised; none on meta (no values)."""
        initialized = self._buffers["initialized"]
        if self._init_done or initialized.is_meta:
            return False
        if bool(initialized):
            self._init_done = True
            return False
        return bool((self.scale == 1).all())

    def _check_has_qparams(self) -> None:
        """With the observer off, raises where the qparams come from no data: a learnable scale
        never initialised (still 1.0), or an observer that recorded nothing (scale eps)."""
        if not self.learnable:
            self._modules["observer"]._check_recorded("qlib.nn.FakeQuantize")
        elif self._uninitialised():
            raise RuntimeError(
                "qlib.nn.FakeQuantize: its observer is disabled and this learnable FakeQuantize has not "
                "taken its first scale from data (it is still the initial 1.0): run data through it "
                "with the observer enabled, or load a trained state_dict, first")

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            refuse_fx_proxy("qlib.nn.FakeQuantize", x)
        elif x.is_nested:  # (as nn.Linear: a jagged x runs on its values)
            return on_nested("qlib.nn.FakeQuantize", self.forward, x)
        observer = self._modules["observer"]  # (nn.Module.__getattr__ costs about 0.7 us)
        b = self._buffers
        if not torch.compiler.is_compiling():
            self._resync()
        # A forward run inside a backward is activation checkpointing's recomputation
        # (torch.utils.checkpoint, either kind): the batch was observed in the forward already.
        # Observing it again counted it twice (a moving average stepped twice) and recomputed the
        # activations with other qparams than the forward's: gradients of other values. So it
        # quantizes with the qparams as they are, which are the forward's.
        observe = self._observer_enabled and (torch.compiler.is_compiling()
                                              or torch._C._current_graph_task_id() == -1)
        if self._fake_quant_enabled and isinstance(x, Tensor) and x.dtype not in OP_FLOAT_DTYPES:
            # The op's refusal, before the observer records x: a call that raises changes nothing
            # (it recorded the batch, a moving average stepped, a learnable scale took it).
            raise RuntimeError(f"qlib.nn.FakeQuantize: x must be float32, float16 or bfloat16, got {x.dtype}")
        # An empty batch needs no qparams for its empty output (as nn.Linear and torch.ao's
        # FakeQuantize take it): no check that they come from data, no first scale taken from it.
        # (untraced: torch.jit.trace's sizes as plain ints, no TracerWarnings)
        if self._fake_quant_enabled and not self._observer_enabled and not torch.compiler.is_compiling() \
                and not (isinstance(x, Tensor) and untraced(lambda: x.numel() == 0)):
            self._check_has_qparams()  # (frozen before any data: a branch calibration never ran)
        if self._fake_quant_enabled and not self.learnable:
            # One op (min-max observers), or None.
            y = observer._observe_fake_quant(x, observe)
            if y is not None:
                return y
        if observe and self.learnable and not self._init_done and torch._C._are_functorch_transforms_active() \
                and not torch.compiler.is_compiling() and not b["initialized"].is_meta and not bool(b["initialized"]):
            # (before observing: a call that raises changes nothing)
            raise RuntimeError(
                "qlib.nn.FakeQuantize: a learnable FakeQuantize takes its first scale from the first batch "
                "it observes, written into its Parameters, which torch.func transforms (grad, vjp, vmap) "
                "cannot do: run one forward eagerly (or load a trained state_dict) first")
        if observe:
            observer(x.detach())
            on_meta = self.learnable and b["initialized"].is_meta  # (shape inference: no values to take)
            if self.learnable and not self._init_done and not on_meta and not torch.compiler.is_compiling() \
                    and untraced(lambda: bool(b["initialized"])):
                # Another process set the shared buffer (Hogwild, model.share_memory()): the
                # scale is already trained there; take it (a host read only until initialised).
                self._init_done = True
            if on_meta or (self.learnable and untraced(lambda: known_empty(x)) and not _distributed()):
                pass  # (an empty batch: the first scale waits for one with data; DDP: all ranks all-reduce)
            elif self.learnable and not self._init_done:
                # (An exported or traced graph would write the first scale into the Parameters
                # every call; a decomposed exported program then fails on that write.)
                if exporting() or torch.jit.is_tracing():
                    raise RuntimeError(
                        "qlib.nn.FakeQuantize: a learnable FakeQuantize takes its first scale from the "
                        "first batch it observes: run one forward (or load a trained state_dict) before "
                        "torch.export or torch.jit.trace; after steps only under torch.compile (which take "
                        "it on the device), call model.train() or model.eval() first: they read it")
                _take_first_qparams(self, observer, x)
            elif self._follow_observer and not (exporting() or torch.jit.is_tracing()):
                _take_first_qparams(self, observer, x)  # (calibrating: the observer's qparams)
        if not self._fake_quant_enabled:
            return x
        if self.learnable:
            # One op: the clamps (scale >= eps, zero point in range) and LSQ's gradient scale
            # (None: 1 / sqrt(x.numel() * quant_max), in the op, so no shape is specialised).
            # (A parametrized scale / zero point lives outside _parameters and _buffers.)
            p, b = self._parameters, self._buffers
            scale = p["scale"] if "scale" in p else self.scale
            zp = p["zero_point"] if "zero_point" in p else b["zero_point"] if "zero_point" in b else self.zero_point
            return ops.lsq_fake_quant(x, scale.to(x.device), zp.to(x.device), self.quant_min,
                                      self.quant_max, None, self.eps)
        unsized, empty = untraced(lambda: (observer._buffers["qparams_shape"].numel() == 0, x.numel() == 0))
        if unsized:
            if empty:  # (an empty batch: no qparams needed, as torch.ao's FakeQuantize)
                return x.clone()
            raise RuntimeError(f"qlib.nn.FakeQuantize: {NOTHING_RECORDED}")
        scale, zp = observer.qparams_for(x)
        return ops.fake_quant(x, scale.to(x.device), zp.to(x.device), self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        return (f"quant_range=({self.quant_min}, {self.quant_max}), learnable={self.learnable}, "
                f"observer_enabled={self.observer_enabled}, fake_quant_enabled={self.fake_quant_enabled}")


def _synced(b) -> tuple:
    """What the Python switches mirror: the buffers and the switches' version counter (an
    in-place write, as an EMA's copy_, moves it)."""
    return b["switches"], b.get("initialized"), _version(b["switches"])


def _version(t: Tensor):
    return None if t.is_inference() else t._version  # (inference tensors have none)


@graph_break("a learnable FakeQuantize's first scale, eagerly (an observer not yet sized, "
             "float16 / bfloat16 or parametrized qparams, FSDP2): run one step first for fullgraph")
def _take_first_qparams_eagerly(fq: FakeQuantize, observer: nn.Module, x: Tensor) -> None:
    _take_first_qparams(fq, observer, x)


def _take_first_qparams(fq: FakeQuantize, observer: nn.Module, x: Tensor) -> None:
    """The learnable scale (and zero point) from the observer, at its first batch x (and at every
    batch after follow_observer()). Traced by
    torch.compile without host reads (qparams_for: no check that x held a finite value), so the
    first steps are one graph, not a graph break in every layer (which ran past dynamo's
    recompile limit and left later steps eager); traced, the device flag `initialized` decides
    step after step (a batch with nothing finite keeps the initial value until one has some).
    Eagerly where tracing cannot give eager's bits: an observer not yet sized (eager's error,
    DDP's sizing), float16 / bfloat16 qparams (inductor drops their rounding), parametrized ones
    (right_inverse's Tensor.set_), and under FSDP2 (the write-through into the shard reads torch
    internals: traced, the first scale was lost)."""
    seen = None  # (traced: whether the observer recorded a finite value, on the device)
    if not torch.compiler.is_compiling():
        scale, zp = observer.calculate_qparams()
    elif observer._buffers["qparams_shape"].numel() == 0 or fq.scale.dtype in (torch.float16, torch.bfloat16) \
            or parametrize.is_parametrized(fq) or (_process_group() and _fully_sharded()):
        return _take_first_qparams_eagerly(fq, observer, x)
    else:
        scale, zp = observer.qparams_for(x)
        if not _distributed():  # (a rank's own count is not the global one: taken as is, as before)
            seen = observer._buffers["observed"] > 0
    if _blocks(scale.shape) != _blocks(fq.scale.shape):  # (same size, other blocks: wrong numbers)
        raise RuntimeError(
            f"qlib.nn.FakeQuantize: the observer gives qparams of shape {tuple(scale.shape)}, "
            f"the learnable scale has qparams_shape {tuple(fq.scale.shape)}; pass "
            f"qparams_shape={tuple(scale.shape)}")
    with torch.no_grad():
        for name, value in (("scale", scale), ("zero_point", zp.float())):
            old = getattr(fq, name)
            value = value.reshape(old.shape).to(old.dtype)
            if seen is not None:  # (traced) until a step has seen something finite, the initial value
                # (then kept, unless calibrating: the scale follows the observer)
                value = torch.where(seen if fq._follow_observer else seen & ~fq.initialized, value, old)
            if parametrize.is_parametrized(fq, name):  # (set through right_inverse)
                setattr(fq, name, value)
            else:
                old.copy_(value)
                if seen is None and isinstance(old, nn.Parameter) and _process_group():
                    _write_through_fsdp(fq, name, old, value)
        fq.initialized.fill_(True) if seen is None else fq.initialized.logical_or_(seen)
    if seen is None:
        fq._init_done = True


def _process_group() -> bool:
    """Whether fully_shard may hold fq's parameters: any process group, one rank included
    (FSDP2 unshards into a separate copy at world size 1 too; _distributed() asks for more than
    one rank, where the observers' all-reduces matter)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _fully_sharded() -> bool:
    """Whether fully_shard (FSDP2) holds modules in this process."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return False
    return len(_module_state_mapping) > 0


# torch.compile calls it instead of tracing it and takes the result as a constant: what
# torch.compiler.assume_constant_result marks (the decorator would import dynamo with qlib).
_fully_sharded._dynamo_marked_constant = True


def _write_through_fsdp(fq: FakeQuantize, name: str, unsharded: Tensor, value: Tensor) -> None:
    """Under FSDP2 (fully_shard) the forward runs on an unsharded copy of fq's parameter `name`,
    which FSDP frees when it reshards: the first scale written there alone was lost (the scale
    trained on from its initial 1.0, with `initialized` set). Writes `value` (the same on every
    rank: the observers all-reduce) into the sharded parameter too."""
    import weakref
    moved = ("qlib.nn.FakeQuantize: cannot look for FSDP2's sharded copy of a learnable scale in this "
             "torch; under fully_shard, run one batch before sharding")
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # (torch internals moved: test_fsdp2_write_through_warns_where_torch_internals_moved)
        warnings.warn(moved)
        return
    for state in list(_module_state_mapping.values()):
        state = state() if isinstance(state, weakref.ref) else state
        groups = getattr(state, "_fsdp_param_groups", None)  # (torch >= 2.12: a list)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)  # (torch <= 2.11: one or None)
            groups = () if group is None else (group,)
        for group in groups:
            for p in getattr(group, "fsdp_params", ()):
                info = getattr(p, "_module_info", None)
                if info is None or info.module is not fq or info.param_name != name:
                    continue
                if getattr(p, "_unsharded_param", None) is not unsharded:
                    warnings.warn(moved)
                    return
                sharded = p.sharded_param
                sharded.copy_(distribute_tensor(value.to(sharded.device), sharded.device_mesh,
                                                sharded.placements, src_data_rank=None))
                return


# torch.ao.quantization's switch helpers (`model.apply(torch.ao.quantization.disable_observer)`, the
# QAT tutorial's freeze step) act on FakeQuantizeBase instances only.
FakeQuantizeBase.register(FakeQuantize)
