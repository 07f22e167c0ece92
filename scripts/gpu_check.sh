#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the package, run the static kernel checks and the whole
# test suite without the Triton interpreter, memcheck the Triton kernels, and produce every GPU
# number of benchmarks/RESULTS.md. Logs, JSON and plots go to OUTDIR. Four calls of at most
# ten minutes each cover everything (run them back to back on the same machine: the later ones
# reuse the first's build):
#
#   scripts/gpu_check.sh OUTDIR part1            # build inspect tests memcheck compare
#   scripts/gpu_check.sh OUTDIR part2            # build compare-backward pytest-bench sweep train-cifar10
#   scripts/gpu_check.sh OUTDIR part3            # build layer training
#   scripts/gpu_check.sh OUTDIR part4            # build residual
#   scripts/gpu_check.sh OUTDIR sweep training   # or any stages, in this order
#   scripts/gpu_check.sh OUTDIR quick            # one call: build compare layer training memcheck tests
#
# TESTS (test files) and TESTS_K (a pytest -k expression) narrow the tests stage; LAYER_SHAPES
# (bench_layer.py shape names, in the order to run) and LAYER_ROUNDS (default 3) the layer stage;
# TRAINING_RUNS (PRESET:FLAGS words, e.g. "tokenizer:--amp cifar:") the training stage;
# RESIDUAL_SHAPES (bench_residual.py shape names) the residual stage.
#
# Stages: build inspect tests memcheck compare compare-backward pytest-bench sweep layer
# training residual train-cifar10. compare: the goal point's forward (bf16, fp32, and ours alone in fp32
# with VQVAE_FAST_TRITON_FP32_PRECISION=tf32) and indices only, and the CPU key point; layer:
# bench_layer.py (one VQ-layer training step against vector-quantize-pytorch and a cdist layer)
# in fp32 and under bf16 autocast; training: bench_training.py at the tokenizer preset (64x64
# images, 16x16 codes, K=16384, N=16384 per step) and the CIFAR one; residual:
# bench_residual.py (residual quantizers' training step and encode: ours, vector-quantize-pytorch's
# ResidualVQ, the stage loops over cdist and over our single-stage op) in fp32 and bf16 autocast. The whole call ends
# within DEADLINE_S (default 570 s): every stage runs under `timeout` with at most its own
# limit (STAGE_LIMIT_S, default 240 s) and the time left, and a stage with no time left is
# reported as not run. Optional peers: wheels placed in .wheels/ are installed with --no-deps
# by the build stage, since the GPU machine may have no package registry; .wheels/ is
# git-ignored, so carry it to the GPU machine. Fetch them beforehand with
#   pip download --no-deps flash-kmeans -d .wheels          # compare: flash-kmeans' assignment
#   pip download --no-deps vector-quantize-pytorch einops einx frozendict loguru torch-einops-utils -d .wheels
# (the second: the layer stage's peer and its dependencies that torch does not bring).
# Afterwards, to publish: copy OUTDIR/*.json into benchmarks/results/ and OUTDIR/plots/*.png
# into benchmarks/plots/, and fill in the GPU section of benchmarks/RESULTS.md with
# `python benchmarks/report.py OUTDIR/*.json`.
# Exit status: non-zero if the build, the static checks or the tests failed, or a benchmark
# found a wrong result of ours.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [part1|part2|part3|quick|all|STAGE ...]}
shift
case "${*:-all}" in
  part1) stages="build inspect tests memcheck compare" ;;
  part2) stages="build compare-backward pytest-bench sweep train-cifar10" ;;
  part3) stages="build layer training" ;;
  part4) stages="build residual" ;;
  quick) stages="build compare layer training memcheck tests"; quick=1 ;;
  all) stages="build inspect tests memcheck compare compare-backward pytest-bench sweep layer training residual train-cifar10" ;;
  *) stages="$*" ;;
esac
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
status=0
deadline=$(( $(date +%s) + ${DEADLINE_S:-570} ))
note() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
limit=0
time_left() {  # time_left NAME [MAX_S]: sets $limit to min(MAX_S, time to the deadline); false if none
  local left=$(( deadline - $(date +%s) - 5 ))
  local max=${2:-${STAGE_LIMIT_S:-240}}
  limit=$(( left < max ? left : max ))
  if [ "$limit" -le 10 ]; then note "$1 NOT RUN: the call's deadline (DEADLINE_S) is reached"; return 1; fi
}
want() {  # want STAGE [MAX_S]: the stage was asked for and there is time left for it
  [[ " $stages " == *" $1 "* ]] && time_left "$@"
}
check() {  # check NAME RC: record a stage's exit status
  if [ "$2" -eq 0 ]; then note "$1 ok"; else note "$1 FAILED (rc=$2)"; status=1; fi
}
compare() {  # compare TASK...: the goal's point (tokenizer size) in bf16 and fp32, and the CPU key point
  local n k d dtype task spec
  local specs=${COMPARE_SPECS:-"262144 16384 256 bfloat16,262144 16384 256 float32,65536 1024 64 float32"}
  IFS=, read -ra specs <<< "$specs"
  for spec in "${specs[@]}"; do
    read -r n k d dtype task_override <<< "$spec"
    for task in ${task_override:-$@}; do
      time_left "compare $task $spec" 150 || continue
      timeout "$limit" python benchmarks/compare.py --device cuda --shape "$n" "$k" "$d" --dtype "$dtype" \
        --task "$task" --rounds 10 --json "$out/compare_cuda_${task}_${n}x${k}x${d}_$dtype.json" 2>&1 \
        | tee -a "$out/compare.txt"
      check "compare $task $spec" "${PIPESTATUS[0]}"
    done
  done
}
compare_tf32() {  # ours alone, fp32 forward at the goal point with the alternative first pass (one TF32 product)
  local n=262144 k=16384 d=256
  time_left "compare forward $n $k $d float32 tf32" 90 || return 0
  VQVAE_FAST_TRITON_FP32_PRECISION=tf32 timeout "$limit" python benchmarks/compare.py --device cuda \
    --shape "$n" "$k" "$d" --dtype float32 --task forward --providers "vqvae_fast[triton]" --rounds 10 \
    --json "$out/compare_cuda_forward_${n}x${k}x${d}_float32_tf32.json" 2>&1 | tee -a "$out/compare.txt"
  check "compare forward $n $k $d float32, ours with VQVAE_FAST_TRITON_FP32_PRECISION=tf32" "${PIPESTATUS[0]}"
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"
git rev-parse HEAD > "$out/git-commit.txt" 2>/dev/null
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")
if [ "${quick:-0}" = 1 ]; then
  # The quick profile, in this order, each stage under its own limit (estimated time on an
  # H100/H200 from a fresh machine in brackets): build (~60-90 s: the C++ CPU kernels); the
  # goal point's forward in bf16 (~35 s, limit 150) and fp32 (~60 s, limit 150), then ours
  # alone in fp32 with the TF32 first pass (~25 s, limit 90); the layer benchmark in fp32 and
  # under bf16 autocast (~90 s each, limit 120 each; its JSON is rewritten after every shape, so
  # a run cut at its limit keeps the shapes done, the tokenizer-sized ones first); the training
  # step at the tokenizer preset and at CIFAR's, both bf16 autocast (~40 and ~25 s, limit 90
  # each); memcheck (~40 s, limit 120); then the kernel tests with whatever time is left.
  COMPARE_SPECS=${COMPARE_SPECS:-"262144 16384 256 bfloat16 forward,262144 16384 256 float32 forward"}
  LAYER_SHAPES=${LAYER_SHAPES:-"vqgan-f16 llamagen-vq16 trainer-default cifar-vqvae mimi-first encodec-stage"}
  TRAINING_RUNS=${TRAINING_RUNS:-"tokenizer:--amp cifar:--amp"}
  TESTS=${TESTS:-"tests/test_triton_nearest_code.py tests/test_residual.py tests/test_residual_cosine.py tests/test_layer_step.py tests/test_extreme_inputs.py tests/test_nearest_code.py tests/test_custom_ops.py tests/test_quantize_grad.py tests/test_inputs.py tests/test_vector_quantizer.py tests/test_build.py"}
  STAGE_LIMIT_S=${STAGE_LIMIT_S:-600}
fi

if want build; then
  # The C++ CPU kernels, compiled against this machine's torch (the GPU kernels are Triton,
  # compiled at first use); skipped when the library is newer than every source and loads.
  lib=$(ls vqvae_fast/_C*.so 2>/dev/null | head -1)
  if [ -n "$lib" ] && [ -z "$(find csrc setup.py -newer "$lib" -type f)" ] \
     && python -c "import vqvae_fast._extension as e, sys; sys.exit(0 if e.has_compiled() else 1)" 2>/dev/null; then
    note "build: $lib is up to date"
  elif MAX_JOBS=${MAX_JOBS:-16} python -m pip install -e . --no-build-isolation --no-deps > "$out/build.log" 2>&1; then
    note "build ok"
  else
    tail -50 "$out/build.log"; note "build FAILED (see build.log)"; exit 1
  fi
  if ls .wheels/*.whl > /dev/null 2>&1; then
    python -m pip install --no-deps .wheels/*.whl > "$out/wheels.log" 2>&1 && note "installed $(ls .wheels/*.whl | xargs -n1 basename | tr '\n' ' ')"
  fi
fi

if want inspect; then
  # The static checks on this GPU's architecture (what CI checks without a GPU, for sm_90 and sm_80).
  timeout "$limit" python scripts/inspect_kernels.py --arch "$arch" --json "$out/inspect_$arch.json" \
    > "$out/inspect_$arch.txt" 2>&1
  check "inspect ($arch, inspect_$arch.txt)" $?
fi

run_tests() {
  want tests || return 0
  # -v: each test's outcome reaches the log as it runs, so a run cut at its limit still says what passed.
  timeout "$limit" python -m pytest ${TESTS:-tests} ${TESTS_K:+-k "$TESTS_K"} -v -rfEs --durations=10 --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1; rc=$?
  grep -cE " PASSED" "$out/tests.log" | sed 's/^/passed: /'; grep -E " (FAILED|ERROR)" "$out/tests.log" | head -20; tail -3 "$out/tests.log"
  check "tests (tests.log)" $rc
}
[ "${quick:-0}" = 1 ] || run_tests  # the quick profile runs them last

run_memcheck() {
  want memcheck 120 || return 0
  # The Triton kernels, forward and backward, at one small ragged shape per dtype.
  if command -v compute-sanitizer > /dev/null; then
    timeout "$limit" compute-sanitizer --tool memcheck --error-exitcode 1 python -c '
import torch, vqvae_fast
for dtype in (torch.float32, torch.bfloat16):
    z = torch.randn(300, 40, device="cuda", dtype=dtype, requires_grad=True)
    codebook = torch.randn(77, 40, device="cuda", dtype=dtype, requires_grad=True)
    quantized, indices, loss = vqvae_fast.quantize(z, codebook, backend="triton")
    (quantized.float().square().sum() + loss).backward()
    torch.cuda.synchronize()
    assert z.grad is not None and codebook.grad is not None and bool((indices < 77).all())
    print(dtype, "forward+backward ran")
' > "$out/memcheck.log" 2>&1
    check "memcheck (memcheck.log)" $?
  else
    note "memcheck skipped: no compute-sanitizer on PATH"
  fi
}
[ "${quick:-0}" = 1 ] || run_memcheck  # the quick profile runs it after the benchmarks

if [[ " $stages " == *" compare "* ]]; then compare forward nearest; compare_tf32; fi
if [[ " $stages " == *" compare-backward "* ]]; then compare backward; fi

if [[ " $stages " == *" pytest-bench "* ]] && ! python -c "import pytest_benchmark" 2> /dev/null; then
  note "pytest-bench skipped: pytest-benchmark is not installed"
elif want pytest-bench 120; then
  VQVAE_FAST_BENCH_SHAPES=${BENCH_SHAPES:-262144x16384x256:bfloat16,65536x1024x64:float32} \
    timeout "$limit" python -m pytest benchmarks/ --benchmark-only -q --benchmark-columns=median,iqr,min,max,rounds \
    --benchmark-json="$out/pytest_benchmark_cuda.json" > "$out/pytest_benchmark.log" 2>&1
  rc=$?; tail -3 "$out/pytest_benchmark.log"; check "pytest-benchmark (pytest_benchmark.log)" $rc
fi

if want sweep 200; then
  # --max-minutes starts no new point after 2 minutes; timeout bounds the last one.
  timeout "$limit" python benchmarks/sweep.py --gpu --max-minutes "${SWEEP_MINUTES:-2}" \
    --json "$out/sweep_cuda_forward.json" --plots "$out/plots" 2>&1 | tee "$out/sweep_forward.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  note "sweep done (sweep_forward.txt, plots/; points not reached are listed in the JSON)"
fi

if [[ " $stages " == *" layer "* ]]; then
  # One VQ-layer training step (ours, vector-quantize-pytorch when installed, a cdist layer) at
  # bench_layer.py's shapes; a run cut at its limit keeps the shapes done in its JSON.
  for autocast in none bf16; do
    time_left "layer $autocast" 120 || break
    name=bench_layer_cuda; [ "$autocast" = none ] || name+="_$autocast"
    timeout "$limit" python benchmarks/bench_layer.py --device cuda --rounds "${LAYER_ROUNDS:-3}" --autocast "$autocast" \
      ${LAYER_SHAPES:+--shapes $LAYER_SHAPES} --json "$out/$name.json" 2>&1 | tee -a "$out/layer.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ]; then note "layer $autocast cut at $limit s (the JSON has the shapes done)"
    else check "layer $autocast (layer.txt)" "$rc"; fi
  done
fi

if [[ " $stages " == *" training "* ]]; then
  # bench_training.py: PRESET:FLAGS per run; JSON training_cuda[_amp][_tokenizer].json.
  for run in ${TRAINING_RUNS:-tokenizer:--amp cifar:--amp cifar:}; do
    preset=${run%%:*} flags=${run#*:}
    time_left "training $preset $flags" 90 || break
    name=training_cuda; [[ " $flags " == *" --amp "* ]] && name+=_amp; [ "$preset" = cifar ] || name+="_$preset"
    timeout "$limit" python benchmarks/bench_training.py --device cuda --preset "$preset" $flags --json "$out/$name.json" \
      2>&1 | tee -a "$out/training.txt"
    check "training $preset $flags ($name.json)" "${PIPESTATUS[0]}"
  done
fi

if [[ " $stages " == *" residual "* ]]; then
  # Residual quantizers (issue 20): training step and encode at bench_residual.py's shapes; a run
  # cut at its limit keeps the shapes done in its JSON.
  for autocast in none bf16; do
    time_left "residual $autocast" 240 || break
    name=bench_residual_cuda; [ "$autocast" = none ] || name+="_$autocast"
    timeout "$limit" python benchmarks/bench_residual.py --device cuda --autocast "$autocast" \
      ${RESIDUAL_SHAPES:+--shapes $RESIDUAL_SHAPES} --json "$out/$name.json" 2>&1 | tee -a "$out/residual.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ]; then note "residual $autocast cut at $limit s (the JSON has the shapes done)"
    else check "residual $autocast (residual.txt)" "$rc"; fi
  done
fi

if want train-cifar10 "${TRAIN_LIMIT_S:-240}"; then
  # The trainer on the GPU: 20k steps at batch 256 (bf16 autocast) on the CIFAR-10 folder beside
  # the repo (CIFAR_DIR to override); final.json has test PSNR, codes used, wall time. Cut at the
  # stage limit, the run keeps its metrics.jsonl and checkpoint (continue with --resume).
  cifar=${CIFAR_DIR:-../shared/data/cifar-10-subset/cifar-10-batches-py}
  timeout "$limit" python examples/train_cifar10.py --data-dir "$cifar" --device cuda --amp \
    --steps 20000 --batch-size 256 --out "$out/train_cifar10_20k" --quiet 2>&1 | tee "$out/train_cifar10_20k.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ]; then note "train-cifar10 cut at $limit s (see metrics.jsonl)"; else check "train-cifar10" "$rc"; fi
fi

if [ "${quick:-0}" = 1 ]; then run_memcheck; run_tests; fi

note "gpu_check status=$status; results in $out"
exit $status
