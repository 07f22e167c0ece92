"""The portable scan's inner loops as an aarch64 compiler emits them (NEON), checked without an
arm64 machine: csrc/cpu/scan_portable.cpp is compiled to assembly at -O3 for aarch64-linux-gnu,
and the scan's inner loops (the innermost loops with at least 12 vector fmla; the other loops,
of code_in_group, pack_panel and exact_sq_dist, have a few) are read: how many fmla each has, how
many loads, and whether it touches the stack (an accumulator spilled to memory).

    python scripts/inspect_neon_scan.py [--json FILE]

Compilers: the clang of the `ziglang` wheel (requirements.txt) and, where installed,
aarch64-linux-gnu-g++ (gcc builds the extension on most arm64 Linux machines). The scan's pass
keeps 24 accumulators (16 rows x 6 codes, 4 floats each) in the 32 vector registers: there should
be two such loops (the two forms of the pass, scan.h's group_index or not), each with 24 fmla, the
loads of 6 vectors (4 of rows, 2 of codes) and no stack access. Exit status 1 if a compiler's
loops miss that, 77 if no compiler is found.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cpu" / "scan_portable.cpp"
EXPECTED_FMLA = 24  # kPassCodes x kPassVectors accumulators, one fmla each per coordinate
SCAN_LOOP_FMLA = 12  # fewer: another function's loop


def compilers() -> dict[str, list[str]]:
    """Name -> command of each aarch64 C++ compiler found."""
    found = {}
    if importlib.util.find_spec("ziglang") is not None:
        found["clang (zig)"] = [sys.executable, "-m", "ziglang", "c++", "-target", "aarch64-linux-gnu"]
    if shutil.which("aarch64-linux-gnu-g++"):
        found["gcc"] = ["aarch64-linux-gnu-g++"]
    return found


def assembly(command: list[str]) -> str:
    """scan_portable.cpp compiled to aarch64 assembly with the flags setup.py builds with."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "scan_portable.s"
        done = subprocess.run(command + ["-O3", "-g0", "-std=c++20", "-fPIC", "-DNDEBUG", *includes, "-S",
                                         str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        return out.read_text()


LABEL = re.compile(r"^(\.?L[\w.$]+):")
BRANCH = re.compile(r"^\s+(?:b\.\w+|b\w\w|cbn?z|tbn?z)\s+(?:\w+,\s*)*(?:#\d+,\s*)?(\.?L[\w.$]+)\s*$")


def scan_loops(text: str) -> list[list[str]]:
    """The instructions of every innermost loop (a label, straight code with no other label, and
    a branch back to it) with at least SCAN_LOOP_FMLA vector fmla."""
    lines = [line.split("//")[0].rstrip() for line in text.splitlines()]
    loops, open_label, body = [], None, []
    for line in lines:
        label = LABEL.match(line)
        if label:
            open_label, body = label.group(1), []
            continue
        if not line.strip() or line.lstrip().startswith("."):
            continue
        body.append(line.strip())
        branch = BRANCH.match(line)
        if branch and branch.group(1) == open_label:
            if sum(bool(re.match(r"fmla\s+v\d+\.4s", i)) for i in body) >= SCAN_LOOP_FMLA:
                loops.append(body)
            open_label, body = None, []
    return loops


def summarise(loop: list[str]) -> dict:
    return {
        "instructions": len(loop),
        "fmla": sum(i.startswith("fmla") for i in loop),
        "loads": sum(bool(re.match(r"ld", i)) for i in loop),
        "stack_accesses": sum("[sp" in i for i in loop),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the per-compiler loop summaries here")
    args = parser.parse_args()
    found = compilers()
    if not found:
        print("inspect_neon_scan: SKIP: no aarch64 compiler (pip install ziglang)", file=sys.stderr)
        return 77
    report, ok = {}, True
    for name, command in found.items():
        version = subprocess.run(command + ["--version"], capture_output=True, text=True).stdout.splitlines()[0]
        loops = [summarise(loop) for loop in scan_loops(assembly(command))]
        good = len(loops) == 2 and all(l["fmla"] == EXPECTED_FMLA and l["stack_accesses"] == 0 for l in loops)
        ok = ok and good
        report[name] = {"version": version, "loops": loops, "ok": good}
        print(f"{'ok  ' if good else 'FAIL'}  {name} ({version}): {len(loops)} scan loops")
        for l in loops:
            print(f"        {l['instructions']} instructions: {l['fmla']} fmla, {l['loads']} loads, "
                  f"{l['stack_accesses']} stack accesses")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
