"""Fake (meta) implementations of the observer ops (schemas in csrc/schemas.cpp).

x is [blocks, elements per block]; hist is int64 [blocks, bins] on the
canonical grid of range (float64 [blocks, 2]: min and max binned so far).
"""
import torch

from ._load import _C  # (loads qlib._C, or says how to build it)
from ._fakes import register_fake


@register_fake("qlib::block_minmax")
def _(x):
    _C.check_block_minmax_args(x)
    r = x.shape[0]
    return (
        x.new_empty((r,), dtype=torch.float32),
        x.new_empty((r,), dtype=torch.float32),
        x.new_empty((), dtype=torch.int64),
    )


@register_fake("qlib::minmax_observe")
def _(x, min_val, max_val, observed, nonfinite, averaging_constant):
    _C.check_minmax_observe_args(x, min_val, max_val, observed, nonfinite, averaging_constant)
    return None


@register_fake("qlib::observer_qparams")
def _(min, max, quant_min, quant_max, symmetric, eps):
    _C.check_choose_qparams_args("qlib::observer_qparams", min, max, quant_min, quant_max, eps)
    return min.new_empty(min.shape, dtype=torch.float32), min.new_empty(min.shape, dtype=torch.int32)


@register_fake("qlib::histogram_observe")
def _(x, hist, range, absolute):
    _C.check_histogram_observe_args(x, hist, range)
    return hist.new_empty(hist.shape), range.new_empty(range.shape), x.new_empty((), dtype=torch.int64)


@register_fake("qlib::histogram_observe_in_place")
def _(x, hist, range, observed, nonfinite, absolute):
    _C.check_histogram_observe_in_place_args(x, hist, range, observed, nonfinite)
    return None


@register_fake("qlib::histogram_rebin")
def _(hist, range, new_range):
    _C.check_histogram_op_args("qlib::histogram_rebin", hist, range, new_range, None, None, None)
    return hist.new_empty(hist.shape)


@register_fake("qlib::histogram_quantile")
def _(hist, range, q):
    _C.check_histogram_op_args("qlib::histogram_quantile", hist, range, None, q, None, None)
    return hist.new_empty((hist.shape[0],), dtype=torch.float32)


@register_fake("qlib::histogram_mse_search")
def _(hist, range, quant_min, quant_max, symmetric, num_candidates):
    _C.check_histogram_op_args("qlib::histogram_mse_search", hist, range, None, None,
                               (quant_min, quant_max, num_candidates), None)
    r = hist.shape[0]
    return hist.new_empty((r,), dtype=torch.float32), hist.new_empty((r,), dtype=torch.float32)


@register_fake("qlib::histogram_entropy_search")
def _(hist, range, num_levels):
    _C.check_histogram_op_args("qlib::histogram_entropy_search", hist, range, None, None, None, num_levels)
    r = hist.shape[0]
    return hist.new_empty((r,), dtype=torch.float32), hist.new_empty((r,), dtype=torch.float32)
