"""A portable build (issue 23): the C++ sources compile for aarch64 as well as x86-64.

scripts/cross_compile_check.sh cross-compiles every source of vqvae_fast._C for aarch64-linux-gnu
with the clang of the `ziglang` wheel (requirements.txt), with the flags torch's cpp_extension
uses, so CI checks arm64 without an arm64 runner. The tests below skip only where that wheel is
not installed; CI installs requirements.txt, so there they run.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cross_compile_check.sh"

needs_cross_compiler = pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None,
    reason="no aarch64 cross compiler: the ziglang wheel of requirements.txt is not installed",
)


def run_check(csrc: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    command = ["bash", str(SCRIPT)] + ([str(csrc)] if csrc is not None else [])
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("CROSS_CXX", None)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@needs_cross_compiler
def test_extension_sources_compile_for_aarch64():
    """Every source setup.py builds compiles for aarch64, and every function of ours that one of
    them calls is defined for aarch64 by some file (x86-only bodies have portable fallbacks)."""
    done = run_check()
    report = done.stdout[-12000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    sources = ["csrc/ops.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    for source in sources:
        assert f"ok    {source.removeprefix('csrc/')} " in done.stdout, report
    assert "ok    symbols:" in done.stdout, report


def _tiny_csrc(tmp_path: Path, files: dict[str, str]) -> Path:
    """A csrc/ of small files (no torch headers, so each compiles in well under a second)."""
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    for name, text in files.items():
        (csrc / name).write_text(text)
    return csrc


@needs_cross_compiler
def test_check_fails_on_x86_only_code(tmp_path):
    """The check itself: an unguarded x86 intrinsic or target attribute fails it, naming the file
    and showing the error."""
    csrc = _tiny_csrc(tmp_path, {
        "ops.cpp": "int ops_ok() { return 1; }\n",
        "cpu/x86.cpp": (
            "#include <immintrin.h>\n"
            "bool fast() { return __builtin_cpu_supports(\"avx512f\"); }\n"
        ),
        # clang compiles this for aarch64 (the attribute of a function it never emits is not
        # looked at) where gcc, which builds the extension there, rejects it: the check fails it.
        "cpu/attribute.cpp": 'template <bool B> __attribute__((target("avx2"))) int twice(int x) { return 2 * x; }\n',
    })
    done = run_check(csrc, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ok    ops.cpp " in done.stdout and "FAIL  cpu/x86.cpp " in done.stdout, done.stdout
    assert "immintrin.h" in done.stdout and "error" in done.stdout, done.stdout
    assert "FAIL  cpu/attribute.cpp " in done.stdout and "gcc rejects it" in done.stdout, done.stdout


@needs_cross_compiler
def test_check_passes_guarded_code_and_fails_a_missing_fallback(tmp_path):
    """x86 code under `#if defined(__x86_64__)` with a fallback passes; the same guard without
    the fallback compiles but leaves a called function undefined on aarch64, which fails."""
    guarded = (
        "namespace vqvae_fast {\n"
        "#if defined(__x86_64__)\n"
        "}\n#include <immintrin.h>\nnamespace vqvae_fast {\n"
        "bool scan_available() { return __builtin_cpu_supports(\"avx512f\"); }\n"
        "%s\n"
        "#endif\n"
        "}\n"
    )
    caller = "namespace vqvae_fast { bool scan_available(); }\nbool use() { return vqvae_fast::scan_available(); }\n"
    with_fallback = _tiny_csrc(tmp_path / "a", {
        "ops.cpp": caller, "cpu/scan.cpp": guarded % "#else\nbool scan_available() { return false; }"})
    done = run_check(with_fallback, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    cpu/scan.cpp " in done.stdout and "ok    symbols:" in done.stdout, done.stdout

    without = _tiny_csrc(tmp_path / "b", {"ops.cpp": caller, "cpu/scan.cpp": guarded % "// no fallback"})
    done = run_check(without, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL  symbols:" in done.stdout and "vqvae_fast::scan_available()" in done.stdout, done.stdout


def test_setup_has_no_native_arch_flags():
    """Runtime dispatch only: no -march=native / -mcpu=native / -mavx* in setup.py's flags."""
    text = (ROOT / "setup.py").read_text()
    for flag in ("-march=native", "-mcpu=native", "-mtune=native", "-mavx", "-mamx"):
        assert flag not in text, flag


def _neon_inspector():
    spec = importlib.util.spec_from_file_location("inspect_neon_scan", ROOT / "scripts" / "inspect_neon_scan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cross_compiler
def test_neon_scan_keeps_its_accumulators_in_registers():
    """The portable scan compiled for aarch64 (NEON) at -O3: both forms of its pass have an inner
    loop of 24 fmla with no stack access (scripts/inspect_neon_scan.py; gcc too where installed)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "inspect_neon_scan.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "ok    clang (zig)" in done.stdout, done.stdout


def test_neon_loop_reader_sees_spills_and_short_loops():
    """The reader of the inspection: a loop whose accumulators spill, or with fewer fmla, fails."""
    inspect = _neon_inspector()
    fmla = "\tfmla\tv0.4s, v1.4s, v2.s[0]\n"
    good = ".LBB0_1:\n\tldp\tq1, q2, [x0], #32\n" + fmla * 24 + "\tsubs\tx1, x1, #1\n\tb.ne\t.LBB0_1\n"
    spilled = good.replace("\tsubs", "\tstr\tq3, [sp, #16]\n\tsubs")
    other = ".L7:\n" + fmla * 3 + "\tbne\t.L7\n"  # another function's loop: not a scan loop
    loops = inspect.scan_loops(good + spilled.replace("LBB0_1", "LBB0_2") + other)
    assert [inspect.summarise(loop)["stack_accesses"] for loop in loops] == [0, 1]
    assert all(inspect.summarise(loop)["fmla"] == inspect.EXPECTED_FMLA for loop in loops)
