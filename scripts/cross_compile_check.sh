#!/usr/bin/env bash
# Cross-compile every C++ source of the extension vqvae_fast._C (CSRC/ops.cpp + CSRC/cpu/*.cpp,
# the list setup.py builds) for aarch64 Linux, to object files in a temporary folder, and say
# per file whether it compiled. No linking, nothing is run: it checks that the sources build on
# arm64 (no x86 intrinsics, target attributes or __builtin_cpu_supports outside x86 guards),
# which CI can do without an arm64 runner.
#
#   scripts/cross_compile_check.sh [CSRC_DIR]     # default: csrc/ beside this script
#
# Prints one line per file ("ok" or "FAIL"); on a failure, that file's compiler errors follow, and
# the exit status is 1. Where binutils' nm is present, the objects' symbols are then matched too:
# a function of ours that some file calls and no file defines for aarch64 fails the check. Exit
# status 77 (nothing compiled) when no cross compiler is found; 2 for a usage error.
#
# The compiler: the clang inside the `ziglang` wheel of PyPI (in requirements.txt), run as
# `python -m ziglang c++ -target aarch64-linux-gnu`: it brings its own libc++ and glibc headers
# for the target, so no sysroot is needed. Any other cross compiler can be named instead:
#   CROSS_CXX="aarch64-linux-gnu-g++"  or  CROSS_CXX="clang++ --target=aarch64-linux-gnu --sysroot=..."
# PYTHON (default: python, else python3, on PATH) is the interpreter whose torch gives the include paths.
#
# Flags are those torch.utils.cpp_extension passes for setup.py's CppExtension (torch's include
# paths, Python's include dir, -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C,
# -std=c++20 as torch requires, -fPIC, -DNDEBUG, -fopenmp), at CROSS_OPT (default -O1: codegen
# runs, so a target-specific builtin or attribute that only fails when lowered is still caught,
# at a fraction of -O3's time). -fopenmp stays, so `#pragma omp` is parsed as on a real build,
# but the zig toolchain has no omp.h (torch's ATen/Parallel.h includes it): a stub omp.h that
# only declares the OpenMP runtime functions is put first on the include path. Object files do
# not need the runtime, so nothing is lost for a compile-only check.
#
# Objects (-c), not -fsyntax-only: codegen-time errors are caught too, and zig's clang driver does
# not take -fsyntax-only. -O1 costs ~45-50 s of CPU for the sources (-O0 ~42 s), 35-60 s on two
# cores; most of it is torch's headers. aarch64-linux-gnu-g++ (Debian's g++-aarch64-linux-gnu) as
# CROSS_CXX gives the same verdicts. JOBS (default: number of CPUs) files compile at once; CROSS_TARGET (default
# aarch64-linux-gnu) and CROSS_OPT change the target and the optimisation level.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
csrc="${1:-$here/../csrc}"
csrc="$(cd "$csrc" 2>/dev/null && pwd)" || { echo "cross_compile_check: no such folder: ${1:-csrc}" >&2; exit 2; }
python="${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}"
target="${CROSS_TARGET:-aarch64-linux-gnu}"
opt="${CROSS_OPT:--O1}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

if [[ -n "${CROSS_CXX:-}" ]]; then
  read -r -a cxx <<<"$CROSS_CXX"
  command -v "${cxx[0]}" >/dev/null || { echo "cross_compile_check: SKIP: CROSS_CXX=${cxx[0]} not found" >&2; exit 77; }
else
  if ! "$python" -c "import ziglang" 2>/dev/null; then
    echo "cross_compile_check: SKIP: no cross compiler (pip install ziglang, or set CROSS_CXX)" >&2
    exit 77
  fi
  cxx=("$python" -m ziglang c++ -target "$target")
fi

# Include paths exactly as cpp_extension computes them, then Python's headers (ops.cpp includes Python.h).
# (torch's import warnings, e.g. about CUDA_HOME, are shown only if this fails.)
paths_err="$(mktemp)"
mapfile -t includes < <("$python" - 2>"$paths_err" <<'EOF'
import sysconfig
from torch.utils import cpp_extension
for path in cpp_extension.include_paths():
    print(path)
print(sysconfig.get_paths()["include"])
EOF
)
if (( ${#includes[@]} < 2 )); then
  cat "$paths_err" >&2; rm -f "$paths_err"
  echo "cross_compile_check: could not ask torch for its include paths (PYTHON=$python)" >&2
  exit 2
fi
rm -f "$paths_err"

sources=("$csrc/ops.cpp")
while IFS= read -r f; do sources+=("$f"); done < <(ls "$csrc"/cpu/*.cpp 2>/dev/null | LC_ALL=C sort)
[[ -f "${sources[0]}" ]] || { echo "cross_compile_check: $csrc/ops.cpp not found" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/cross_compile_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stub"
cat >"$work/stub/omp.h" <<'EOF'
/* Stub for a compile-only check: declarations of the OpenMP runtime, no implementation. */
#pragma once
#ifdef __cplusplus
extern "C" {
#endif
int omp_get_num_threads(void);
int omp_get_max_threads(void);
int omp_get_thread_num(void);
int omp_get_num_procs(void);
int omp_in_parallel(void);
void omp_set_num_threads(int);
void omp_set_dynamic(int);
int omp_get_dynamic(void);
double omp_get_wtime(void);
#ifdef __cplusplus
}
#endif
EOF

flags=(-I"$work/stub")
for inc in "${includes[@]}"; do flags+=(-I"$inc"); done
flags+=("$opt" -g0 -std=c++20 -fPIC -fopenmp -DNDEBUG -fwrapv
        -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)

x86_features='avx|sse|amx|fma|bmi|f16c|lzcnt|popcnt|x86|vnni|vpclmul|gfni|pclmul|aes'
x86_in_source="target *\\( *\"[^\"]*($x86_features)|__builtin_cpu_supports *\\( *\"($x86_features)"
x86_on_arm="invalid cpu feature string for builtin|is not a recognized feature for this target|in the 'target' attribute string|x86 only: gcc rejects it"
echo "cross_compile_check: ${#sources[@]} files of $csrc for $target: ${cxx[*]} $opt -c"
start=$SECONDS
for i in "${!sources[@]}"; do
  while (( $(jobs -rp | wc -l) >= jobs )); do wait -n; done
  src="${sources[$i]}"
  (
    t0=$EPOCHREALTIME
    "${cxx[@]}" "${flags[@]}" -c -o "$work/$i.o" "$src" >"$work/$i.log" 2>&1
    rc=$?
    # clang never looks at the target attribute of a function it does not emit (an unused inline
    # or template one), where gcc rejects any x86 one: what our own files keep after preprocessing
    # for this target is searched for them (torch's headers are not).
    if (( rc == 0 )); then
      "${cxx[@]}" "${flags[@]}" -E "$src" 2>/dev/null | awk -v dir="$csrc/" -v OFS=: '
        /^# [0-9]+ "/ { line = $2; file = substr($3, 2, length($3) - 2); next }
        { if (index(file, dir) == 1) print file, line, $0; line++ }' |
        grep -E "$x86_in_source" | sed 's/$/  <- x86 only: gcc rejects it on this target/' >>"$work/$i.log"
    fi
    echo "$rc $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" >"$work/$i.rc"
  ) &
done
wait

failed=0
symbols_failed=0
for i in "${!sources[@]}"; do
  src="${sources[$i]}"
  rel="${src#"$csrc"/}"
  read -r rc secs <"$work/$i.rc"
  # clang only warns about x86 features on aarch64 (and drops them), where gcc, which builds the
  # extension there, stops: `target("avx2") is not valid`, `__builtin_cpu_supports not declared`.
  if [[ "$rc" == 0 ]] && grep -qE "$x86_on_arm" "$work/$i.log"; then rc="x86 feature for $target: gcc rejects it"; fi
  if [[ "$rc" == 0 ]]; then
    warnings=$(grep -c ': warning:' "$work/$i.log")
    printf 'ok    %-22s %5ss%s\n' "$rel" "$secs" "$( (( warnings )) && echo "  ($warnings warnings)")"
  else
    failed=$((failed + 1))
    printf 'FAIL  %-22s %5ss  (%s)\n' "$rel" "$secs" "$([[ "$rc" =~ ^[0-9]+$ ]] && echo "exit $rc" || echo "$rc")"
    sed 's/^/    /' "$work/$i.log"
  fi
done
# Nothing is linked (no aarch64 libtorch here), but the objects' own symbols can be matched: a
# function of ours (namespace vqvae_fast) that one file calls and no file defines for this target
# (a definition guarded away without a fallback) would make the library fail to load there.
if (( failed == 0 )) && command -v nm >/dev/null; then
  nm -g --defined-only "$work"/*.o 2>/dev/null | awk 'NF == 3 {print $3}' | LC_ALL=C sort -u >"$work/defined"
  nm -u "$work"/*.o 2>/dev/null | awk 'NF == 2 {print $2}' | grep -E '^_ZN[KVRO]*10vqvae_fast' | LC_ALL=C sort -u >"$work/used"
  missing=$(LC_ALL=C comm -23 "$work/used" "$work/defined")
  if [[ -n "$missing" ]]; then
    symbols_failed=1
    echo "FAIL  symbols: called but defined in no file for $target:"
    echo "$missing" | { command -v c++filt >/dev/null && c++filt || cat; } | sed 's/^/    /'
  else
    echo "ok    symbols: every vqvae_fast function called is defined for $target"
  fi
fi
echo "cross_compile_check: $(( ${#sources[@]} - failed )) of ${#sources[@]} compiled for $target, $failed failed$( (( symbols_failed )) && echo ", symbols missing") ($((SECONDS - start)) s)"
(( failed == 0 && symbols_failed == 0 ))
