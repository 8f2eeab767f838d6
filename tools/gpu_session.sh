#!/usr/bin/env bash
# One accelerator session, in the order that matters most (each step time-boxed;
# a failing step is logged and the next still runs):
#   1. tools/gpu_checks.py   Pallas kernels compiled for the device vs references,
#                            one full expert-layer host→device, one expert's FFN
#                            (SECTIONS=… picks sections; default below)
#   2. engine tests on the device (pinned_host staging, Pallas decode path)
#   3. tools/bench_streaming.py part A on a reduced synthetic model (2-bit shared)
# When step 3 is asked for, its synthetic store (≈ 45 s on the 16-core H100 host) is
# built in the background after step 1 (whose host-side timings it would disturb),
# so step 2 hides the build. Every job
# shares one persistent XLA compilation cache (each bench job is its own process).
# Usage: [STEPS=123] [SECTIONS=…] [TOKENS=32] [BENCH_EXTRA='--compare transfer,cancel'] bash tools/gpu_session.sh OUT_DIR [PYTHON]
set -u
out=${1:?usage: tools/gpu_session.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/perspective-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
T_CHECKS=${T_CHECKS:-170} T_TESTS=${T_TESTS:-150} T_BENCH=${T_BENCH:-240}
STEPS=${STEPS:-123}          # which of the numbered steps below to run
SECTIONS=${SECTIONS:-ternary,shared,pdr,transfer,staging,ffn}
TEST_PLATFORM=${TEST_PLATFORM:-cuda}
WORK=${WORK:-/tmp/perspective-bench}
BENCH=(--parts A --variants wide --experts 16 --host-mb 256 --routers coherent
       --tokens "${TOKENS:-32}" --work-dir "$WORK" --shared-bits 2 ${BENCH_EXTRA:-})

step() { echo "=== $* ($(date +%T))"; }
step "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tail -1
$py -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"

if [[ $STEPS == *1* ]]; then
step "1. gpu_checks ($SECTIONS)"
timeout "$T_CHECKS" $py tools/gpu_checks.py --quick --sections "$SECTIONS" --out "$out" \
  > "$out/gpu_checks.log" 2>&1
echo "rc $?"; grep -v "^ " "$out/gpu_checks.log" | tail -25
fi

if [[ $STEPS == *3* ]]; then      # build the store while step 2 uses the device (after
  step "3a. building the synthetic store in the background"   # step 1's host timings)
  JAX_PLATFORMS=cpu $py tools/bench_streaming.py "${BENCH[@]}" --build-only \
    > "$out/build.log" 2>&1 &
  build_pid=$!
fi

if [[ $STEPS == *2* ]]; then
step "2. engine + kernel tests on the device"
JAX_PLATFORMS=$TEST_PLATFORM JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$T_TESTS" \
  $py -m pytest -q -p no:cacheprovider -rfE tests/infer/test_infer.py tests/infer/test_expert_tiers.py \
  tests/kernels/test_group_matmul.py tests/kernels/test_kernels.py \
  -k "${TESTS_K:-kernel or ternary or pdr or engine or double_buffer or delta or flipped or saved or group or 2bit or gptq or pinned or cancel or admission or guess or transfer}" \
  --durations=12 > "$out/pytest_device.log" 2>&1
echo "rc $?"; tail -25 "$out/pytest_device.log"
fi

if [[ $STEPS == *3* ]]; then
step "3. streaming bench (synthetic wide, 18 x 16 experts, 256 MB host)"
wait "$build_pid"; echo "build rc $?"; tail -3 "$out/build.log"
timeout "$T_BENCH" $py tools/bench_streaming.py "${BENCH[@]}" --skip-build \
  > "$out/bench_streaming.log" 2>&1
echo "rc $?"; tail -22 "$out/bench_streaming.log"
fi
step "done"
