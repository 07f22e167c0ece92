"""The Triton search's plan and its 16-bit centring, at the interpreter's toy sizes (or a GPU's)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_nearest, backend_device, distance_rtol
from vqvae_fast import nearest_code

kernels = pytest.importorskip("vqvae_fast.ops.triton_nearest_code")
plans = pytest.importorskip("vqvae_fast.ops.triton_plan")
prepare = pytest.importorskip("vqvae_fast.ops.triton_prepare")
backward = pytest.importorskip("vqvae_fast.ops.triton_quantize_bwd")


def test_plans_split_the_codebook_only_for_few_rows():
    for machine, few, many in ((plans.INTERPRETER, 40, 300), (plans.SM90, 4096, 262144),
                               (plans.SM80, 4096, 262144)):
        assert plans.plan_search(few, 16384, 64, torch.bfloat16, machine).splits > 1
        assert plans.plan_search(many, 16384, 64, torch.bfloat16, machine).splits == 1
        plan = plans.plan_search(few, 16384, 64, torch.bfloat16, machine)
        assert plan.codes_per_split % plans.code_align(machine) == 0  # splits start on tile bounds


def test_plans_keep_z_resident_up_to_512():
    for machine in (plans.INTERPRETER, plans.SM90, plans.SM80):
        for d in (5, 64, 200, 512):
            plan = plans.plan_search(1 << 18, 16384, d, torch.bfloat16, machine)
            assert plan.block_d == plan.d_pad >= d
        plan = plans.plan_search(1 << 18, 16384, 520, torch.bfloat16, machine)
        assert plan.block_d < plan.d_pad and plan.d_pad % plan.block_d == 0


def test_every_gpu_config_kept_fits_its_shared_memory_budget():
    for machine in (plans.SM90, plans.SM80):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for d in (16, 64, 128, 256, 512, 1024):
                plan = plans.plan_search(1 << 18, 16384, d, dtype, machine)
                kept = [c for c in plans.search_configs(machine)
                        if plans.keep_config(c, machine, 1 << 18, plan.d_pad, plan.block_d, plan.mode)]
                assert kept, (machine.name, dtype, d)


def _device():
    return backend_device("triton")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_narrow_columns_centre_exactly(dtype):
    """The proof in `_column_centre`, checked: every centred code is exact in 16 bits, for bands
    up to the |mean| / 4 limit, of either sign and many magnitudes (and wide columns stay at 0)."""
    device = _device()
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        mean = float(torch.randn(1, generator=g)) * 10.0 ** int(torch.randint(-3, 4, (1,), generator=g))
        width = abs(mean) * float(torch.rand(1, generator=g)) * (0.5 if trial % 4 == 0 else 0.125)
        codebook = (mean + width * (2 * torch.rand(64, 6, generator=g) - 1)).to(dtype).to(device)
        z = torch.randn(20, 6, generator=g).to(dtype).to(device)
        plan = plans.plan_search(20, 64, 6, dtype, plans.machine_for(codebook.device))
        ops = prepare.prepare_operands(z, codebook, plan)
        centre = ops.centre[:6]
        exact = (codebook.double() - centre) * ops.scale  # a power of two: exact
        assert torch.equal(ops.codes[:64, :6].double(), exact), f"trial {trial}: a centred code was rounded"
        column = codebook.float()
        narrow = (column.amax(0) - column.amin(0)) <= column.mean(0).abs() / 4
        assert bool((centre[~narrow] == 0).all())
        assert torch.equal(centre[narrow], centre[narrow].to(dtype).double()), "a centre is not a 16-bit value"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_rescoring_fixes_rows_not_exact_in_16_bits(dtype, monkeypatch):
    """One column sits in a narrow band around 1000 (centred), z rows lie far from it, so their
    centred values need more than 16 bits: they are flagged and re-scored. In bf16, scored from
    the rounded values instead, some rows pick a code measurably farther than the nearest (in
    fp16 the rounding is 8 times finer and stays within the tolerance on this data)."""
    device = _device()
    g = torch.Generator().manual_seed(0)
    e0 = 1000 + 120 * (2 * torch.rand(64, generator=g) - 1)
    codebook = torch.stack([e0, 300 * torch.randn(64, generator=g), 300 * torch.randn(64, generator=g)], 1)
    z = torch.stack([256 + 256 * torch.rand(4000, generator=g), 300 * torch.randn(4000, generator=g),
                     300 * torch.randn(4000, generator=g)], 1)
    z, codebook = z.to(dtype).to(device), codebook.to(dtype).to(device)
    assert_nearest(z, codebook, nearest_code(z, codebook, backend="triton"), distance_rtol("triton", dtype))
    plan = plans.plan_search(4000, 64, 3, dtype, plans.machine_for(z.device))
    flagged = int(prepare.prepare_operands(z, codebook, plan).inexact[:4000].sum())
    assert flagged > 100, f"only {flagged} rows need re-scoring: the data no longer tests it"
    if dtype == torch.float16:
        return
    mode_for = plans.mode_for
    monkeypatch.setattr(plans, "mode_for", lambda dt, rescoring=False: (
        mode_for(dt, rescoring=rescoring)._replace(flag_inexact=False) if not rescoring else mode_for(dt, True)))
    with pytest.raises(AssertionError, match="farther than the nearest"):
        assert_nearest(z, codebook, nearest_code(z, codebook, backend="triton"), distance_rtol("triton", dtype))


class _CountingKernel:
    """Stands in for a Triton kernel object and counts its launches."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts.append(self.name)
        return self.kernel[grid]


def _rows(split: bool, device) -> int:
    """A row count that splits the codebook (fewer row blocks than SMs) or does not, on the
    machine at hand (the interpreter's 4 "SMs" or a GPU's 132)."""
    machine = plans.machine_for(device)
    if split:
        return 40
    return 2 * min(c.kwargs["BLOCK_N"] for c in plans.search_configs(machine)) * machine.num_sms


@pytest.mark.parametrize("dtype, split, fn, expected", [
    (torch.float32, False, "quantize_fwd", ["stats", "prepare", "search", "rescore", "loss"]),
    (torch.bfloat16, False, "quantize_fwd", ["stats", "prepare", "search", "search", "loss"]),
    (torch.float32, True, "quantize_fwd", ["stats", "prepare", "search", "merge", "rescore", "loss"]),
    (torch.float32, False, "nearest_code", ["stats", "prepare", "search", "rescore"]),
    (torch.bfloat16, True, "nearest_code", ["stats", "prepare", "search", "search", "merge"]),
], ids=["fp32", "bf16 (re-scoring pass)", "fp32 split", "nearest fp32", "nearest bf16 split"])
def test_launches_per_call(dtype, split, fn, expected, monkeypatch):
    """The forward's host-side launches: statistics, one preparation of both operands, the
    search (16-bit: and its re-scoring pass, a no-op unless a row is flagged), the split merge
    when the codebook is split, fp32: the exact re-scoring of the rows the bound could not
    settle (launched whatever their number: it is read on the device), the loss. Nothing else
    runs on the device, and nothing waits for it."""
    device = _device()
    launches = []
    for module, attr, name in ((prepare, "_stats_kernel", "stats"), (prepare, "_prepare_kernel", "prepare"),
                               (kernels, "_search_kernel", "search"), (kernels, "_search_tuned", "search"),
                               (kernels, "_merge_kernel", "merge"), (kernels, "_rescore_kernel", "rescore"),
                               (kernels, "_loss_kernel", "loss")):
        monkeypatch.setattr(module, attr, _CountingKernel(getattr(module, attr), launches, name))
    n = _rows(split, device)
    z, codebook = torch.randn(n, 8, device=device).to(dtype), torch.randn(400, 8, device=device).to(dtype)
    getattr(kernels, fn)(*((z, codebook, 0.25) if fn == "quantize_fwd" else (z, codebook)))
    assert launches == expected


class _Fp32Scalars:
    """Stands in for a Triton kernel and rounds its float arguments to fp32, as a GPU launch
    does (the interpreter passes Python floats at full precision)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*(float(np.float32(a)) if type(a) is float else a for a in args),
                                              **kwargs)


KERNELS = ("_search_kernel", "_search_tuned", "_merge_kernel", "_rescore_kernel", "_loss_kernel")
PREPARE_KERNELS = ("_stats_kernel", "_prepare_kernel")
BACKWARD_KERNELS = ("_grad_z_kernel", "_codebook_diff_atomic_kernel", "_codebook_diff_segment_kernel")


def test_fp64_loss_and_gradient_survive_fp32_scalar_arguments(monkeypatch):
    """A float64 loss and grad_z keep float64 accuracy although launches pass floats as fp32
    (on a GPU they did not: 2e-8 relative error, found on an H200)."""
    for module, names in ((kernels, KERNELS), (prepare, PREPARE_KERNELS), (backward, BACKWARD_KERNELS)):
        for name in names:
            monkeypatch.setattr(module, name, _Fp32Scalars(getattr(module, name)))
    device, beta = _device(), 0.3
    z = torch.randn(37, 5, dtype=torch.float64, device=device)
    codebook = torch.randn(19, 5, dtype=torch.float64, device=device)
    _, indices, loss = kernels.quantize_fwd(z, codebook, beta)
    error = z - codebook[indices]
    expected = (1 + beta) * (error ** 2).mean()
    assert abs(loss.item() - expected.item()) <= 1e-13 * expected.item()
    grad_q = torch.randn_like(z)
    grad_loss = torch.tensor(0.7, dtype=torch.float64, device=device)
    grad_z, _ = backward.quantize_bwd(grad_q, grad_loss, z, codebook, indices, beta, True, False)
    # Relative to the terms, not to their sum: where grad_q and the loss term nearly cancel, a
    # sum's own rounding is a large share of it (a fresh draw failed at 4e-13 relative, 6e-19 absolute).
    loss_term = grad_loss * (2 * beta / z.numel()) * error
    scale = grad_q.abs() + loss_term.abs()
    assert bool(((grad_z - (grad_q + loss_term)).abs() <= 1e-13 * scale).all())


@pytest.mark.parametrize("precision", ("bf16x3", "tf32"))
def test_the_settle_rate_benchmark_counts_the_rows_the_kernel_flags(precision, monkeypatch):
    """benchmarks/settle_rate.py (the share of rows re-scored, in RESULTS.md) emulates the fp32
    search's rounding and bound on the CPU: the kernel flags the same number of rows."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import settle_rate

    device = _device()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 40, generator=g)
    codebook = z[torch.randint(256, (96,), generator=g)] + 0.3 * torch.randn(96, 40, generator=g)
    expected = round(settle_rate.share_flagged(z, codebook, precision) * 256)
    monkeypatch.setenv("VQVAE_FAST_TRITON_FP32_PRECISION", precision)
    seen = {}
    original = kernels.prepare_operands
    monkeypatch.setattr(kernels, "prepare_operands", lambda *args: seen.setdefault("ops", original(*args)))
    kernels.nearest_code(z.to(device), codebook.to(device))
    assert expected > 0 and int(seen["ops"].scratch[0]) == expected
