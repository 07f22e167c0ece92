"""The static GPU checks (scripts/inspect_kernels.py) hold for sm_90 and sm_80, and can fail."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import inspect_kernels  # noqa: E402

FIELDS = {"kernel", "config", "dtype", "mma", "registers", "spill_bytes", "shared_bytes", "z_loads_in_loop"}


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_every_kernel_and_config_passes_the_static_checks(arch, tmp_path):
    out = tmp_path / f"inspect_{arch}.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "inspect_kernels.py"), "--arch", arch, "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    records = json.loads(out.read_text())
    assert all(FIELDS <= set(r) for r in records)
    searches = [r for r in records if r["kernel"].startswith("search")]
    assert len(searches) > 100
    assert all(r["mma"] in ("wgmma", "mma") for r in searches if r["dtype"] in ("bf16", "fp16"))
    if arch == "sm_90":
        assert any(r["mma"] == "wgmma" for r in searches)
    assert any(r["z_loads_in_loop"] == 0 for r in searches) and any(r["z_loads_in_loop"] is None for r in searches)


LOOP_WITH_Z_LOAD = """\
  tt.func public @k(%z_ptr: !tt.ptr<bf16>, %codes_ptr: !tt.ptr<bf16>) {
    %0 = tt.splat %z_ptr : !tt.ptr<bf16> -> tensor<64x64x!tt.ptr<bf16>>
    %1 = tt.splat %codes_ptr : !tt.ptr<bf16> -> tensor<64x64x!tt.ptr<bf16>>
    %r:2 = scf.for %i = %c0 to %c8 step %c1 iter_args(%zp = %0, %acc = %cst) -> (tensor<64x64x!tt.ptr<bf16>>, f32) {
      %z = tt.load %zp : tensor<64x64x!tt.ptr<bf16>>
      %e = tt.load %1 : tensor<64x64x!tt.ptr<bf16>>
      %d = tt.dot %z, %e, %acc : tensor<64x64xbf16> * tensor<64x64xbf16> -> tensor<64x64xf32>
      scf.yield %zp, %d : tensor<64x64x!tt.ptr<bf16>>, f32
    }
    tt.return
  }
"""


def test_the_z_load_check_sees_a_load_inside_the_loop():
    assert inspect_kernels.z_loads_in_codebook_loop(LOOP_WITH_Z_LOAD) == 1
    hoisted = LOOP_WITH_Z_LOAD.replace("      %z = tt.load %zp", "      %z = arith.addf %zp")
    assert inspect_kernels.z_loads_in_codebook_loop(hoisted) == 0


def test_a_budget_too_small_fails_the_check():
    done = subprocess.run([sys.executable, str(SCRIPTS / "inspect_kernels.py"), "--arch", "sm_90",
                           "--budget-kb", "1"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "B allowed" in done.stdout and "fail a check" in done.stdout
