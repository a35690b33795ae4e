"""Model-level workflows: swap the Linears of a model for quantized ones.

- quantize_dynamic(model): nn.Linear -> Int8Linear (dynamic per-token activations).
- prepare_qat(model, config): nn.Linear -> QATLinear (fake quant in the loop).
- prepare(model, config) -> calibrate(model, batches) -> convert(model):
  post-training static quantization (observers only, then Int8Linear).
- convert(model) also turns a QAT-trained model into Int8Linear modules, or into
  Linear4bit modules after weight-only 4-bit QAT (activation_bits=None).

Each takes ``filter_fn``: a callable (module, fqn) -> bool, or fnmatch patterns of the
qualified module names ("encoder.*", or a list such as ["*.q_proj", "*.v_proj"]).
"""
from __future__ import annotations

import fnmatch
import inspect
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._state import OP_FLOAT_DTYPES
from .config import QATConfig, config_or_default
from .nn.fake_quantize import FakeQuantize
from .nn.int8_linear import Int8Linear
from .nn.linear_4bit import Linear4bit
from .nn.qat_linear import QATLinear
from .nn.smoothing import carry_smoothing, is_smoothed, settle_divide_input

# filter_fn(module, fqn) -> bool, or fnmatch patterns of the module names ("body.*" or a list).
FilterFn = Union[Callable[[nn.Module, str], bool], str, Sequence[str]]


def selects(filter_fn: Optional[FilterFn], who: str) -> Callable[[nn.Module, str], bool]:
    """filter_fn as a predicate: None selects all; a pattern or a list of patterns selects the
    modules whose qualified name matches one (fnmatch)."""
    if filter_fn is None:
        return lambda module, fqn: True
    if isinstance(filter_fn, str) or (isinstance(filter_fn, (list, tuple)) and
                                      all(isinstance(p, str) for p in filter_fn)):
        patterns = [filter_fn] if isinstance(filter_fn, str) else list(filter_fn)
        return lambda module, fqn: any(fnmatch.fnmatchcase(fqn, p) for p in patterns)
    if not callable(filter_fn):
        raise TypeError(f"qlib.{who}: filter_fn must be a callable (module, fqn) -> bool, a name pattern "
                        f"or a list of them, got {type(filter_fn).__name__}")
    return lambda module, fqn: bool(filter_fn(module, fqn))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's Linear layers): y = x @ weight + bias, weight [in, out]."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


def as_linear(module: nn.Module) -> nn.Module:
    """A Conv1D as the nn.Linear it computes (the weight transposed, the bias shared); else module."""
    if not is_conv1d(module):
        return module
    w, b = module.weight, module.bias
    linear = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta")
    linear.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if b is not None:
        linear.bias = b
    return linear


def peft_adapters(model: nn.Module) -> set:
    """ids of the modules inside peft adapters: a LoRA layer's lora_A / lora_B (peft's
    `adapter_layer_names`), a ModulesToSaveWrapper's trainable copies. The swaps leave them
    float: an int8 / 4-bit adapter is frozen (its zero lora_B stayed zero, silently), as QLoRA
    keeps adapters float. Their base layers (`base_layer`, `original_module`) are swapped."""
    ids = set()
    for m in model.modules():
        names = getattr(type(m), "adapter_layer_names", None)
        if not isinstance(names, tuple) or not any(c.__module__.startswith("peft.") for c in type(m).__mro__):
            continue
        for name in names:
            sub = m
            for part in name.split("."):  # (dotted: "token_adapter.trainable_tokens_delta")
                sub = getattr(sub, part, None)
            if isinstance(sub, nn.Module):
                ids.update(id(s) for s in sub.modules())
    return ids


def warn_conv1d_left(model: nn.Module, chosen: Callable[[nn.Module, str], bool], who: str,
                     adapters: set) -> None:
    """Warns for the Conv1D modules (GPT-2's Linears) filter_fn chose but this swap leaves float."""
    left = [fqn for fqn, m in model.named_modules() if is_conv1d(m) and chosen(m, fqn) and id(m) not in adapters]
    if left:
        warnings.warn(f"qlib.{who}: {len(left)} transformers Conv1D modules (GPT-2's Linear layers: "
                      f"{', '.join(map(repr, left[:3]))}{', ...' if len(left) > 3 else ''}) stay float: "
                      f"{who} swaps nn.Linear only (quantize_dynamic and quantize_weight_only take "
                      "Conv1D too)", stacklevel=_caller_stacklevel())


def warn_unmatched_patterns(model: nn.Module, kind: type, filter_fn: Optional[FilterFn], who: str,
                            conv1d: bool, adapters: set) -> None:
    """Warns for each name pattern of filter_fn that matches no module of type `kind`: patterns
    match the Linears' own names, so "*.q_proj" naming a wrapper (a LoRA layer holding its base
    Linear, as peft's target_modules do) swapped nothing, silently."""
    if isinstance(filter_fn, str):
        patterns = [filter_fn]
    elif isinstance(filter_fn, (list, tuple)) and all(isinstance(p, str) for p in filter_fn):
        patterns = list(filter_fn)
    else:
        return
    named = list(model.named_modules(remove_duplicate=False))
    for p in patterns:
        hits = [(fqn, m) for fqn, m in named if fnmatch.fnmatchcase(fqn, p)]
        if any((parametrize.type_before_parametrizations(m) is kind or (conv1d and is_conv1d(m)))
               and id(m) not in adapters for _, m in hits):
            continue
        what = ", ".join(f"{fqn!r} ({type(m).__name__})" for fqn, m in hits[:3]) + (", ..." if len(hits) > 3 else "")
        name = "nn.Linear" if kind is nn.Linear else kind.__name__
        warnings.warn(f"qlib.{who}: filter_fn pattern {p!r} matches no {name}, so it swaps nothing"
                      + (f"; it matches {what}. Patterns match the {name}s' own names: {p + '.*'!r} "
                         "takes those inside" if hits else "")
                      + (" (peft adapters stay float)" if any(id(m) in adapters for _, m in hits) else ""),
                      stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside qlib and torch (torch.no_grad's
    wrapper): the user's call."""
    dirs = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level


def _composable_apis(module: nn.Module) -> list:
    """Names of the torch.distributed composable APIs (checkpoint, fully_shard, ...) applied to module."""
    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:  # (a torch without distributed)
        return []
    return list(_get_registry(module) or ())


def swap_selector(kind: type, filter_fn: Optional[FilterFn], who: str,
                  conv1d: bool = False) -> Callable[[nn.Module, str], bool]:
    """(module, fqn) -> whether a swap to `kind`'s replacement takes it: a module of exactly type
    `kind` (or a transformers Conv1D, with conv1d) chosen by filter_fn. A chosen pruned or
    parametrized one (weight_norm, ...) raises."""
    chosen = selects(filter_fn, who)

    def selected(module: nn.Module, fqn: str) -> bool:
        if type(module) is kind or (conv1d and is_conv1d(module)):
            if not chosen(module, fqn):
                return False
            if prune.is_pruned(module):
                raise ValueError(f"qlib.{who}: {fqn or 'the model'} is pruned (torch.nn.utils.prune); make the "
                                 "pruning permanent first (torch.nn.utils.prune.remove) or leave it out with filter_fn")
            if _composable_apis(module):
                raise ValueError(
                    f"qlib.{who}: {fqn or 'the model'} has torch.distributed composable APIs applied "
                    f"({', '.join(_composable_apis(module))}), whose state is kept per module; apply them after "
                    "the swap, or to a parent module")
            w = module._parameters.get("weight")
            if w is not None and is_traceable_wrapper_subclass(w):
                raise ValueError(
                    f"qlib.{who}: the weight of {fqn or 'the model'} is a {type(w).__name__}, a tensor subclass (another "
                    "library's quantized or sharded weight, as torchao's quantize_ makes), which qlib's ops do not "
                    "read; swap the float model, or leave it out with filter_fn")
            if any(isinstance(h, (WeightNorm, SpectralNorm)) for h in module._forward_pre_hooks.values()):
                raise ValueError(
                    f"qlib.{who}: {fqn or 'the model'} has a hook-based torch.nn.utils.weight_norm / spectral_norm, "
                    "whose weight is recomputed on each forward (the one it holds may be stale, e.g. after "
                    "load_state_dict); remove it first (torch.nn.utils.remove_weight_norm / remove_spectral_norm) "
                    "or leave it out with filter_fn")
            return True
        if parametrize.is_parametrized(module) and parametrize.type_before_parametrizations(module) is kind \
                and chosen(module, fqn):
            raise ValueError(
                f"qlib.{who}: {fqn or 'the model'} is a parametrized {kind.__name__} (weight_norm, ...); remove "
                "its parametrizations first (torch.nn.utils.parametrize.remove_parametrizations) or leave it "
                "out with filter_fn")
        return False

    return selected


def model_swap_selector(model: nn.Module, kind: type, filter_fn: Optional[FilterFn], who: str,
                        conv1d: bool = False) -> Callable[[nn.Module, str], bool]:
    """swap_selector for this model, less peft's adapters in an nn.Linear swap (they stay float:
    see peft_adapters); warns of the patterns that match nothing and, in an nn.Linear swap
    without conv1d, of the chosen Conv1Ds left float."""
    chooses = swap_selector(kind, filter_fn, who, conv1d)
    adapters = peft_adapters(model)
    warn_unmatched_patterns(model, kind, filter_fn, who, conv1d, adapters)
    if kind is not nn.Linear:
        return chooses
    if not conv1d:
        warn_conv1d_left(model, selects(filter_fn, who), who, adapters)
    return lambda module, fqn: id(module) not in adapters and chooses(module, fqn)


def _swap(model: nn.Module, kind: type, make: Callable[[nn.Module, str], nn.Module],
          filter_fn: Optional[FilterFn], who: str, conv1d: bool = False) -> nn.Module:
    """Replaces, in place, each module of exactly type `kind` (and each transformers Conv1D, with
    conv1d; else they are warned of, for an nn.Linear swap) selected by filter_fn(module, fqn) with
    make(module, fqn). A module shared by several parents gets one shared replacement. Returns
    the model (or the replacement, when the model itself is selected)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"qlib.{who}: expected an nn.Module, got {type(model).__name__}")
    selected = model_swap_selector(model, kind, filter_fn, who, conv1d)

    if selected(model, ""):
        model = _keep_hooks(model, make(model, ""))
        _ddp_local_buffers(model)
        return model
    swaps = []
    for parent_fqn, parent in model.named_modules(remove_duplicate=False):
        # _modules, not named_children(): that skips a child already seen under another name
        # (nn.Sequential(lin, act, lin)), which would stay float.
        for name, child in parent._modules.items():
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            if child is not None and selected(child, fqn):
                swaps.append((parent, name, child, fqn))
    # Every replacement first, then the swaps: a make that raises (a NaN weight, ...) leaves the
    # model as it was, not half converted.
    done = {}
    for parent, name, child, fqn in swaps:
        if id(child) not in done:
            done[id(child)] = make(child, fqn)
    for parent, name, child, fqn in swaps:
        setattr(parent, name, _keep_hooks(child, done[id(child)]))
    if swaps:
        _off_fused_transformer_paths(model)
        _ddp_local_buffers(model)
    return model


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def _keep_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """The replacement runs the hooks of the module it replaces, as torch.ao's swap_module: it
    takes over old's hook dicts, so the handles the user holds still remove them."""
    if new is old:
        return new
    for name in _HOOK_DICTS:
        hooks = getattr(old, name)
        if hooks:
            hooks.update(getattr(new, name))
            object.__setattr__(new, name, hooks)
    if old._is_full_backward_hook is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    if is_smoothed(old):  # (old's divide_input hook came along, inert on a qlib Linear: new divides once)
        settle_divide_input(carry_smoothing(old, new))
    return new


def _off_fused_transformer_paths(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's inference fast path (eval, no grad, batch_first) calls
    torch._transformer_encoder_layer_fwd with linear1 / linear2's ``.weight`` tensors and never
    runs their forward: a QATLinear's fake quant and observers would be skipped (float outputs,
    nothing calibrated) and an Int8Linear's int8 buffer read as a float weight. Turn that path
    (and nn.TransformerEncoder's nested-tensor one, which needs it) off where a layer holds a
    qlib module: both are instance attributes that only gate the fused kernels."""
    touched = set()
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and any(
                isinstance(m, (QATLinear, Int8Linear, Linear4bit)) or is_smoothed(m) for m in layer.modules()):
            layer.activation_relu_or_gelu = 0
            touched.add(id(layer))
            if not getattr(layer, "_qlib_unnests", False):
                # An encoder outside `model` (qlib given a layer, or enc.layers) may still nest.
                layer.register_forward_pre_hook(_unnest_src, with_kwargs=True)
                layer.register_forward_hook(_renest_output, with_kwargs=True)
                layer._qlib_unnests = True
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and any(id(l) in touched for l in enc.layers):
            enc.use_nested_tensor = False


def fused_paths_restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts back what _off_fused_transformer_paths may change in model (flags,
    hooks): the undo of swaps that a later failure takes back (gptq_quantize's sequential ones)."""
    layers = [(layer, layer.activation_relu_or_gelu, "_qlib_unnests" in layer.__dict__)
              for layer in model.modules() if isinstance(layer, nn.TransformerEncoderLayer)]
    encoders = [(enc, enc.use_nested_tensor) for enc in model.modules() if isinstance(enc, nn.TransformerEncoder)]

    def restore() -> None:
        for layer, act, unnests in layers:
            layer.activation_relu_or_gelu = act
            if not unnests and layer.__dict__.pop("_qlib_unnests", False):
                for name in ("_forward_pre_hooks", "_forward_hooks"):
                    hooks = getattr(layer, name)
                    for key in [k for k, h in hooks.items() if h in (_unnest_src, _renest_output)]:
                        del hooks[key]
                        getattr(layer, name + "_with_kwargs").pop(key, None)
        for enc, nested in encoders:
            enc.use_nested_tensor = nested
    return restore


def _unnest_src(layer, args, kwargs):
    """A nested src (nn.TransformerEncoder's padding-mask fast path) runs padded, with the
    padding as src_key_padding_mask: the slow path's Linears cannot take nested tensors. The
    call's keep mask rides on that mask tensor (`_qlib_keep`) to _renest_output: not on the
    layer, which calls from several threads share, and not on the kwargs dict, which a pre-hook
    registered after this one may copy."""
    src = args[0] if args else kwargs.get("src")
    if src is None or not src.is_nested:
        return None
    padded = src.to_padded_tensor(0.0)
    lengths = torch.tensor([t.size(0) for t in src.unbind()], device=padded.device)
    keep = torch.arange(padded.size(1), device=padded.device) < lengths[:, None]
    padding = ~keep
    padding._qlib_keep = keep
    kwargs = dict(kwargs, src_key_padding_mask=padding)
    if args:
        return (padded,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, src=padded)


def _renest_output(layer, args, kwargs, output):
    keep = getattr(kwargs.get("src_key_padding_mask"), "_qlib_keep", None)
    if keep is None:
        return None
    return torch._nested_tensor_from_mask(output, keep, mask_check=False)


def _naming(who: str, make: Callable[[nn.Module, str], nn.Module]) -> Callable[[nn.Module, str], nn.Module]:
    """make, whose errors name the module (a model has many Linears)."""
    def named(module: nn.Module, fqn: str) -> nn.Module:
        try:
            return make(module, fqn)
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"qlib.{who}: module {fqn or '(the model)'!r}: {e}") from e
    return named


def check_op_dtype(linear: nn.Linear, fqn: str, who: str) -> None:
    """Refuses a Linear of a dtype the ops do not take (float64: every forward raised)."""
    if linear.weight.dtype not in OP_FLOAT_DTYPES:
        raise RuntimeError(
            f"qlib.{who}: module {fqn or '(the model)'!r}: weight must be float32, float16 or bfloat16, "
            f"got {linear.weight.dtype}; cast the model first (e.g. model.float())")


def _op_dtype_checked(make: Callable[[nn.Module, str], nn.Module], who: str) -> Callable[[nn.Module, str], nn.Module]:
    """make, after check_op_dtype."""
    def checked(linear: nn.Linear, fqn: str) -> nn.Module:
        check_op_dtype(linear, fqn, who)
        return make(linear, fqn)
    return checked


def quantize_dynamic(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` (and transformers ``Conv1D``, GPT-2's Linears) of
    ``model`` selected by ``filter_fn(module, fqn)`` (all of them when None) with an
    :class:`qlib.nn.Int8Linear` (int8 per-channel weights, dynamic per-token int8 activations).
    Returns the model; if ``model`` itself is a selected ``nn.Linear``, returns its replacement.
    """
    make = _naming("quantize_dynamic", lambda m, fqn: Int8Linear.from_float(as_linear(m)))
    return _swap(model, nn.Linear, _op_dtype_checked(make, "quantize_dynamic"), filter_fn, "quantize_dynamic",
                 conv1d=True)


def quantize_weight_only(model: nn.Module, codebook="nf4", block_size: int = 64,
                         filter_fn: Optional[FilterFn] = None,
                         compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` (and transformers ``Conv1D``) of ``model`` selected by
    ``filter_fn(module, fqn)`` with a :class:`qlib.nn.Linear4bit` (4-bit weights: ``codebook`` "nf4", "int4", "kmeans" (fitted
    to each weight) or 16 values;
    one absmax per ``block_size`` weights; float activations, run in ``compute_dtype`` when
    given). Returns the model, or the replacement when ``model`` itself is a selected
    ``nn.Linear``."""
    make = _naming("quantize_weight_only",
                   lambda m, fqn: Linear4bit.from_float(as_linear(m), codebook, block_size, compute_dtype))
    return _swap(model, nn.Linear, _op_dtype_checked(make, "quantize_weight_only"), filter_fn, "quantize_weight_only",
                 conv1d=True)


def _prepare_qat(model: nn.Module, config: Optional[QATConfig], filter_fn: Optional[FilterFn], who: str,
                 made: list) -> nn.Module:
    config = config_or_default(config, f"qlib.{who}")
    _warn_kept_qat_linears(model, config, filter_fn, who)

    def make(linear: nn.Linear, fqn: str) -> QATLinear:
        config.check_linear(linear.in_features, linear.out_features, fqn)
        qat = QATLinear.from_float(linear, config)
        made.append(qat)
        return qat

    return _swap(model, nn.Linear, _op_dtype_checked(make, who), filter_fn, who)


def _warn_kept_qat_linears(model: nn.Module, config: QATConfig, filter_fn: Optional[FilterFn],
                           who: str) -> None:
    """prepare / prepare_qat swap nn.Linears only: the QATLinears of an earlier call stay as they are.
    Warns where that differs from what this call asks: another config, or (prepare_qat) fake quant
    off (an earlier prepare's observe-only modules would train unquantized)."""
    if not isinstance(model, nn.Module):
        return  # (_swap raises)
    chosen = selects(filter_fn, who)
    kept = []
    for fqn, m in model.named_modules():
        if type(m) is QATLinear and chosen(m, fqn):
            off = who == "prepare_qat" and any(not f.fake_quant_enabled for f in m.modules()
                                               if isinstance(f, FakeQuantize))
            if m.config != config or off:
                kept.append(f"'{fqn or 'the model'}'" + (" (fake quant off)" if off else ""))
    if kept:
        more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
        warnings.warn(
            f"qlib.{who}: {len(kept)} QATLinear(s) from an earlier prepare / prepare_qat are kept as they are "
            f"({', '.join(kept[:3])}{more}), not as this call asks: its config applies to the remaining "
            "nn.Linears only. To prepare again, start from the float model; to switch an earlier prepare's "
            "fake quant on, call enable_fake_quant() on each qlib.nn.FakeQuantize.", stacklevel=4)


def _ddp_local_buffers(model: nn.Module) -> None:
    """Buffers DistributedDataParallel must not broadcast from rank 0 (broadcast_buffers=True, the
    default, copies them over the other ranks' before every forward): the observers' statistics,
    which they all-reduce themselves (a broadcast made the all-reduce count rank 0's data
    world_size times and the others' last batch only), and Int8Linear's packed weight, whose
    layout is the local CPU kernel's. DDP reads the list from the module it wraps: wrap the model
    the workflow returned."""
    from .observers import ObserverBase

    names = [f"{prefix}.{b}" if prefix else b for prefix, m in model.named_modules()
             for b in (m._buffers if isinstance(m, ObserverBase) else
                       ["weight_packed"] if isinstance(m, Int8Linear) else [])]
    if names:
        old = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        model._ddp_params_and_buffers_to_ignore = old + [n for n in names if n not in old]


def prepare_qat(model: nn.Module, config: Optional[QATConfig] = None,
                filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Swaps (in place) each selected nn.Linear for a QATLinear that shares its
    parameters; filter_fn(module, fqn) -> bool chooses which. Returns model.

    Make the optimizer afterwards: learnable scales and zero points (``*_learnable=True``) are
    new Parameters, which an optimizer made before leaves out (silently untrained)."""
    return _prepare_qat(model, config, filter_fn, "prepare_qat", [])


def prepare(model: nn.Module, config: Optional[QATConfig] = None,
            filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """For post-training static quantization: like prepare_qat, but the
    inserted modules only observe (fake quant off) until `convert`. QATLinears
    already in the model (an earlier prepare_qat) keep their switches."""
    made = []
    model = _prepare_qat(model, config, filter_fn, "prepare", made)
    for qat in made:
        for m in qat.modules():
            if isinstance(m, FakeQuantize):
                m.disable_fake_quant()
                m.follow_observer()  # (learnable qparams: the whole calibration's, not the first batch's)
    return model


def calibrate(model: nn.Module, batches: Iterable, progress: bool = True) -> nn.Module:
    """Runs `batches` through the model in eval mode so its observers record ranges; shows a
    tqdm bar. A tuple or list is unpacked into positional inputs; a dict (or another mapping,
    such as a Hugging Face tokenizer's BatchEncoding) into keyword inputs where the model's
    forward names each of its keys as a parameter (`model(**batch)`: a transformers model);
    anything else (a tensor, a dict as sentence-transformers models take: their forward names
    one `input`) is passed as the one input.
    The model is left in eval mode (for the inference that follows convert): call
    `model.train()` to go on training a QAT model after it."""
    from .observers import ObserverBase

    if not any(isinstance(m, ObserverBase) for m in model.modules()):
        warnings.warn("qlib.calibrate: the model holds no qlib observer (run qlib.prepare first): "
                      "the batches record nothing", stacklevel=2)
    if run_batches(model, batches, progress) == 0:
        warnings.warn("qlib.calibrate: `batches` gave no batch (an exhausted generator or DataLoader?): "
                      "the observers recorded nothing", stacklevel=2)
    return model


@torch.no_grad()
def run_batches(model: nn.Module, batches: Iterable, progress: bool) -> int:
    """calibrate's loop (GPTQ's too: its hooks record, not observers); the number of batches run."""
    from tqdm.auto import tqdm

    model.eval()
    try:
        total = len(batches)
    except (TypeError, NotImplementedError):
        total = None  # (a generator, or a DataLoader of an IterableDataset: its __len__ raises)
    count = 0
    for batch in tqdm(batches, desc="calibrating", total=total, disable=not progress, leave=False):
        if isinstance(batch, (tuple, list)):
            model(*batch)
        elif _keyword_batch(model, batch):
            model(**batch)
        else:
            model(batch)
        count += 1
    return count


def _keyword_batch(model: nn.Module, batch) -> bool:
    """Whether a mapping batch goes in as keywords: model.forward names each key as a parameter
    (a transformers model given its tokenizer's output; a sentence-transformers model, whose
    forward takes the dict as its one `input`, gets it whole). The dict passed as one positional
    input failed deep in a transformers model with a bare AttributeError."""
    if not isinstance(batch, Mapping) or not batch:
        return False
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # (no signature to read: pass it whole, as before)
        return False
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return all(isinstance(k, str) and k in named for k in batch)


def convert(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Turns each QATLinear (from prepare_qat + training, or prepare +
    calibrate) into an Int8Linear with static activation qparams taken from
    its (trained or calibrated) FakeQuantize modules; a weight-only one
    (``activation_bits=None``, at most 4 symmetric weight bits) into a
    Linear4bit whose weight equals the fake-quantized one.

    In place, as the other workflows: returns ``model`` itself (its replacement when ``model``
    is itself a selected QATLinear), so the QAT model is consumed: its QATLinears, float
    weights and observers are gone. To keep it (to train on, or to compare with), convert a
    copy: ``int8_model = qlib.convert(copy.deepcopy(model))``."""
    made = []

    def make(qat: QATLinear, fqn: str) -> nn.Module:
        made.append(fqn)
        return Int8Linear.from_qat(qat) if qat.activation_fake_quant is not None else Linear4bit.from_qat(qat)

    model = _swap(model, QATLinear, _naming("convert", make), filter_fn, "convert")
    if not made:  # (a model never prepared, or converted already: say so)
        warnings.warn(f"qlib.convert: the model holds no QATLinear{' that filter_fn selects' if filter_fn else ''} "
                      "(made by qlib.prepare or qlib.prepare_qat): nothing was converted", stacklevel=2)
    return model
