"""VQVAE and the quantizer's codebook-health options: shapes, consistency, checkpoints, state updates."""
from __future__ import annotations

import pytest
import torch

from vqvae_fast import VQVAE, VQVAE2, VectorQuantizer, load_checkpoint, nearest_code
from vqvae_fast.functional import InputError
from vqvae_fast.models.vqvae import save_checkpoint
from vqvae_fast.vector_quantizer import LAPLACE_EPS

SMALL = dict(num_codes=32, code_dim=8, channels=16, res_channels=8)


def trained_a_little(model: VQVAE, steps: int = 3) -> VQVAE:
    """A few Adam steps on random images, so the codebook state has moved away from its init."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        out = model(torch.rand(8, 3, 32, 32))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return model


def test_default_config_is_the_classic_size():
    model = VQVAE()
    params = sum(p.numel() for p in model.parameters())
    assert 1.3e6 <= params <= 1.7e6, params
    assert model.quantizer.num_codes == 512 and model.quantizer.beta == 0.25
    x = torch.rand(2, 3, 32, 32)
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    out = model(x)
    assert out.reconstruction.shape == x.shape and out.indices.shape == (2, 8, 8)
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))


def test_sizes_are_configurable():
    model = VQVAE(num_codes=16, code_dim=4, channels=8, res_channels=4, num_res_blocks=1, levels=3)
    codes = model.encode(torch.rand(3, 3, 32, 16))
    assert codes.shape == (3, 4, 2)
    assert int(codes.max()) < 16
    assert model.decode(codes).shape == (3, 3, 32, 16)


@pytest.mark.parametrize("model_class", [VQVAE, VQVAE2])
def test_activation_is_used_everywhere_and_checked(tmp_path, model_class):
    model = model_class(activation="silu", **SMALL)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.SiLU in kinds and torch.nn.ReLU not in kinds
    save_checkpoint(tmp_path / "ckpt.pt", model, step=0)
    loaded = load_checkpoint(tmp_path / "ckpt.pt", map_location="cpu")
    assert torch.nn.SiLU in {type(m) for m in loaded.modules()}
    assert torch.nn.SiLU not in {type(m) for m in model_class(**SMALL).modules()}  # the paper's ReLU by default
    with pytest.raises(InputError, match="activation must be one of"):
        model_class(activation="gelu", **SMALL)


@pytest.mark.parametrize("recipe", ["default", "plain", "gradient_codebook"])
def test_decode_of_encode_equals_reconstruct_and_forward(recipe):
    model = {"default": lambda: VQVAE(**SMALL), "plain": lambda: VQVAE.plain(**SMALL),
             "gradient_codebook": lambda: VQVAE(ema_decay=None, **SMALL)}[recipe]()
    model = trained_a_little(model).eval()
    x = torch.rand(5, 3, 32, 32)
    reconstruction = model.reconstruct(x)
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1
    assert torch.equal(model.decode(model.encode(x)), reconstruction)
    out = model(x)
    assert torch.equal(out.indices, model.encode(x))
    assert torch.equal(out.reconstruction.clamp(0, 1), reconstruction)
    torch.testing.assert_close(out.mse, torch.mean((reconstruction - x) ** 2))


def test_inference_methods_never_change_the_model():
    model = trained_a_little(VQVAE(ema_decay=0.9, **SMALL))  # left in training mode on purpose
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32)
    model.decode(model.encode(x))
    model.reconstruct(x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_round_trip_reproduces_reconstructions_bit_for_bit(tmp_path):
    model = trained_a_little(VQVAE(ema_decay=0.95, num_res_blocks=1, **{**SMALL, "num_codes": 24})).eval()
    x = torch.rand(6, 3, 32, 32)
    save_checkpoint(tmp_path / "ckpt.pt", model, step=3)
    loaded = load_checkpoint(tmp_path / "ckpt.pt", map_location="cpu")
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_kmeans_init_runs_once_on_the_first_training_batch():
    vq = VectorQuantizer(16, 2, kmeans_init=True)
    # Four tight clusters far from the uniform +-1/16 init.
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    z = (centres.repeat_interleave(64, 0) + 0.01 * torch.randn(256, 2))
    out = vq(z)
    assert bool(vq.initialized)
    # Every code is a centroid of data points, so every vector is quantized within its cluster.
    assert float((out.quantized - z).abs().max().detach()) < 0.1
    codebook = vq.codebook.detach().clone()
    vq(z + 100)  # a second batch: no new init
    assert torch.equal(vq.codebook.detach(), codebook)
    # A fresh module loading this state does not re-initialise either.
    fresh = VectorQuantizer(16, 2, kmeans_init=True)
    fresh.load_state_dict(vq.state_dict())
    fresh(z + 100)
    assert torch.equal(fresh.codebook.detach(), codebook)


def test_eval_mode_does_not_initialise():
    vq = VectorQuantizer(8, 3, kmeans_init=True).eval()
    codebook = vq.codebook.detach().clone()
    vq(torch.randn(20, 3))
    assert not bool(vq.initialized) and torch.equal(vq.codebook.detach(), codebook)


def test_ema_codebook_follows_the_running_mean_of_its_vectors():
    vq = VectorQuantizer(4, 2, ema_decay=0.5)
    with torch.no_grad():  # counts start at 1, so the running sums are the codes themselves
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0]]))
        vq.ema_sum.copy_(vq.codebook)
    z = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [9.0, 1.0], [11.0, 1.0], [12.0, 1.0]], requires_grad=True)
    out = vq(z)
    assert not vq.codebook.requires_grad
    assert out.indices.tolist() == [0, 0, 1, 1, 1]
    # code = (.5 * sum + .5 * batch sum) / smoothed(.5 * count + .5 * batch count); unused codes stay put.
    sums = torch.tensor([[0.0, 1.0], [(10.0 + 32.0) / 2.0, 1.5], [0.0, 5.0], [25.0, 25.0]])
    counts = torch.tensor([1.5, 2.0, 0.5, 0.5])
    smoothed = (counts + LAPLACE_EPS) / (counts.sum() + 4 * LAPLACE_EPS) * counts.sum()  # Laplace
    torch.testing.assert_close(vq.codebook.detach(), sums / smoothed[:, None])
    torch.testing.assert_close(vq.codebook.detach()[2:], torch.tensor([[0.0, 10.0], [50.0, 50.0]]), rtol=1e-4, atol=0)
    out.loss.backward()  # the commitment term still trains whatever produced z
    assert bool(z.grad.any())


def test_an_ema_code_unused_for_many_steps_stays_finite_and_bounded():
    """Laplace smoothing: with restarts off, a code nobody chooses keeps its place while its
    count is large, then moves smoothly towards the origin as its count and sum vanish: never
    further out than it was (the old clamp of the count let sum / 1e-5 blow it up), never inf/NaN."""
    vq = VectorQuantizer(3, 2, ema_decay=0.9)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [40.0, -40.0]]))
        vq.ema_sum.copy_(vq.codebook)
    z = torch.tensor([[0.1, 0.0], [0.9, 1.1]])
    norms = []
    for step in range(2000):
        vq(z)
        assert torch.isfinite(vq.codebook).all(), step
        norms.append(float(vq.codebook[2].norm()))
    start = float(torch.tensor([40.0, -40.0]).norm())
    assert norms[20] == pytest.approx(start, rel=1e-3)  # count 0.9^20 = 0.12 >> 1e-5: in place
    assert max(norms) <= start * (1 + 1e-6) and norms[-1] < 1e-3


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_dead_codes_restart_on_recent_vectors_deterministically(ema_decay):
    def run(seed):
        torch.manual_seed(seed)
        vq = VectorQuantizer(8, 3, restart_dead=True, ema_decay=ema_decay, usage_decay=0.5, dead_threshold=0.2)
        with torch.no_grad():  # code 0 sits on the data; codes 1..7 far away, never chosen
            far = -100.0 * torch.arange(1, 8.0)[:, None].expand(7, 3)
            vq.codebook.copy_(torch.cat([torch.full((1, 3), 20.0), far]))
            if ema_decay is not None:
                vq.ema_sum.copy_(vq.codebook)
        z = torch.randn(64, 3) + 20
        deads = [int(vq(z).dead_codes) for _ in range(4)]
        return vq, z, deads

    vq, z, deads = run(0)
    # Usage of codes 1..7 halves each step (1, .5, .25, .125 < .2: dead after step 3); step 4 restarts them.
    assert deads == [0, 0, 7, 0]
    exact = "donot_use_mm_for_euclid_dist"
    distance_to_batch = torch.cdist(vq.codebook.detach()[1:], z, compute_mode=exact).min(1).values
    if ema_decay is None:
        assert float(distance_to_batch.max()) == 0.0  # each restarted code sits exactly on a batch vector
    else:
        assert float(distance_to_batch.max()) < 3.0  # then the EMA moves it towards what it wins
    assert int((nearest_code(z, vq.codebook.detach()) >= 1).sum()) >= 7
    assert torch.equal(run(0)[0].codebook, vq.codebook)


def test_usage_marks_unused_codes_dead():
    vq = VectorQuantizer(4, 2, usage_decay=0.5, dead_threshold=0.1)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0], [-9.0, 9.0]]))
    z = torch.tensor([[0.1, 0.0], [0.9, 1.0]] * 8)
    deads = [int(vq(z).dead_codes) for _ in range(5)]
    assert deads == [0, 0, 0, 2, 2]  # unused codes' usage: .5, .25, .125, .0625 < .1
    assert vq.dead_mask().tolist() == [False, False, True, True]


def test_amp_keeps_the_quantizer_in_fp32():
    model = VQVAE(ema_decay=None, **SMALL)  # gradient codebook: its gradient must be fp32
    x = torch.rand(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.vq_loss.dtype == torch.float32
    out.loss.backward()
    assert model.quantizer.codebook.grad.dtype == torch.float32
    assert bool(model.quantizer.codebook.grad.any())


def test_vqvae2_levels_reconstruct_and_checkpoint(tmp_path):
    from vqvae_fast.models.vqvae import VQVAE2

    model = trained_a_little(VQVAE2(num_codes=32, top_codes=16, code_dim=8, channels=16, res_channels=8)).eval()
    x = torch.rand(3, 3, 32, 32)
    top, bottom = model.encode_levels(x)
    assert top.shape == (3, 4, 4) and bottom.shape == (3, 8, 8)
    assert int(top.max()) < 16 and int(bottom.max()) < 32
    assert torch.equal(model.decode_levels((top, bottom)), model.reconstruct(x))
    out = model(x)
    assert torch.equal(out.indices, bottom) and torch.equal(out.top_indices, top)
    save_checkpoint(tmp_path / "two.pt", model)
    loaded = load_checkpoint(tmp_path / "two.pt")
    assert isinstance(loaded, VQVAE2) and torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert [q.num_codes for q in loaded.quantizers] == [16, 32]


def test_residual_vqvae_codes_stages_and_decodes_with_fewer():
    """VQVAE(stages=S): codes (B, h, w, S); decode of the first stages gives coarser images, all of
    them gives the reconstruction; the statistics are the stages' mean perplexity and summed usage."""
    torch.manual_seed(0)
    model = VQVAE(num_codes=16, code_dim=8, channels=16, res_channels=8, num_res_blocks=1, stages=3,
                  kmeans_init=True, ema_decay=0.9, quantizer_dropout=0.5)
    x = torch.rand(4, 3, 32, 32)
    out = model(x)
    assert out.indices.shape == (4, 8, 8, 3) and out.perplexity.shape == () and out.codes_used.shape == ()
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (4, 8, 8, 3) and bool((codes >= 0).all())
    torch.testing.assert_close(model.decode(codes), model.reconstruct(x))
    assert model.decode(codes[..., :1]).shape == x.shape
    assert [grid.shape for grid in model.encode_levels(x)] == [(4, 8, 8)] * 3
    torch.testing.assert_close(model.decode_levels(model.encode_levels(x)), model.reconstruct(x))
    assert len(model.quantizers) == 3 and model.config["stages"] == 3
    with pytest.raises(InputError, match="stages"):
        VQVAE(stages=0)
