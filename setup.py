"""Builds qlib._C with torch.utils.cpp_extension.

The CUDA kernels are compiled whenever the installed torch is a CUDA build and
nvcc is found (never decided by torch.cuda.is_available()); QLIB_USE_CUDA=0
forces a CPU-only build. TORCH_CUDA_ARCH_LIST picks the GPU archs (default
9.0a, Hopper with wgmma). QLIB_CPU_ISA=avx2|default picks the CPU vector ISA
(default: avx2 when this machine has it). The fused Hopper int8 GEMM
(cuda/int8_gemm_sm90.cu) is built when the arch list has 9.0a and CUTLASS's
headers are found: QLIB_CUTLASS_INCLUDE, else PyPI's nvidia-cutlass package.
"""
import glob
import importlib.util
import os
from pathlib import Path

import torch

# torch guesses CUDA_HOME from the nvcc on PATH, which may be a bare wrapper
# outside the toolkit; prefer the toolkit's standard home when it exists.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent


def cpu_isa():
    isa = os.environ.get("QLIB_CPU_ISA")
    if isa:
        if isa not in ("avx2", "default"):
            raise SystemExit(f"QLIB_CPU_ISA must be avx2 or default, got {isa!r}")
        return isa
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "default"
    return "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "default"


def use_cuda():
    if os.environ.get("QLIB_USE_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def cutlass_include():
    """The directory holding cutlass/cutlass.h, or None."""
    given = os.environ.get("QLIB_CUTLASS_INCLUDE")
    candidates = [Path(given)] if given else []
    spec = importlib.util.find_spec("cutlass_library")  # nvidia-cutlass, found without importing it
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "source" / "include")
    for c in candidates:
        if (c / "cutlass" / "cutlass.h").exists():
            return str(c)
    if given:
        raise SystemExit(f"QLIB_CUTLASS_INCLUDE={given!r} has no cutlass/cutlass.h")
    return None


with_cuda = use_cuda()
isa = cpu_isa()
archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a") if with_cuda else ""
if with_cuda:
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs

cxx = ["-O3", "-fno-math-errno"]
if isa == "avx2":
    # at::vec picks its AVX2 code by these macros, as ATen's own kernels do.
    cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
# at::parallel_for is a header template: without -fopenmp (_OPENMP undefined) it runs
# every CPU kernel on ONE thread. Link too, so omp_* resolve (to torch's own libgomp.so.1,
# already loaded by `import torch`).
link = []
if "OpenMP" in torch.__config__.parallel_info():
    cxx += ["-fopenmp"]
    link += ["-fopenmp"]
macros = [
    ("QLIB_CPU_ISA", f'"{isa}"'),
    ("QLIB_TORCH_VERSION", f'"{torch.__version__}"'),
]
sources = sorted(glob.glob("csrc/*.cpp"))
include_dirs = [str(ROOT / "csrc")]
if with_cuda:
    macros += [("QLIB_WITH_CUDA", None), ("QLIB_CUDA_ARCHS", f'"{archs}"')]
    sources += sorted(glob.glob("cuda/*.cu"))
    cutlass = cutlass_include()
    sm90_gemm = cutlass is not None and "9.0a" in archs.replace(" ", ";").split(";")
    if sm90_gemm:
        include_dirs.append(cutlass)
        macros.append(("QLIB_WITH_SM90_GEMM", None))
    else:
        sources.remove("cuda/int8_gemm_sm90.cu")
        print("qlib setup.py: building WITHOUT the fused Hopper int8 GEMM ("
              + ("no CUTLASS headers: pip install --no-deps nvidia-cutlass==4.2.0.0"
                 if cutlass is None else "9.0a is not in TORCH_CUDA_ARCH_LIST") + ")")
    # pip's CUDA torch ships the CUDA library headers (cusparse.h, cublasLt.h)
    # in nvidia/cu*/include; a bare nvcc install may lack them.
    include_dirs += sorted(glob.glob(str(Path(torch.__file__).parents[1] / "nvidia/cu*/include")))
    ext = CUDAExtension(
        "qlib._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={
            "cxx": cxx,
            # 2908: CUTLASS's Blackwell headers capture `this` implicitly (C++20 deprecation)
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-diag-suppress=2908"],
        },
        extra_link_args=link,
    )
else:
    ext = CppExtension(
        "qlib._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )

# Lets `import qlib` check, before loading _C, that it matches this machine.
(ROOT / "python/qlib/_build_config.py").write_text(
    "# Written by setup.py.\n"
    f"CPU_ISA = {isa!r}\nWITH_CUDA = {with_cuda!r}\nCUDA_ARCHS = {archs!r}\n"
    f"TORCH_VERSION = {torch.__version__!r}\n"
)

setup(
    package_dir={"": "python"},
    packages=find_packages("python"),
    # _C links against this torch's C++ API: another torch fails to load it (undefined symbols).
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "tqdm", "matplotlib"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
