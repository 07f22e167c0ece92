#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the package, run the whole test suite without the
# Triton interpreter, and the benchmarks; logs and JSON go to OUTDIR.
#   scripts/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
# Build once (CUDA extension against this machine's torch).
MAX_JOBS=16 pip install -e . --no-build-isolation --no-deps > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -m pytest tests -q -rs --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1; tests_rc=$?
tail -5 "$out/tests.log"
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest tests -q -x -k "cuda" \
    > "$out/memcheck.log" 2>&1; echo "memcheck rc=$?" | tee -a "$out/memcheck.log"
fi
python benchmarks/compare.py --device cuda --shape 65536 1024 64 --dtype float32 --rounds 20 \
  --json "$out/compare_65536x1024x64_fp32.json" | tee "$out/compare.txt"
python benchmarks/compare.py --device cuda --shape 262144 16384 256 --dtype bfloat16 --rounds 10 \
  --json "$out/compare_262144x16384x256_bf16.json" | tee -a "$out/compare.txt"
exit $tests_rc
