"""Int8Linear: a Linear with real int8 weights and int8 activations.

Weights are int8, symmetric per output channel in the narrow range
[-127, 127] (scale = absmax / 127, float32). Activations are quantized on the
fly inside the fused op ``torch.ops.qlib.int8_linear``: per token (dynamic,
one scale per row) or per tensor with a calibrated scale (static). The int32
GEMM result is dequantized with act_scale * weight_scale, plus bias, in the
input's dtype.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Union

import torch
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor

from .. import _C, _int8_ops  # noqa: F401  (_int8_ops registers the int8 fakes)
from .._ops import choose_qparams, quantize
from .._state import MIN_SCALE, QuantState, check_finite_weight, check_host_readable, on_nested, untraced, weight_zeros
from .qat_linear import QATLinear
from .smoothing import carry_smoothing, smoothed_input

_ACTIVATIONS = ("dynamic", "static")


def quantize_weight_per_channel(weight: Tensor):
    """(int8 weight [N, K], float32 scale [N]): symmetric per output channel, range [-127, 127]."""
    w = weight.detach().float()
    if w.shape[0] == 0:  # no output channels: nothing to quantize (an nn.Linear may have none)
        return torch.empty(w.shape, dtype=torch.int8, device=w.device), w.new_empty(0)
    check_finite_weight("qlib.nn.Int8Linear", w)
    if w.shape[1] > 0:
        lo, hi = torch.aminmax(w, dim=1)  # (max |w| without a float copy of the weight: its peak memory)
        amax = torch.maximum(hi, -lo)
    else:
        amax = w.new_zeros(w.shape[0])
    # Floored at MIN_SCALE, not choose_qparams' eps (1.2e-7): that zeroed weights below ~6e-8
    # and coarsened those below ~1.5e-5 (as GPTQ's group scales).
    scale, _ = choose_qparams(-amax, amax, -127, 127, True, MIN_SCALE)
    q = quantize(w, scale.unsqueeze(1), None, -127, 127, torch.int8)
    return q, scale


def _outside_functorch():
    """A context in which ops run outside the active torch.func transforms (none: a no-op)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return contextlib.nullcontext()
    return torch._C._DisableFuncTorch()


def _version_of(t: Tensor):
    """t's version counter (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def _weight_key(w: Tensor):
    """What the packed weight was built from. Inference tensors have no version counter: then
    only a new weight tensor is seen. The CPU layout depends on the int8 kernel
    (qlib.set_int8_cpu_kernel)."""
    kernel = _C.int8_cpu_kernel() if w.is_cpu else None
    return (_version_of(w), w.data_ptr(), kernel)


def _python_refs(w: Tensor) -> int:
    return sys.getrefcount(w)


def _python_refs_of_a_held_entry() -> int:
    """_python_refs of a tensor that a dict holds and one local of the caller names, as
    Int8Linear._drop_weight_if_unshared calls it: the count when nothing else refers to it."""
    d = {"w": torch.empty(0)}
    w = d["w"]
    return _python_refs(w)


_UNSHARED_REFS = _python_refs_of_a_held_entry()


def _storage_refs(w: Tensor) -> int:
    """Tensors sharing w's memory (w included)."""
    return torch._C._storage_Use_Count(w.untyped_storage()._cdata) - 1  # (less untyped_storage()'s own)


def _finalizer_sees_its_tensor() -> bool:
    """Whether a weakref.finalize callback of a tensor runs while that tensor still holds its
    memory (torch 2.14: yes; the callbacks run first in its dealloc)."""
    try:
        w, seen = torch.zeros(1), []
        alias = w.detach()
        weakref.finalize(alias, lambda: seen.append(_storage_refs(w)))
        del alias
        return seen == [2]
    except (AttributeError, RuntimeError):
        return False


_DYING_ALIAS_REFS = int(_finalizer_sees_its_tensor())


def _held_elsewhere(w: Tensor, python_refs: int, dying_aliases: int = 0) -> bool:
    """Whether anything but the module refers to its weight w or shares its memory: a Python name
    (python_refs, against _UNSHARED_REFS), a view, a detached alias (state_dict's), an autograd
    graph; `dying_aliases`: aliases being deallocated that still count. Where torch lacks the
    private counters, True (the module then keeps its plain weight)."""
    try:
        storage_refs = _storage_refs(w) - dying_aliases
        return python_refs > _UNSHARED_REFS or w._use_count() > 1 or storage_refs > 1
    except (AttributeError, RuntimeError):
        return True


class Int8Linear(QuantState):
    """``y = dequant(int8(x) @ int8(W).T) + bias``; drop-in for an inference ``nn.Linear``.

    Build one with :meth:`from_float`. ``activation="dynamic"`` quantizes each
    token (row) with its own scale; ``"static"`` uses the calibrated per-tensor
    ``act_scale`` buffer. The state_dict holds ``weight`` (int8 [N, K]),
    ``weight_scale`` (float32 [N]), ``bias`` (float32 [N], if any) and, when
    static, ``act_scale`` (float32 scalar), ``act_zero_point`` (int32 scalar) and
    ``act_quant_range`` (int32 [2]: the activations' code range): plain tensors that load with
    ``torch.load(weights_only=True)``.

    On CPUs whose int8 kernel reads a packed layout (all but AMX), the module keeps only
    ``weight_packed`` (1 byte a weight): ``weight`` (and ``state_dict()``) then reads back as
    the int8 [N, K] weight, unpacked on demand. The module holds that plain weight for as long
    as anything else refers to it (a name, a view, a state_dict's tensor), so in-place edits of
    it are repacked at the next forward, and drops it at the first forward after that.
    """

    smoothing_in_forward = True  # (divides by qlib.smooth_quant's s: nn/smoothing.py)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "dynamic",
        device=None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Int8Linear: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.activation = activation
        self.register_buffer("weight", weight_zeros((out_features, in_features), torch.int8, device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None
        if activation == "static":
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
            # Static activations may carry a zero point and their own code
            # range inside int8 (from QAT or calibration).
            self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32, device=device))
            self.register_buffer("act_quant_range", torch.tensor([-127, 127], dtype=torch.int32, device=device))
            self._act_range = (-127, 127)  # mirrors act_quant_range without a device read
            self._act_range_of = self._buffers["act_quant_range"]  # the buffer it mirrors
            self._act_range_ver = _version_of(self._act_range_of)  # and its version when read
            self.register_load_state_dict_post_hook(Int8Linear._sync_act_range)
        else:
            self.act_scale = None
        # CPU: the weight pre-packed for the int8 kernel (not in the state_dict; rebuilt by
        # repack() whenever `weight` changes; under amx only a tag). Empty until packed.
        self.register_buffer("weight_packed", torch.empty(0, dtype=torch.int8, device=device), persistent=False)
        # (weight's key when packed, weakrefs to it (a new one may reuse its memory) and to the packed
        # tensor): one tuple, replaced at once, so a thread never pairs one pack with another's key.
        self._pack_state = None

    @torch.no_grad()
    def repack(self) -> None:
        """Re-packs ``weight`` for the CPU kernel; called automatically after ``from_float``,
        ``load_state_dict`` and in-place edits of ``weight`` (outside ``torch.compile``). Call it
        after editing ``weight.data`` or editing under ``torch.inference_mode``: such edits do
        not move the version counter it watches."""
        self._repack()
        self._drop_weight_if_unshared()

    def _repack(self) -> None:
        w = self.weight  # (unpacked first where only the packing is kept)
        key = _weight_key(w)  # (before packing: an edit made meanwhile by another thread moves past it)
        packed = self.weight_packed = torch.ops.qlib.int8_pack_weight(w)
        self._pack_state = (key, weakref.ref(w), weakref.ref(packed))

    def _drop_weight_if_unshared(self, dying_aliases: int = 0) -> None:
        """Drops the plain weight (None then: `weight` unpacks it on demand) where its packing for
        this CPU kernel holds it, unedited since, and nothing but the module refers to it."""
        b, state = self._buffers, self.__dict__.get("_pack_state")
        w = b["weight"]  # (read once: another thread may drop it)
        if w is None or not w.is_cpu or b["weight_packed"].numel() == 0 or not _C.int8_packed_copy():
            return
        refs = _python_refs(w)  # (w the one local naming it here, as _UNSHARED_REFS counts; callers hold none)
        if _held_elsewhere(w, refs, dying_aliases):
            return
        if state is None or state[2]() is not b["weight_packed"] or state[1]() is not w:
            return  # (not the packing's weight: the next forward repacks)
        b["weight"] = None
        if _weight_key(w) != state[0]:  # (edited: now or, by another thread, just before)
            b["weight"] = w

    @staticmethod
    def _let_go_of_weight(module_ref) -> None:
        """A state_dict's weight tensor was deallocated: the module drops its plain weight if it
        was the last other reference."""
        m = module_ref()
        if m is not None:
            m._drop_weight_if_unshared(_DYING_ALIAS_REFS)

    def _unpacked_weight(self) -> Tensor:
        """``weight`` where the module keeps only the packing: unpacked, and held in ``_buffers``
        (see the class's docstring)."""
        b = self._buffers
        if "weight_packed" not in b:  # (not built yet: register_buffer asks)
            raise AttributeError("weight")
        packed, state = b["weight_packed"], self.__dict__.get("_pack_state")
        if torch.compiler.is_compiling() or is_functorch_wrapped_tensor(packed):
            # (traced, or a packing passed through a transform: an op in the graph, not the module's to hold)
            return torch.ops.qlib.int8_unpack_weight(packed, self.out_features, self.in_features)
        with torch.inference_mode(False), _outside_functorch():
            # A plain tensor, editable outside inference_mode too, and not a torch.func wrapper
            # (read under grad / jvp: the module would hold a wrapper of a finished transform).
            w = torch.ops.qlib.int8_unpack_weight(packed, self.out_features, self.in_features)
        b["weight"] = w
        # (the kernel packed for, as far as known: forward repacks for another)
        kernel = state[0][2] if state is not None and state[2]() is packed else None
        self._pack_state = ((_version_of(w), w.data_ptr(), kernel), weakref.ref(w), weakref.ref(packed))
        return w

    @property
    def weight(self) -> Tensor:
        w = self._buffers.get("weight")
        return w if w is not None else self._unpacked_weight()

    def hold_plain_weight_only(self) -> None:
        """Keeps the plain int8 weight and drops the CPU kernel's packing (repacked at the next eager
        forward): what an exported graph reads (``qlib.export_onnx``)."""
        w = self.weight
        self._buffers["weight"] = w
        self._buffers["weight_packed"] = torch.empty(0, dtype=torch.int8, device=w.device)
        self._pack_state = None

    def __getstate__(self):
        state = super().__getstate__()
        return dict(state, _pack_state=None)  # (weakrefs do not pickle; the copy repacks once)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        activation: str = "dynamic",
        act_scale: Union[Tensor, float, None] = None,
    ) -> "Int8Linear":
        """Quantize ``linear``'s weight per channel; ``activation="static"`` needs ``act_scale``
        (a positive float or one-element tensor, e.g. from a calibrated observer)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_float: expected an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, QATLinear):  # (its trained qparams would be dropped)
            raise TypeError(f"Int8Linear.from_float: got a QATLinear, whose trained qparams from_float would "
                            "ignore: use Int8Linear.from_qat or qlib.convert")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Int8Linear.from_float: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if activation == "static":
            if act_scale is None:
                raise ValueError("Int8Linear.from_float: activation='static' needs act_scale (calibrate it first)")
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32).detach()
            if act_scale.numel() != 1:
                raise ValueError("Int8Linear.from_float: act_scale must be one value (per-tensor), got shape "
                                 f"{tuple(act_scale.shape)}")
            act_scale = act_scale.reshape(())
            if not (torch.isfinite(act_scale) and act_scale >= MIN_SCALE):
                raise ValueError(
                    f"Int8Linear.from_float: act_scale must be positive and finite, at least {MIN_SCALE} "
                    f"(so that 1 / scale is finite), got {act_scale.item()}"
                )
        elif act_scale is not None:
            raise ValueError("Int8Linear.from_float: act_scale is only used with activation='static'")
        device = linear.weight.device
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activation, device=device)
        q, scale = quantize_weight_per_channel(linear.weight)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        if activation == "static":
            mod.act_scale.copy_(act_scale.to(device))
        mod.repack()
        return carry_smoothing(linear, mod)

    @classmethod
    def from_qat(cls, qat: nn.Module) -> "Int8Linear":
        """From a QATLinear (trained, or calibrated by qlib.prepare + calibrate):
        the weight is quantized with the weight FakeQuantize's scales and the
        activation qparams become static, so outputs equal the QAT model's up
        to float rounding. Needs symmetric per-channel or per-tensor weights
        of at most 8 bits and per-tensor activations of at most 8 bits."""
        wfq, afq = qat.weight_fake_quant, qat.activation_fake_quant
        check_finite_weight("Int8Linear.from_qat", qat.weight.detach())
        if afq is None:
            raise ValueError("Int8Linear.from_qat: weight-only QAT (activation_bits=None) has no activation "
                             "scale; Linear4bit.from_qat converts it (at most 4 weight bits)")
        N, K = qat.out_features, qat.in_features
        w_scale, w_zp = qat.weight_qparams()
        if w_scale.numel() not in (1, N) or (w_scale.numel() == N and w_scale.dim() == 2 and w_scale.shape[1] != 1):
            raise ValueError(f"Int8Linear.from_qat: weight scales of shape {tuple(w_scale.shape)} are not "
                             "per-channel or per-tensor (per-group weights have no int8 kernel)")
        if bool((w_zp != 0).any()):
            raise ValueError("Int8Linear.from_qat: weights must be symmetric (zero point 0)")
        a_scale, a_zp = (t.detach() for t in afq.calculate_qparams())
        if a_scale.numel() != 1:
            raise ValueError(f"Int8Linear.from_qat: activations need one scale, got shape {tuple(a_scale.shape)}")
        for name, fq in (("weight", wfq), ("activation", afq)):
            if fq.quant_max - fq.quant_min > 255:
                raise ValueError(f"Int8Linear.from_qat: {name} range [{fq.quant_min}, {fq.quant_max}] is wider than 8 bits")
        if wfq.quant_min < -128 or wfq.quant_max > 127:
            raise ValueError(f"Int8Linear.from_qat: weight range [{wfq.quant_min}, {wfq.quant_max}] does not fit int8")
        device = qat.weight.device
        mod = cls(K, N, qat.bias is not None, "static", device=device)
        w_scale = w_scale.float().reshape(-1).expand(N).contiguous()
        mod.weight.copy_(quantize(qat.weight.detach().float(), w_scale.view(N, 1), None,
                                  wfq.quant_min, wfq.quant_max, torch.int8))
        mod.weight_scale.copy_(w_scale)
        if qat.bias is not None:
            mod.bias.copy_(qat.bias.detach().float())
        # An unsigned 8-bit code range [0, 255] shifts by 128 into int8.
        shift = max(0, afq.quant_max - 127)
        mod.act_scale.copy_(a_scale.float().reshape(()))
        mod.act_zero_point.copy_(a_zp.round().int().reshape(()) - shift)
        mod.act_quant_range.copy_(torch.tensor([afq.quant_min - shift, afq.quant_max - shift]))
        Int8Linear._sync_act_range(mod)
        mod.repack()
        return carry_smoothing(qat, mod)

    @staticmethod
    def _sync_act_range(module: "Int8Linear", incompatible_keys=None) -> None:
        buf = module._buffers["act_quant_range"]
        if buf.is_meta:  # (no values to read: the mirror stays)
            module._act_range_of, module._act_range_ver = buf, _version_of(buf)
            return
        check_host_readable("qlib.nn.Int8Linear", "act_quant_range", buf)
        check_host_readable("qlib.nn.Int8Linear", "act_zero_point", module._buffers["act_zero_point"])
        lo, hi = (int(v) for v in buf.tolist())
        if not -128 <= lo < hi <= 127:
            raise RuntimeError(f"Int8Linear: act_quant_range [{lo}, {hi}] does not fit int8")
        zp = int(module.act_zero_point)
        if not lo <= zp <= hi:
            raise RuntimeError(f"Int8Linear: act_zero_point {zp} lies outside act_quant_range [{lo}, {hi}]")
        module._act_range, module._act_range_of, module._act_range_ver = (lo, hi), buf, _version_of(buf)

    def _weight_for_call(self):
        """(plain weight or None, packing) for an eager call: repacked where stale, the plain
        weight dropped where nothing else holds it."""
        b = self._buffers
        state = self.__dict__.get("_pack_state")
        packed, w = b["weight_packed"], b["weight"]  # (read once: another thread may drop it)
        if w is None:  # the packing alone
            if state is not None and (state[2]() is not packed or state[0][2] == _C.int8_cpu_kernel()):
                return None, packed
            self._repack()  # (unpickled, or packed for another kernel)
        elif state is not None and state[1]() is not w:
            # Another weight swapped in for the call (torch.func.functional_call): run it
            # unpacked; the module's own packing stays.
            return w, torch.empty(0, dtype=torch.int8, device=w.device)
        elif state is None or state[0] != _weight_key(w) or state[2]() is not packed:
            self._repack()  # (new, edited in place, or a packing swapped in)
        del w  # (_drop_weight_if_unshared counts the references to it)
        self._drop_weight_if_unshared()
        return b["weight"], b["weight_packed"]

    def _eager_weights(self):
        """(plain weight or None, packing) for an eager call, after forward's bookkeeping: the
        static activation range re-read where its buffer changed, the packing made current."""
        b = self._buffers
        if self.activation == "static":
            rng = b["act_quant_range"]
            if rng is not self.__dict__.get("_act_range_of") or _version_of(rng) != self.__dict__.get("_act_range_ver"):
                # (new buffers: torch.func.functional_call, .to(); or edited in place)
                Int8Linear._sync_act_range(self)
        packed, w = b["weight_packed"], b["weight"]
        fake_mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
        if fake_mode or is_functorch_wrapped_tensor(packed) or (w is not None and is_functorch_wrapped_tensor(w)):
            # vmap / grad transforms: no packing of a batch of weights; a FakeTensorMode
            # (shape propagation): the packing's size is data-dependent
            return w, packed if w is None else torch.empty(0, dtype=torch.int8, device=w.device)
        del w  # (_drop_weight_if_unshared counts the references to it)
        return self._weight_for_call()

    def forward(self, input: Tensor) -> Tensor:  # (nn.Linear's name: callers may pass input=x)
        x = input
        if isinstance(x, Tensor) and x.is_nested:  # (as nn.Linear: jagged nested tensors run on their values)
            return on_nested("Int8Linear", self.forward, x)
        x = smoothed_input(self, x)
        # Buffers straight from _buffers: nn.Module.__getattr__ costs about 0.7 us a name,
        # which is most of a small call's Python time.
        b = self._buffers
        bias = b["bias"] if "bias" in b else self.bias  # (a Parameter or parametrized bias is elsewhere)
        if torch.compiler.is_compiling():  # (traced: the state as it was)
            w, packed = b["weight"], b["weight_packed"]  # (w None: the packing alone is the weight)
            if w is not None:
                # Traced while the module holds its plain weight (something refers to it, or it was
                # just assigned): edits of it are not tracked in a graph, so the call reads it.
                packed = torch.empty(0, dtype=torch.int8, device=w.device)
        else:
            w, packed = untraced(self._eager_weights)  # (torch.jit.trace: the graph records the op alone)
        if self.activation == "dynamic":
            return torch.ops.qlib.int8_linear_packed(x, packed, w, b["weight_scale"], bias)
        # Static: codes = quantize(x, act_scale, act_zero_point, lo, hi); the zero point is
        # taken out exactly in int32 inside the op.
        lo, hi = self._act_range
        return torch.ops.qlib.int8_linear_packed(
            x, packed, w, b["weight_scale"], bias, b["act_scale"], b["act_zero_point"], lo, hi,
        )

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight plus its scales (bias and act_scale excluded)."""
        return self.out_features * self.in_features + self.weight_scale.numel() * 4

    def extra_repr(self) -> str:
        if self.activation == "dynamic":
            act = "dynamic per-token [-127, 127]"
        else:
            lo, hi = self._act_range
            zp = 0 if self.act_zero_point.is_meta else int(self.act_zero_point)  # (meta: no values)
            act = f"static per-tensor [{lo}, {hi}]" + (f" zero_point={zp}" if zp else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=int8 symmetric per-channel, activation=int8 {act}"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        unpacked = self._buffers["weight"] is None
        if unpacked:
            self._unpacked_weight()  # (held while the state_dict's tensor lives)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if unpacked and not keep_vars:  # (then let go of: no wait for a forward, which a compiled loop never runs)
            weakref.finalize(destination[prefix + "weight"], Int8Linear._let_go_of_weight, weakref.ref(self))

    def __setattr__(self, name, value):
        if name == "weight" and isinstance(value, Tensor) and (isinstance(value, nn.Parameter) or value.dtype != torch.int8):
            # (before nn.Module's: a Parameter would drop the weight buffer, then fail to register
            # under the `weight` property with "attribute 'weight' already exists")
            raise TypeError(
                f"Int8Linear ({self.extra_repr()}): weight holds int8 codes (a frozen buffer, scaled by "
                f"weight_scale), not a {'Parameter' if isinstance(value, nn.Parameter) else value.dtype} of "
                "float weights; a tied or trained weight (lm_head.weight = embed.weight) needs a float "
                "Linear: leave it out of the swap (filter_fn), or assign int8 codes")
        super().__setattr__(name, value)
        if name == "weight":
            self._pack_state = None  # a new weight: packed at the next forward

    def _apply(self, fn, recurse=True):
        # A packing is a CPU kernel's layout: the plain weight goes where the module goes.
        if self._buffers["weight"] is None and fn(torch.empty(0, dtype=torch.int8)).device.type != "cpu":
            self.weight
        w, packed = self._buffers["weight"], self._buffers["weight_packed"]
        if packed.is_meta and w is not None and not w.is_meta:
            # A meta skeleton whose weight was set without load_state_dict (accelerate's
            # load_checkpoint_and_dispatch): the packing, not in the state, holds nothing yet, and
            # .to() failed on it ("Cannot copy out of meta tensor"). Packed at the next forward.
            self._buffers["weight_packed"] = torch.empty(0, dtype=torch.int8, device=w.device)
        super()._apply(fn, recurse)
        if self._buffers["weight"] is not w:
            self._pack_state = None  # (moved: the module's own, packed at the next forward)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        b = self._buffers
        # What a load that fails restores. Not _pack_state (reset: the next forward repacks): its
        # weakref to the weight would keep torch.utils.swap_tensors (load_state_dict under
        # torch.__future__.set_swap_module_params_on_conversion(True)) from swapping it.
        before = (b["weight"], b["weight_packed"])
        self._pack_state = None
        errors = len(error_msgs)
        try:
            self._check_and_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                 error_msgs)
        except BaseException:
            b["weight"], b["weight_packed"] = before
            raise
        if len(error_msgs) > errors:  # (load_state_dict raises; the weight stays as it was)
            b["weight"], b["weight_packed"] = before
            return
        del before  # (a reference to the weight: repack() drops it where none is left)
        # Now, not on the next forward: a compiled or exported forward never repacks.
        self.repack()

    def _check_and_load(self, state_dict, prefix, *args):
        b = self._buffers
        loaded = state_dict.get(prefix + "weight")
        if b["weight"] is None:  # the plain weight, to check and load into: unpacked unless
            # overwritten (after to_empty() the packing holds no weight)
            shape = (self.out_features, self.in_features)
            if isinstance(loaded, Tensor) and tuple(loaded.shape) == shape:
                b["weight"] = torch.empty(shape, dtype=torch.int8, device=b["weight_packed"].device)
            else:
                self._unpacked_weight()
        for name, key, value in self._loaded_buffers(state_dict, prefix):
            if name in ("weight_scale", "act_scale") and not value.is_meta:  # (meta: no values)
                # A NaN / zero / negative scale would give NaN or wrong outputs; x is divided
                # by act_scale, so it must also keep 1 / scale finite.
                low = MIN_SCALE if name == "act_scale" else 0.0
                bad = ~(torch.isfinite(value) & (value > 0) & (value >= low))
                if bool(bad.any()):
                    v = value.detach().reshape(-1)[bad.reshape(-1)][0].item()
                    need = f"at least {low}" if low else "> 0"
                    raise RuntimeError(
                        f"Int8Linear ({self.extra_repr()}): state_dict[{key!r}] holds {v}; "
                        f"{name} must be finite and {need} (a corrupt state_dict?)"
                    )
        super()._load_from_state_dict(state_dict, prefix, *args)
