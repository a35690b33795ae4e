#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UBSan in a scratch copy of the
# working tree and runs the pytest suite against it (about 5 + 2 minutes on 2 cores).
# Usage: bash scripts/sanitize_cpu.sh [pytest args, default: tests]   (needs .venv from
# scripts/test.sh). Last runs: stop 54: the fake_quant, affine and fuzz suites clean (the mask backward's shared prep); stop 41: the affine, fake_quant, int8, int8 kernel, QAT, observer, fuzz and loading suites clean (1142 passed; sym-size checks in the fakes); stop 40: every suite but MiniLM and DDP clean (1452 passed) with the packing alone; stop 39 (second session, Zen 4): every suite but MiniLM and DDP clean (657 + 748 passed) after a K = 0 fix in pack_b; stop 30: whole suite clean on an AMX Xeon (1289 passed); stop 26: the fake_quant, affine, fuzz and QAT suites clean (179 passed; stop 25's STE backward); stop 24: the 4-bit and fuzz suites clean (252 passed); whole suite clean (stop 11; stop 20 on an AMX Xeon, 1077 passed); stop 21: the 4-bit and QAT suites clean (302 passed; after the last 4-bit change the 4-bit suites, 265); stop 22: the 4-bit suites (273), the observer and fuzz suites (95); stop 17: observers, affine, fuzz,
# fake_quant and int8 kernels clean (418 passed); stop 16: fake_quant, affine, fuzz, QAT,
# observers clean (230 passed); stop 15: the fake_quant, affine,
# observer, int8, QAT and fuzz suites clean (430 passed) after a check_quant_range fix.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${QLIB_SANITIZE_DIR:-/tmp/qlib_sanitize}
PY="$ROOT/.venv/bin/python"
rm -rf "$WORK" && mkdir -p "$WORK/site"
(cd "$ROOT" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$WORK"
cd "$WORK"
QLIB_USE_CUDA=0 CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize=vptr" \
  LDFLAGS="-fsanitize=address,undefined" "$PY" setup.py build_ext --inplace >build.log 2>&1 ||
  { tail -30 build.log; exit 1; }
# triton's bundled C++ runtime trips ASan's __cxa_throw interceptor: keep it unimported.
echo "import sys; sys.modules['triton'] = None" >site/sitecustomize.py
# libstdc++ preloaded too, or ASan cannot intercept C++ exceptions (python has no libstdc++).
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  PYTHONPATH="$WORK/site:$WORK/python" "$PY" -m pytest -q -p no:cacheprovider "${@:-tests}"
