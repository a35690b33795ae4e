"""GPTQ (Frantar et al., 2022): 4-bit weights chosen with second-order information.

Rounding each weight to its nearest code (RTN) ignores how the layer's inputs mix the errors.
GPTQ quantizes a weight matrix one input column at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse of H = 2 X^T X / n (X: the
layer's calibration inputs), which minimises ||X W^T - X W_hat^T|| column by column. Scales
are symmetric per group of ``group_size`` columns, taken from the updated weights when a
group starts (the min-max observer's scale); the codes come from ``qlib.quantize``. The result
is a :class:`qlib.nn.Linear4bit` (codebook "int-grid").

By default all selected Linears see the calibration batches in one pass of the float model,
each keeping its K x K H in float32 until it is quantized. ``sequential=True`` instead
quantizes them one at a time, each calibrated on the model whose earlier Linears are already
4-bit (as the paper does block by block), so a layer's codes make up for the errors of the
layers before it: one pass over the batches a Linear.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import Tensor, nn

from . import _ops
from ._state import MIN_SCALE
from .nn.linear_4bit import Linear4bit
from .workflows import FilterFn, _swap, check_op_dtype, fused_paths_restorer, model_swap_selector, run_batches


class _Hessian:
    """Running H = 2 X^T X / n of a Linear's inputs, held as ``h`` = H * 2^(-2 e): each batch is
    scaled by 2^-e, e the exponent of the largest |x| seen so far, before its products are summed
    in float32. Scaling by a power of two is exact, so h does not depend on the inputs' scale (nor
    does GPTQ on H's: damp is relative), and inputs far outside float32's square root (1e-20, 1e20)
    neither underflow nor overflow. NaN or Inf inputs still make h NaN or Inf."""

    _NONE_YET = -(1 << 40)  # the exponent before any finite, nonzero batch

    def __init__(self, k: int, device):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)  # (not the default dtype)
        self.exponent = torch.full((), self._NONE_YET, dtype=torch.int64, device=device)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().flatten(0, -2) if x.dim() > 1 else x.detach().unsqueeze(0)
        if x.dtype != torch.float64:  # (float64 is scaled first: it may not fit float32 before)
            x = x.float()
        n = x.shape[0]
        if n == 0:
            return
        self.rows += n
        if x.shape[1] == 0:  # (no inputs: nothing to sum, but the rows count)
            return
        # All on the device (no host syncs): e = max(e, exponent of this batch's absmax).
        amax = x.abs().amax()
        seen = torch.isfinite(amax) & (amax > 0)  # (0, NaN or Inf: keeps e; NaN / Inf reach h anyway)
        exponent = torch.maximum(self.exponent, torch.where(seen, torch.frexp(amax).exponent.long(), self._NONE_YET))
        # The sum so far times (rows before / rows now) and 2^(-2 (e_new - e_old)) (0 past float32's range).
        self.h *= (self.rows - n) / self.rows * torch.exp2(-2.0 * (exponent - self.exponent).clamp(max=200).float())
        self.exponent = exponent
        # x * 2^-e in two exact steps (2^-e alone may not fit x's dtype), then the sum's factor.
        shift = torch.where(exponent == self._NONE_YET, 0, -exponent)
        half = torch.div(shift, 2, rounding_mode="floor")
        for part in (half, shift - half):
            x = x * torch.exp2(part.double()).to(x.dtype)
        x = x.float() * (2.0 / self.rows) ** 0.5
        with torch.autocast(x.device.type, enabled=False):  # (a caller's autocast would run it in bf16)
            self.h += x.T @ x


@torch.no_grad()
def gptq_weight(w: Tensor, h: Tensor, bits: int = 4, group_size: int = 64, damp: float = 0.01,
                act_order: bool = False, block: int = 128, name: str = "the Linear"):
    """(codes int8 [N, K], scales float32 [N, ceil(K / group_size)]) of w [N, K] under H [K, K]
    (H's scale does not matter, damp being relative: H times a power of 4 gives the same codes).
    act_order: columns in order of decreasing H diagonal, with each group's scale fixed
    beforehand from the weights as they are (groups stay in the original column order)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if isinstance(h, _Hessian):  # (gptq_quantize hands its H over: used in place, freed once factored)
        holder, h = h, h.h
        holder.h, owned = None, True
    else:
        owned = False
    w = w.detach().float().clone()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"qlib.gptq_quantize: the weight of {name} holds NaN or Inf")
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"qlib.gptq_quantize: the calibration inputs of {name} hold NaN or Inf")
    N, K = w.shape
    codes = torch.zeros(N, K, dtype=torch.int8, device=w.device)
    scales = torch.ones(N, -(-K // group_size), dtype=torch.float32, device=w.device)
    if N == 0 or K == 0:  # an empty layer: nothing to choose
        return codes, scales
    if not owned:
        h = h.clone()
    dead = h.diagonal() == 0  # inputs that were always 0: their weights do not matter
    # Their diagonal: the live columns' mean (not 1.0: H's scale is arbitrary, and damp's mean
    # below would weigh a 1.0 against it).
    live = h.diagonal()[~dead]
    h[dead, dead] = live.mean() if live.numel() else 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())

    def group_scale(group: Tensor) -> Tensor:
        # Floored at MIN_SCALE, not at float32 eps (choose_qparams' default), which zeroed groups
        # of weights below ~1e-6 (RTN has no floor).
        return _ops.choose_qparams(group.amin(1), group.amax(1), qmin, qmax, True, MIN_SCALE)[0]

    order = list(range(K))
    if act_order:
        for g in range(scales.shape[1]):
            scales[:, g] = group_scale(w[:, g * group_size:(g + 1) * group_size])
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        order = perm.tolist()
        w, h = w[:, perm], h[perm][:, perm]
    else:
        block = group_size * max(1, block // group_size)  # a group never straddles two blocks
    try:
        # Each K x K factor dropped once the next is made, and (from gptq_quantize) H itself once
        # factored: about 2.8 K x K float32 at the peak, H included, not 4.1 (H and its clone were
        # held throughout: 0.6 GB more at K = 11008).
        u = torch.linalg.cholesky(h)
        del h
        u = torch.cholesky_inverse(u)
        u = torch.linalg.cholesky(u, upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"qlib.gptq_quantize: H of {name} is not positive definite; raise damp "
                         f"(now {damp})") from e
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        wb, err = w[:, b0:b1], torch.empty(N, b1 - b0, dtype=torch.float32, device=w.device)
        for j in range(b1 - b0):
            col = order[b0 + j]  # the weight's column in the layer
            if not act_order and col % group_size == 0:
                scales[:, col // group_size] = group_scale(wb[:, j:j + group_size])
            scale = scales[:, col // group_size]
            q = _ops.quantize(wb[:, j:j + 1], scale.unsqueeze(1).contiguous(), None, qmin, qmax, torch.int8)
            codes[:, col:col + 1] = q
            e = (wb[:, j] - q.squeeze(1).float() * scale) / u[b0 + j, b0 + j]
            wb[:, j:] -= e.unsqueeze(1) * u[b0 + j, b0 + j:b1].unsqueeze(0)
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes, scales


@torch.no_grad()
def gptq_quantize(model: nn.Module, batches: Iterable, bits: int = 4, group_size: int = 64,
                  damp: float = 0.01, act_order: bool = False, filter_fn: Optional[FilterFn] = None,
                  compute_dtype: Optional[torch.dtype] = None, max_hessian_bytes: Optional[int] = None,
                  sequential: bool = False, progress: bool = True) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` selected by ``filter_fn(module, fqn)`` with a
    :class:`qlib.nn.Linear4bit` whose ``bits``-bit (2 to 4) symmetric codes and per-group scales
    GPTQ chose on the calibration ``batches`` (tensors, tuples of positional inputs or dicts, as
    ``qlib.calibrate`` takes them).
    ``damp`` (a fraction of H's mean diagonal) keeps H invertible; ``act_order`` quantizes the
    columns with the largest inputs first (group scales then fixed beforehand); ``compute_dtype``
    as in ``quantize_weight_only``. ``max_hessian_bytes`` caps the float32 H held at once (4 K^2
    bytes a Linear): the Linears are then quantized in groups, one pass over ``batches`` (which
    must then be a list or another re-iterable) a group. ``sequential``: one Linear at a time, in
    the order ``model.named_modules()`` lists them (for most models the order they run), each
    calibrated with the ones before it already replaced. Returns the model, or the replacement
    when ``model`` itself is a selected Linear."""
    from tqdm.auto import tqdm

    if not isinstance(bits, int) or not 2 <= bits <= 4:
        raise ValueError(f"qlib.gptq_quantize: bits must be 2, 3 or 4, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"qlib.gptq_quantize: group_size must be a positive int, got {group_size!r}")
    if not damp >= 0:
        raise ValueError(f"qlib.gptq_quantize: damp must be >= 0, got {damp!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"qlib.gptq_quantize: expected an nn.Module, got {type(model).__name__}")
    # (refuses pruned / parametrized ones now; peft's adapters stay float)
    chosen = model_swap_selector(model, nn.Linear, filter_fn, "gptq_quantize")
    selected = {id(m): (fqn, m) for fqn, m in model.named_modules(remove_duplicate=False) if chosen(m, fqn)}
    if not selected:
        raise ValueError("qlib.gptq_quantize: no nn.Linear selected")
    on_meta = [fqn for fqn, m in selected.values() if m.weight.is_meta]
    if on_meta:
        raise ValueError(f"qlib.gptq_quantize: {on_meta[0]!r} has a meta weight; GPTQ needs the weight's "
                         "values (load them first)")
    for fqn, m in selected.values():
        check_op_dtype(m, fqn, "gptq_quantize")
    # Groups of Linears whose H fit max_hessian_bytes together (a larger one goes alone).
    groups, size = [[]], 0
    budget = 0 if sequential else max_hessian_bytes  # sequential: one Linear a group
    for key, (_, m) in selected.items():
        h_bytes = 4 * m.in_features ** 2
        if groups[-1] and budget is not None and size + h_bytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += h_bytes
    if len(groups) > 1 and iter(batches) is batches:
        why = "sequential=True" if sequential else f"max_hessian_bytes={max_hessian_bytes}"
        raise ValueError(f"qlib.gptq_quantize: {why} needs {len(groups)} passes over the batches; "
                         "pass a list (an iterator runs out after one)")
    made = {}

    def swap_made(model):
        return _swap(model, nn.Linear, lambda m, fqn: made[id(m)], lambda m, fqn: id(m) in made, "gptq_quantize")

    restore_fused_paths = fused_paths_restorer(model)
    with tqdm(total=len(selected), desc="GPTQ (Linears)", disable=not progress) as bar:  # across passes
        try:
            for group in groups:
                hessians: Dict[int, _Hessian] = {key: _Hessian(selected[key][1].in_features, selected[key][1].weight.device)
                                                 for key in group}
                hooks = [selected[key][1].register_forward_pre_hook(  # (nn.Linear's input may come as input=x)
                    lambda mod, args, kwargs: hessians[id(mod)].add(args[0] if args else kwargs["input"]),
                    with_kwargs=True) for key in group]
                modes = [(mod, mod.training) for mod in model.modules()]  # each its own (a frozen BatchNorm stays eval)
                try:
                    run_batches(model, batches, progress and len(groups) == 1)  # (nested bars: a line a pass in logs)
                finally:
                    for hook in hooks:
                        hook.remove()
                    for mod, training in modes:
                        mod.training = training
                for key in group:
                    fqn, m = selected[key]
                    name = f"Linear {fqn!r}" if fqn else "the Linear"
                    if hessians[key].rows == 0:
                        raise ValueError(f"qlib.gptq_quantize: {name} saw no calibration input")
                    with torch.autocast(m.weight.device.type, enabled=False):  # float32, under a caller's autocast
                        codes, scales = gptq_weight(m.weight, hessians.pop(key), bits, group_size, damp, act_order,
                                                    name=name)
                    made[key] = Linear4bit.from_codes(codes, scales, group_size, m.bias, compute_dtype)
                    bar.update()
                if sequential:  # the next Linears calibrate on these already quantized
                    model = swap_made(model)
        except BaseException:
            if sequential and made:  # (the groups done were swapped in: the model goes back as it was)
                original = {id(made[key]): selected[key][1] for key in made}
                _swap(model, Linear4bit, lambda m, fqn: original[id(m)], lambda m, fqn: id(m) in original,
                      "gptq_quantize")
                restore_fused_paths()  # (the swaps turned TransformerEncoderLayer's fast path off)
            raise
    return swap_made(model)
