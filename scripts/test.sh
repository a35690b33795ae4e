#!/usr/bin/env bash
# Every test: GoogleTest (csrc against LibTorch) and pytest, in .venv/.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [ ! -f /usr/include/gtest/gtest.h ] || ! command -v cmake >/dev/null; then
  echo "== installing GoogleTest and cmake (Debian packages)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  # env, not a bare VAR=...: after an empty $SUDO bash would run the assignment as a command.
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev cmake >/dev/null
fi

echo "== GoogleTest"
TORCH_DIR="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
AVX2=OFF; grep -qw avx2 /proc/cpuinfo && AVX2=ON
cmake -S . -B build/cpp -DTORCH_DIR="$TORCH_DIR" -DQLIB_AVX2="$AVX2" >/dev/null
cmake --build build/cpp -j"$MAX_JOBS" >/dev/null
./build/cpp/qlib_cpp_tests --gtest_brief=1

echo "== pytest"
# pytest exits 5 when it collects no test: that counts as a failure here.
"$PY" -m pytest tests -q -p no:cacheprovider "$@"
