"""CPU peers of qlib's 4-bit weight-only Linear for benchmarks/bench_linear_4bit.py.

Each ``make_*`` takes an ``nn.Linear`` (float32 weight [N, K]) and a group size G along K and
returns ``f(x) -> y`` (float32 out, any leading dims), or ``None`` where the peer is missing
here (package not installed, shape or group size unsupported). ``f.name`` labels it;
``f.w_ref`` is the float64 weight the peer really multiplies by; ``f.dtype`` its compute dtype.

aten_int4   torch.ops.aten._convert_weight_to_int4pack_for_cpu + _weight_int4pack_mm_for_cpu
            (what torchao runs on the CPU). torch 2.14 conventions: codes int32 [N, K] in
            0..15, N % 16 == 0, K even (innerKTiles is ignored on the CPU); G in {32, 64, 128,
            256}; scales_and_zeros [K/G, N, 2] = (scale, zero) in x's dtype, with
            w = (q - 8) * scale + zero; x 2-D. Only bfloat16 x has a vectorized kernel
            (float32 runs a scalar loop 20-60x slower), so it runs in bfloat16.
torchao     torchao (0.18) PrototypeInt4WeightOnlyConfig (the same ATen op; Int4WeightOnlyConfig
            needs CUDA or mslk); G in {32, 64, 128}; the layer cast to bfloat16.
bnb fused   bitsandbytes (0.50) Linear4bit, NF4, eval mode: on AVX512-BF16 CPUs the weight is
            repacked on the first call and a fused bfloat16 kernel runs.
bnb dequant bitsandbytes.matmul_4bit: dequantizes NF4 to x's dtype each call, then F.linear
            (float32 x only).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

ATEN_INT4_GROUP_SIZES = (32, 64, 128, 256)


def _tag(f: Callable, name: str, w_ref: Optional[torch.Tensor], dtype: torch.dtype) -> Callable:
    f.name = name
    f.w_ref = w_ref
    f.dtype = dtype
    return f


def _bias(linear: nn.Linear) -> Optional[torch.Tensor]:
    return None if linear.bias is None else linear.bias.detach().float().contiguous()


# ---------------------------------------------------------------------------
# plain-torch quantizers (so callers can reproduce / share the exact codes)
# ---------------------------------------------------------------------------


def quantize_int4_asym(w: torch.Tensor, group_size: int):
    """Asymmetric min/max int4 per group of G along K.

    Returns codes uint8 [N, K] in 0..15, scales float32 [N, K/G], zero_points float32
    [N, K/G] (integers in 0..15); dequant: (codes - zp) * scale.
    """
    n, k = w.shape
    assert k % group_size == 0
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    mn = wg.amin(-1).clamp(max=0.0)
    mx = wg.amax(-1).clamp(min=0.0)
    scale = ((mx - mn) / 15.0).clamp(min=1e-8)
    zp = torch.round(-mn / scale).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zp[..., None], 0, 15)
    return q.reshape(n, k).to(torch.uint8), scale, zp


def make_aten_int4(
    linear: nn.Linear,
    group_size: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    codes: Optional[torch.Tensor] = None,
    scales: Optional[torch.Tensor] = None,
    zero_points: Optional[torch.Tensor] = None,
) -> Optional[Callable]:
    """ATen _weight_int4pack_mm_for_cpu peer.

    By default quantizes linear.weight with quantize_int4_asym.  Alternatively pass
    codes [N, K] (0..15), scales [N, K/G] and zero_points [N, K/G] (None -> 8, i.e. symmetric
    codes = q + 8) to benchmark exactly the same quantized weight as another implementation.
    """
    op_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if op_mm is None:
        return None
    w = linear.weight.detach()
    n, k = w.shape
    if group_size not in ATEN_INT4_GROUP_SIZES or k % group_size or n % 16 or k % 2:
        return None
    if codes is None:
        codes, scales, zero_points = quantize_int4_asym(w, group_size)
    if zero_points is None:
        zero_points = torch.full_like(scales, 8.0)
    scales = scales.float()
    zero_points = zero_points.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    # [K/G, N, 2]: (scale, zero) with w = (q - 8) * scale + zero
    sz = torch.stack([scales, (8.0 - zero_points) * scales], dim=-1)  # [N, K/G, 2]
    sz = sz.transpose(0, 1).contiguous().to(compute_dtype)
    # what the kernel really multiplies by (scale/zero rounded to compute_dtype)
    s64 = sz[..., 0].double().t().repeat_interleave(group_size, dim=1)
    z64 = sz[..., 1].double().t().repeat_interleave(group_size, dim=1)
    w_ref = (codes.double() - 8.0) * s64 + z64
    b = _bias(linear)

    def f(x):
        shp = x.shape
        x2 = x.reshape(-1, k).to(compute_dtype).contiguous()
        y = op_mm(x2, packed, group_size, sz)
        if y.dtype != torch.float32:
            y = y.float()
        if b is not None:
            y = y + b
        return y.reshape(*shp[:-1], n)

    name = "aten int4 (%s)" % str(compute_dtype).replace("torch.", "")
    return _tag(f, name, w_ref, compute_dtype)


def make_torchao_int4(linear: nn.Linear, group_size: int) -> Optional[Callable]:
    try:
        import copy

        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
    except Exception:
        return None
    if group_size not in (32, 64, 128) or linear.in_features % group_size:
        return None
    m = copy.deepcopy(linear).to(torch.bfloat16)
    quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False))
    wt = m.weight
    n, k = wt.shape
    # recover the dequantized weight through the kernel itself: identity input
    with torch.inference_mode():
        eye = torch.eye(k, dtype=torch.bfloat16)
        w_ref = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, wt.qdata, group_size, wt.scale_and_zero)
        w_ref = w_ref[:, :n].double().t().contiguous()

    def f(x):
        return m(x.to(torch.bfloat16)).float()

    return _tag(f, "torchao int4 (bf16)", w_ref, torch.bfloat16)


def _bnb():
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF

        return bnb, bnbF
    except Exception:
        return None, None


def make_bnb_nf4_fused(linear: nn.Linear, group_size: int) -> Optional[Callable]:
    bnb, bnbF = _bnb()
    if bnb is None:
        return None
    n, k = linear.weight.shape
    try:
        l4 = bnb.nn.Linear4bit(k, n, bias=linear.bias is not None, compute_dtype=torch.float32,
                               compress_statistics=False, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(linear.weight.detach().float().clone(), requires_grad=False,
                                      blocksize=group_size, compress_statistics=False,
                                      quant_type="nf4", module=l4)
        if linear.bias is not None:
            l4.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        l4 = l4.to("cpu").eval()
        st = l4.weight.quant_state
        w_ref = bnbF.dequantize_4bit(l4.weight.data, st).double()  # before the CPU repack
        with torch.inference_mode():
            l4(torch.zeros(1, k))  # triggers the one-time AVX512-BF16 repack
    except Exception:
        return None
    fused = getattr(l4.weight.quant_state, "packing_format_for_cpu", False)

    def f(x):
        return l4(x)

    return _tag(f, "bnb nf4 Linear4bit " + ("(fused bf16)" if fused else "(dequant)"), w_ref,
                torch.bfloat16 if fused else torch.float32)


def make_bnb_nf4_dequant(linear: nn.Linear, group_size: int) -> Optional[Callable]:
    bnb, bnbF = _bnb()
    if bnb is None:
        return None
    try:
        w = linear.weight.detach().float().contiguous()
        q, st = bnbF.quantize_4bit(w, blocksize=group_size, compress_statistics=False, quant_type="nf4")
        w_ref = bnbF.dequantize_4bit(q, st).double()
    except Exception:
        return None
    b = _bias(linear)
    qt = q.t()

    def f(x):
        return bnb.matmul_4bit(x, qt, quant_state=st, bias=b)

    return _tag(f, "bnb nf4 matmul_4bit (dequant+fp32)", w_ref, torch.float32)
