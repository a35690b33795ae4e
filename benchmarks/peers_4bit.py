"""CPU benchmark peers for a 4-bit weight-only Linear (weights [N, K], group-wise scales).

Every ``make_*`` function takes an ``nn.Linear`` (float32 weight [N, K], optional bias)
and a group size G (along K) and returns a callable ``f(x) -> y`` (x: float32 [..., K],
y: float32 [..., N]), or ``None`` when the peer is unavailable here (package missing,
unsupported shape/group size).  Each returned callable carries:

  f.name      short label
  f.w_ref     float64 [N, K] weight that the peer *actually* multiplies by (its own
              dequantized weight), so ``x @ f.w_ref.T + b`` checks the call
              conventions independently of the 4-bit quantization error.
  f.dtype     dtype the matmul runs in (torch.float32 / torch.bfloat16)

Peers
-----
fp32            F.linear with the float32 weight (the dense baseline).
aten_int4       torch.ops.aten._convert_weight_to_int4pack_for_cpu +
                torch.ops.aten._weight_int4pack_mm_for_cpu (torchao's CPU "tinygemm").
                Conventions (torch 2.14, x86):
                  * codes: int32 [N, K], values 0..15, N % 16 == 0, K even;
                    innerKTiles argument is ignored on CPU (packing identical for any value),
                    packed result is uint8 [N, K/2].
                  * qGroupSize in {32, 64, 128, 256}; K % G == 0.
                  * scales_and_zeros: [K/G, N, 2], [..., 0] = scale, [..., 1] = zero,
                    same dtype as x; dequant is  w = (q - 8) * scale + zero
                    (so an integer zero point zp maps to zero = (8 - zp) * scale).
                  * x: 2-D contiguous, float32 / float16 / bfloat16; output has x's dtype.
                    Only bfloat16 has a vectorized (AVX512/AVX2) kernel on x86;
                    float32/float16 use a scalar reference loop (~100x slower).
aten_int4_fp32  same op with float32 x / scales (the slow scalar path), for reference.
aten_dyn_quant  torch.ops.aten._dyn_quant_pack_4bit_weight / _dyn_quant_matmul_4bit.
                KleidiAI (ARM) op; on x86 torch.backends.kleidiai.is_available() is False
                and it runs a scalar reference fallback that also quantizes the activations
                to int8 per row (so it is W4A8, not weight-only).  Symmetric weights:
                codes uint8 = q + 8 (q in -8..7), packed low nibble = even k -> uint8
                [N, K/2]; scales [N, K/G] (bf16 for KleidiAI groupwise, fp32 otherwise);
                x float32 (bf16 only when G == K).  Bias is ignored by the x86 groupwise
                fallback, so it is added outside.
torchao_int4    torchao (0.18) PrototypeInt4WeightOnlyConfig -> Int4OpaqueTensor, which calls
                the same ATen CPU op; G in {32, 64, 128}; model cast to bfloat16.
                (torchao's Int4WeightOnlyConfig needs mslk / CUDA and does not run on CPU.)
bnb_nf4_fused   bitsandbytes (0.50) Linear4bit, NF4, eval mode: on AVX512-BF16 CPUs the weight
                is repacked on the first forward and a native fused kernel runs in bf16.
bnb_nf4_dequant bitsandbytes.matmul_4bit functional path: dequantize NF4 to x.dtype each call,
                then F.linear (fp32).

Run ``python benchmarks/peers_4bit.py`` for a self-check (errors + timings).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def quantize_int4_sym(w: torch.Tensor, group_size: int):
    """Symmetric absmax int4 per group: q in -8..7, returns (q int8 [N, K], scales [N, K/G])."""
    n, k = w.shape
    assert k % group_size == 0
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    scale = (wg.abs().amax(-1) / 7.0).clamp(min=1e-8)
    q = torch.clamp(torch.round(wg / scale[..., None]), -8, 7)
    return q.reshape(n, k).to(torch.int8), scale


# ---------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------


def make_fp32(linear: nn.Linear, group_size: Optional[int] = None) -> Callable:
    w = linear.weight.detach().float().contiguous()
    b = _bias(linear)

    def f(x):
        return F.linear(x, w, b)

    return _tag(f, "fp32 F.linear", w.double(), torch.float32)


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


def make_aten_int4_fp32(linear: nn.Linear, group_size: int) -> Optional[Callable]:
    return make_aten_int4(linear, group_size, compute_dtype=torch.float32)


def make_aten_dyn_quant(linear: nn.Linear, group_size: int) -> Optional[Callable]:
    """KleidiAI W4A8 op; reference scalar fallback on x86 (slow, activations -> int8)."""
    if not hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit"):
        return None
    w = linear.weight.detach()
    n, k = w.shape
    if not (group_size == k or (group_size % 32 == 0 and k % group_size == 0)) or k % 2:
        return None
    q, scales = quantize_int4_sym(w, group_size)
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    packed_u8 = ((u[:, 1::2] << 4) | u[:, 0::2]).contiguous()  # [N, K/2], low nibble = even k
    kleidi = torch.backends.kleidiai.is_available()
    s_dtype = torch.bfloat16 if (kleidi and group_size < k) else torch.float32
    s = scales.to(s_dtype)
    pw = torch.ops.aten._dyn_quant_pack_4bit_weight(packed_u8, s, None, group_size, k, n)
    w_ref = q.double() * s.double().repeat_interleave(group_size, dim=1)
    b = _bias(linear)

    def f(x):
        shp = x.shape
        y = torch.ops.aten._dyn_quant_matmul_4bit(x.reshape(-1, k).float().contiguous(), pw, group_size, k, n)
        if b is not None:
            y = y + b
        return y.reshape(*shp[:-1], n)

    return _tag(f, "aten dyn_quant W4A8" + ("" if kleidi else " (x86 ref fallback)"), w_ref, torch.float32)


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


PEERS = {
    "fp32": make_fp32,
    "aten_int4": make_aten_int4,
    "aten_int4_fp32": make_aten_int4_fp32,
    "aten_dyn_quant": make_aten_dyn_quant,
    "torchao_int4": make_torchao_int4,
    "bnb_nf4_fused": make_bnb_nf4_fused,
    "bnb_nf4_dequant": make_bnb_nf4_dequant,
}


def make_peers(linear: nn.Linear, group_size: int) -> dict:
    """All peers available here: {key: f}."""
    out = {}
    for key, mk in PEERS.items():
        f = mk(linear, group_size)
        if f is not None:
            out[key] = f
    return out


def time_median_ms(f: Callable, x: torch.Tensor, iters: int = 20, warmup: int = 3):
    """(median_ms, min_ms) over `iters` calls after `warmup`; fewer iters for very slow peers."""
    for _ in range(warmup):
        f(x)
    t0 = time.perf_counter()
    f(x)
    if time.perf_counter() - t0 > 0.2:
        iters = 3
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def _max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    K, N, G = 768, 3072, 128
    lin = nn.Linear(K, N)
    b64 = lin.bias.detach().double()
    w64 = lin.weight.detach().double()
    print("torch", torch.__version__, "| cpu capability", torch.backends.cpu.get_cpu_capability(),
          "| kleidiai", torch.backends.kleidiai.is_available(), "| threads", torch.get_num_threads())
    for mod in ("torchao", "bitsandbytes"):
        try:
            print(mod, __import__(mod).__version__)
        except Exception:
            print(mod, "not importable")
    with torch.inference_mode():
        peers = make_peers(lin, G)
        print(f"K={K} N={N} G={G}; err_fp = max|y - (x W^T + b)| / max|ref| (float64, original W);"
              " err_own = same vs the peer's own dequantized weight (convention check)")
        print(f"{'M':>4} {'peer':38} {'dtype':9} {'err_fp':>9} {'err_own':>9} {'median ms':>10} {'min ms':>9}")
        for M in (1, 16, 128):
            x = torch.randn(M, K)
            ref_fp = x.double() @ w64.T + b64
            for key, f in peers.items():
                y = f(x)
                assert y.shape == (M, N) and y.dtype == torch.float32, (key, y.shape, y.dtype)
                err_fp = _max_rel(y, ref_fp)
                err_own = _max_rel(y, x.double() @ f.w_ref.T + b64)
                med, mn = time_median_ms(f, x)
                print(f"{M:>4} {f.name:38} {str(f.dtype).replace('torch.', ''):9} "
                      f"{err_fp:9.2e} {err_own:9.2e} {med:10.3f} {mn:9.3f}")


if __name__ == "__main__":
    main()
