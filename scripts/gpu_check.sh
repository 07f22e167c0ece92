#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the package, run the whole test suite without the Triton
# interpreter, memcheck the CUDA kernels, and produce every GPU benchmark number of
# benchmarks/RESULTS.md. Logs, JSON and plots go to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR                  # everything, in order
#   scripts/gpu_check.sh OUTDIR sweep training   # only these stages (OUTDIR accumulates)
#
# Stages: build tests memcheck compare pytest-bench sweep training train-cifar10. Where one command may only
# run for a limited time, run the stages in a few calls with the same OUTDIR. SWEEP_MINUTES
# (default 15) bounds each sweep: points not reached are listed in its JSON as not run.
# Afterwards, to publish: copy OUTDIR/*.json into benchmarks/results/ and OUTDIR/plots/*.png
# into benchmarks/plots/, and fill in the GPU section of benchmarks/RESULTS.md.
# Exit status: non-zero if the build or the tests failed or a benchmark found a wrong result.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [STAGE ...]}
shift
stages=${*:-build tests memcheck compare pytest-bench sweep training train-cifar10}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
status=0
want() { [[ " $stages " == *" $1 "* ]]; }
note() { echo "== $*" | tee -a "$out/summary.txt"; }

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"
git rev-parse HEAD > "$out/git-commit.txt" 2>/dev/null

if want build; then
  # The CUDA extension must be compiled against this machine's torch and toolkit.
  if MAX_JOBS=${MAX_JOBS:-16} VQVAE_FAST_CUDA=1 pip install -e . --no-build-isolation --no-deps > "$out/build.log" 2>&1; then
    note "build ok"
  else
    tail -50 "$out/build.log"; note "build FAILED (see build.log)"; exit 1
  fi
fi

if want tests; then
  python -m pytest tests -q -rs --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1; rc=$?
  tail -5 "$out/tests.log"; note "tests rc=$rc"; [ $rc -eq 0 ] || status=1
fi

if want memcheck; then
  if command -v compute-sanitizer > /dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest tests -q -x -k "cuda" \
      > "$out/memcheck.log" 2>&1; rc=$?
    note "memcheck rc=$rc"; [ $rc -eq 0 ] || status=1
  else
    note "memcheck skipped: no compute-sanitizer on PATH"
  fi
fi

if want compare; then
  # The goal's point (tokenizer size) in bf16 and fp32, forward, backward and indices only,
  # and the CPU key point's shape for comparison with the CPU table.
  for spec in "262144 16384 256 bfloat16" "262144 16384 256 float32" "65536 1024 64 float32"; do
    set -- $spec
    for task in forward backward nearest; do
      python benchmarks/compare.py --device cuda --shape "$1" "$2" "$3" --dtype "$4" --task "$task" --rounds 20 \
        --json "$out/compare_cuda_${task}_${1}x${2}x${3}_$4.json" 2>&1 | tee -a "$out/compare.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
  done
  note "compare done (compare.txt)"
fi

if want pytest-bench && ! python -c "import pytest_benchmark" 2> /dev/null; then
  note "pytest-bench skipped: pytest-benchmark is not installed"; status=1
elif want pytest-bench; then
  python -m pytest benchmarks/ --benchmark-only -q --benchmark-columns=median,iqr,min,max,rounds \
    --benchmark-json="$out/pytest_benchmark_cuda.json" > "$out/pytest_benchmark.log" 2>&1; rc=$?
  tail -3 "$out/pytest_benchmark.log"; note "pytest-benchmark rc=$rc"; [ $rc -eq 0 ] || status=1
fi

if want sweep; then
  python benchmarks/sweep.py --gpu --max-minutes "${SWEEP_MINUTES:-15}" \
    --json "$out/sweep_cuda_forward.json" --plots "$out/plots" 2>&1 | tee "$out/sweep_forward.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  python benchmarks/sweep.py --gpu --task backward --dtypes bfloat16 --max-minutes "${SWEEP_MINUTES:-15}" \
    --json "$out/sweep_cuda_backward.json" --plots "$out/plots" 2>&1 | tee "$out/sweep_backward.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  note "sweeps done (sweep_*.txt, plots/)"
fi

if want training; then
  for amp in "" "--amp"; do
    python benchmarks/bench_training.py --device cuda $amp --json "$out/training_cuda${amp:+_amp}.json" \
      2>&1 | tee -a "$out/training.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  note "training benchmark done (training.txt)"
fi

if want train-cifar10; then
  # The trainer on the GPU: 20k steps at batch 256 on the CIFAR-10 folder beside the repo
  # (CIFAR_DIR to override), bf16 autocast; final.json has test PSNR, codes used, wall time.
  cifar=${CIFAR_DIR:-../shared/data/cifar-10-subset/cifar-10-batches-py}
  python examples/train_cifar10.py --data-dir "$cifar" --device cuda --amp --steps 20000 --batch-size 256 \
    --out "$out/train_cifar10_20k" --quiet 2>&1 | tee "$out/train_cifar10_20k.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  note "train-cifar10 done (train_cifar10_20k/final.json)"
fi

note "gpu_check status=$status; results in $out"
exit $status
