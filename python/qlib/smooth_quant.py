"""qlib.smooth_quant: SmoothQuant (Xiao et al., 2023) before int8 quantization.

A few input features of a transformer's Linears carry values 10-100x the others'. One per-token
(or per-tensor) activation scale then leaves the other features few codes. SmoothQuant divides
each input feature j by s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) and multiplies the
weight's column j by s_j, so the product is unchanged and the activations' range is more even.
qlib rounds s to a power of two: dividing by it, and multiplying by it, is exact (barring
underflow), so the smoothed float model gives the same outputs bit for bit. And it never
amplifies a feature (s >= 1): on all-MiniLM-L6-v2 the features the formula would amplify (small
in calibration) made a few held-out sentences worse (min cosine 0.9949 -> 0.9833 for dynamic
int8) while s >= 1 improved the mean and the worst sentence alike (README)."""
from __future__ import annotations

import numbers
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .nn.smoothing import attach, input_key, is_smoothed
from .workflows import FilterFn, _off_fused_transformer_paths, is_conv1d, model_swap_selector, run_batches

MAX_EXPONENT = 12  # s in [1, 2^12] (float16 holds it, and a weight times it)


def smooth_quant(model: nn.Module, batches: Optional[Iterable] = None, alpha: float = 0.5,
                 filter_fn: Optional[FilterFn] = None, progress: bool = True) -> nn.Module:
    """Smooths, in place, each nn.Linear (and transformers Conv1D, GPT-2's Linears) that filter_fn
    selects. It runs ``batches`` through the model (as ``qlib.calibrate``: a progress bar, tuples
    unpacked, mappings as keywords) to record each input feature's max |x| (finite values;
    all-reduced across ranks under torch.distributed). Then it gives the Linear s (above; 1 for a
    feature never nonzero, or whose weight column is all zero), its weight columns times s and a
    forward pre-hook that divides its input by s.

    Run it on the float model, then ``qlib.quantize_dynamic`` / ``prepare`` / ``prepare_qat`` /
    ``quantize_weight_only`` / ``gptq_quantize``: the qlib Linears they make carry s. A larger
    alpha moves more of the activations' range into the weights. On all-MiniLM-L6-v2 alpha = 0.5
    suited dynamic int8 best and 0.65 static int8 (README).

    Without ``batches`` it gives each selected Linear s = 1 and changes no weight: the structure
    ``load_state_dict`` of a smoothed model's state needs (smooth, then quantize, then load).
    The model's training flags are kept. A Linear smoothed already raises (smooth the float model
    once); one whose weight is shared with another module (tied embeddings) stays unsmoothed,
    with a warning."""
    who = "qlib.smooth_quant"
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{who}: alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    selected = model_swap_selector(model, nn.Linear, filter_fn, "smooth_quant", conv1d=True)
    linears = {}  # id -> (fqn, Linear): a Linear shared by several parents is smoothed once
    for fqn, m in model.named_modules():
        if selected(m, fqn):
            linears.setdefault(id(m), (fqn, m))
    if not linears:
        warnings.warn(f"{who}: the model holds no nn.Linear{' that filter_fn selects' if filter_fn else ''}: "
                      "nothing was smoothed", stacklevel=2)
        return model
    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    tied = [key for key, (_, m) in linears.items() if uses.get(id(m.weight), 0) > 1]
    if tied:  # (scaling its columns would change the other module: GPT-2's lm_head and embedding)
        warnings.warn(f"{who}: {len(tied)} Linears share their weight with another module (tied embeddings: "
                      f"{', '.join(repr(linears[k][0]) for k in tied[:3])}{', ...' if len(tied) > 3 else ''}); "
                      "they stay unsmoothed", stacklevel=2)
        for key in tied:
            del linears[key]
    for fqn, m in linears.values():
        if is_smoothed(m):
            raise ValueError(f"{who}: Linear {repr(fqn) if fqn else 'the model'} is smoothed already; smooth the "
                             "float model once")
    if batches is None:
        for _, m in linears.values():
            attach(m, torch.ones(in_features(m), dtype=m.weight.dtype, device=m.weight.device))
        _off_fused_transformer_paths(model)  # (its fused kernels read the weights, skipping the hook)
        return model

    amax = {key: torch.zeros(in_features(m), dtype=torch.float32, device=m.weight.device)
            for key, (_, m) in linears.items()}

    def record(module, args, kwargs):
        x = args[0] if args else kwargs.get(input_key(kwargs))
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            a = x.detach().reshape(-1, x.shape[-1]).abs().float()
            a = torch.where(torch.isfinite(a), a, 0.0).amax(0)
            torch.maximum(amax[id(module)], a, out=amax[id(module)])

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for _, m in linears.values()]
    modes = [(mod, mod.training) for mod in model.modules()]
    try:
        count = run_batches(model, batches, progress)
    finally:
        for hook in hooks:
            hook.remove()
        for mod, training in modes:
            mod.training = training
    if count == 0:
        raise ValueError(f"{who}: `batches` gave no batch (an exhausted generator or DataLoader?); pass "
                         "batches=None for unit scales (to load a smoothed state_dict)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for key in sorted(amax, key=lambda k: linears[k][0]):  # (the same order on every rank)
            torch.distributed.all_reduce(amax[key], op=torch.distributed.ReduceOp.MAX)
    unseen = [fqn for key, (fqn, _) in linears.items() if not bool(amax[key].any())]
    if unseen:
        warnings.warn(f"{who}: {len(unseen)} Linears saw no nonzero finite input ({', '.join(map(repr, unseen[:3]))}"
                      f"{', ...' if len(unseen) > 3 else ''}): they keep s = 1", stacklevel=2)
    with torch.no_grad():
        for key, (_, m) in linears.items():
            columns = m.weight.detach().t() if is_conv1d(m) else m.weight.detach()  # [out, in]
            s = scales(amax[key], columns, float(alpha)).to(m.weight.dtype)  # (powers of two: exact)
            m.weight.mul_(s.reshape(-1, 1) if is_conv1d(m) else s)
            attach(m, s)
    _off_fused_transformer_paths(model)
    return model


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def scales(x_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = 2^round(log2(x_amax^alpha / w_amax^(1 - alpha))) per input feature, in [1, 2^12];
    1 where x_amax or the weight column's max |w| is 0 (or not finite). weight: [out, in]."""
    w_amax = weight.abs().float().amax(0) if weight.numel() else torch.zeros_like(x_amax)
    ok = (x_amax > 0) & (w_amax > 0) & torch.isfinite(w_amax)
    log2 = alpha * torch.log2(torch.where(ok, x_amax, 1.0)) - (1.0 - alpha) * torch.log2(torch.where(ok, w_amax, 1.0))
    s = torch.exp2(torch.round(log2).clamp(0, MAX_EXPONENT))
    return torch.where(ok, s, 1.0)
