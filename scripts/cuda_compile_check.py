"""Compiles cuda/*.cu to object files with nvcc, without linking them.

.ci/run's CUDA check when .venv holds the CPU-only torch (scripts/env.sh installs
that one when the disk is too short for the CUDA build), which cannot link a CUDA
extension: the same arch (9.0a), C++ standard, torch macros and CUTLASS headers as
setup.py's build, against the CUDA torch's headers. Exit status 1 on any error.
"""
import glob
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # as setup.py (nvcc on PATH is a wrapper)
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        sys.exit("cuda_compile_check: no CUTLASS headers (pip install --no-deps nvidia-cutlass==4.2.0.0)")
    return str(Path(spec.origin).parent / "source" / "include")


def header_dirs():
    """torch's and the CUDA libraries' (cusparse.h, cublasLt.h, ...) include folders: those of
    the installed CUDA torch, as setup.py uses, or beside a CPU-only torch, which lacks the CUDA
    build's generated headers, those scripts/env.sh unpacked from the CUDA wheels."""
    root = Path(torch.__file__).parents[1] if torch.version.cuda else ROOT / ".venv" / "cuda-headers"
    if not (root / "torch" / "include").is_dir():
        sys.exit(f"cuda_compile_check: no {root / 'torch' / 'include'} (scripts/env.sh makes it)")
    inc = root / "torch" / "include"
    return [str(inc), str(inc / "torch" / "csrc" / "api" / "include"),
            *sorted(glob.glob(str(root / "nvidia" / "cu*" / "include")))]


def main():
    nvcc = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
    if not nvcc.exists():
        sys.exit(f"cuda_compile_check: no nvcc at {nvcc}")
    includes = header_dirs() + [str(nvcc.parents[1] / "include"), sysconfig.get_paths()["include"],
                                str(ROOT / "csrc"), cutlass_include()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [f"-I{p}" for p in includes] + cpp_extension.COMMON_NVCC_FLAGS + [
        "-std=c++20", "-O3", "-lineinfo", "-diag-suppress=2908",
        "-gencode=arch=compute_90a,code=sm_90a", "--compiler-options", "-fPIC",
        "-DQLIB_WITH_CUDA", "-DQLIB_WITH_SM90_GEMM", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    sources = sorted(glob.glob(str(ROOT / "cuda" / "*.cu")))
    with tempfile.TemporaryDirectory() as out:
        def compile_one(src):
            obj = Path(out) / (Path(src).stem + ".o")
            r = subprocess.run([str(nvcc), "-c", src, "-o", str(obj), *flags],
                               capture_output=True, text=True)
            return src, r.returncode, r.stdout + r.stderr

        jobs = int(os.environ.get("MAX_JOBS", "2"))
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_one, sources))
    failed = [(s, log) for s, rc, log in results if rc != 0]
    for src, rc, log in results:
        print(f"cuda_compile_check: {Path(src).name}: {'ok' if rc == 0 else 'FAILED'}")
    for src, log in failed:
        print(f"\n== {src}\n{log}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
