"""register_fake for the qlib ops: the fake (meta) implementation, after a check that every
tensor argument is on one device. The C++ kernels check devices, but a meta tensor among CPU
ones dispatches to the fake alone, which would hand back an uninitialised CPU tensor."""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def register_fake(name: str):
    def wrap(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            devices = {t.device for t in tensors}
            if len(devices) > 1:
                raise RuntimeError(f"{name}: expected all tensors on one device, got "
                                   f"{', '.join(str(t.device) for t in tensors)}")
            return fn(*args, **kwargs)

        return torch.library.register_fake(name)(checked)

    return wrap
