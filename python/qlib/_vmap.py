"""torch.vmap batching rules of the fake-quant ops: one call on the whole batch, where functorch's
fallback called the op once per sample (per-sample gradients of a QAT model: vmap of grad). The
batch becomes x's leading dim; a batched scale or zero point gives one block per sample there,
an unbatched one a block over the whole batch (a one-element one stays per tensor)."""
from typing import Optional

import torch
from torch import Tensor

ops = torch.ops.qlib


def _leading(t: Tensor, dim: Optional[int], batch: int) -> Tensor:
    """t with the batch as its leading dim (expanded where t is not batched)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)


def _call(op, *args):
    """op(*args), its errors saying that their shapes and flat indices include the batch."""
    try:
        return op(*args)
    except RuntimeError as e:
        if type(e) is not RuntimeError:  # (out of memory, ...: as they are)
            raise
        raise RuntimeError(f"{e} (under torch.vmap: the shapes and flat indices include the batch, "
                           "as dim 0)") from e


def _sample_shape(t: Tensor, dim: Optional[int]) -> tuple[int, ...]:
    """The shape of one sample of t."""
    return tuple(t.shape) if dim is None else tuple(t.movedim(dim, 0).shape[1:])


def _qparams_blocking(x_rank: int, batch: int, scale: Tensor, s_dim: Optional[int], zp: Tensor,
                      z_dim: Optional[int], per_sample: bool) -> tuple[Tensor, Tensor]:
    """scale and zero_point blocking x of rank x_rank + 1 with the batch leading: unbatched ones
    (unless per_sample) over the whole batch, batched ones one block per sample."""
    if not per_sample and s_dim is None and z_dim is None:
        if scale.numel() == 1:  # (per tensor: the same block for every sample)
            return scale, zp
        return scale.unsqueeze(0), zp.unsqueeze(0)
    scale, zp = _leading(scale, s_dim, batch), _leading(zp, z_dim, batch)
    if scale[0].numel() == 1:  # (per tensor within each sample)
        return scale.reshape(batch, *[1] * x_rank), zp.reshape(batch, *[1] * x_rank)
    return scale, zp


def _fake_quant(info, in_dims, x, scale, zero_point, quant_min, quant_max):
    x_dim, s_dim, z_dim = in_dims[:3]
    x = _leading(x, x_dim, info.batch_size)
    s, z = _qparams_blocking(x.dim() - 1, info.batch_size, scale, s_dim, zero_point, z_dim, False)
    return _call(ops.fake_quant, x, s, z, quant_min, quant_max), 0


def _fake_quant_with_mask(info, in_dims, x, scale, zero_point, quant_min, quant_max):
    x_dim, s_dim, z_dim = in_dims[:3]
    x = _leading(x, x_dim, info.batch_size)
    s, z = _qparams_blocking(x.dim() - 1, info.batch_size, scale, s_dim, zero_point, z_dim, False)
    return _call(ops.fake_quant_with_mask, x, s, z, quant_min, quant_max), (0, 0)


def _fake_quant_backward(info, in_dims, grad, x, scale, zero_point, quant_min, quant_max,
                         scale_grad, zero_point_grad):
    g_dim, x_dim, s_dim, z_dim = in_dims[:4]
    B = info.batch_size
    grad, x = _leading(grad, g_dim, B), _leading(x, x_dim, B)
    # (The qparams' gradients are per sample: one block per sample, even for shared qparams.)
    per_sample = scale_grad or zero_point_grad
    s, z = _qparams_blocking(x.dim() - 1, B, scale, s_dim, zero_point, z_dim, per_sample)
    grad_x, grad_s, grad_z = _call(ops.fake_quant_backward, grad, x, s, z, quant_min, quant_max,
                                   scale_grad, zero_point_grad)
    # (Each sample's sums in its qparam's own shape; an output not asked for is not batched.)
    if scale_grad:
        grad_s = grad_s.reshape(B, *_sample_shape(scale, s_dim))
    if zero_point_grad:
        grad_z = grad_z.reshape(B, *_sample_shape(zero_point, z_dim))
    return (grad_x, grad_s, grad_z), (0, 0 if scale_grad else None, 0 if zero_point_grad else None)


def _fake_quant_mask_backward(info, in_dims, grad, mask):
    B = info.batch_size
    return _call(ops.fake_quant_mask_backward, _leading(grad, in_dims[0], B), _leading(mask, in_dims[1], B)), 0


for _name, _rule in (("fake_quant", _fake_quant), ("fake_quant_with_mask", _fake_quant_with_mask),
                     ("fake_quant_backward", _fake_quant_backward),
                     ("fake_quant_mask_backward", _fake_quant_mask_backward)):
    torch.library.register_vmap(f"qlib::{_name}", _rule)
