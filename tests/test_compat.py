"""vqvae_fast.compat against vector-quantize-pytorch itself (skipped where it is not installed):
built from the same arguments and the same state, the same codes (up to exact near-ties, checked
by distance), shapes, dtypes, return structure, losses, gradients, EMA and dead-code state."""
from __future__ import annotations

import pytest
import torch

from vqvae_fast import InputError
from vqvae_fast.compat import RVQ_UNSUPPORTED, UNSUPPORTED, ResidualVQ, VectorQuantize

peer = pytest.importorskip("vector_quantize_pytorch")


def pair(seed=0, cls="VectorQuantize", **kwargs):
    """The peer's class and ours from the same arguments, ours loaded from the peer's state_dict (strict)."""
    torch.manual_seed(seed)
    theirs = getattr(peer, cls)(**kwargs)
    ours = {"VectorQuantize": VectorQuantize, "ResidualVQ": ResidualVQ}[cls](**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def check_codes(x_rows, codebook, ours, theirs, cosine=False):
    """Ours is the exact nearest; where the peer picked another code, it must be as near (a tie)."""
    x_rows, codebook = x_rows.double(), codebook.double()
    if cosine:
        x_rows, codebook = torch.nn.functional.normalize(x_rows, dim=-1), torch.nn.functional.normalize(codebook, dim=-1)
    dist = torch.cdist(x_rows, codebook) ** 2
    best = dist.min(1).values
    mine = dist.gather(1, ours.reshape(-1, 1))[:, 0]
    other = dist.gather(1, theirs.reshape(-1, 1))[:, 0]
    assert torch.equal(mine, best) or torch.allclose(mine, best, rtol=0, atol=1e-12)
    differ = ours.reshape(-1) != theirs.reshape(-1)
    assert differ.float().mean() < 0.01
    assert torch.allclose(other[differ], mine[differ], rtol=1e-5, atol=1e-6)


LAYOUTS = [
    (dict(), (3, 40, 16)),
    (dict(channel_last=False), (3, 16, 40)),
    (dict(accept_image_fmap=True), (2, 16, 5, 6)),
    (dict(accept_3d_fmap=True), (2, 16, 2, 3, 4)),
    (dict(), (7, 16)),
    (dict(heads=2, separate_codebook_per_head=True, codebook_dim=8), (3, 40, 16)),
    (dict(heads=2, codebook_dim=8), (3, 40, 16)),
    (dict(codebook_dim=6, layernorm_after_project_in=True), (3, 40, 16)),
]


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize("options,shape", LAYOUTS, ids=lambda v: str(v))
def test_eval_and_train_match_the_peer(options, shape, cosine):
    theirs, ours = pair(dim=16, codebook_size=32, use_cosine_sim=cosine, **options)
    torch.manual_seed(1)
    x = torch.randn(shape)
    theirs.eval(), ours.eval()
    (qt, it, lt), (qo, io, lo) = theirs(x), ours(x)
    assert qo.shape == qt.shape and io.shape == it.shape and qo.dtype == qt.dtype and io.dtype == it.dtype
    assert lo.shape == lt.shape and float(lo) == float(lt) == 0.0  # the peer reports no loss in eval
    # codes: compare in the codebook's space (after project_in / head split)
    if not ours.has_projections:
        rows = x if x.dim() == 2 else (x.movedim(1, -1) if (options.get("channel_last") is False or x.dim() > 3) else x)
        if ours.codebook.dim() == 3:  # separate codebook per head
            for h in range(ours.heads):
                head = rows[..., h * ours.codebook_dim:(h + 1) * ours.codebook_dim]
                check_codes(head.reshape(-1, ours.codebook_dim), ours.codebook[h], io[..., h], it[..., h], cosine)
        else:
            check_codes(rows.reshape(-1, ours.codebook_dim), ours.codebook, io, it, cosine)
    else:
        assert (io == it).float().mean() > 0.99
    # train mode: one step from the same state, EMA included
    theirs.train(), ours.train()
    xg_t, xg_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    (qt, it, lt), (qo, io, lo) = theirs(xg_t), ours(xg_o)
    assert qo.shape == qt.shape and io.shape == it.shape and lo.shape == lt.shape and lo.dtype == lt.dtype
    assert (io == it).float().mean() > 0.99
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
    if (io == it).all():
        torch.testing.assert_close(qo, qt, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours._codebook.embed, theirs._codebook.embed, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours._codebook.cluster_size, theirs._codebook.cluster_size)
        torch.testing.assert_close(ours._codebook.embed_avg, theirs._codebook.embed_avg, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(qt)
        (qt * g).sum().add(lt).backward()
        (qo * g).sum().add(lo).backward()
        torch.testing.assert_close(xg_o.grad, xg_t.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("rotation", [False, True], ids=["ste", "rotation"])
def test_learnable_codebook_gradients_match(rotation):
    kwargs = dict(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False, rotation_trick=rotation,
                  commitment_weight=0.7)
    theirs, ours = pair(**kwargs)
    x = torch.randn(2, 30, 8)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (qt, it, lt), (qo, io, lo) = theirs(xt), ours(xo)
    assert torch.equal(io, it)
    torch.testing.assert_close(lo, lt)
    g = torch.randn_like(qt)
    ((qt * g).sum() + 3 * lt).backward()
    ((qo * g).sum() + 3 * lo).backward()
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours._codebook.embed.grad, theirs._codebook.embed.grad, rtol=1e-4, atol=1e-6)
    # frozen: no codebook gradient, no state change
    ours.zero_grad()
    _, _, lo = ours(x.clone().requires_grad_(), freeze_codebook=True)
    lo.backward()
    assert ours._codebook.embed.grad is None or not ours._codebook.embed.grad.any()


def test_masks_and_lens():
    theirs, ours = pair(dim=8, codebook_size=16)
    x, lens = torch.randn(3, 10, 8), torch.tensor([10, 4, 0])
    for train in (False, True):
        theirs.train(train), ours.train(train)
        (qt, it, lt), (qo, io, lo) = theirs(x, lens=lens), ours(x, lens=lens)
        mask = torch.arange(10) < lens[:, None]
        assert (io[~mask] == -1).all() and (it[~mask] == -1).all() and not qo[~mask].any()
        assert torch.equal(io, it)
        torch.testing.assert_close(qo, qt)
        torch.testing.assert_close(lo, lt)
    # masked rows took no part in the EMA statistics
    torch.testing.assert_close(ours._codebook.cluster_size, theirs._codebook.cluster_size)
    torch.testing.assert_close(ours._codebook.embed, theirs._codebook.embed, rtol=1e-5, atol=1e-6)
    _, io, _ = ours(x, mask=torch.arange(10) < lens[:, None])
    assert (io[2] == -1).all()


def test_dead_codes_are_replaced_as_the_peer_does():
    theirs, ours = pair(dim=8, codebook_size=64, threshold_ema_dead_code=2.2, decay=0.5)
    x = torch.randn(2, 16, 8)
    (_, it, _), (_, io, _) = theirs(x), ours(x)
    assert torch.equal(io, it)
    # the same codes fell under 2.2 (cluster_size 0.5 + 0.5 count, never 2.2), as many replaced (at most the 32 rows)
    resets = [(m._codebook.cluster_size[0] == 2.2).sum() for m in (theirs, ours)]
    assert resets[0] == resets[1] > 0
    for model in (theirs, ours):
        book = model._codebook
        reset = book.cluster_size[0] == 2.2
        rows = x.reshape(-1, 8)
        assert ((book.embed[0][reset][:, None] - rows[None]).abs().amax(-1).min(1).values == 0).all()
        torch.testing.assert_close(book.embed_avg[0][reset], 2.2 * book.embed[0][reset])


def test_kmeans_init_and_checkpoint_round_trip():
    theirs, ours = pair(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=5)
    assert not ours._codebook.initted
    x = torch.randn(4, 50, 8) + 3.0
    ours(x)
    assert ours._codebook.initted
    # centroids near the data, cluster sizes a partition of the batch (then one EMA step)
    assert (ours.codebook.mean(0) - 3.0).abs().max() < 1.0
    # a trained peer checkpoint gives the same codes in ours
    theirs(x)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    (_, it, _), (_, io, _) = theirs(x), ours(x)
    check_codes(x.reshape(-1, 8), ours.codebook, io, it)
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_loss_breakdown_and_indices_helpers():
    theirs, ours = pair(dim=8, codebook_size=16, commitment_weight=0.25, heads=2, separate_codebook_per_head=True)
    x = torch.randn(2, 10, 8)
    out_t, out_o = theirs(x, return_loss_breakdown=True), ours(x, return_loss_breakdown=True)
    assert len(out_o) == len(out_t) == 4 and out_o[3]._fields == out_t[3]._fields
    torch.testing.assert_close(out_o[3].commitment, out_t[3].commitment)
    torch.testing.assert_close(out_o[2], out_t[2])
    torch.testing.assert_close(ours.get_output_from_indices(out_o[1]), theirs.get_output_from_indices(out_t[1]))
    torch.testing.assert_close(ours.get_codes_from_indices(out_o[1]), theirs.get_codes_from_indices(out_t[1]))


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_arguments_raise_naming_them(name):
    default = UNSUPPORTED[name][0]
    value = {bool: True, float: 0.5, type(None): 3}.get(type(default), 7)
    if isinstance(default, bool):
        value = not default
    with pytest.raises(InputError, match=name):
        VectorQuantize(dim=8, codebook_size=16, **{name: value})


@pytest.mark.parametrize("name", sorted(RVQ_UNSUPPORTED))
def test_unsupported_residual_arguments_raise_naming_them(name):
    default = RVQ_UNSUPPORTED[name][0]
    value = {bool: True, float: 0.5, int: 2, dict: {"a": 1}, type(None): 3}[type(default)]
    if isinstance(default, bool):
        value = not default
    with pytest.raises(InputError, match=name):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **{name: value})


def test_unsupported_forward_arguments_raise():
    vq = VectorQuantize(dim=8, codebook_size=16)
    x = torch.randn(2, 5, 8)
    for name, value in (("topk", 2), ("indices", torch.zeros(2, 5, dtype=torch.long)), ("sample_codebook_temp", 0.5),
                        ("accum_ema_update", True), ("codebook_transform_fn", abs)):
        with pytest.raises(InputError, match=name):
            vq(x, **{name: value})
    with pytest.raises(InputError, match="typo_argument"):
        VectorQuantize(dim=8, codebook_size=16, typo_argument=1)


@pytest.mark.parametrize("options", [dict(), dict(use_cosine_sim=True), dict(shared_codebook=True),
                                     dict(codebook_dim=4, rotation_trick=False), dict(codebook_size=(16, 8, 32))],
                         ids=["plain", "cosine", "shared", "projection-ste", "sizes"])
def test_residual_vq_matches_the_peer(options):
    kwargs = dict(dim=8, num_quantizers=3, codebook_size=16)
    kwargs.update(options)
    theirs, ours = pair(cls="ResidualVQ", **kwargs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    torch.manual_seed(2)
    x = torch.randn(2, 30, 8)
    theirs.eval(), ours.eval()
    (qt, it, lt), (qo, io, lo) = theirs(x), ours(x)
    assert io.shape == it.shape == (2, 30, 3) and lo.shape == lt.shape == (3,)
    assert (io == it).float().mean() > 0.99
    theirs.train(), ours.train()
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_t, out_o = theirs(xt, return_all_codes=True), ours(xo, return_all_codes=True)
    assert len(out_o) == len(out_t) == 4 and out_o[3].shape == out_t[3].shape
    assert (out_o[1] == out_t[1]).float().mean() > 0.99
    if torch.equal(out_o[1], out_t[1]):
        torch.testing.assert_close(out_o[2], out_t[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_o[0], out_t[0], rtol=1e-4, atol=1e-5)
        g = torch.randn_like(out_t[0])
        ((out_t[0] * g).sum() + out_t[2].sum()).backward()
        ((out_o[0] * g).sum() + out_o[2].sum()).backward()
        torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-3, atol=1e-4)  # S stage gradients, as the peer
        for lt_, lo_ in zip(theirs.layers, ours.layers):
            torch.testing.assert_close(lo_._codebook.embed, lt_._codebook.embed, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.get_output_from_indices(out_o[1]), theirs.get_output_from_indices(out_t[1]))


def test_residual_quantize_dropout_and_masks():
    kwargs = dict(dim=8, num_quantizers=4, codebook_size=16, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    theirs, ours = pair(cls="ResidualVQ", **kwargs)
    x = torch.randn(2, 12, 8)
    for seed in range(4):
        (_, it, lt), (_, io, lo) = theirs(x, rand_quantize_dropout_fixed_seed=seed), ours(
            x, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(io == -1, it == -1) and (io[..., :2] >= 0).all()
        torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)  # the seed from the global RNG, as the peer draws it
    _, it, _ = theirs(x)
    torch.manual_seed(5)
    _, io, _ = ours(x)
    assert torch.equal(io == -1, it == -1)
    ours.eval()
    codes = ours(x)[1]
    torch.testing.assert_close(ours.get_output_from_indices(codes[..., :2]),
                               ours.get_codes_from_indices(codes)[:2].sum(0))
    mask = torch.arange(12) < torch.tensor([12, 5])[:, None]
    q, idx, _ = ours(x, mask=mask)
    assert (idx[~mask] == -1).all() and not q[~mask].any() and (idx[mask] >= 0).all()


def test_peer_readme_examples():
    """The peer's README usage, with the compat classes."""
    vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024) and commit_loss.shape == ()
    residual_vq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)
    residual_vq.eval()  # in training the EMA moves the codebooks after the forward
    quantized, indices, commit_loss = residual_vq(x)
    quantized_out = residual_vq.get_output_from_indices(indices)
    torch.testing.assert_close(quantized, quantized_out, rtol=1e-4, atol=1e-4)
    vq = VectorQuantize(dim=256, codebook_dim=16, codebook_size=256)
    assert vq(x)[0].shape == x.shape
    vq = VectorQuantize(dim=256, codebook_size=256, heads=8, separate_codebook_per_head=True)
    assert vq(x)[1].shape == (1, 1024, 8)
    vq = VectorQuantize(dim=256, codebook_size=256, accept_image_fmap=True)
    img = torch.randn(1, 256, 32, 32)
    q, i, _ = vq(img)
    assert q.shape == img.shape and i.shape == (1, 32, 32)
    vq = VectorQuantize(dim=256, codebook_size=256, use_cosine_sim=True, threshold_ema_dead_code=2,
                        kmeans_init=True, kmeans_iters=10)
    assert vq(x)[0].shape == x.shape
    vq = VectorQuantize(dim=256, codebook_size=512)
    x = torch.randn(1, 1024, 256)
    mask = torch.ones((1, 1024)).bool()
    assert vq(x, mask=mask)[0].shape == x.shape
