#!/usr/bin/env bash
# For a lent GPU (the device tool), never CI: builds qlib against that machine's own
# torch, then runs the stages named in $1 in that order (default: build,test,sanitize,bench),
# each log under $OUT.
#   build     pip install -e . (always; or reuse .gpubuild/ when it matches these sources: a
#             carried one, or the one a warm machine's earlier call left)
#   test      sm90 (the fused Hopper GEMM's tests, in a process of their own), then suite (the
#             whole pytest suite but those, CUDA included; TEST_K=cuda: the CUDA variants only)
#   suite90   test_int8 / test_model_cast's CUDA tests with QLIB_INT8_CUDA_GEMM=cutlass-sm90
#             (suitelt: with cublaslt, the path "auto" leaves on 9.0 where the fused GEMM fits)
#   sanitize  the CUDA tests under compute-sanitizer memcheck and racecheck
#   probe     scripts/gpu_probe.py diagnostics, and a native backtrace of an error path
#   fwdbwd    gpu_probe.py --fwd-bwd: float32 fake_quant fwd+bwd per-tensor vs per-channel
#   benchfq   bench_fake_quant alone (benchfq64: at 64M elements, past the L2, for issue 2's bf16
#             per-channel / per-group question); benchobs: bench_observers alone; benchint8: the int8 GPU table
#             (torchao's int8 dynamic Linear too, from a carried .wheels/torchao-*.whl);
#             bench4: the 4-bit GPU table (qlib NF4 against dense bf16)
#   fqpacks   bench_fake_quant --packs-only: the fake_quant kernels at 1, 2 and 4 packs per thread
#   ncufq     Nsight Compute on the fake_quant forward kernel, per-tensor vs per-channel, float32 vs
#             bfloat16 (issue 2's missed bf16 per-channel / per-group targets): throughput, stalls
#   ceilings  benchmarks/gpu_ceilings.py (copy bandwidth, bf16 and int8 GEMM rates)
#   bench     ceilings and every benchmark's GPU section
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD/python
STAGES=${1:-build,test,sanitize,bench}
PY=python3
# The device call's own limit (run's timeout_s, ~590 s) kills everything at once; the stages'
# limits add up to far more. Each stage's limit is cut to what is left of BUDGET_S, and a stage
# with under 15 s left is skipped, so the script ends by itself and prints every summary line.
DEADLINE=$((SECONDS + ${BUDGET_S:-575}))
stage() {  # stage NAME LIMIT_S CMD...: log to $OUT/NAME.log, print rc, time and the log's tail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then echo "== $name: SKIPPED ($left s left of BUDGET_S): $*" | tee -a "$OUT/$name.log"; return 124; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-12}" "$OUT/$name.log"
}

# The image's first g++ (/opt/gcc) links libstdc++ statically into the extension, and
# then every TORCH_CHECK message with a number segfaults (two libstdc++ in one process):
# build with the system compiler, whose libstdc++ torch also loads.
for cxx in /usr/bin/g++ /usr/bin/g++-13; do
  if [ -x "$cxx" ]; then export CXX=$cxx CC=${cxx/g++/gcc}; break; fi
done
# The device has no network: CUTLASS's headers (for cuda/int8_gemm_sm90.cu) come carried in
# .cutlass/include (here: mkdir -p .cutlass && cp -r .venv/lib/python3.11/site-packages/cutlass_library/source/include .cutlass/;
# without the mkdir, cp makes .cutlass itself the include folder: .cutlass/cutlass/cutlass.h, accepted too).
for inc in .cutlass/include .cutlass; do
  if [ -f "$inc/cutlass/cutlass.h" ]; then export QLIB_CUTLASS_INCLUDE=$PWD/$inc; break; fi
done
[ -n "${QLIB_CUTLASS_INCLUDE:-}" ] || echo "== NO .cutlass carried: building WITHOUT the fused sm90 int8 GEMM (its tests skip)"
# torchao (the int8 bench's peer) comes carried as a wheel in .wheels/ (here: .venv/bin/pip
# download --no-deps torchao==0.18.0 -d .wheels), installed beside qlib without its dependencies.
if ls .wheels/torchao-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index --target /tmp/peers .wheels/torchao-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/peers
else echo "== no .wheels/torchao-*.whl carried: the int8 bench runs without its torchao column"; fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
SRC_HASH=$(cat setup.py $(ls csrc/* cuda/* | LC_ALL=C sort) | sha1sum | cut -c1-16)
if [ -f .gpubuild/hash ] && [ "$(cat .gpubuild/hash)" = "$SRC_HASH" ]; then
  echo "== build: reusing .gpubuild (sources unchanged)"
  gunzip -c .gpubuild/_C.so.gz >python/qlib/"$(cat .gpubuild/so_name)"; cp .gpubuild/_build_config.py python/qlib/
else
  stage build 420 $PY -m pip install --no-build-isolation --no-deps --no-index -e . -v
  TAIL=0 stage build 60 bash -c 'so=$(ls python/qlib/_C*.so); echo "== libstdc++ linked:"; ldd $so | grep stdc;
    cuobjdump --dump-resource-usage $so | grep -E "Function|REG" | c++filt | paste - - | sed -E "s/ +/ /g" | cut -c1-260;
    cuobjdump --dump-sass $so >/tmp/sass.txt; for i in LDG.E.128 STG.E.128 IMMA HMMA IGMMA DP4A IDP; do echo "$i: $(grep -c $i /tmp/sass.txt)"; done'
  # Kept in .gpubuild/ (a warm machine's next call reuses it), and with BUILD_TO_OUT=1 sent back
  # too, to carry to a fresh machine: without its host debug info (python's CFLAGS carry -g: ~43
  # MB of a 45 MB CPU-only build), under the 16 MiB a file that comes back from $OUT.
  so=$(cd python/qlib && ls _C*.so) && mkdir -p .gpubuild && strip --strip-debug -o /tmp/_C_nodebug.so "python/qlib/$so" \
    && gzip -c /tmp/_C_nodebug.so >.gpubuild/_C.so.gz && echo "$so" >.gpubuild/so_name \
    && cp python/qlib/_build_config.py .gpubuild/ && echo "$SRC_HASH" >.gpubuild/hash && ls -l .gpubuild/_C.so.gz \
    && if [ "${BUILD_TO_OUT:-0}" = 1 ]; then cp .gpubuild/* "$OUT"/; fi
fi
$PY -c "import qlib, torch; print(torch.__version__, qlib.build_info(), 'CUDA GEMMs built:', qlib.int8_cuda_gemms())" || exit 1

# Stages run in the order $1 names them ("bench": every benchmark's GPU section).
for s in $(echo ",$STAGES," | sed 's/,bench,/,ceilings,benchfq,benchobs,benchint8,bench4,/; s/,test,/,sm90,suite,/; s/,/ /g'); do
  case $s in
  build) ;;
  probe)
    TAIL=400 stage probe 200 $PY scripts/gpu_probe.py
    cat >/tmp/err.py <<'PYEOF'
import torch, qlib
torch.ops.qlib.block_minmax(torch.randn(3))
PYEOF
    TAIL=60 stage probe 120 cuda-gdb -batch -ex run -ex bt --args $PY /tmp/err.py ;;
  # fake_quant's float32 per-tensor fwd+bwd outlier: both orders, and the profiles.
  fwdbwd) TAIL=80 stage probe 90 $PY scripts/gpu_probe.py --fwd-bwd ;;
  # test = sm90 then suite. The fused sm90 GEMM's tests run in a process of their own (their
  # names hold no "cuda"): a fault in a kernel never run before must not take the suite down.
  sm90) TAIL=25 stage test 240 $PY -m pytest tests/test_int8.py -q -p no:cacheprovider -rfEs -k sm90 ;;
  # TEST_K="cuda" runs only the CUDA variants (a short lease).
  suite) TAIL=25 stage test 420 $PY -m pytest tests -q -p no:cacheprovider -n 8 -rfEs -k "${TEST_K:+($TEST_K) and }not sm90" ;;
  # The int8 Linear CUDA tests again with the fused sm90 GEMM chosen wherever it fits.
  suite90) QLIB_INT8_CUDA_GEMM=cutlass-sm90 TAIL=25 stage test 240 $PY -m pytest tests/test_int8.py tests/test_model_cast.py \
      -q -p no:cacheprovider -n 8 -rfEs -k "cuda and not sm90" ;;
  # ... and with cuBLASLt's path chosen ("auto" takes the fused GEMM on 9.0 wherever it fits).
  suitelt) QLIB_INT8_CUDA_GEMM=cublaslt TAIL=25 stage test 240 $PY -m pytest tests/test_int8.py tests/test_model_cast.py \
      -q -p no:cacheprovider -n 8 -rfEs -k "cuda and not sm90" ;;
  sanitize)
    # (The bad-qparams NaN kernels and pad_operand's off-boundary views are in; not the errors, nor K = 2^17.)
    SEL="cuda and not compile and not opcheck and not export and not ddp and not error and not bad_in and not bad_arg and not bad_static and not k_boundary and not packed_matches"
    for tool in ${SAN_TOOLS:-memcheck racecheck}; do
      stage "sanitize" 280 compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
        $PY -m pytest tests/test_fake_quant.py tests/test_affine_ops.py tests/test_observers.py tests/test_int8.py tests/test_fourbit.py \
        -q -p no:cacheprovider -x -k "$SEL"
    done ;;
  ncufq)
    cat >/tmp/fq.py <<'PYEOF'
import torch, qlib
x32 = torch.randn(4096, 4096, device="cuda")
for x in (x32, x32.bfloat16()):
    for s in (torch.tensor(0.02, device="cuda"), torch.full((4096, 1), 0.02, device="cuda")):
        z = torch.zeros(s.shape, dtype=torch.int32, device="cuda")
        for _ in range(3):
            torch.ops.qlib.fake_quant(x, s, z, -128, 127)
torch.cuda.synchronize()
PYEOF
    # Launches 3-12 (past the first two, which warm up); clocks left alone (METHOD.md).
    TAIL=200 stage ncufq 240 ncu --clock-control none -k regex:fake_quant_kernel --launch-skip 2 --launch-count 10 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section SchedulerStats $PY /tmp/fq.py ;;
  ceilings) TAIL=8 stage bench 120 $PY benchmarks/gpu_ceilings.py ;;
  benchfq) TAIL=18 stage bench 150 $PY benchmarks/bench_fake_quant.py --device cuda --repeat 50 ;;
  benchfq64) TAIL=18 stage bench64 200 $PY benchmarks/bench_fake_quant.py --device cuda --repeat 30 --numel 67108864 ;;
  fqpacks) TAIL=16 stage bench 90 $PY benchmarks/bench_fake_quant.py --device cuda --repeat 30 --packs-only ;;
  benchobs) TAIL=26 stage bench 120 $PY benchmarks/bench_observers.py --device cuda ;;
  benchint8) TAIL=30 stage bench 240 $PY benchmarks/bench_int8_linear.py --no-cpu --markdown "$OUT/int8.md" ;;
  bench4) TAIL=24 stage bench 120 $PY benchmarks/bench_linear_4bit.py --no-cpu ;;
  *) echo "== unknown stage: $s" ;;
  esac
done
