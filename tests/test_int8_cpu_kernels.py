"""The int8 CPU kernel families (qlib.set_int8_cpu_kernel): every one this CPU runs is
exact, packed weights carry their layout, and the whole int8 suite passes with the VNNI
layout (run with AVX2 ops where the CPU has no VNNI). 'amx' (AMX-INT8 tiles) is tested
where the CPU has it."""
import os
import subprocess
import sys

import pytest
import torch

import qlib
from conftest import kernel_family_fixture
from qlib.nn import Int8Linear

ops = torch.ops.qlib
MAX_K = 2**17 - 1
KERNELS = qlib.int8_cpu_kernels()


def current():
    return qlib.build_info()["int8_cpu_kernel"]


kernel = kernel_family_fixture(KERNELS, qlib.set_int8_cpu_kernel)


def ref_gemm(a, b):
    return a.long() @ b.long().T


def test_kernel_names_and_errors():
    assert {"avx2", "vnni-emulated"} <= set(KERNELS)
    best = current()
    assert best in KERNELS
    with pytest.raises(RuntimeError, match="unknown kernel 'avx9'; expected 'auto' or one of avx2"):
        qlib.set_int8_cpu_kernel("avx9")
    for name in ("avx-vnni", "avx512-vnni", "amx"):
        if name not in KERNELS:
            with pytest.raises(RuntimeError, match=f"this CPU cannot run the '{name}' kernel; it can run: avx2"):
                qlib.set_int8_cpu_kernel(name)
    assert current() == best  # a refused name changes nothing


@pytest.mark.parametrize("M", [1, 6, 7, 8, 12, 14, 18, 33, 95, 96, 97])
@pytest.mark.parametrize("K", [1, 3, 5, 30, 1027])
def test_gemm_exact_every_kernel(kernel, M, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (21, K), dtype=torch.int8, generator=g)
    a[0, 0], b[0, 0] = -128, -128
    assert torch.equal(ops.int8_gemm(a, b).long(), ref_gemm(a, b))
    assert torch.equal(ops.int8_gemm(a[::2], b.t().contiguous().t()).long(), ref_gemm(a[::2], b))


@pytest.mark.parametrize("threads", [4, 5])
def test_packed_tiles_at_any_thread_count(kernel, threads):
    """The packed kernels give each thread a lane of neighbouring tiles and let it take what the
    others leave: every tile once, at more threads than cores, lanes of unequal length (18 tiles
    over 4 or 5 threads) and fewer tiles than threads (one). Int8Linear's output must equal the
    one-thread output bit for bit (the int32 sums are exact)."""
    g = torch.Generator().manual_seed(threads)
    cases = []
    for M, K, N in [(3, 300, 1100), (16, 64, 33), (130, 200, 530), (1, 40, 16)]:
        mod = Int8Linear.from_float(torch.nn.Linear(K, N))
        cases.append((mod, torch.randn(M, K, generator=g)))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = [mod(x) for mod, x in cases]
        torch.set_num_threads(threads)
        for _ in range(3):
            for (mod, x), r in zip(cases, ref):
                assert torch.equal(mod(x), r)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("M", [16, 40])
def test_gemm_k_boundary_packed_every_kernel(kernel, M):
    """The packed kernels (M = 16: two 8-row panels under the zmm step, 6 + 6 + 4 under the others). With the VNNI layout
    A is stored as a + 128 and its int32 sums wrap; the exact result must still come back at
    the longest K."""
    N = 5
    a = torch.where(torch.rand(M, MAX_K) < 0.5, -128, 127).to(torch.int8)
    b = torch.where(torch.rand(N, MAX_K) < 0.5, -128, 127).to(torch.int8)
    a[0], b[0] = -128, -128  # (-128)(-128)K = 2^31 - 2^14
    a[1], b[1] = 127, -128
    c = ops.int8_gemm(a, b)
    assert c[0, 0].item() == 2**31 - 2**14 and c[1, 1].item() == -127 * 128 * MAX_K
    assert torch.equal(c.long(), ref_gemm(a, b))


@pytest.mark.skipif("avx512-vnni" not in KERNELS, reason="needs AVX512-VNNI")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zmm_activation_codes_match_avx2(dtype):
    """The zmm kernels (avx512-vnni, amx) quantize activation rows on zmm, the others on AVX2,
    row-major or straight into the packed kernels' A panels: the same codes and scales bit for
    bit (NaN, Inf and huge values, rows of K around the 16- and 64-value steps, static zero
    points), so every kernel's int8_linear gives the same bits, packed weight or not."""
    g = torch.Generator().manual_seed(7)
    zmm = [k for k in ("avx512-vnni", "amx") if k in KERNELS]
    try:
        for M, K in [(1, 1), (3, 5), (7, 16), (5, 17), (2, 63), (9, 64), (4, 65), (6, 130), (33, 768), (3, 1000)]:
            x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 100
            x[0, 0] = float("nan")
            x[-1, -1] = float("inf") if M > 1 else x[-1, -1]
            x[M // 2, K // 2] = -1e30 if M > 2 else x[M // 2, K // 2]
            x = x.to(dtype)
            w = torch.randint(-128, 128, (9, K), dtype=torch.int8, generator=g)
            s = torch.rand(9, generator=g) + 0.1
            static = [(), (torch.tensor(0.05), torch.tensor(-3, dtype=torch.int32), -128, 127),
                      (torch.tensor(0.3), torch.tensor(100, dtype=torch.int32), 0, 127)]
            outs = {}
            for name in ["avx2", *zmm]:
                qlib.set_int8_cpu_kernel(name)
                packed = ops.int8_pack_weight(w)
                ys = [ops.int8_linear(x, w, s, None, *a) for a in static]
                ys += [ops.int8_linear_packed(x, packed, w, s, None, *a) for a in static]
                outs[name] = (ops.quantize_per_token(x), ys)
            (q0, s0), y0 = outs["avx2"]
            for name in zmm:
                (q1, s1), y1 = outs[name]
                assert torch.equal(q0, q1) and torch.equal(s0.nan_to_num(-1), s1.nan_to_num(-1)), (name, M, K)
                for a, b in zip(y0, y1):
                    assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)), (name, M, K)
    finally:
        qlib.set_int8_cpu_kernel("auto")


@pytest.mark.parametrize("M", [5, 16, 48])
def test_linear_k_boundary_every_kernel(kernel, M):
    """int8_linear at the longest K, with codes of +-127 against weights of -128 / 127: the
    kernels on the plain weight (QLIB_INT8_PACKED_COPY=0 reruns this file) take x + 128 and
    w's row sums through int32 sums that wrap; the result must still be exact."""
    N = 7
    x = torch.where(torch.rand(M, MAX_K) < 0.5, -1.0, 1.0)
    x[0], x[1] = 1.0, -1.0
    w = torch.where(torch.rand(N, MAX_K) < 0.5, -128, 127).to(torch.int8)
    w[0], w[1] = -128, 127
    s = torch.rand(N) + 0.5
    q, sx = ops.quantize_per_token(x)
    ref = (q.long() @ w.long().T).double() * sx.double() * s.double()
    for y in (ops.int8_linear(x, w, s, None), ops.int8_linear_packed(x, ops.int8_pack_weight(w), w, s, None)):
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("M", [1, 5, 40])
def test_linear_exact_every_kernel(kernel, M):
    """Packed and unpacked int8_linear, dynamic and static with a zero point, against the
    exact integer sums."""
    K, N = 67, 29
    x = torch.randn(M, K) * 3
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_scale = torch.rand(N) * 0.01 + 1e-3
    packed = ops.int8_pack_weight(w)
    q, s = ops.quantize_per_token(x)
    ref = (q.long() @ w.long().T).double() * s.double() * w_scale.double()
    for y in (ops.int8_linear(x, w, w_scale, None), ops.int8_linear_packed(x, packed, w, w_scale, None)):
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    act_scale, z = torch.tensor(0.05), torch.tensor(-100, dtype=torch.int32)
    qs = qlib.quantize(x, act_scale, z, -128, 127)
    ref = ((qs.long() + 100) @ w.long().T).double() * 0.05 * w_scale.double()
    for y in (ops.int8_linear(x, w, w_scale, None, act_scale, z, -128, 127),
              ops.int8_linear_packed(x, packed, w, w_scale, None, act_scale, z, -128, 127)):
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_packed_weight_from_another_kernel_runs_exactly():
    """A weight packed under one kernel (say, inside an exported program made on another
    machine) runs with the AVX2 kernel of its own layout: same numbers, a warning."""
    w = torch.randint(-127, 128, (20, 70), dtype=torch.int8)
    x, s = torch.randn(40, 70), torch.rand(20) + 0.5
    z = torch.tensor(-7, dtype=torch.int32)
    ref = ops.int8_linear(x, w, s, None)
    ref_static = ops.int8_linear(x, w, s, None, torch.tensor(0.03), z, -128, 127)
    try:
        for pack_with in KERNELS:  # every layout this CPU packs, run by every other kernel
            for run_with in KERNELS:
                qlib.set_int8_cpu_kernel(pack_with)
                packed = ops.int8_pack_weight(w)
                qlib.set_int8_cpu_kernel(run_with)
                for m in (40, 3):  # (amx hands M < 8 to its VNNI step)
                    assert torch.equal(ops.int8_linear_packed(x[:m], packed, w, s, None), ref[:m])
                    assert torch.equal(
                        ops.int8_linear_packed(x[:m], packed, w, s, None, torch.tensor(0.03), z, -128, 127),
                        ref_static[:m])
        qlib.set_int8_cpu_kernel("avx2")
        packed = ops.int8_pack_weight(w)
        qlib.set_int8_cpu_kernel("vnni-emulated")
        assert not torch.equal(ops.int8_pack_weight(w), packed)  # the layouts differ
    finally:
        qlib.set_int8_cpu_kernel("auto")


def test_kernel_warnings_go_through_python_warnings():
    """The kernels' warnings are Python UserWarnings at the caller's line (filters, pytest.warns
    and -W error see them; a TORCH_WARN inside a torch.ops call went to stderr only); a filter
    that makes one an error makes the op raise it."""
    import warnings

    w = torch.randint(-128, 128, (20, 70), dtype=torch.int8)
    x, s = torch.randn(3, 70), torch.rand(20) + 0.5
    other = "vnni-emulated" if current() == "avx2" else "avx2"
    try:
        qlib.set_int8_cpu_kernel(other)
        packed = ops.int8_pack_weight(w)
        qlib.set_int8_cpu_kernel("auto")
        with pytest.warns(UserWarning, match="packed for another int8 CPU kernel") as rec:
            ops.int8_linear_packed(x, packed, w, s, None)
        assert rec[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(RuntimeError, match="packed for another int8 CPU kernel.*turned into an error"):
                ops.int8_linear_packed(x, packed, w, s, None)
        w2 = w.clone()
        w2[::2] = -w2[::2]  # other values on the fingerprint's grid
        with pytest.warns(UserWarning, match="w_int8 holds other values than the weight w_packed was packed from"):
            y = ops.int8_linear_packed(x, ops.int8_pack_weight(w), w2, s, None)
        assert torch.equal(y, ops.int8_linear(x, w2, s, None))
    finally:
        qlib.set_int8_cpu_kernel("auto")


def test_packed_weight_is_checked():
    """A corrupt packing (its tag, its panels), a cut one, one of another shape or device: an
    error naming the op, with or without w_int8."""
    w = torch.randint(-127, 128, (20, 70), dtype=torch.int8)
    x, s = torch.randn(3, 70), torch.ones(20)
    packed = ops.int8_pack_weight(w)
    # The tag's magic, layout and K (K = 71 may have K = 70's size: then the shape tells).
    bad = "its tag is corrupt|holds a weight of shape \\[20, 71\\]|do not match w_packed, a weight of shape \\[20, 71\\]"
    for byte in (-32, -28, -20):
        corrupt = packed.clone()
        corrupt[byte] += 1
        for w_arg in (w, None):
            with pytest.raises(RuntimeError, match=f"qlib::int8_linear_packed: .*({bad})"):
                ops.int8_linear_packed(x, corrupt, w_arg, s, None)
        with pytest.raises(RuntimeError, match=f"qlib::int8_unpack_weight: .*({bad})"):
            ops.int8_unpack_weight(corrupt, 20, 70)
    for w_arg in (w, None):
        with pytest.raises(RuntimeError, match="its tag is corrupt|is not a CPU int8_pack_weight output"):
            ops.int8_linear_packed(x, packed[:-1], w_arg, s, None)
        with pytest.raises(RuntimeError, match="not a CPU int8_pack_weight output"):
            ops.int8_linear_packed(x, packed[::2], w_arg, s, None)
    # (The AMX layout pads K to 64, so there K = 66 has K = 70's size and the tag tells.)
    with pytest.raises(RuntimeError, match=r"w_packed holds a weight of shape \[20, 66\], not \[20, 70\]"):
        ops.int8_linear_packed(x, ops.int8_pack_weight(w[:, :66]), w, s, None)
    with pytest.raises(RuntimeError, match=r"x of shape \[3, 70\] and w_scale of shape \[20\] do not match w_packed, "
                                           r"a weight of shape \[20, 66\]"):
        ops.int8_linear_packed(x, ops.int8_pack_weight(w[:, :66]), None, s, None)
    with pytest.raises(RuntimeError, match=r"do not match w_packed"):
        ops.int8_linear_packed(x, packed, None, s[:19], None)
    with pytest.raises(RuntimeError, match=r"qlib::int8_unpack_weight: w_packed holds a weight of shape \[20, 70\], not \[20, 71\]"):
        ops.int8_unpack_weight(packed, 20, 71)
    with pytest.raises(RuntimeError, match="qlib::int8_unpack_weight: N and K must be >= 0"):
        ops.int8_unpack_weight(packed, -1, 70)
    if qlib.build_info()["int8_packed_copy"]:
        corrupt = packed.clone()
        corrupt[0] += 1  # w[0, 0] in every layout, which the fingerprint samples
        with pytest.raises(RuntimeError, match="panels do not match the fingerprint in its tag"):
            ops.int8_unpack_weight(corrupt, 20, 70)
    else:  # (a tag only: nothing to unpack, nothing to run without w_int8)
        with pytest.raises(RuntimeError, match="holds only a tag, not the weight .*amx kernel, or QLIB_INT8_PACKED_COPY=0"):
            ops.int8_unpack_weight(packed, 20, 70)


def test_pack_weight_rejects_n_past_int32():
    """The tag holds N as int32: 2^31 rows raise before anything is copied or packed (a
    stride-0 view, so the test allocates one byte)."""
    w = torch.zeros(1, 1, dtype=torch.int8).expand(2**31, 1)
    with pytest.raises(RuntimeError, match=r"qlib::int8_pack_weight: N = 2147483648 rows exceed 2147483647"):
        ops.int8_pack_weight(w)
    with pytest.raises(RuntimeError, match=r"qlib::int8_pack_weight: K = 131072 exceeds 131071"):
        ops.int8_pack_weight(torch.zeros(1, 1, dtype=torch.int8).expand(2**31, MAX_K + 1))


@pytest.mark.parametrize("M", [1, 7, 8, 33, 260])
@pytest.mark.parametrize("K", [65, 1100])
@pytest.mark.parametrize("N", [33, 290])
def test_tile_edges_every_kernel(kernel, M, K, N):
    """Shapes across the kernels' tile and padding edges (AMX: 32 x 32 register blocks,
    128 x 256 thread tiles, 1024-k blocks, K padded to 64, N to 32; last row panels of 1 and
    2 rows, which the decode micro-kernels take), against exact sums."""
    g = torch.Generator().manual_seed(M * 7 + K * 3 + N)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    assert torch.equal(ops.int8_gemm(a, b).long(), ref_gemm(a, b))
    x = torch.randn(M, K, generator=g).bfloat16()
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-3
    q, s = ops.quantize_per_token(x)
    # The epilogue's float32 math on the exact sums: float(c) * (s[m] * w_scale[n]), then bf16.
    ref = ((q.long() @ b.long().T).float() * (s * w_scale)).bfloat16()
    y = ops.int8_linear_packed(x, ops.int8_pack_weight(b), b, w_scale, None)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("M", [1, 2, 4, 5, 40])
@pytest.mark.parametrize("K", [1, 5, 63, 64, 130])
def test_strided_and_short_weight_rows_every_kernel(kernel, M, K):
    """A weight whose rows are a slice of a wider tensor, and K below one 64-k step (amx reads
    the weight where it lies, 64 k a load, the last rows from a zero-padded copy), dynamic
    and static with a zero point, packed and not, against exact sums."""
    g = torch.Generator().manual_seed(M * 11 + K)
    N = 37
    w = torch.randint(-128, 128, (N, K + 9), dtype=torch.int8, generator=g)[:, 4:4 + K]
    x = torch.randn(M, K, generator=g) * 3
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    q, sx = ops.quantize_per_token(x)
    ref = (q.long() @ w.long().T).double() * sx.double() * s.double()
    act, z = torch.tensor(0.05), torch.tensor(-100, dtype=torch.int32)
    ref_static = ((qlib.quantize(x, act, z, -128, 127).long() + 100) @ w.long().T).double() * 0.05 * s.double()
    packed = ops.int8_pack_weight(w)
    for r, extra in ((ref, ()), (ref_static, (act, z, -128, 127))):
        for y in (ops.int8_linear(x, w, s, None, *extra), ops.int8_linear_packed(x, packed, w, s, None, *extra)):
            torch.testing.assert_close(y.double(), r, rtol=1e-6, atol=1e-6 * r.abs().max().item())


GUARD_PAGE_PROBE = """
import ctypes, mmap
import torch, qlib
ops = torch.ops.qlib
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
for kernel in qlib.int8_cpu_kernels():
    qlib.set_int8_cpu_kernel(kernel)
    for N, K in [(1, 1), (3, 5), (33, 63), (40, 64), (37, 65), (70, 130), (5, 4100)]:
        pages = (N * K + page - 1) // page + 1
        buf = mmap.mmap(-1, pages * page)
        end = (pages - 1) * page
        assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + end, page, 0) == 0
        w = torch.frombuffer(buf, dtype=torch.int8, count=N * K, offset=end - N * K).view(N, K)
        w.copy_(torch.randint(-128, 128, (N, K), dtype=torch.int8))
        s = torch.rand(N) + 0.1
        p = ops.int8_pack_weight(w)
        for M in (1, 3, 4, 5, 8, 12, 16, 17, 40):
            x = torch.randn(M, K)
            q, sx = ops.quantize_per_token(x)
            ref = (q.double() @ w.double().T) * sx.double() * s.double()
            for y in (ops.int8_linear(x, w, s, None), ops.int8_linear_packed(x, p, w, s, None)):
                torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes")
def test_no_read_past_the_weight_every_kernel():
    """The kernels read the weight in place (amx 64 k a tile row, past K into the next row):
    a weight that ends where an unreadable page starts runs exactly, at every kernel (in a
    subprocess: a read past it would be a segfault)."""
    out = subprocess.run([sys.executable, "-c", GUARD_PAGE_PROBE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.skipif("amx" not in KERNELS, reason="needs AMX-INT8")
def test_amx_int8linear_holds_one_byte_a_weight():
    """Under amx the kernels read the weight in place: int8_pack_weight keeps only a tag, so on
    the CPU an Int8Linear's weight takes 4x less than float32's."""
    qlib.set_int8_cpu_kernel("amx")
    try:
        lin = torch.nn.Linear(300, 200)
        m = Int8Linear.from_float(lin)
        x = torch.randn(6, 300)
        y = m(x)
        assert m.weight_packed.numel() == 32  # the tag (layout, shape, fingerprint) only
        assert (m.weight.nbytes + m.weight_packed.nbytes) * 3.9 < lin.weight.nbytes  # plus scales
        q, s = ops.quantize_per_token(x)
        ref = (q.double() @ m.weight.double().T) * s.double() * m.weight_scale.double() + lin.bias.double()
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    finally:
        qlib.set_int8_cpu_kernel("auto")


@pytest.mark.skipif("amx" not in KERNELS, reason="needs AMX-INT8")
def test_amx_reads_the_weight_not_its_packing():
    """Under amx nothing packed is used: a weight changed where the fingerprint does not look
    (Python could not repack: an exported or compiled graph after a load) still runs exactly at
    every M, dynamic and static with a zero point (stale row sums were used)."""
    qlib.set_int8_cpu_kernel("amx")
    try:
        w = torch.randint(-128, 128, (80, 64), dtype=torch.int8)
        s = torch.rand(80) + 0.1
        packed = ops.int8_pack_weight(w)
        w[1, 1] += 1  # off the fingerprint's 16 x 16 grid
        static = (torch.tensor(0.05), torch.tensor(-60, dtype=torch.int32), -128, 127)
        for M in (1, 3, 4, 5, 8, 40, 300):
            x = torch.randn(M, 64)
            for extra in ((), static):
                assert torch.equal(ops.int8_linear_packed(x, packed, w, s, None, *extra),
                                   ops.int8_linear(x, w, s, None, *extra)), M
    finally:
        qlib.set_int8_cpu_kernel("auto")


def test_packed_copy_env_var():
    """QLIB_INT8_PACKED_COPY=1 gives every kernel its panels (amx too), =0 none (a 32-byte tag:
    the kernels read the weight itself); the results are the same bits."""
    code = ("import torch, qlib; w = torch.randint(-128, 128, (40, 300), dtype=torch.int8)\n"
            "x, s = torch.randn(9, 300), torch.rand(40)\n"
            "for name in qlib.int8_cpu_kernels():\n"
            "    qlib.set_int8_cpu_kernel(name); p = torch.ops.qlib.int8_pack_weight(w)\n"
            "    y = torch.ops.qlib.int8_linear_packed(x, p, w, s, None)\n"
            "    print(name, p.numel(), bool(torch.equal(y, torch.ops.qlib.int8_linear(x, w, s, None))),\n"
            "          qlib.build_info()['int8_packed_copy'])")
    # AMX panels (amx, avx512-vnni): N to 32, K to 64; 8-column panels: N to 16, K to 4.
    panels = {name: 64 * 320 + 4 * 64 + 32 if name in ("amx", "avx512-vnni") else 48 * 300 + 4 * 48 + 32
              for name in KERNELS}
    for env in ("1", "0", None):
        e = dict(os.environ, QLIB_INT8_PACKED_COPY=env or "")
        out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        for name in KERNELS:
            copy = env == "1" or (env is None and name != "amx")
            line = f"{name} {panels[name] if copy else 32} True {copy}"
            assert line in out.stdout.splitlines(), (env, out.stdout)
    e = dict(os.environ, QLIB_INT8_PACKED_COPY="yes")
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "QLIB_INT8_PACKED_COPY=yes must be 0 or 1" in out.stderr
    info = ("import qlib; i = qlib.build_info(); "
            "print(i['int8_packed_copy'].startswith('error: the environment variable QLIB_INT8_PACKED_COPY=yes'), "
            "i['int8_cpu_kernel'] in qlib.int8_cpu_kernels())")
    out = subprocess.run([sys.executable, "-c", info], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out.stderr  # the rest still reported


def test_int8_suites_without_packed_copies():
    """tests/test_int8.py and this file again with QLIB_INT8_PACKED_COPY=0: every kernel on the
    plain weight (gemm_panels_plain) at every M (the two tests of other kernels' packings and
    their warnings are about the copies, and left out)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, QLIB_INT8_PACKED_COPY="0", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "-k", "not from_another_kernel and not warnings_go_through and not without_packed_copies "
               "and not packed_copy_env_var and not suite_with_the_vnni_layout and not packed_bits_at_few_rows",
         os.path.join(here, "test_int8.py"), os.path.abspath(__file__)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


FEW_ROWS_SWEEP = """
import sys, torch, qlib
ops = torch.ops.qlib
out = {}
for name in qlib.int8_cpu_kernels():
    qlib.set_int8_cpu_kernel(name)
    g = torch.Generator().manual_seed(0)
    for M in [*range(1, 21), 31, 32, 33, 47, 48, 49]:
        for K in (1, 3, 4, 63, 64, 65, 130, 1029):
            for N in (1, 9, 70):
                w = torch.randint(-128, 128, (N, K + 7), dtype=torch.int8, generator=g)[:, 3:3 + K]
                x, s, b = torch.randn(M, K, generator=g) * 3, torch.rand(N, generator=g) + 0.1, torch.randn(N, generator=g)
                p = ops.int8_pack_weight(w)
                act, z = torch.tensor(0.05), torch.tensor(-7, dtype=torch.int32)
                out[name, M, K, N] = (ops.int8_linear_packed(x, p, w, s, b),
                                      ops.int8_linear_packed(x.bfloat16(), p, w, s, None, act, z, -128, 127))
torch.save(out, sys.argv[1])
"""


def test_plain_weight_gives_the_packed_bits_at_few_rows(tmp_path):
    """1-49 rows of x on the plain weight (QLIB_INT8_PACKED_COPY=0: dot kernels to 4 rows, then
    avx512-vnni's x-rows-in-lanes kernel to 48 (every split of the rows into panels), then the
    panels) against the packed copy (=1), bit for bit: K tails, strided weight rows, a static
    zero point."""
    outs = []
    for env in ("0", "1"):
        path = tmp_path / f"out{env}.pt"
        e = dict(os.environ, QLIB_INT8_PACKED_COPY=env)
        r = subprocess.run([sys.executable, "-c", FEW_ROWS_SWEEP, str(path)], env=e, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(torch.load(path))
    plain, packed = outs
    assert plain.keys() == packed.keys() and len(plain) == len(KERNELS) * 26 * 8 * 3
    for key in plain:
        for a, b in zip(plain[key], packed[key]):
            assert torch.equal(a, b), key


def test_compiled_packing_survives_a_kernel_switch():
    """int8_pack_weight's size depends on the kernel of the process that runs it (amx: row sums
    only), which no compile guard or cache key holds: its fake size is data-dependent, so a
    graph compiled under one kernel runs under another (it asserted the traced size)."""
    def f(x, w, ws):
        p = ops.int8_pack_weight(w)
        return ops.int8_linear_packed(x, p, w, ws, None), p

    w = torch.randint(-128, 128, (40, 300), dtype=torch.int8)
    ws, x = torch.rand(40) + 0.01, torch.randn(6, 300)
    ref = ops.int8_linear(x, w, ws, None)
    compiled = torch.compile(f, fullgraph=True)
    try:
        for name in KERNELS + KERNELS[:1]:
            qlib.set_int8_cpu_kernel(name)
            y, p = compiled(x, w, ws)
            assert torch.equal(y, ref) and torch.equal(p, ops.int8_pack_weight(w)), name
    finally:
        qlib.set_int8_cpu_kernel("auto")


def test_int8linear_under_fake_tensor_mode():
    """Shape propagation with a plain FakeTensorMode (no ShapeEnv: the packing's data-dependent
    size cannot be made) runs the layer unpacked and leaves a real layer's packing alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert Int8Linear(300, 40)(torch.empty(6, 300)).shape == (6, 40)
    m = Int8Linear.from_float(torch.nn.Linear(300, 40))
    x = torch.randn(6, 300)
    y = m(x)
    m._pack_state = None  # needs a repack
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert m(torch.empty(6, 300)).shape == (6, 40)
    assert torch.equal(m(x), y)


def test_saved_packing_runs_where_the_kernel_reads_the_weight(tmp_path):
    """A module saved with only its packing (torch.save of the module) runs exactly from its
    first call in a process whose kernel reads the plain weight (QLIB_INT8_PACKED_COPY=0; an AMX
    CPU alike): the packing is unpacked there."""
    if not qlib.build_info()["int8_packed_copy"]:
        pytest.skip("this kernel keeps only a tag (QLIB_INT8_PACKED_COPY)")
    m = Int8Linear.from_float(torch.nn.Linear(70, 20))
    x = torch.randn(5, 70)
    torch.save({"m": m, "x": x, "y": m(x)}, tmp_path / "m.pt")
    code = ("import sys, torch, qlib; d = torch.load(sys.argv[1], weights_only=False)\n"
            "print(qlib.build_info()['int8_packed_copy'], bool(torch.equal(d['m'](d['x']), d['y'])))")
    env = dict(os.environ, QLIB_INT8_PACKED_COPY="0")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_int8linear_repacks_after_a_kernel_switch():
    lin = torch.nn.Linear(70, 20)
    x = torch.randn(4, 70)
    m = Int8Linear.from_float(lin)
    y0 = m(x)
    other = "vnni-emulated" if current() == "avx2" else "avx2"
    qlib.set_int8_cpu_kernel(other)
    try:
        assert torch.equal(m(x), y0)  # repacked for the other layout, same numbers
    finally:
        qlib.set_int8_cpu_kernel("auto")


def test_env_var_picks_the_kernel():
    env = dict(os.environ, QLIB_INT8_CPU_KERNEL="vnni-emulated")
    code = "import qlib; print(qlib.build_info()['int8_cpu_kernel'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "vnni-emulated", out.stderr
    env["QLIB_INT8_CPU_KERNEL"] = "bogus"
    for call in ("int8_pack_weight(torch.ones(2, 3, dtype=torch.int8))",
                 "int8_gemm(torch.ones(1, 3, dtype=torch.int8), torch.ones(2, 3, dtype=torch.int8))"):  # (M = 1 too)
        code = f"import torch, qlib; torch.ops.qlib.{call}"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "QLIB_INT8_CPU_KERNEL=bogus is not usable" in out.stderr
        assert "unknown kernel 'bogus'" in out.stderr
    code = "import qlib; print(qlib.build_info()['int8_cpu_kernel'])"  # still reports
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("error: the environment variable QLIB_INT8_CPU_KERNEL=bogus")


def test_int8_suite_with_the_vnni_layout():
    """tests/test_int8.py again, every int8 CPU path on the VNNI layout."""
    if current() != "avx2":
        pytest.skip("this CPU already runs a VNNI kernel in the main suite")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, QLIB_INT8_CPU_KERNEL="vnni-emulated", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", os.path.join(here, "test_int8.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def _advised_huge_bytes(t):
    """Bytes of t's memory in mappings that carry the MADV_HUGEPAGE advice ("hg" in smaps'
    VmFlags: the request, whether or not the kernel found 2 MiB pages for it)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.nbytes
    advised, vma = 0, None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            a, b = (int(v, 16) for v in head.split("-"))
            vma = (max(a, lo), min(b, hi))
        elif head == "VmFlags:" and vma is not None and vma[1] > vma[0] and "hg" in line.split()[1:]:
            advised += vma[1] - vma[0]
    return advised


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="needs Linux with THP")
def test_big_weights_ask_for_huge_pages():
    """A 16 MiB int8 weight, its packed copy and an 8 MiB 4-bit weight ask for 2 MiB pages on
    their 2 MiB-aligned interior (madvise, a hint); they hold zeros as torch.zeros gives, and
    meta / fake construction still works."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qlib.nn import Linear4bit

    q = Int8Linear.from_float(torch.nn.Linear(4096, 4096))
    big = [(Int8Linear(4096, 4096).weight, 14), (Linear4bit(4096, 4096).packed, 6)]
    # (Where the kernel packs, the packing is the weight; elsewhere it is only a tag.)
    big.append((q.weight_packed, 14) if qlib.build_info()["int8_packed_copy"] else (q.weight, 14))
    for w, mib in big:
        assert _advised_huge_bytes(w) >= mib << 20
    assert not Int8Linear(4096, 4096).weight.any() and not Linear4bit(4096, 4096).packed.any()
    x = torch.randn(3, 4096)
    assert torch.equal(q(x), torch.ops.qlib.int8_linear(x, q.weight, q.weight_scale, q.bias))
    with torch.device("meta"):
        assert Int8Linear(4096, 4096).weight.is_meta
    with FakeTensorMode():
        assert Int8Linear(4096, 4096)(torch.empty(2, 4096)).shape == (2, 4096)


# ---------------------------------------------------------------- the packing alone
@pytest.mark.parametrize("K", [1, 3, 64, 130, 1029])
@pytest.mark.parametrize("N", [1, 17, 33])
def test_packing_alone_gives_the_same_bits(kernel, K, N):
    """int8_linear_packed without w_int8 (the packed kernels at every M, 1-2 rows included),
    and int8_unpack_weight, against int8_linear on the weight: every kernel, dtype, odd shapes,
    non-contiguous x, a static range with a zero point."""
    if not qlib.build_info()["int8_packed_copy"]:
        pytest.skip("this kernel keeps only a tag (QLIB_INT8_PACKED_COPY)")
    g = torch.Generator().manual_seed(K * 7 + N)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    b = torch.randn(N, generator=g)
    packed = ops.int8_pack_weight(w)
    assert torch.equal(ops.int8_unpack_weight(packed, N, K), w)
    a, zp = torch.tensor(0.03), torch.tensor(-9)
    for M in (1, 2, 3, 5, 13, 40):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(M, 2 * K, generator=g).to(dtype)[:, ::2]  # non-contiguous
            assert torch.equal(ops.int8_linear_packed(x, packed, None, s, b), ops.int8_linear(x, w, s, b))
            assert torch.equal(ops.int8_linear_packed(x, packed, None, s, None, a, zp, -128, 127),
                               ops.int8_linear(x, w, s, None, a, zp, -128, 127))


def test_int8linear_keeps_only_the_packing():
    """Where the kernel packs, Int8Linear holds its weight once, packed (about 1 byte a weight);
    `weight` reads back the int8 weight, in-place edits of it and assignments are repacked,
    and outputs are int8_linear's on that weight."""
    if not qlib.build_info()["int8_packed_copy"]:
        pytest.skip("this kernel runs on the plain weight")
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 70)
    m = Int8Linear.from_float(lin)
    q, scale = qlib.nn.int8_linear.quantize_weight_per_channel(lin.weight)
    assert m._buffers["weight"] is None and "weight" not in dict(m.named_buffers())
    # (the packing pads N to 16 or 32 and K to 4 or 64: under 1.5 N K here, 2 N K with a copy)
    assert sum(t.numel() * t.element_size() for t in m.buffers()) < 1.6 * 300 * 70
    x = torch.randn(2, 5, 300)
    assert torch.equal(m(x), ops.int8_linear(x, q, scale, lin.bias.detach()))
    assert torch.equal(m.weight, q) and m.weight is m.weight  # (held until the next forward)
    m.weight[3, :] = 0  # an edit through a temporary
    q[3, :] = 0
    assert torch.equal(m(x), ops.int8_linear(x, q, scale, lin.bias.detach()))
    assert m._buffers["weight"] is None  # the forward let it go
    w = m.weight
    m(x)
    w.mul_(-1)  # an edit of a weight still held after a forward
    assert torch.equal(m(x), ops.int8_linear(x, -q, scale, lin.bias.detach()))
    del w
    m.weight = q.clone()  # an assignment
    assert torch.equal(m(x), ops.int8_linear(x, q, scale, lin.bias.detach()))
    assert m._buffers["weight"] is None and torch.equal(m.weight, q)
    assert m.weight_bytes() == 300 * 70 + 70 * 4


def test_int8linear_packing_alone_state_and_transforms():
    """With only the packing kept: the state_dict holds the int8 weight (the module keeps it
    while the state_dict's tensor lives, so edits of it are seen), loads (strict, assign, meta,
    wrong shapes, a failed copy, after to_empty), pickles, deep-copies (after edits too), runs
    under functional_call with another weight (its own weight untouched), gives x its gradient
    and moves off the CPU with its weight."""
    import copy
    import io

    if not qlib.build_info()["int8_packed_copy"]:
        pytest.skip("this kernel runs on the plain weight")
    torch.manual_seed(1)
    a, b = (Int8Linear.from_float(torch.nn.Linear(64, 48)) for _ in range(2))
    x = torch.randn(7, 64)
    ya, yb = a(x), b(x)
    a.state_dict()["weight"][1] = -4  # an edit through a temporary state_dict
    assert torch.equal(a(x)[:, 1], ops.int8_linear(x, a.weight, a.weight_scale, a.bias)[:, 1])
    assert a.weight[1].eq(-4).all()
    sd = a.state_dict()
    assert list(sd) == ["weight", "weight_scale", "bias"] and torch.equal(sd["weight"], a.weight)
    a(x)
    sd["weight"][0] = 3  # an edit of a state_dict taken before a forward
    y3 = a(x)
    assert torch.equal(y3[:, 0], ops.int8_linear(x, sd["weight"], a.weight_scale, a.bias)[:, 0])
    assert a._buffers["weight"] is not None  # (held: the state_dict's tensor lives)
    for e in (copy.deepcopy(a), torch.load(io.BytesIO(_saved(a)), weights_only=False)):
        assert torch.equal(e(x), y3)
    sd["weight"][2] = 5  # edited after the forward: copies and compiled calls see it too
    y5 = ops.int8_linear(x, sd["weight"], a.weight_scale, a.bias)
    for e in (copy.deepcopy(a), torch.load(io.BytesIO(_saved(a)), weights_only=False)):
        assert torch.equal(e(x), y5)
    assert torch.equal(torch.compile(a, fullgraph=True, backend="eager")(x), y5)
    assert torch.equal(a(x), y5)
    ya = a(x)
    c = Int8Linear(64, 48)
    c.load_state_dict(sd)
    assert c._buffers["weight"] is None and torch.equal(c(x), ya)
    with torch.device("meta"):
        d = Int8Linear(64, 48)
    d.load_state_dict(dict(sd), assign=True)  # (a copy: torch marks sd's _metadata as assigned)
    assert d._buffers["weight"] is sd["weight"] and d.weight_packed.is_cpu and torch.equal(d(x), ya)
    with pytest.raises(RuntimeError, match=r"state_dict\['weight'\] is torch.int8 of shape \(48, 63\)"):
        c.load_state_dict(dict(sd, weight=sd["weight"][:, :63]))
    with pytest.raises(RuntimeError, match="weight"):  # a failed copy leaves the weight as it was
        c.load_state_dict(dict(sd, weight=torch.empty(48, 64, dtype=torch.int8, device="meta")))
    assert torch.equal(c(x), ya)
    with pytest.raises(RuntimeError, match="weight_scale must be finite"):  # so does a refused state
        c.load_state_dict(dict(sd, weight=-sd["weight"], weight_scale=sd["weight_scale"] * float("nan")))
    assert torch.equal(c(x), ya)
    c.to_empty(device="cpu")  # allocate, then load: the packing holds no weight meanwhile
    c.load_state_dict(sd)
    assert torch.equal(c(x), ya)
    assert torch.equal(d(x), ya) and d._buffers["weight"] is not None  # (a's memory: d's weight)
    del sd, d
    a(x)
    assert a._buffers["weight"] is None  # (let go at a forward)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # a checkpoint: let go of as its state_dict goes, no forward needed
    assert a._buffers["weight"] is None
    e = copy.deepcopy(a)
    with torch.inference_mode():
        sd = e.state_dict()
    e.load_state_dict(sd)  # (an inference_mode state_dict, alive: a plain weight all the same)
    e.weight[0] = 1
    assert torch.equal(e(x)[:, 0], ops.int8_linear(x, e.weight, e.weight_scale, e.bias)[:, 0])
    del sd
    assert torch.equal(torch.func.functional_call(b, {"weight": a.weight, "weight_scale": a.weight_scale,
                                                      "bias": a.bias}, (x,)), ya)
    assert torch.equal(b(x), yb) and b._buffers["weight"] is None
    xg = x.clone().requires_grad_()
    b(xg).sum().backward()
    w_hat = b.weight.float() * b.weight_scale[:, None]
    torch.testing.assert_close(xg.grad, torch.ones(7, 48) @ w_hat)
    b.to("meta")
    assert b.weight.is_meta and b.weight.shape == (48, 64)


def test_int8linear_weight_read_under_torch_func():
    """`weight` read inside torch.func transforms (grad, jvp, jacrev, vmap) where only the packing
    is kept: the int8 weight, as outside, and the module holds a plain tensor, not a wrapper of
    the transform (was: "Cannot access data pointer of Tensor that doesn't have storage")."""
    from torch._C._functorch import is_functorch_wrapped_tensor
    from torch.func import grad, jacrev, jvp, vmap

    if not qlib.build_info()["int8_packed_copy"]:
        pytest.skip("this kernel runs on the plain weight")
    torch.manual_seed(2)
    x = torch.randn(3, 40)
    transforms = {
        "grad": lambda f: grad(lambda t: f(t).sum())(x),
        "jvp": lambda f: jvp(f, (x,), (torch.ones_like(x),))[1],
        "jacrev": lambda f: jacrev(f)(x),
        "vmap": lambda f: vmap(f)(x[None]),
    }
    for name, transform in transforms.items():
        m = Int8Linear.from_float(torch.nn.Linear(40, 24))
        w = m.weight.clone()
        y = m(x)
        assert m._buffers["weight"] is None, name
        got = transform(lambda t: ops.int8_linear(t, m.weight, m.weight_scale, m.bias))
        want = transform(lambda t: ops.int8_linear(t, w, m.weight_scale, m.bias))
        assert torch.equal(got, want), name
        held = m._buffers["weight"]
        assert held is None or not is_functorch_wrapped_tensor(held), name
        assert torch.equal(m.weight, w) and torch.equal(m(x), y), name


def _saved(module):
    import io
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()


@pytest.mark.skipif(os.environ.get("QLIB_BIG_TESTS") != "1",
                    reason="big-memory test (about 11 GiB); set QLIB_BIG_TESTS=1 to run")
def test_gemm_and_linear_past_2_31_elements():
    """int8_gemm with M * N past 2^31 (an 8 GiB int32 C), and with a weight of N * K past 2^31
    (2 GiB): int8_gemm, int8_linear and the packed weight on rows at both ends."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (46341, 64), dtype=torch.int8, generator=gen)
    c = ops.int8_gemm(a, a)
    for rows in (slice(0, 2), slice(2**31 // 46341, None)):  # the last row holds flat index 2^31
        assert torch.equal(c[rows].long(), ref_gemm(a[rows], a))
    del c
    K = 8192
    N = 2**31 // K + 5
    w = torch.randint(-128, 128, (1024, K), dtype=torch.int8, generator=gen).repeat(N // 1024 + 1, 1)[:N]
    ends = [0, 1, N - 2, N - 1]
    x8 = torch.randint(-127, 128, (3, K), dtype=torch.int8, generator=gen)
    assert torch.equal(ops.int8_gemm(x8, w)[:, ends].long(), ref_gemm(x8, w[ends]))
    assert torch.equal(ops.int8_gemm(w, x8)[ends].long(), ref_gemm(w[ends], x8))
    s = torch.rand(N, generator=gen) + 0.5
    packed = ops.int8_pack_weight(w)
    for M in (1, 3, 64):
        x = torch.randn(M, K, generator=gen)
        sx = (x.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
        qx = torch.round(x * (1.0 / sx)).clamp(-127, 127)
        ref = (qx.double() @ w[ends].double().T * (sx.double() * s[ends].double())).float()
        for y in (ops.int8_linear(x, w, s, None), ops.int8_linear_packed(x, packed, None, s, None)):
            torch.testing.assert_close(y[:, ends], ref, rtol=1e-5, atol=1e-5)
