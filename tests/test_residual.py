"""Residual quantization (vqvae_fast.residual_quantize and ResidualVectorQuantizer) against a
plain float64 loop, stage by stage, on every backend."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, assert_nearest, away_from_ties, backend_device, distance_rtol
from test_cosine_ops import kernel_unit
from vqvae_fast import (InputError, ResidualVectorQuantizer, residual_decode, residual_nearest_code,
                        residual_quantize)
from vqvae_fast.residual import unit_codebooks

SHAPES = ((53, 3, 19, 7), (1, 1, 1, 4), (0, 2, 5, 3), (40, 4, 33, 65))  # N, S, K, D


def stacked_codebooks(s, k, d, dtype, device):
    """Each stage's codes at a smaller scale, as trained residual codebooks are."""
    scales = 0.5 ** torch.arange(s, dtype=torch.float64)
    return (torch.randn(s, k, d, dtype=torch.float64) * scales[:, None, None]).to(dtype).to(device)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_stage_finds_the_nearest_code_of_its_residual(backend, shape, dtype):
    n, s, k, d = shape
    device = backend_device(backend)
    z = torch.randn(n, d, device=device).to(dtype)
    books = stacked_codebooks(s, k, d, dtype, device)
    out = residual_quantize(z, books, beta=0.3, backend=backend)
    assert out.indices.shape == (n, s) and out.indices.dtype == torch.int64
    assert out.stage_losses.shape == (s,) and out.loss.shape == ()
    residual = z
    expected_total = torch.zeros(n, d, dtype=torch.float64)
    for stage in range(s):
        idx = out.indices[:, stage]
        # exact for fp32/fp64 (and cpu/reference), 2e-5 for 16-bit triton: the single-stage rule
        assert_nearest(residual.cpu(), books[stage].cpu(), idx.cpu(), distance_rtol(backend, dtype))
        chosen = books[stage][idx]
        if n:
            mse = (chosen.double() - residual.double()).square().mean()
            torch.testing.assert_close(out.stage_losses[stage].double().cpu(), (1.3 * mse).cpu(),
                                       rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)
        expected_total += chosen.double().cpu()
        residual = (z.float() - expected_total.float().to(z.device)).to(dtype)  # as the op forms it
    torch.testing.assert_close(out.quantized.double().cpu(), expected_total,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, out.stage_losses.sum(), equal_nan=True)  # N = 0: NaN (a mean over nothing)
    assert torch.equal(residual_nearest_code(z, books, backend=backend), out.indices)
    if n:
        torch.testing.assert_close(residual_decode(out.indices, books).double().cpu(), expected_total,
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("gradient", ("ste", "rotation"))
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_gradients_match_the_reference(backend, gradient):
    """float64: straight through of the sum (or rotated to it), every stage's commitment term
    to z and codebook term to its codebook, as the plain-PyTorch composition gives them."""
    device = backend_device(backend)
    z = torch.randn(37, 6, dtype=torch.float64, device=device, requires_grad=True)
    books = stacked_codebooks(3, 11, 6, torch.float64, device).requires_grad_()
    weight = torch.randn(37, 6, dtype=torch.float64, device=device)
    grads = []
    for name in (backend, "reference"):
        out = residual_quantize(z, books, beta=0.4, backend=name, gradient=gradient)
        grads.append(torch.autograd.grad((out.quantized * weight).sum() + 2.0 * out.loss, (z, books)))
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    if gradient == "ste":  # the sum passes its gradient to z once, plus every stage's commitment term
        out = residual_quantize(z, books, beta=0.4, backend=backend)
        (grad_z,) = torch.autograd.grad((out.quantized * weight).sum(), (z,))
        torch.testing.assert_close(grad_z, weight)


def _plain_stage_losses(z, books, indices, beta):
    """The stage losses by plain autograd over the residuals (every stage's residual kept)."""
    total, losses = torch.zeros_like(z), []
    for s, book in enumerate(books):
        residual = z - total
        chosen = book[indices[:, s]]
        losses.append(((chosen - residual.detach()) ** 2).mean() + beta * ((residual - chosen.detach()) ** 2).mean())
        total = total + chosen.detach()
    return torch.stack(losses)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loss_gradients_without_keeping_the_residuals_match_plain_autograd(backend, dtype):
    """residual_quantize forms the stage losses' gradients from z, the codebooks and the indices
    (StageLosses: O(N D + S K D) kept, not S N D); they equal plain autograd's over the kept
    residuals, for each stage's loss weighted differently (one weight 0), codebooks of two sizes."""
    device = backend_device(backend)
    z = torch.randn(41, 6, dtype=dtype, device=device, requires_grad=True)
    books = [(torch.randn(13, 6, dtype=dtype) * scale).to(device).requires_grad_() for scale in (1.0, 0.5, 0.25)]
    books[2] = books[2][:7].detach().requires_grad_()
    weights = torch.tensor([1.5, 0.0, -2.0], dtype=dtype, device=device)
    out = residual_quantize(z, books, beta=0.3, backend=backend)
    got = torch.autograd.grad((out.stage_losses * weights).sum(), (z, *books))
    expected_losses = _plain_stage_losses(z, books, out.indices, 0.3)
    torch.testing.assert_close(out.stage_losses, expected_losses.to(out.stage_losses.dtype), rtol=1e-5, atol=1e-7)
    expected = torch.autograd.grad((expected_losses * weights).sum(), (z, *books))
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for ours, plain in zip(got, expected):
        torch.testing.assert_close(ours, plain, **tol)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_gradcheck_of_the_composed_op(backend):
    """float64 gradcheck where the gradient is a true derivative (as test_quantize_grad does for
    one stage): beta * the commitment terms, loss(beta) - loss(0), w.r.t. z (r_s = z - sg[...]
    moves with z one for one), and the codebook terms (beta = 0) w.r.t. the last codebook (no
    later stage sees it). The rest is stopped by definition, as in every residual quantizer."""
    device = backend_device(backend)
    first, last = stacked_codebooks(2, 5, 4, torch.float64, device).unbind(0)
    z = away_from_ties(9, [first, last]).to(device).requires_grad_()

    def commitment(x):
        books = [first, last]
        return (residual_quantize(x, books, beta=0.7, backend=backend).loss
                - residual_quantize(x, books, beta=0.0, backend=backend).loss)

    def codebook_terms(e):
        return residual_quantize(z.detach(), [first, e], beta=0.0, backend=backend).loss

    assert torch.autograd.gradcheck(commitment, (z,))
    assert torch.autograd.gradcheck(codebook_terms, (last.clone().requires_grad_(),))


def test_per_stage_codebook_sizes_and_fewer_stages():
    z = torch.randn(30, 5)
    books = [torch.randn(16, 5), torch.randn(4, 5) * 0.5, torch.randn(9, 5) * 0.25]
    full = residual_quantize(z, books, backend="cpu")
    two = residual_quantize(z, books, backend="cpu", stages=2)
    assert full.indices.shape == (30, 3) and two.indices.shape == (30, 2)
    assert torch.equal(two.indices, full.indices[:, :2]) and bool((full.indices[:, 1] < 4).all())
    assert torch.equal(residual_decode(two.indices, books), residual_decode(full.indices[:, :2], books))


def test_bad_input_is_named():
    z = torch.randn(8, 4)
    with pytest.raises(InputError, match=r"\(S, K, D\)"):
        residual_quantize(z, torch.randn(5, 4))
    with pytest.raises(InputError, match="S = 0"):
        residual_quantize(z, [])
    with pytest.raises(InputError, match="stage 1: D mismatch"):
        residual_quantize(z, [torch.randn(3, 4), torch.randn(3, 5)])
    with pytest.raises(InputError, match="stage 0: dtype mismatch"):
        residual_quantize(z, torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(InputError, match=r"stages must be an int in \[1, 2\]"):
        residual_quantize(z, torch.randn(2, 3, 4), stages=3)
    with pytest.raises(InputError, match=r"indices must be in \[0, 3\)"):
        residual_decode(torch.tensor([[0, 3]]), torch.randn(2, 3, 4))
    with pytest.raises(InputError, match="S' <= 2"):
        residual_decode(torch.zeros(1, 3, dtype=torch.long), torch.randn(2, 3, 4))


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    z, books = torch.randn(20, 6), stacked_codebooks(3, 8, 6, torch.float32, "cpu")
    compiled = torch.compile(lambda a, b: residual_quantize(a, b, backend="cpu"), fullgraph=True)
    eager = residual_quantize(z, books, backend="cpu")
    for a, b in zip(compiled(z, books), eager):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_module_matches_the_functional_op(backend):
    device = backend_device(backend)
    rvq = ResidualVectorQuantizer(3, 12, 6, beta=0.3, backend=backend).to(device)
    x = torch.randn(2, 6, 4, 5, device=device, requires_grad=True)  # (B, dim, H, W)
    out = rvq(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 4, 5, 3)
    flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    books = torch.stack([c.detach() for c in rvq.codebooks()])
    expected = residual_quantize(flat, books, beta=0.3, backend=backend)
    assert torch.equal(out.indices.reshape(-1, 3), expected.indices)
    torch.testing.assert_close(out.quantized.detach().permute(0, 2, 3, 1).reshape(-1, 6), expected.quantized)
    torch.testing.assert_close(out.stage_losses, expected.stage_losses)
    out.loss.backward()
    assert x.grad is not None and all(c.grad is not None for c in rvq.codebooks())
    assert out.perplexity.shape == (3,) and out.codes_used.dtype == torch.int64
    assert torch.equal(rvq.encode(x), out.indices)
    torch.testing.assert_close(rvq.decode(out.indices), out.quantized.detach().permute(0, 2, 3, 1))


@pytest.mark.parametrize("health", ("none", "restarts"))
def test_module_gradients_match_plain_autograd(health):
    """The module's gradients (formed by StageLosses, no residual kept per stage) equal plain
    autograd's over the codebooks as searched: learned codebooks, with and without restarts
    rewriting them after the search (their gradient is still that of the codes searched)."""
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(3, 9, 5, beta=0.3, channels_last=True, backend="cpu",
                                  restart_dead=health == "restarts", dead_threshold=2.0)
    x = torch.randn(33, 5, requires_grad=True)
    g = torch.randn(33, 5)
    searched = [book.detach().clone() for book in rvq.codebooks()]
    out = rvq(x)
    if health == "restarts":
        assert int(out.dead_codes.sum()) > 0 and any(not torch.equal(a, b.detach())
                                                     for a, b in zip(searched, rvq.codebooks()))
    got = torch.autograd.grad((out.quantized * g).sum() + 1.7 * out.loss, (x, *rvq.codebooks()))
    x2, books = x.detach().clone().requires_grad_(), [book.clone().requires_grad_() for book in searched]
    plain = _plain_stage_losses(x2, books, out.indices, 0.3).sum()
    expected = torch.autograd.grad((x2 * g).sum() + 1.7 * plain, (x2, *books))
    for ours, reference_grad in zip(got, expected):
        torch.testing.assert_close(ours, reference_grad, rtol=1e-5, atol=1e-7)


def test_kmeans_init_runs_stage_by_stage_on_the_residuals():
    """Stage s is initialised from what the initialised stages before it leave: each stage's
    codes are smaller than the previous stage's, and the error falls with every stage."""
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(3, 16, 4, kmeans_init=True, ema_decay=0.9, channels_last=True, backend="cpu")
    x = torch.randn(512, 4) * 3
    rvq(x)
    scales = [float(c.norm(dim=1).mean()) for c in rvq.codebooks()]
    assert scales[0] > scales[1] > scales[2], scales
    rvq.eval()
    errors = [float((rvq.decode(rvq.encode(x, num_stages=s)) - x).square().mean()) for s in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2], errors


def _fitted_rows_batch():
    """96 rows; stage 0 (64 codes, k-means) fits many of them exactly (singleton clusters), so
    their residual is exactly 0."""
    torch.manual_seed(0)
    return torch.randn(96, 4)


def test_later_stages_do_not_seed_codes_on_rows_already_fitted():
    """k-means seeds of stage 1 are drawn in proportion to the residual's squared norm: none lands
    on a row stage 0 fits exactly (0 Lloyd steps: the codes are the seeds)."""
    x = _fitted_rows_batch()
    rvq = ResidualVectorQuantizer(2, 64, 4, kmeans_init=True, kmeans_iters=0, channels_last=True, backend="cpu")
    rvq.stages[1] = type(rvq.stages[0])(16, 4, kmeans_init=True, kmeans_iters=0, channels_last=True, backend="cpu")
    rvq(x)
    residual = x - rvq.codebooks()[0].detach()[rvq.encode(x, num_stages=1)[:, 0]]
    fitted = int((residual.square().sum(1) == 0).sum())
    assert fitted >= 20, fitted  # the premise: a uniform draw of 16 would hit one with near certainty
    assert bool((rvq.codebooks()[1].detach().square().sum(1) > 0).all())


def test_later_stages_restart_dead_codes_on_rows_not_yet_fitted():
    """Every code of stage 1 dead (threshold above any usage) restarts on a residual drawn in
    proportion to its squared norm: none on a row stage 0 fits exactly."""
    x = _fitted_rows_batch()
    rvq = ResidualVectorQuantizer(2, 64, 4, kmeans_init=True, kmeans_iters=0, channels_last=True, backend="cpu")
    rvq.stages[1] = type(rvq.stages[0])(16, 4, restart_dead=True, dead_threshold=1e9, channels_last=True,
                                        backend="cpu")
    for _ in range(3):
        assert int(rvq(x).dead_codes[1]) == 16
        assert bool((rvq.codebooks()[1].detach().square().sum(1) > 0).all())


def test_quantizer_dropout_draws_prefixes_and_resumes():
    rvq = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=1.0, channels_last=True, backend="cpu", seed=5)
    x = torch.randn(50, 3)
    counts = []
    for _ in range(12):
        out = rvq(x)
        active = int((out.indices[0] >= 0).sum())
        assert bool((out.indices[:, :active] >= 0).all()) and bool((out.indices[:, active:] == -1).all())
        assert bool((out.stage_losses[active:] == 0).all())
        counts.append(active)
    assert len(set(counts)) > 1 and min(counts) >= 1
    state = rvq.state_dict()
    again = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=1.0, channels_last=True, backend="cpu", seed=5)
    again.load_state_dict(state)
    assert [int((again(x).indices[0] >= 0).sum()) for _ in range(5)] == \
        [int((rvq(x).indices[0] >= 0).sum()) for _ in range(5)]
    rvq.eval()
    assert bool((rvq(x).indices >= 0).all())  # no dropout outside training


def test_module_bad_settings():
    with pytest.raises(ValueError, match="num_stages"):
        ResidualVectorQuantizer(0, 8, 3)
    with pytest.raises(ValueError, match="quantizer_dropout"):
        ResidualVectorQuantizer(2, 8, 3, quantizer_dropout=1.5)
    rvq = ResidualVectorQuantizer(2, 8, 3, channels_last=True)
    with pytest.raises(InputError, match=r"num_stages must be an int in \[1, 2\]"):
        rvq(torch.randn(4, 3), num_stages=3)
    with pytest.raises(InputError, match="dim=3"):
        rvq(torch.randn(4, 5))


# ----------------------------------------------------------------------------- fused encoding (triton)


def _stage_residuals(z, books, indices):
    """The residual each stage saw, formed as the op forms it (sum in fp32/fp64, one rounding)."""
    acc = torch.promote_types(z.dtype, torch.float32)
    total = torch.zeros(z.shape, dtype=acc)
    residuals = []
    for s in range(books.shape[0]):
        residuals.append((z.to(acc) - total).to(z.dtype))
        total = total + books[s][indices[:, s]].to(acc)
    return residuals


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", ((53, 3, 19, 7), (70, 5, 100, 40), (33, 2, 1, 3), (20, 3, 70, 120)),
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_encoding_is_exact_stage_by_stage(shape, dtype):
    """Every stage in one kernel: each stage's code is the exact nearest of the residual it saw
    (fp32 and 16-bit re-scored in float64 where the fp32 bound cannot settle a row; fp64 by fp64
    dot products), and the codes equal the per-stage loop's."""
    n, s, k, d = shape
    device = backend_device("triton")
    z = torch.randn(n, d).to(dtype)
    books = stacked_codebooks(s, k, d, dtype, "cpu")
    fused = residual_nearest_code(z.to(device), books.to(device), backend="triton").cpu()
    loop = residual_nearest_code(z.to(device), list(books.to(device).unbind(0)), backend="triton").cpu()
    for stage, residual in enumerate(_stage_residuals(z, books, fused)):
        assert_nearest(residual, books[stage], fused[:, stage], 1e-12 if dtype != torch.float64 else 1e-10)
    assert torch.equal(fused, loop)


def test_fused_encoding_ties_offsets_and_extreme_scales():
    """Exact duplicates across code tiles go to the lowest index; a common offset of 1000 and
    fp32 inputs around 1e-30 or 1e20 give the reference's codes."""
    device = backend_device("triton")
    base = torch.randn(3, 70, 6)
    books = torch.cat([base, base, base[:, :10]], dim=1)  # every code twice (three times for 10), tiles apart
    z = torch.randn(90, 6)
    codes = residual_nearest_code(z.to(device), books.to(device), backend="triton").cpu()
    assert bool((codes < 70).all())
    assert torch.equal(codes, residual_nearest_code(z.double(), books.double(), backend="reference"))
    for offset, scale in ((1000.0, 1.0), (0.0, 1e-30), (0.0, 1e20)):
        zs, bs = (z + offset) * scale, torch.randn(3, 40, 6) * scale
        bs[0] += offset * scale
        fused = residual_nearest_code(zs.to(device), bs.to(device), backend="triton").cpu()
        for stage, residual in enumerate(_stage_residuals(zs, bs, fused)):
            assert_nearest(residual, bs[stage], fused[:, stage], 1e-12)


def test_fused_encoding_non_finite_rows_and_codes():
    device = backend_device("triton")
    z, books = torch.randn(40, 5), torch.randn(2, 30, 5)
    z[3, 1] = float("nan")
    z[7, 0] = float("inf")
    books[0, 4, 2] = float("nan")
    books[1, 0] = float("inf")
    codes = residual_nearest_code(z.to(device), books.to(device), backend="triton").cpu()
    assert bool((codes[[3, 7]] == 0).all())  # a row with NaN/Inf takes code 0 at every stage
    finite_rows = torch.ones(40, dtype=torch.bool)
    finite_rows[[3, 7]] = False
    assert bool((codes[finite_rows, 0] != 4).all()) and bool((codes[finite_rows, 1] != 0).all())


def _count_launches(monkeypatch) -> list:
    """The names of the Triton kernels launched from now on (cleared by the caller)."""
    from vqvae_fast.ops import triton_residual

    launched = []
    cls = type(triton_residual._residual_encode_kernel)
    run = cls.run
    monkeypatch.setattr(cls, "run", lambda self, *a, **k: (launched.append(self.fn.__name__), run(self, *a, **k))[1])
    return launched


def test_fused_encoding_is_two_launches_whatever_the_stages(monkeypatch):
    device = backend_device("triton")
    launched = _count_launches(monkeypatch)
    for stages in (2, 8):
        launched.clear()
        residual_nearest_code(torch.randn(64, 8, device=device), torch.randn(stages, 32, 8, device=device),
                              backend="triton")
        assert launched == ["_absmax_kernel", "_residual_encode_kernel"]


def test_what_the_fused_kernel_takes():
    """Stacked codebooks and D <= 128 (wider rows spilled on sm_90); lists, wider rows and N = 0 take
    the per-stage loop, with the same codes."""
    from vqvae_fast.ops import triton_residual

    z = torch.randn(10, 128)
    assert triton_residual.supports(z, torch.randn(2, 4, 128))
    assert not triton_residual.supports(torch.randn(10, 129), torch.randn(2, 4, 129))
    assert not triton_residual.supports(z, [torch.randn(4, 128)] * 2)
    assert not triton_residual.supports(z[:0], torch.randn(2, 4, 128))
    device = backend_device("triton")
    wide, books = torch.randn(12, 129, device=device), torch.randn(2, 9, 129, device=device)
    assert torch.equal(residual_nearest_code(wide, books, backend="triton").cpu(),
                       residual_nearest_code(wide.cpu().double(), books.cpu().double(), backend="reference"))


def test_fused_encoding_op_passes_opcheck_and_compiles():
    device = backend_device("triton")
    import vqvae_fast.ops.triton_ops  # noqa: F401  (registers the op)

    z, books = torch.randn(40, 12, device=device), torch.randn(3, 20, 12, device=device)
    torch.library.opcheck(torch.ops.vqvae_fast.triton_residual_nearest_code, (z, books))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: residual_nearest_code(a, b, backend="triton"), fullgraph=True)
    assert torch.equal(compiled(z, books), residual_nearest_code(z, books, backend="triton"))


# ----------------------------------------------------------------------------- fused training (triton)


def _fused_and_loop(z, books, weight, stage_weights, beta=0.3, gradient="ste", distance="euclidean"):
    """(outputs, gradients w.r.t. (z, books)) of residual_quantize on triton with the stacked
    codebooks (the fused kernels) and with the same codebooks as a list (the per-stage loop)."""
    results = []
    for codebooks in (books, list(books.unbind(0))):
        out = residual_quantize(z, codebooks, beta=beta, backend="triton", gradient=gradient, distance=distance)
        objective = (out.quantized.float() * weight).sum() + (out.stage_losses.float() * stage_weights).sum()
        results.append((out, torch.autograd.grad(objective, (z, books))))
    return results


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", ((53, 3, 19, 7), (70, 5, 100, 40), (33, 2, 1, 3), (20, 3, 70, 120)),
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_training_step_is_the_per_stage_loop(shape, dtype):
    """Stacked codebooks on triton: the forward in the encoder's kernel (which also writes the sum of
    the codes and each row's squared error) and the stage losses' backward in one kernel give the
    per-stage loop's codes and sum bit for bit, its losses and its gradients (weights of one stage
    0 and one negative; the loop rounds r - e to 16 bits before summing, the kernel does not)."""
    n, s, k, d = shape
    device = backend_device("triton")
    z = torch.randn(n, d).to(dtype).to(device).requires_grad_()
    books = stacked_codebooks(s, k, d, dtype, device).requires_grad_()
    weight = torch.randn(n, d, device=device)
    stage_weights = torch.linspace(1.5, -2.0, s, device=device)
    if s > 1:
        stage_weights[1] = 0.0
    (fused, fused_grads), (loop, loop_grads) = _fused_and_loop(z, books, weight, stage_weights)
    assert torch.equal(fused.indices, loop.indices)
    assert torch.equal(fused.quantized, loop.quantized)
    sixteen = dtype in (torch.bfloat16, torch.float16)
    torch.testing.assert_close(fused.stage_losses, loop.stage_losses, rtol=1e-2 if sixteen else 1e-6, atol=1e-7)
    # the gradients from float64 formulas (StageLosses'), on the codes both found
    residuals = _stage_residuals(z.detach().cpu(), books.detach().cpu(), fused.indices.cpu())
    grad_z = weight.double().cpu().clone()
    grad_books = torch.zeros(s, k, d, dtype=torch.float64)
    spread = torch.zeros(s, k, d, dtype=torch.float64)  # a 16-bit sum's rounding: rows x |terms| x eps
    for stage, residual in enumerate(residuals):
        diff = residual.double() - books[stage].detach().double().cpu()[fused.indices[:, stage].cpu()]
        w = 2.0 * float(stage_weights[stage]) / (n * d)
        grad_z += 0.3 * w * diff
        grad_books[stage].index_add_(0, fused.indices[:, stage].cpu(), -w * diff)
        rows = torch.bincount(fused.indices[:, stage].cpu(), minlength=k).double()[:, None]
        spread[stage] = rows * torch.zeros(k, d, dtype=torch.float64).index_add_(
            0, fused.indices[:, stage].cpu(), (w * diff).abs()) * torch.finfo(dtype).eps
    tol = dict(rtol=2e-2, atol=1e-3) if sixteen else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused_grads[0], loop_grads[0], **tol)
    # the loop sums each code's gradient in the codebook's dtype, row after row (16-bit: ~eps of
    # the partial sums a row, so up to rows x |terms| x eps off; the kernel sums in fp32)
    books_tol = dict(tol, atol=tol["atol"] + float(spread.max())) if sixteen else tol
    torch.testing.assert_close(fused_grads[1], loop_grads[1], **books_tol)
    tol = dict(rtol=2e-2, atol=2e-3) if sixteen else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grads[0].double().cpu(), grad_z, **tol)
    torch.testing.assert_close(fused_grads[1].double().cpu(), grad_books, **tol)


def test_fused_training_rotation_non_finite_and_deterministic():
    """The rotation gradient, a row and codes with NaN/Inf (the loop's NaNs, nowhere else; a stage
    without gradient adds no NaN), and under torch.use_deterministic_algorithms the codebooks'
    gradient formed stage by stage in torch (the kernel adds it with atomics): all as the loop."""
    device = backend_device("triton")
    z = torch.randn(45, 6, device=device)
    books = stacked_codebooks(3, 17, 6, torch.float32, device)
    weight, stage_weights = torch.randn(45, 6, device=device), torch.tensor([1.0, 0.5, -1.0], device=device)
    (fused, fused_grads), (loop, loop_grads) = _fused_and_loop(
        z.requires_grad_(), books.requires_grad_(), weight, stage_weights, gradient="rotation")
    for ours, expected in zip(fused_grads, loop_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    bad_z, bad_books = z.detach().clone(), books.detach().clone()
    bad_z[4, 2] = float("nan")
    bad_books[1, 3, 0] = float("inf")  # never chosen
    bad_books[2, 5, 1] = float("nan")  # never chosen; stage 2 has no gradient below
    stage_weights = torch.tensor([1.0, 0.5, 0.0], device=device)
    (fused, fused_grads), (loop, loop_grads) = _fused_and_loop(
        bad_z.requires_grad_(), bad_books.requires_grad_(), weight, stage_weights)
    assert torch.equal(fused.indices, loop.indices) and bool((fused.indices[4] == 0).all())
    torch.testing.assert_close(fused.stage_losses, loop.stage_losses, equal_nan=True)
    for ours, expected in zip(fused_grads, loop_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not bool(fused_grads[1][2].isnan().any())
    assert bool(torch.isfinite(fused_grads[0][torch.arange(45, device=device) != 4]).all())
    stage_weights = torch.tensor([1.0, 0.5, -1.0], device=device)
    (_, atomic_grads), (_, loop_grads) = _fused_and_loop(z, books, weight, stage_weights)
    with _deterministic():
        (_, fixed_grads), _ = _fused_and_loop(z, books, weight, stage_weights)
    for atomic, fixed, expected in zip(atomic_grads, fixed_grads, loop_grads):
        torch.testing.assert_close(atomic, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fixed, expected, rtol=1e-5, atol=1e-6)


class _deterministic:
    def __enter__(self):
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", ((53, 3, 19, 7), (70, 5, 100, 40), (20, 3, 70, 120)),
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_cosine_is_the_per_stage_loop(shape, dtype):
    """distance="cosine" on the fused kernels (unit codes from unit_codebooks, each residual
    normalised inside them): the per-stage loop's codes (each stage the nearest unit code to its
    unit residual), sum, losses and gradients, through the residual's normalisation to z and the
    codes' to the codebooks; encoding the same codes in one launch."""
    n, s, k, d = shape
    device = backend_device("triton")
    z = (torch.randn(n, d) * torch.rand(n, 1).mul(4).exp()).to(dtype).to(device).requires_grad_()
    books = stacked_codebooks(s, k, d, dtype, device).requires_grad_()
    weight = torch.randn(n, d, device=device)
    stage_weights = torch.linspace(1.5, -2.0, s, device=device)
    stage_weights[1] = 0.0
    (fused, fused_grads), (loop, loop_grads) = _fused_and_loop(z, books, weight, stage_weights, distance="cosine")
    assert torch.equal(fused.indices, loop.indices)
    sixteen = dtype == torch.bfloat16
    eps = torch.finfo(dtype).eps
    # unit codes normalised with a float64 norm on both sides, summed in another order: an ulp apart at most
    torch.testing.assert_close(fused.quantized, loop.quantized, rtol=0, atol=4 * s * eps)
    torch.testing.assert_close(fused.stage_losses, loop.stage_losses, rtol=1e-2 if sixteen else 1e-5, atol=1e-7)
    tol = dict(rtol=5e-2, atol=1e-3) if sixteen else dict(rtol=1e-4, atol=1e-6)
    for ours, expected in zip(fused_grads, loop_grads):
        torch.testing.assert_close(ours.float(), expected.float(), **tol)
    assert torch.equal(residual_nearest_code(z, books, backend="triton", distance="cosine"), fused.indices)
    residuals = _stage_residuals(z.detach().cpu(), unit_codebooks(books.detach()).cpu(), fused.indices.cpu())
    for stage, residual in enumerate(residuals):  # among the unit vectors the kernels see
        assert_nearest(kernel_unit(residual), kernel_unit(books[stage].detach().cpu()), fused.indices[:, stage].cpu(),
                       distance_rtol("triton", dtype))


def test_fused_cosine_launches_and_compiles(monkeypatch):
    """Cosine: the forward is one launch (unit vectors need no scale; the codebooks are normalised
    by torch ops), the backward one; opcheck of the three ops with normalize, and torch.compile."""
    device = backend_device("triton")
    launched = _count_launches(monkeypatch)
    z = torch.randn(64, 8, device=device, requires_grad=True)
    books = torch.randn(4, 32, 8, device=device, requires_grad=True)
    out = residual_quantize(z, books, backend="triton", distance="cosine")
    assert launched == ["_residual_encode_kernel"]
    launched.clear()
    out.loss.backward()
    assert launched == ["_stage_rows_kernel"]
    assert z.grad is not None and books.grad is not None
    unit = unit_codebooks(books.detach())
    zd = z.detach()
    torch.library.opcheck(torch.ops.vqvae_fast.triton_residual_nearest_code, (zd, unit, True))
    torch.library.opcheck(torch.ops.vqvae_fast.triton_residual_quantize_fwd, (zd, unit, 2, True))
    indices = out.indices
    torch.library.opcheck(torch.ops.vqvae_fast.triton_stage_losses_bwd,
                          (torch.randn(4, device=device), zd, unit, indices, 0.25, True, True, True))
    torch._dynamo.reset()
    zg, bg = zd.clone().requires_grad_(), books.detach().clone().requires_grad_()
    compiled = torch.compile(lambda a, b: residual_quantize(a, b, backend="triton", distance="cosine").loss,
                             fullgraph=True)
    compiled(zg, bg).backward()
    expected = torch.autograd.grad(residual_quantize(zd.clone().requires_grad_(), books, backend="triton",
                                                     distance="cosine").loss, (books,))
    torch.testing.assert_close(bg.grad, expected[0], rtol=1e-5, atol=1e-7)


def test_fused_training_launches(monkeypatch):
    """Forward: the encoder's two launches whatever S (then a torch sum of the row errors);
    backward of the stage losses: one."""
    device = backend_device("triton")
    launched = _count_launches(monkeypatch)
    for stages in (2, 8):
        z = torch.randn(64, 8, device=device, requires_grad=True)
        books = torch.randn(stages, 32, 8, device=device, requires_grad=True)
        launched.clear()
        out = residual_quantize(z, books, backend="triton")
        assert launched == ["_absmax_kernel", "_residual_encode_kernel"]
        launched.clear()
        out.loss.backward()
        assert launched == ["_stage_rows_kernel"]
        assert z.grad is not None and books.grad is not None


def test_fused_training_ops_pass_opcheck_and_compile():
    device = backend_device("triton")
    import vqvae_fast.ops.triton_ops  # noqa: F401  (registers the ops)

    z, books = torch.randn(40, 12, device=device), torch.randn(3, 20, 12, device=device)
    torch.library.opcheck(torch.ops.vqvae_fast.triton_residual_quantize_fwd, (z, books))
    indices = residual_nearest_code(z, books, backend="triton")
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.vqvae_fast.triton_stage_losses_bwd,
                              (torch.randn(3, device=device), z, books, indices, 0.25, *need))
    torch._dynamo.reset()
    zg, bg = z.clone().requires_grad_(), books.clone().requires_grad_()
    compiled = torch.compile(lambda a, b: residual_quantize(a, b, backend="triton").loss, fullgraph=True)
    compiled(zg, bg).backward()
    expected = torch.autograd.grad(residual_quantize(z.requires_grad_(), books.requires_grad_(),
                                                     backend="triton").loss, (z, books))
    torch.testing.assert_close(zg.grad, expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bg.grad, expected[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("health", ("ema+restarts", "learned", "learned+restarts", "cosine ema+restarts",
                                    "cosine learned"))
def test_module_training_step_fused_is_the_stage_loop(monkeypatch, health):
    """The module on triton takes the fused kernels (one search launch for every stage, the EMA
    counts and residual sums from its epilogue, one backward launch) once every stage is
    initialised; each step gives the stage loop's codes, sum, losses, statistics, codebook state
    and gradients (restart draws included: the same residuals and weights, drawn in the same
    order). The loop's state is copied into the fused module before each step (the atomics' sums
    differ in the last bits)."""
    device = backend_device("triton")
    torch.manual_seed(0)
    options = dict(ema_decay=0.9 if "ema" in health else None, restart_dead="restarts" in health,
                   dead_threshold=0.8, kmeans_init=True, kmeans_iters=2, channels_last=True, backend="triton",
                   distance="cosine" if "cosine" in health else "euclidean")
    fused = ResidualVectorQuantizer(3, 24, 6, 0.3, **options).to(device)
    looped = ResidualVectorQuantizer(3, 24, 6, 0.3, **options).to(device)
    looped._fused_codebooks = lambda *args: None  # always the stage loop
    x = torch.randn(90, 6, device=device)
    fused(x), looped(x)  # the k-means init (the stage loop in both)
    launched = _count_launches(monkeypatch)
    restarted = 0
    for step in range(3):
        fused.load_state_dict(looped.state_dict())
        x = (torch.randn(90, 6) * (1 + step)).to(device).requires_grad_()
        g = torch.randn(90, 6, device=device)
        results = []
        for module in (fused, looped):
            launched.clear()
            torch.manual_seed(step)  # the restarts' draws
            out = module(x)
            grads = torch.autograd.grad((out.quantized * g).sum() + 1.7 * out.loss,
                                        (x, *[c for c in module.codebooks() if c.requires_grad]))
            results.append((out, grads, module.state_dict()))
            if module is fused:
                assert launched.count("_residual_encode_kernel") == 1 and launched.count("_stage_rows_kernel") == 2
            else:
                assert "_residual_encode_kernel" not in launched
        (f_out, f_grads, f_state), (l_out, l_grads, l_state) = results
        assert torch.equal(f_out.indices, l_out.indices)
        if "cosine" in health:  # unit codes from a float64 norm summed in another order: an ulp apart at most
            torch.testing.assert_close(f_out.quantized, l_out.quantized, rtol=0, atol=1e-6)
        else:
            assert torch.equal(f_out.quantized, l_out.quantized)
        torch.testing.assert_close(f_out.stage_losses, l_out.stage_losses, rtol=1e-6, atol=1e-8)
        for name in ("perplexity", "codes_used", "dead_codes"):
            torch.testing.assert_close(getattr(f_out, name), getattr(l_out, name), rtol=1e-5, atol=1e-6)
        for key in l_state:
            torch.testing.assert_close(f_state[key], l_state[key], rtol=1e-5, atol=1e-6, msg=key)
        for ours, expected in zip(f_grads, l_grads):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
        restarted += int(l_out.dead_codes.sum())
    if "restarts" in health:
        assert restarted > 0  # the premise: restarts happened


def test_module_fused_eval_fewer_stages_and_when_it_is_not_taken(monkeypatch):
    """Eval and fewer stages take the fused kernels too (usage statistics from its counts); the
    first step (k-means init) and torch.use_deterministic_algorithms take the loop."""
    device = backend_device("triton")
    rvq = ResidualVectorQuantizer(3, 16, 5, channels_last=True, backend="triton", kmeans_init=True,
                                  ema_decay=0.9).to(device)
    x = torch.randn(70, 5, device=device)
    taken = []
    original = ResidualVectorQuantizer._fused_stages
    monkeypatch.setattr(ResidualVectorQuantizer, "_fused_stages",
                        lambda self, *a: (taken.append(True), original(self, *a))[1])
    rvq(x)
    assert not taken  # k-means init
    rvq.eval()
    for stages in (3, 2):
        taken.clear()
        out = rvq(x, num_stages=stages)
        assert taken
        expected = residual_quantize(x, torch.stack(rvq.codebooks()[:stages]).detach(), backend="reference")
        assert torch.equal(out.indices[:, :stages], expected.indices)
        counts = [torch.bincount(expected.indices[:, s].cpu(), minlength=16).float() for s in range(stages)]
        used = torch.tensor([int((c > 0).sum()) for c in counts] + [0] * (3 - stages))
        assert torch.equal(out.codes_used.cpu(), used)
    rvq.train()
    taken.clear()
    with _deterministic():
        rvq(x)
    assert not taken
    rvq(x)
    assert taken


def test_module_encode_is_the_codes_only_path():
    """encode: residual_nearest_code on the stacked codebooks (fused on triton), the same codes as
    the forward, in the codebooks' precision whatever the input's, with fewer stages too."""
    rvq = ResidualVectorQuantizer(3, 10, 5, channels_last=True, backend="cpu").eval()
    x = torch.randn(7, 4, 5)
    codes = rvq.encode(x)
    assert torch.equal(codes, rvq(x).indices)
    assert torch.equal(rvq.encode(x, num_stages=2), codes[..., :2])
    assert torch.equal(rvq.encode(x.double()), rvq.encode(x.double().float()))


@pytest.mark.parametrize("autocast", (False, True))
def test_module_forward_and_encode_agree_on_16_bit_inputs(autocast):
    """A bf16 input (a bf16 encoder, or autocast) with fp32 codebooks: the forward forms every
    residual in the codebooks' precision from one fp32 sum, as encode does, so both choose the same
    codes (rounding the running sum to bf16 at every stage changed ~1% of the rows' codes), and the
    output is that sum rounded once to the input's dtype."""
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(6, 64, 16, channels_last=True, kmeans_init=False, ema_decay=None).eval()
    with torch.no_grad():
        for s, stage in enumerate(rvq.stages):
            stage.codebook.copy_(torch.randn_like(stage.codebook) * 0.3 ** s)  # shrinking, as trained stages
    x = torch.randn(512, 16).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = rvq(x)
    assert torch.equal(out.indices, rvq.encode(x.detach()))
    assert out.quantized.dtype == torch.bfloat16
    expected = residual_quantize(x.detach().float(), torch.stack(rvq.codebooks()).detach(), backend="cpu")
    assert torch.equal(out.indices, expected.indices)
    assert torch.equal(out.quantized, expected.quantized.bfloat16())
    torch.testing.assert_close(out.stage_losses, expected.stage_losses)
    out.loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
