"""SmoothQuant's per-input-channel scales on a Linear (``qlib.smooth_quant`` sets them).

A smoothed Linear holds the buffer ``smoothquant_scale`` (s, one power of two per input
feature, in the weight's dtype). Its weight columns were multiplied by s and its input is
divided by s, so the float outputs do not change: only the magnitudes the quantizers see move.
The qlib Linears (QATLinear, Int8Linear, Linear4bit) divide in their forward
(``smoothed_input``); a float nn.Linear (or Conv1D) by a forward pre-hook, ``divide_input``.
The qlib Linears made from a smoothed Linear (from_float, from_qat and the workflows' swaps)
carry s."""
import itertools

import torch
from torch import Tensor, nn

BUFFER = "smoothquant_scale"


def input_key(kwargs: dict) -> str:
    """The keyword a layer's input came as (nn.Linear's and qlib's `input`, Conv1D's `x`)."""
    return "input" if "input" in kwargs else "x"


def divisible(x, s: Tensor) -> bool:
    """A float x whose last dim s divides. Anything else stays as it is: the layer's own checks
    name what is wrong (a division would raise torch's broadcast error first)."""
    return isinstance(x, Tensor) and x.is_floating_point() and x.dim() > 0 and x.shape[-1] == s.shape[0]


def smoothed_input(module: nn.Module, x):
    """x / s for a smoothed module (x as it is where not divisible)."""
    s = module._buffers.get(BUFFER)
    return x / s.to(x.dtype) if s is not None and divisible(x, s) else x


def divides_in_forward(module: nn.Module) -> bool:
    """The qlib Linears divide in their forward: a hook there would divide twice."""
    return getattr(type(module), "smoothing_in_forward", False)


def divide_input(module: nn.Module, args: tuple, kwargs: dict):
    """The forward pre-hook: the input (first positional argument, or by keyword) divided by s.
    Nothing on a module that divides in its forward (a qlib Linear holds the hook where it took
    over the hook dicts of the float Linear it replaced, which still uses them)."""
    if divides_in_forward(module):
        return None
    if args:
        return (smoothed_input(module, args[0]),) + tuple(args[1:]), kwargs
    key = input_key(kwargs)
    return (args, dict(kwargs, **{key: smoothed_input(module, kwargs[key])})) if key in kwargs else None


def _check_loaded_scale(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: a corrupt s (zero, negative, NaN, Inf) would give wrong
    outputs silently."""
    s = state_dict.get(prefix + BUFFER)
    if not isinstance(s, Tensor) or s.is_meta:
        return
    ok = (torch.isfinite(s) & (s > 0)).reshape(-1)
    if not bool(ok.all()):
        bad = s.detach().reshape(-1)[~ok][0].item()
        raise RuntimeError(f"{type(module).__name__}: state_dict[{prefix + BUFFER!r}] holds {bad}; SmoothQuant "
                           "scales must be positive and finite (a corrupt state_dict?)")


def is_smoothed(module: nn.Module) -> bool:
    return module._buffers.get(BUFFER) is not None


def attach(module: nn.Module, scale: Tensor) -> None:
    """Gives module the buffer s, its load check and, unless it divides in its forward, the hook."""
    module.register_buffer(BUFFER, scale)
    module.register_load_state_dict_pre_hook(_check_loaded_scale)
    settle_divide_input(module)


def settle_divide_input(module: nn.Module) -> None:
    """One divide_input hook on a smoothed float module, none on an unsmoothed one (a swap hands a
    module the hooks of the one it replaces). A module that divides in its forward keeps what it
    holds: the dicts may be shared with the module it replaced. torch.compile's guards skip
    module hooks by default, so a graph traced for an unsmoothed twin would run without the
    division: they are turned on here."""
    if divides_in_forward(module):
        return
    for key in [k for k, h in module._forward_pre_hooks.items() if h is divide_input]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
    if is_smoothed(module):
        if hasattr(torch._dynamo.config, "skip_nnmodule_hook_guards"):
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        module.register_forward_pre_hook(divide_input, with_kwargs=True, prepend=True)


def carry_smoothing(source: nn.Module, made: nn.Module) -> nn.Module:
    """made (a qlib Linear made from source) divides its input by source's s too."""
    if is_smoothed(source) and not is_smoothed(made):
        device = next(itertools.chain(made.parameters(), made.buffers())).device
        attach(made, source._buffers[BUFFER].detach().clone().to(device))
    return made
