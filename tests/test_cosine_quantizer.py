"""VectorQuantizer(distance="cosine"): l2-normalised vectors and codes, against plain-PyTorch references."""
from __future__ import annotations

import io
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import assert_nearest, backend_device, distance_rtol
from vqvae_fast import VQVAE, InputError, VectorQuantizer
from vqvae_fast.vector_quantizer import LAPLACE_EPS, kmeans

BACKENDS = ("reference", "cpu", "triton")


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def assert_unit_norm(codes: torch.Tensor, atol: float = 1e-5) -> None:
    norms = codes.detach().double().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=atol)


def assert_best_cosine(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, tol: float) -> None:
    """float64 reference: the chosen code's cosine distance is within tol of the best code's."""
    z64, e64 = unit(z.detach().cpu().double()), unit(codebook.detach().cpu().double())
    d = torch.cdist(z64, e64, compute_mode="donot_use_mm_for_euclid_dist").square()  # = 2 - 2 cos
    chosen, best = d.gather(1, indices.cpu().reshape(-1, 1))[:, 0], d.min(1).values
    gap = chosen - best
    assert float(gap.max()) <= tol, f"worst excess cosine distance {float(gap.max()):.3g} (allowed {tol:g})"


def test_bad_distance_raises_input_error():
    with pytest.raises(InputError, match="euclidean.*cosine"):
        VectorQuantizer(8, 4, distance="manhattan")
    with pytest.raises(TypeError):
        VectorQuantizer(8, 4, 0.25, "cosine")  # keyword-only


def test_extra_repr_and_init():
    cosine, euclidean = VectorQuantizer(32, 6, distance="cosine"), VectorQuantizer(32, 6)
    assert "distance='cosine'" in repr(cosine) and "distance" not in repr(euclidean)
    assert_unit_norm(cosine.codebook)
    ema = VectorQuantizer(32, 6, distance="cosine", ema_decay=0.9)
    assert_unit_norm(ema.codebook)
    assert torch.equal(ema.ema_sum, ema.codebook.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_code_loss_and_output(backend):
    device = backend_device(backend)
    vq = VectorQuantizer(40, 8, beta=0.3, backend=backend, distance="cosine").to(device)
    with torch.no_grad():  # a learned codebook off unit norm: only the directions count
        vq.codebook.copy_(torch.randn(40, 8) * torch.rand(40, 1) * 5 + 0.01)
        vq.codebook[3] = 0.0  # a zero code stays zero
    x = torch.randn(2, 8, 5, 3, device=device) * torch.rand(2, 1, 5, 3, device=device) * 10
    x[0, :, 0, 0] = 0.0  # a zero vector stays zero
    quantized, indices, loss = vq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 5, 3)
    z = x.permute(0, 2, 3, 1).reshape(-1, 8)
    codes = unit(vq.codebook.detach())
    assert torch.equal(vq.code_vectors().detach(), codes)
    # exact on what the fused op saw; within fp32 normalisation error of the float64 reference
    assert_nearest(unit(z), codes, indices.reshape(-1), distance_rtol(backend, torch.float32))
    assert_best_cosine(z, vq.codebook, indices, 1e-5 if backend != "triton" else 1e-3)
    flat_q = quantized.permute(0, 2, 3, 1).reshape(-1, 8)
    if backend == "triton":  # normalised inside the kernels (a float64 norm): to fp32 rounding of torch's
        torch.testing.assert_close(flat_q, codes[indices.reshape(-1)], rtol=3e-7, atol=1e-12)
    else:
        assert torch.equal(flat_q, codes[indices.reshape(-1)])
    expected = (1 + 0.3) * (unit(z).double() - codes[indices.reshape(-1)].double()).square().mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert bool(torch.isfinite(quantized).all()) and bool(torch.isfinite(loss))


@pytest.mark.parametrize("gradient", ["ste", "rotation"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_plain_pytorch(backend, gradient):
    device = backend_device(backend)
    beta = 0.25
    vq = VectorQuantizer(24, 6, beta=beta, backend=backend, distance="cosine", gradient=gradient).to(device)
    with torch.no_grad():
        vq.codebook.mul_(torch.rand(24, 1, device=device) * 3 + 0.5)  # off unit norm
    x = (torch.randn(3, 7, 6, device=device) * 4).requires_grad_()
    weight = torch.randn(3, 7, 6, device=device)
    quantized, indices, loss = vq(x)
    ((quantized * weight).sum() + 3.0 * loss).backward()

    x_ref = x.detach().clone().requires_grad_()
    cb_ref = vq.codebook.detach().clone().requires_grad_()
    z, e = unit(x_ref.reshape(-1, 6)), unit(cb_ref)
    chosen = e[indices.reshape(-1)]
    if gradient == "ste":
        q = z + (chosen - z).detach()
    else:  # the rotation trick on the normalised vectors: lam * R z, lam and R held constant
        from vqvae_fast.reference import rotation_gradient

        class Rotation(torch.autograd.Function):
            @staticmethod
            def forward(ctx, z_, chosen_):
                ctx.save_for_backward(z_, chosen_)
                return chosen_.clone()

            @staticmethod
            def backward(ctx, grad):
                z_, chosen_ = ctx.saved_tensors
                return rotation_gradient(grad, z_, chosen_), None

        q = Rotation.apply(z, chosen.detach())
    ref_loss = F.mse_loss(chosen, z.detach()) + beta * F.mse_loss(z, chosen.detach())
    ((q.reshape(3, 7, 6) * weight).sum() + 3.0 * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vq.codebook.grad, cb_ref.grad, rtol=1e-4, atol=1e-6)
    assert bool(vq.codebook.grad.any())


def test_zero_input_row_has_finite_gradient():
    vq = VectorQuantizer(8, 4, distance="cosine")
    x = torch.randn(5, 4)
    x[2] = 0.0
    x.requires_grad_()
    quantized, _, loss = vq(x)
    (quantized.sum() + loss).backward()
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(vq.codebook.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_update_keeps_unit_norm_and_moves_toward_assigned(backend):
    device = backend_device(backend)
    decay = 0.6
    vq = VectorQuantizer(12, 5, backend=backend, distance="cosine", ema_decay=decay).to(device)
    vq.train()
    before_sum, before_count = vq.ema_sum.clone(), vq.ema_count.clone()
    before = vq.codebook.detach().clone()
    x = (torch.randn(60, 5, device=device) * torch.rand(60, 1, device=device) * 8).requires_grad_()
    quantized, indices, loss = vq(x)
    (quantized.sum() + loss).backward()
    assert vq.codebook.grad is None and x.grad is not None  # the EMA codebook gets no gradient
    z = unit(x.detach())
    counts = torch.bincount(indices, minlength=12).float()
    sums = torch.zeros(12, 5, device=device).index_add_(0, indices, z)
    ema_sum = decay * before_sum + (1 - decay) * sums
    ema_count = decay * before_count + (1 - decay) * counts
    torch.testing.assert_close(vq.ema_sum, ema_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.ema_count, ema_count, rtol=1e-5, atol=1e-6)
    total = ema_count.sum()
    smoothed = (ema_count + LAPLACE_EPS) / (total + 12 * LAPLACE_EPS) * total
    torch.testing.assert_close(vq.codebook.detach(), unit(ema_sum / smoothed[:, None]), rtol=1e-5, atol=1e-6)
    assert_unit_norm(vq.codebook)
    # each used code turned toward the mean direction of its normalised vectors
    used = counts > 0
    assert bool(used.any())
    target = unit(sums[used])
    cos_before = (before[used] * target).sum(1)
    cos_after = (vq.codebook.detach()[used] * target).sum(1)
    assert bool((cos_after >= cos_before - 1e-6).all()), (cos_before, cos_after)
    assert bool((cos_after > cos_before + 1e-3).any())


def test_kmeans_init_gives_unit_norm_centroids():
    directions = unit(torch.randn(4, 6))
    labels = torch.arange(400) % 4
    # tight clusters of directions, with norms spread over two orders of magnitude
    x = (directions[labels] + 0.02 * torch.randn(400, 6)) * torch.logspace(-1, 1, 400)[:, None]
    centroids = kmeans(x, 4, 60, "cpu", spherical=True)  # enough Lloyd steps to converge from any seeding
    assert_unit_norm(centroids)
    # a fixed point of spherical Lloyd: each centroid is the mean direction of the unit vectors nearest it
    assign = (unit(x) @ centroids.T).argmax(1)
    for k in assign.unique():
        torch.testing.assert_close(centroids[k], unit(unit(x[assign == k]).sum(0)), rtol=0, atol=1e-4)
    vq = VectorQuantizer(4, 6, distance="cosine", kmeans_init=True, ema_decay=0.9, backend="cpu")
    vq.train()
    vq(x)
    assert bool(vq.initialized) and not vq._needs_init
    assert_unit_norm(vq.codebook)
    torch.testing.assert_close(unit(vq.ema_sum), vq.codebook.detach(), rtol=1e-5, atol=1e-6)  # its direction
    # the plain k-means is unchanged: centroids of x, not of its directions
    plain = kmeans(x, 4, 5, "cpu")
    assert float(plain.norm(dim=1).max()) > 1.5


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_on_normalised_batch_vectors(ema):
    vq = VectorQuantizer(16, 4, distance="cosine", restart_dead=True, ema_decay=0.9 if ema else None,
                         backend="cpu")
    vq.train()
    untouched = vq.codebook.detach().clone()
    with torch.no_grad():
        vq.usage[:5] = -10.0  # dead after this step whatever it uses: restarted at its end
    x = torch.randn(30, 4) * 50
    vq(x)
    restarted = vq.codebook.detach()
    assert_unit_norm(restarted)
    cos = restarted[:5] @ unit(x).T
    torch.testing.assert_close(cos.max(1).values, torch.ones(5), rtol=0, atol=1e-5)
    if ema:
        torch.testing.assert_close(unit(vq.ema_sum[:5]), restarted[:5], rtol=0, atol=1e-6)
        assert bool((vq.ema_count[:5] == 1).all())
    else:
        assert torch.equal(restarted[5:], untouched[5:])
    # through forward as well: a fresh dead code ends unit-norm on a batch direction
    with torch.no_grad():
        vq.usage[7] = 0.0
    vq(x)
    assert_unit_norm(vq.codebook)


def test_old_state_dict_loads():
    # a checkpoint of the format from before `distance`: these keys exactly
    old = VectorQuantizer(16, 4, ema_decay=0.9, kmeans_init=True, restart_dead=True)
    old.train()
    old(torch.randn(40, 4))
    buffer = io.BytesIO()
    torch.save(old.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()))
    assert set(state) == {"codebook", "usage", "initialized", "ema_count", "ema_sum"}
    new = VectorQuantizer(16, 4, ema_decay=0.9, kmeans_init=True, restart_dead=True, distance="euclidean")
    new.load_state_dict(state)  # strict
    assert not new._needs_init
    old.eval(), new.eval()
    x = torch.randn(20, 4)
    a, b = old(x), new(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    # the cosine module has the same keys (nothing new in its state dict)
    assert set(VectorQuantizer(16, 4, ema_decay=0.9, distance="cosine").state_dict()) == set(state)
    # a whole model's state dict, saved without the option
    small = dict(num_codes=16, code_dim=4, channels=8, res_channels=4, num_res_blocks=1)
    model_state = VQVAE(**small).state_dict()
    model = VQVAE(**small)
    model.quantizer = VectorQuantizer(16, 4, ema_decay=0.9, kmeans_init=True, restart_dead=True, distance="euclidean")
    model.load_state_dict(model_state)
    assert torch.equal(model.quantizer.codebook, model_state["quantizer.codebook"])


# --- torch.distributed: the same code paths, the codebook state identical on both ranks -----------------

WORLD = 2


def _cosine_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randn(n, 4, generator=g) * (1 + 5 * rank) + rank for n in (40 + 7 * rank, 0 if rank else 30, 33)]
    torch.manual_seed(rank)  # different RNG states: the synced draws must not depend on them
    vq = VectorQuantizer(16, 4, kmeans_init=True, restart_dead=True, ema_decay=0.8, backend="cpu", distance="cosine")
    vq.train()
    states = []
    for step, x in enumerate(batches):
        if step == 2:
            vq.usage[:5] = 0.0
        vq(x)
        states.append({k: v.clone() for k, v in vq.state_dict().items()})
    torch.save(states, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_synced_cosine_state_is_identical_on_every_rank(tmp_path):
    from test_distributed import free_port

    mp.spawn(_cosine_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for step, (a, b) in enumerate(zip(*ranks)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step}: {name} differs between ranks"
        assert_unit_norm(a["codebook"])
