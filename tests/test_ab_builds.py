"""benchmarks/ab_builds.py runs end to end: this checkout timed against itself, one tiny shape."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ab_builds_times_both_builds():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_builds.py"), "--base", str(ROOT), "--shapes", "40x13x9",
         "--rounds", "2", "--calls", "1"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.strip().startswith("40x13x9"))
    match = re.search(r"base\s+([\d.]+)\s+new\s+([\d.]+)\s+base/new ([\d.]+)\s+paired ([\d.]+)", line)
    assert match, line
    base, new, ratio, paired = map(float, match.groups())
    assert base > 0 and new > 0 and ratio > 0 and paired > 0


def test_ab_builds_refuses_a_base_without_the_package(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_builds.py"), "--base", str(tmp_path), "--shapes", "8x2x2"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no vqvae_fast package" in done.stderr


def test_ab_builds_compares_two_environments_on_the_installed_build():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_builds.py"), "--new-env", "THP_MEM_ALLOC_ENABLE=1",
         "--task", "cdist", "--shapes", "40x13x9", "--rounds", "2", "--calls", "1"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "new: installed build THP_MEM_ALLOC_ENABLE=1" in done.stdout, done.stdout
    assert re.search(r"40x13x9\s+base\s+[\d.]+\s+new\s+[\d.]+\s+base/new [\d.]+\s+paired [\d.]+", done.stdout)


@pytest.mark.parametrize("arguments, message", [
    ([], "nothing differs between the two sides"),
    (["--new-env", "THP_MEM_ALLOC_ENABLE"], "expected NAME=VALUE"),
])
def test_ab_builds_refuses_sides_that_cannot_differ(arguments, message):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_builds.py"), "--shapes", "8x2x2", *arguments],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr
