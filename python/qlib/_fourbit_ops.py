"""Fakes and typed wrappers of the 4-bit ops (linear_4bit's autograd is in csrc/fourbit_autograd.cpp).

Schemas live in csrc/schemas.cpp (block `// 4-bit weights`); the formulas in csrc/quant_math.h
("4-bit codebooks"); kernels in csrc/fourbit_cpu.cpp and cuda/fourbit_cuda.cu.

Scheme (documented contract): a weight [N, K] is cut into blocks of ``block_size`` weights
along K (a row's last block may be shorter). Each block keeps ``absmax`` = max |w| (float32);
each weight keeps the 4-bit index of the codebook value nearest ``w / absmax`` (a tie goes to
the lower value; an all-zero block takes the value nearest 0), decided against the midpoints
``0.5 a + 0.5 b`` rounded to float32 (as bitsandbytes' NF4 thresholds). Codes are packed two a
byte along K, the even k in the low nibble: ``packed`` is uint8 [N, ceil(K / 2)], ``absmax``
float32 [N, ceil(K / block_size)]. Dequantized, a weight is ``codebook[code] * absmax`` in
float32. ``quantize_4bit`` checks the codebook (finite, strictly increasing) and the weight
(finite); ``dequantize_4bit`` and ``linear_4bit`` take any 16 floats without reading them, so
a NaN in a codebook or absmax gives NaN outputs (``Linear4bit`` checks both when it loads a
state_dict).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._fakes import register_fake
from ._load import _C  # (loads qlib._C, or says how to build it)

ops = torch.ops.qlib

# NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1), 8 positive and 7 negative, plus 0,
# scaled to [-1, 1]; the values bitsandbytes uses.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Symmetric int4: k / 7 for k = -8..7, so that codes are round(7 * w / absmax) (-8 unused).
INT4 = tuple(k / 7 for k in range(-8, 8))
# The integers -8..7: the codebook of Linear4bit.from_qat, whose absmax then holds an affine
# scale (the QAT step), so that decoded weights are q * scale, as fake_quant gives them.
INT_GRID = tuple(float(k) for k in range(-8, 8))

CodebookLike = Union[str, Tensor]


def codebook_4bit(codebook: CodebookLike = "nf4", device=None) -> Tensor:
    """The float32 [16] codebook named ``"nf4"`` or ``"int4"``, or ``codebook`` itself (16
    increasing values, e.g. from k-means) as float32 on ``device``."""
    if isinstance(codebook, str):
        values = {"nf4": NF4, "int4": INT4}.get(codebook.lower())
        if values is None:
            raise ValueError(f"qlib.codebook_4bit: unknown codebook {codebook!r}; use 'nf4', 'int4' or a tensor of "
                             "16 values ('kmeans' is fitted to a weight: Linear4bit.from_float or fit_codebook_4bit)")
        return torch.tensor(values, dtype=torch.float32, device=device)
    if not isinstance(codebook, Tensor):
        raise TypeError(f"qlib.codebook_4bit: codebook must be a name or a Tensor, got {type(codebook).__name__}")
    # A copy: a module buffer must not share the caller's storage.
    return codebook.detach().to(device=device if device is not None else codebook.device, dtype=torch.float32,
                                copy=True).contiguous()


def _ceil_div(a, b):
    return (a + b - 1) // b


@torch.no_grad()
def fit_codebook_4bit(w: Tensor, block_size: int = 64, bins: int = 4096, max_iters: int = 200) -> Tensor:
    """A float32 [16] codebook fitted to ``w`` (2-D, finite): weighted 1-D k-means (Lloyd) over
    ``w / absmax`` of its blocks, each value weighted by absmax^2, so that it minimises the
    squared error of the dequantized weight. The values are first gathered in ``bins`` equal
    bins over [-1, 1] (sums per bin, so a bin moves as one point); NF4 is the start, and the
    values end strictly increasing. All-zero blocks carry no weight; an all-zero or empty w
    gives NF4."""
    who = "qlib.fit_codebook_4bit"
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{who}: w must be a 2-D floating tensor, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}"
                         f"{' of ' + str(w.dtype) if isinstance(w, Tensor) else ''}")
    if int(block_size) < 1 or int(bins) < 16:
        raise ValueError(f"{who}: block_size must be >= 1 and bins >= 16, got {block_size} and {bins}")
    if w.numel() == 0:
        return codebook_4bit("nf4", w.device)
    if w.is_meta:
        raise ValueError(f"{who}: w is on the meta device; a fitted codebook needs the weight's values")
    N, K = w.shape
    bs, kb = int(block_size), _ceil_div(K, int(block_size))
    mass = torch.zeros(bins, dtype=torch.float64, device=w.device)  # sum of absmax^2 per bin
    moment = torch.zeros_like(mass)                                 # sum of absmax^2 * v per bin
    step = max(1, (1 << 20) // K)
    for r0 in range(0, N, step):
        rows = w[r0:r0 + step].float()
        if not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).flatten().nonzero()[0])
            raise ValueError(f"{who}: w holds a non-finite value ({rows.flatten()[bad].item()}) at "
                             f"[{r0 + bad // K}, {bad % K}]")
        blocks = torch.nn.functional.pad(rows, (0, kb * bs - K)).view(-1, kb, bs)
        absmax = blocks.abs().amax(-1, keepdim=True)
        keep = (absmax > 0).expand_as(blocks).clone()
        keep[:, -1, K - (kb - 1) * bs:] = False  # the last block's padding
        v = (blocks / absmax)[keep]  # the same float32 division as codebook_code
        weight = absmax.double().square().expand_as(blocks)[keep]  # (float32 overflows past 1.8e19)
        index = ((v.double() + 1) * (bins / 2)).floor().clamp_(0, bins - 1).long()
        mass += torch.bincount(index, weight, minlength=bins)
        moment += torch.bincount(index, weight * v.double(), minlength=bins)
    centers = torch.tensor(NF4, dtype=torch.float64, device=w.device)
    used = mass > 0
    points, mass, moment = moment[used] / mass[used], mass[used], moment[used]
    for _ in range(max_iters if points.numel() else 0):
        cluster = torch.bucketize(points, 0.5 * (centers[:-1] + centers[1:]))  # ties to the lower value
        total = torch.zeros(16, dtype=torch.float64, device=w.device).index_add_(0, cluster, mass)
        first = torch.zeros_like(total).index_add_(0, cluster, moment)
        updated = torch.where(total > 0, first / total.clamp_min(1e-300), centers)
        if torch.equal(updated, centers):
            break
        centers = updated
    values = centers.sort().values.float().cpu().tolist()
    for j in range(1, 16):  # strictly increasing, as the ops require
        if values[j] <= values[j - 1]:
            values[j] = float(torch.nextafter(torch.tensor(values[j - 1], dtype=torch.float32),
                                              torch.tensor(2.0, dtype=torch.float32)))
    return torch.tensor(values, dtype=torch.float32, device=w.device)


@register_fake("qlib::quantize_4bit")
def _(w, codebook, block_size):
    _C.check_quantize_4bit_args(w, codebook, block_size)
    n, k = w.shape
    return (w.new_empty((n, _ceil_div(k, 2)), dtype=torch.uint8),
            w.new_empty((n, _ceil_div(k, block_size)), dtype=torch.float32))


@register_fake("qlib::dequantize_4bit")
def _(packed, absmax, codebook, in_features, block_size, dtype):
    _C.check_dequantize_4bit_args(packed, absmax, codebook, in_features, block_size, dtype)
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


@register_fake("qlib::linear_4bit")
def _(x, packed, absmax, codebook, block_size, bias):
    _C.check_linear_4bit_args(x, packed, absmax, codebook, block_size, bias)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _op_codebook(codebook: CodebookLike, device) -> Tensor:
    """The codebook for the ops' wrappers: a tensor that requires grad keeps its autograd link
    (converted, not detached), so that dequantize_4bit / linear_4bit raise as documented rather
    than drop its gradient silently."""
    if isinstance(codebook, Tensor) and codebook.requires_grad:
        return codebook.to(device=device, dtype=torch.float32).contiguous()
    return codebook_4bit(codebook, device)


def quantize_4bit(w: Tensor, codebook: CodebookLike = "nf4", block_size: int = 64) -> Tuple[Tensor, Tensor]:
    """(packed uint8 [N, ceil(K / 2)], absmax float32 [N, ceil(K / block_size)]) of a finite
    float weight [N, K]; see the module docstring for the scheme."""
    return ops.quantize_4bit(w, codebook_4bit(codebook, w.device), block_size)


def dequantize_4bit(packed: Tensor, absmax: Tensor, codebook: CodebookLike, in_features: int,
                    block_size: int = 64, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight [N, in_features] as ``codebook[code] * absmax`` (float32 math) in ``dtype``."""
    return ops.dequantize_4bit(packed, absmax, _op_codebook(codebook, packed.device), in_features, block_size, dtype)


def linear_4bit(x: Tensor, packed: Tensor, absmax: Tensor, codebook: CodebookLike, block_size: int = 64,
                bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W_hat.T + bias`` with the 4-bit weight, in x's dtype; any leading dims;
    differentiable in x and bias. Few rows (up to 32 on the CPU, 4 on CUDA) run one fused
    kernel that decodes the weight as it reads it, in float32. More rows decode W_hat and run
    the device's GEMM: in x's dtype on CUDA (W_hat and the bias rounded to it), in float32 on
    the CPU, except that a bfloat16 x multiplies W_hat rounded to bfloat16 where the CPU has
    AVX512-BF16 and the blocks are multiples of 32 (3 to 256 rows on the AMX tile unit where
    it has AMX-BF16), with float32 sums (more than 24 such rows: ATen's bfloat16 GEMM, the bias
    rounded to bfloat16). ``packed`` holds ceil(K / 2) bytes a row, so for an even K an x of
    K - 1 features fits it too (the weight's last column then goes unused): ``Linear4bit``
    checks x against its ``in_features``."""
    return ops.linear_4bit(x, packed, absmax, _op_codebook(codebook, packed.device), block_size, bias)


def fourbit_cpu_kernels() -> List[str]:
    """Names of the 4-bit CPU kernel families this CPU can run, each running what the one
    before does plus its own: 'scalar', 'avx512' (float32 decode and dots), 'avx512-bf16'
    (bfloat16 W_hat and vdpbf16ps for a bfloat16 x), 'amx-bf16' (a bfloat16 x of 3 to 256
    rows on the AMX tile unit); ``build_info()["fourbit_cpu_kernel"]`` is the one in use (the
    best, unless set or named by ``QLIB_FOURBIT_CPU_KERNEL``)."""
    from . import _C

    return list(_C.fourbit_cpu_kernels())


def set_fourbit_cpu_kernel(name: str) -> None:
    """Use the 4-bit CPU kernel family ``name`` ('auto' = the best this CPU runs); for
    benchmarks and tests."""
    from . import _C

    _C.set_fourbit_cpu_kernel(str(name))
