#!/usr/bin/env bash
# Here, before a lent GPU's first call (the device has no network): makes what
# scripts/gpu_session.sh wants carried, .cutlass/include (CUTLASS's headers, for the fused sm90
# int8 GEMM; ~27 MB) and .wheels/ (torchao, the int8 bench's peer), then checks csrc/ builds as
# C++17 (the device's torch 2.11). Then, e.g.:
#   run(command="TEST_K=cuda bash scripts/gpu_session.sh build,sm90,suite,benchint8",
#       carry=[".cutlass", ".wheels"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # (.venv, with CUTLASS's headers in cutlass_library)
INC=$("$PY" -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")
rm -rf .cutlass && mkdir -p .cutlass && cp -r "$INC" .cutlass/
mkdir -p .wheels
ls .wheels/torchao-*.whl >/dev/null 2>&1 || "$PY" -m pip download -q --no-deps torchao==0.18.0 -d .wheels
du -sh .cutlass .wheels
bash scripts/cxx17_check.sh
