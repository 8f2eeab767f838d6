#!/usr/bin/env bash
# One accelerator session, in the order that matters most (each step time-boxed;
# a failing step is logged and the next still runs):
#   1. tools/gpu_checks.py   Pallas kernels compiled for the device vs references,
#                            one full expert-layer host→device, one expert's FFN
#                            (SECTIONS=… picks sections; default below)
#   2. engine tests on the device (pinned_host staging, Pallas decode path)
#   3. tools/bench_streaming.py part A on a reduced synthetic model (2-bit shared)
#   5. tools/bench_locality.py decode on trained model directories (LOCALITY_MODELS,
#      space-separated): tok/s, stalls, prefetch accuracy per predictor (issue 24)
#   4. tools/bench_train_step.py: training tokens/s and MFU of the dense and routed
#      steps at d_model 1024 and 2048 (curricula/small.yaml scaled, bfloat16),
#      pdr_impl=auto (Pallas) vs chunked (issue 19; MFU against PEAK_TFLOPS, the
#      datasheet dense bf16 peak, 989 for an H100/H200 SXM)
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
STEPS=${STEPS:-1234}         # which of the numbered steps below to run
T_TRAIN=${T_TRAIN:-200} PEAK_TFLOPS=${PEAK_TFLOPS:-989}
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
  tests/infer/test_context_routing_engine.py tests/infer/test_hub_deltas.py \
  -k "${TESTS_K:-kernel or ternary or pdr or engine or double_buffer or delta or flipped or saved or group or 2bit or gptq or pinned or cancel or admission or guess or transfer or hub or context or previous or batched}" \
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
if [[ $STEPS == *5* ]]; then      # trained models (issue 24) carried in LOCALITY_MODELS
step "5. trained models: decode per predictor (bench_locality decode)"
dirs=(); for m in ${LOCALITY_MODELS:-}; do dirs+=(--model-dir "$m"); done
timeout "${T_LOCALITY:-150}" $py tools/bench_locality.py decode "${dirs[@]}" \
  > "$out/locality_decode.log" 2>&1
echo "rc $?"; tail -14 "$out/locality_decode.log"
fi
if [[ $STEPS == *4* ]]; then
step "4. training step throughput and MFU (bf16, d_model 1024 / 2048)"
for width in "1024 2816 8 128" "2048 5632 16 128"; do
  read -r d ff heads hd <<< "$width"
  timeout "$T_TRAIN" $py tools/bench_train_step.py --config curricula/small.yaml \
    --stages dense,sparse --arm "dense-chunked:dense:model.pdr_impl=chunked" \
    --repeats 10 --peak-tflops "$PEAK_TFLOPS" \
    model.d_model=$d model.d_ff=$ff model.n_heads=$heads model.head_dim=$hd \
    model.n_kv_heads=4 model.n_layers=8 model.dtype=bfloat16 model.vocab_size=32768 \
    moe.num_experts=8 moe.lattice=[2,2,2] data.seq_len=1024 train.batch_size=16 \
    > "$out/train_step_d$d.log" 2>&1
  echo "rc $?"; tail -9 "$out/train_step_d$d.log"
done
fi
step "done"
