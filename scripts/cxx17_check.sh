#!/usr/bin/env bash
# Before a GPU call: the device's torch (2.11) builds extensions as C++17, this machine's
# (2.14) as C++20, so a C++20-only construct (std::popcount, ...) passes CI here and fails the
# device's build. Checks every csrc/*.cpp with g++ -std=c++17 -fsyntax-only against torch
# 2.11's headers (fetched once into $T211: pip download, ~530 MB, only torch/include kept).
# With --cuda, also nvcc -std=c++17 -c on every cuda/*.cu (1-3 minutes each).
set -euo pipefail
cd "$(dirname "$0")/.."
T211=${T211:-/tmp/t211}
PY=.venv/bin/python
if [ ! -f "$T211/torch/include/torch/extension.h" ]; then
  echo "== fetching torch 2.11's headers into $T211"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps torch==2.11.0 -d "$tmp"
  mkdir -p "$T211" && unzip -q "$tmp"/torch-2.11.0-*.whl 'torch/include/*' -d "$T211"
  rm -rf "$tmp"
fi
INC=(-I"$T211/torch/include" -I"$T211/torch/include/torch/csrc/api/include" -Icsrc
     -I"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
     -I"$("$PY" -c 'import pybind11; print(pybind11.get_include())' 2>/dev/null || echo "$T211/torch/include")")
DEFS=(-DQLIB_CPU_ISA='"avx2"' -DQLIB_TORCH_VERSION='"2.11.0"' -DTORCH_EXTENSION_NAME=_C
      -DTORCH_API_INCLUDE_EXTENSION_H)
fail=0
for f in csrc/*.cpp; do
  if ! g++ -std=c++17 -fsyntax-only -fopenmp -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 \
      -DCPU_CAPABILITY_AVX2 "${DEFS[@]}" "${INC[@]}" "$f" 2>/tmp/cxx17_check.err; then
    echo "== $f: FAILS as C++17"; head -20 /tmp/cxx17_check.err; fail=1
  fi
done
if [ "${1:-}" = "--cuda" ]; then
  NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  CUTLASS=$(ls -d .venv/lib/python3*/site-packages/cutlass_library/source/include 2>/dev/null || true)
  for f in cuda/*.cu; do
    if ! "$NVCC" -std=c++17 -c -o /dev/null -gencode arch=compute_90a,code=sm_90a \
        --expt-relaxed-constexpr -diag-suppress=2908 -DQLIB_WITH_CUDA -DQLIB_CUDA_ARCHS='"9.0a"' \
        ${CUTLASS:+-DQLIB_WITH_SM90_GEMM -I"$CUTLASS"} "${DEFS[@]}" "${INC[@]}" \
        $(ls -d .venv/lib/python3*/site-packages/nvidia/cu*/include | sed 's/^/-I/') \
        "$f" 2>/tmp/cxx17_check.err; then
      echo "== $f: FAILS as C++17"; grep -m 20 error /tmp/cxx17_check.err; fail=1
    fi
  done
fi
[ "$fail" = 0 ] && echo "== C++17 check: every file passes against torch 2.11's headers"
exit "$fail"
