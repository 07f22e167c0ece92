"""Drop-in replacements for vector-quantize-pytorch's `VectorQuantize` and `ResidualVQ`.

Switch with one import line::

    # from vector_quantize_pytorch import VectorQuantize, ResidualVQ
    from vqvae_fast.compat import VectorQuantize, ResidualVQ

Same constructor arguments and defaults (vector-quantize-pytorch 1.32), same forward arguments
and return values (`quantized, indices, commit_loss`, plus the loss breakdown with
`return_loss_breakdown=True`, `all_codes` with `return_all_codes=True`), same input layouts
(`(b, n, d)`, `(b, d)`, `channel_last=False` `(b, d, n)`, `accept_image_fmap` `(b, c, h, w)`,
`accept_3d_fmap` `(b, c, d, h, w)`), same buffer and parameter names (a checkpoint saved from the
peer's class loads with `load_state_dict`, strict), the same EMA, Laplace smoothing and dead-code
replacement rules. The nearest code, the gather, the commitment loss and the per-code counts and
sums of the EMA come from the fused op `vqvae_fast.quantize_with_code_stats` (exact argmin, no
N x K distance matrix and no one-hot); k-means init is `vqvae_fast.vector_quantizer.kmeans`.

Every argument the peer accepts and we do not implement raises `InputError` naming it and saying
what to do; none is silently ignored (see `UNSUPPORTED` and `RVQ_UNSUPPORTED`).

Known differences from the peer (everything else is meant to match; tests/test_compat.py checks it
against the installed peer):
- Indices are exact nearest codes (the peer's fp32 cdist can pick a farther code when distances
  nearly tie or the vectors share a large offset), so indices may differ on near-ties only.
- k-means init: Lloyd's algorithm with our exact assignment (same iterations, seeded with random
  rows); `cluster_size` after init counts the assignment to the final centroids (the peer's, to
  the centroids of the iteration before). Random draws (k-means seeds, dead-code samples) use the
  global torch RNG but not in the peer's order, so they are not the same draws.
- Dead-code replacement under `sync_codebook`: candidates are drawn on rank 0 from the rows of all
  ranks and broadcast (the peer samples per rank in proportion to its rows).
- `get_codes_from_indices` gives a zero vector for index -1 (the peer gathers the last code), and
  for shared-codebook multi-head indices returns `(..., heads * dim)` as for separate codebooks.
- Masks with `use_cosine_sim` or a projection: the commitment loss compares the normalised,
  projected vectors of the unmasked rows (the peer compares the codes with the raw input there).
- ResidualVQ keeps the peer's gradient: every stage's output passes its gradient to the input
  (straight through or rotated), so the input gets S stage gradients, as in the peer; the library's
  own `vqvae_fast.ResidualVectorQuantizer` passes the sum's gradient once. Stages run one after the
  other, each through the fused single-stage op.
- The fused op computes in float32 (the peer too: it casts the input to float32); outputs are cast
  back to the input's dtype as the peer does.
"""
from __future__ import annotations

import random
from collections import namedtuple
from math import ceil

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .functional import InputError, code_counts, l2_normalize, nearest_code, quantize_with_code_stats
from .vector_quantizer import gather_rows, kmeans

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

PEER = "vector-quantize-pytorch"

# argument: (the peer's default, what to do instead)
UNSUPPORTED = {
    "commitment_use_cross_entropy_loss": (False, "use the default MSE commitment loss"),
    "orthogonal_reg_weight": (0.0, "leave it at 0; add your own regulariser on `.codebook` to the loss"),
    "orthogonal_reg_active_codes_only": (False, "orthogonal regularisation is not implemented"),
    "orthogonal_reg_max_codes": (None, "orthogonal regularisation is not implemented"),
    "codebook_diversity_loss_weight": (0.0, "leave it at 0; threshold_ema_dead_code keeps codes in use"),
    "codebook_diversity_temperature": (100.0, "the codebook diversity loss is not implemented"),
    "stochastic_sample_codes": (False, "codes are the exact nearest (argmin); use the peer for Gumbel sampling"),
    "sample_codebook_temp": (1.0, "codes are the exact nearest; stochastic sampling is not implemented"),
    "straight_through": (False, "use rotation_trick=False for the straight-through estimator"),
    "directional_reparam": (False, "use rotation_trick=True or False"),
    "directional_reparam_variance": (5e-3, "directional reparameterisation is not implemented"),
    "sync_affine_param": (False, "affine codebook parameters are not implemented"),
    "affine_param": (False, "normalise the encoder output yourself (e.g. layernorm_after_project_in)"),
    "affine_param_batch_decay": (0.99, "affine codebook parameters are not implemented"),
    "affine_param_codebook_decay": (0.9, "affine codebook parameters are not implemented"),
    "vq_bridge": (None, "use learnable_codebook=True, ema_update=False with a plain codebook"),
    "manual_ema_update": (False, "the EMA runs in forward; use freeze_codebook to skip it"),
    "in_place_codebook_optimizer": (None, "use learnable_codebook=True, ema_update=False and your optimizer"),
    "manual_in_place_optimizer_update": (False, "in-place codebook optimisers are not implemented"),
    "sync_update_v": (0.0, "leave it at 0 (the synchronous update rule is not implemented)"),
    "sync_kmeans": (True, "k-means init always runs over the vectors of all ranks when synced"),
}
RVQ_UNSUPPORTED = {
    "diveq": (False, "use rotation_trick=True or False"),
    "heads": (1, "residual VQ has one head (as in the peer, which asserts it)"),
    "accept_image_fmap": (False, "pass (b, h*w, d) sequences (x.flatten(2).transpose(1, 2))"),
    "implicit_neural_codebook": (False, "use plain codebooks (QINCo is not implemented)"),
    "mlp_kwargs": ({}, "implicit neural codebooks are not implemented"),
    "beam_size": (None, "use greedy residual quantization (beam search is not implemented)"),
    "eval_beam_size": (None, "beam search is not implemented"),
    "beam_score_quantizer_weights": (None, "beam search is not implemented"),
    "quant_grad_frac": (0.0, "leave it at 0: later stages do not pass gradient to earlier ones"),
}


def _reject(owner: str, options: dict, table: dict) -> None:
    for name, value in options.items():
        if name not in table:
            raise InputError(f"{owner}: unknown argument {name!r} (not an argument of {PEER}'s {owner} either)")
        default, hint = table[name]
        if value is not default and value != default:
            raise InputError(f"{owner}: {name}={value!r} is not supported by vqvae_fast.compat: {hint} "
                             f"(or keep {PEER} for this model)")


def _forward_reject(owner: str, **options) -> None:
    for name, value in options.items():
        if value is not None and value is not False:
            raise InputError(f"{owner}.forward: {name}= is not supported by vqvae_fast.compat "
                             f"(keep {PEER} for it, or leave it unset)")


def _synced() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _laplace_smoothed(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    total = cluster_size.sum(dim=-1, keepdim=True)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


class _Codebook(nn.Module):
    """The peer's `_codebook` state, under its names: embed (C, K, d) (a Parameter when learnable),
    embed_avg, cluster_size (C, K), initted."""

    def __init__(self, dim, codebook_size, num_codebooks, *, kmeans_init, kmeans_iters, decay, eps,
                 threshold_ema_dead_code, use_cosine_sim, learnable_codebook, ema_update, use_ddp):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = F.normalize(embed, dim=-1, eps=1e-6)
        self.codebook_size, self.num_codebooks, self.dim = codebook_size, num_codebooks, dim
        self.kmeans_iters, self.decay, self.eps = kmeans_iters, decay, eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code
        self.use_cosine_sim, self.learnable_codebook = use_cosine_sim, learnable_codebook
        self.ema_update, self.use_ddp = ema_update, use_ddp
        self.manual_ema_update = False  # set by ResidualVQ(shared_codebook=True)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)

    @torch.no_grad()
    def init_embed_(self, groups: list[torch.Tensor]) -> None:
        """k-means of each codebook's rows (float32, normalised for cosine), the peer's bookkeeping."""
        for c, rows in enumerate(groups):
            if self.use_ddp:
                rows = gather_rows(rows)
                means = torch.empty_like(self.embed[c])
                if dist.get_rank() == 0:
                    means = kmeans(rows, self.codebook_size, self.kmeans_iters, spherical=self.use_cosine_sim)
                dist.broadcast(means, src=0)
            else:
                means = kmeans(rows, self.codebook_size, self.kmeans_iters, spherical=self.use_cosine_sim)
            bins = code_counts(nearest_code(rows, means), self.codebook_size)
            self.embed_avg.data[c] = means * bins[:, None]
            self.cluster_size.data[c] = bins
        self.update_ema()
        self.initted.fill_(True)

    @torch.no_grad()
    def update_ema(self) -> None:
        embed = self.embed_avg / _laplace_smoothed(self.cluster_size, self.eps)[..., None]
        self.embed.data.copy_(F.normalize(embed, dim=-1, eps=1e-6) if self.use_cosine_sim else embed)

    @torch.no_grad()
    def track(self, c: int, counts: torch.Tensor, sums: torch.Tensor) -> None:
        if self.use_ddp:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.data[c].lerp_(counts.to(self.cluster_size.dtype), 1.0 - self.decay)
        self.embed_avg.data[c].lerp_(sums.to(self.embed_avg.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def expire_codes_(self, c: int, rows: torch.Tensor) -> None:
        """Codes whose EMA cluster size fell below the threshold move onto random rows of the batch."""
        if self.threshold_ema_dead_code <= 0:
            return
        dead = self.cluster_size[c] < self.threshold_ema_dead_code
        if not bool(dead.any()):
            return
        if self.use_cosine_sim:
            rows = F.normalize(rows, dim=-1, eps=1e-6)
        if self.use_ddp:
            rows = gather_rows(rows)
        if rows.shape[0] == 0:
            return
        dead_ids = dead.nonzero(as_tuple=True)[0]
        if dead_ids.numel() > rows.shape[0]:  # as the peer: no duplicates, the rest waits for later steps
            dead_ids = dead_ids[torch.randperm(dead_ids.numel(), device=rows.device)[:rows.shape[0]]]
        if rows.shape[0] >= dead_ids.numel():
            pick = torch.randperm(rows.shape[0], device=rows.device)[:dead_ids.numel()]
        else:
            pick = torch.randint(0, rows.shape[0], (dead_ids.numel(),), device=rows.device)
        sampled = rows[pick].to(self.embed.dtype)
        if self.use_ddp:
            dist.broadcast(sampled, src=0)  # rank 0's draw (dead_ids equal on every rank)
        self.embed.data[c, dead_ids] = sampled
        self.cluster_size.data[c, dead_ids] = self.reset_cluster_size
        self.embed_avg.data[c, dead_ids] = sampled * self.reset_cluster_size


class VectorQuantize(nn.Module):
    """vector-quantize-pytorch's `VectorQuantize` (its arguments, defaults, returns and state names)
    over the fused exact quantizer. See the module docstring for what differs."""

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False, decay=0.8,
                 eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10, use_cosine_sim=False,
                 layernorm_after_project_in=False, threshold_ema_dead_code=0, channel_last=True,
                 accept_image_fmap=False, accept_3d_fmap=False, commitment_weight=1.0, rotation_trick=None,
                 sync_codebook=None, ema_update=None, learnable_codebook=None, return_zeros_for_masked_padding=True,
                 route_gradients_to_input=True, **unsupported):
        super().__init__()
        _reject("VectorQuantize", unsupported, UNSUPPORTED)
        ema_update = True if ema_update is None else ema_update
        learnable_codebook = False if learnable_codebook is None else learnable_codebook
        rotation_trick = dim > 1 if rotation_trick is None else rotation_trick
        if learnable_codebook and ema_update:
            raise InputError("VectorQuantize: learnable_codebook=True needs ema_update=False (as in the peer)")
        if learnable_codebook and use_cosine_sim:
            raise InputError("VectorQuantize: use_cosine_sim with learnable_codebook is not supported (nor by the peer)")
        if accept_image_fmap and accept_3d_fmap:
            raise InputError("VectorQuantize: pass at most one of accept_image_fmap and accept_3d_fmap")
        self.dim, self.heads, self.separate_codebook_per_head = dim, heads, separate_codebook_per_head
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        inner = codebook_dim * heads
        self.has_projections = inner != dim
        if self.has_projections:
            linear = nn.Linear(dim, inner)
            self.project_in = nn.Sequential(linear, nn.LayerNorm(inner)) if layernorm_after_project_in else linear
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        self.eps, self.commitment_weight = eps, commitment_weight
        self.has_commitment_loss = commitment_weight > 0.0
        self.rotation_trick, self.learnable_codebook = rotation_trick, learnable_codebook
        self.route_gradients_to_input = route_gradients_to_input
        self.use_cosine_sim, self.codebook_size = use_cosine_sim, codebook_size
        self.accept_image_fmap, self.accept_3d_fmap, self.channel_last = accept_image_fmap, accept_3d_fmap, channel_last
        self.return_zeros_for_masked_padding, self.freeze_codebook = return_zeros_for_masked_padding, freeze_codebook
        self._codebook = _Codebook(codebook_dim, codebook_size, heads if separate_codebook_per_head else 1,
                                   kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
                                   threshold_ema_dead_code=threshold_ema_dead_code, use_cosine_sim=use_cosine_sim,
                                   learnable_codebook=learnable_codebook, ema_update=ema_update,
                                   use_ddp=_synced() if sync_codebook is None else sync_codebook)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def ema_update(self):
        return self._codebook.ema_update

    @property
    def codebook(self):
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes):
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes[None])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of `indices` (the forward's index layout), in the forward's output layout before
        project_out; index -1 gives a zero vector."""
        embed = self._codebook.embed
        missing = indices < 0
        safe = indices.clamp_min(0)
        if self.heads > 1:  # (..., h) -> (..., h * d)
            heads = torch.arange(self.heads, device=indices.device) if self.separate_codebook_per_head else 0
            codes = embed[heads, safe]
            codes = codes.masked_fill(missing[..., None], 0.0).flatten(-2)
        else:
            codes = embed[0][safe].masked_fill(missing[..., None], 0.0)
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.get_codes_from_indices(indices)
        if self.has_projections:
            channels_first = not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap
            codes = self.project_out(codes.movedim(1, -1) if channels_first else codes)
            codes = codes.movedim(-1, 1) if channels_first else codes
        return codes

    def forward(self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        _forward_reject("VectorQuantize", indices=indices, topk=topk, sample_codebook_temp=sample_codebook_temp,
                        codebook_transform_fn=codebook_transform_fn, ema_update_weight=ema_update_weight,
                        accum_ema_update=accum_ema_update)
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        ema_update = self._codebook.ema_update if ema_update is None else ema_update
        if mask is not None and lens is not None:
            raise InputError("VectorQuantize.forward: pass mask or lens, not both")
        if lens is not None:
            mask = torch.arange(x.shape[1], device=x.device) < lens[:, None]
        only_one = x.dim() == 2
        if only_one:
            if mask is not None:
                raise InputError("VectorQuantize.forward: a mask needs (b, n, d) input, got (b, d)")
            x = x[:, None]
        channels_first = (self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last) and not only_one
        if (self.accept_image_fmap or self.accept_3d_fmap) and mask is not None:
            raise InputError("VectorQuantize.forward: masks need sequence input, not feature maps (as in the peer)")
        want = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        if want is not None and x.dim() != want:
            raise InputError(f"VectorQuantize: accept_{'image' if want == 4 else '3d'}_fmap expects {want}-D input "
                             f"(b, c, ...), got shape {tuple(x.shape)}")
        orig = x.movedim(1, -1) if channels_first else x  # (b, ..., dim)
        if orig.shape[-1] != self.dim:
            raise InputError(f"VectorQuantize: expected {self.dim} channels, got input of shape {tuple(x.shape)}")
        if mask is not None and mask.shape != orig.shape[:-1]:
            raise InputError(f"VectorQuantize.forward: mask of shape {tuple(mask.shape)} for input {tuple(x.shape)}")
        lead = orig.shape[:-1]
        projected = self.project_in(orig)
        dtype = projected.dtype
        H, d, K = self.heads, self.codebook_dim, self.codebook_size
        flat = projected.reshape(-1, H, d).float()  # rows x heads x d
        R = flat.shape[0]
        valid = None if mask is None else mask.reshape(-1).bool()
        separate = self.separate_codebook_per_head
        if separate:
            groups = [(flat[:, h], valid) for h in range(H)]
        else:
            groups = [(flat.reshape(-1, d), None if valid is None else valid.repeat_interleave(H))]
        rows = [g if v is None else g[v] for g, v in groups]
        book = self._codebook
        if not bool(book.initted) and all(r.shape[0] > 0 for r in rows):
            book.init_embed_([r.detach() for r in rows])
        updating = self.training and not freeze and (ema_update or book.threshold_ema_dead_code > 0)
        gradient = "rotation" if self.rotation_trick else "ste"
        distance = "cosine" if self.use_cosine_sim else "euclidean"
        outs, idx_out, commit = [], [], []
        for c, ((group, v), r) in enumerate(zip(groups, rows)):
            embed = book.embed[c]
            if not (self.learnable_codebook and self.training and not freeze):
                embed = embed.detach()
            if updating:  # the EMA / dead-code update below rewrites embed in place; backward needs this one
                embed = embed.clone()
            q_full = group.new_zeros(group.shape)
            i_full = torch.full(group.shape[:1], -1, dtype=torch.long, device=group.device)
            if r.shape[0] > 0:
                q, i, loss, counts, sums = quantize_with_code_stats(r, embed, beta=1.0, gradient=gradient,
                                                                    with_sums=updating, distance=distance)
                # ours: mean((e - sg z)^2) + mean((z - sg e)^2), the peer's commitment: mse(q, z) with the
                # gradient of both terms: value loss / 2, gradient that of `loss`.
                commit.append(loss - loss.detach() / 2)
                if not (self.training and self.route_gradients_to_input):
                    q = q.detach()  # the peer passes no gradient to the input in eval
                if v is None:
                    q_full, i_full = q, i
                else:
                    q_full = q_full.index_put((v,), q)
                    i_full = i_full.index_put((v,), i)
                if updating:
                    book.track(c, counts, sums)
            elif updating and book.use_ddp:  # every rank joins the collectives
                book.track(c, torch.zeros(K, device=group.device), torch.zeros(K, d, device=group.device))
            outs.append(q_full)
            idx_out.append(i_full)
        if updating:
            if ema_update and not book.manual_ema_update:
                book.update_ema()
            for c, r in enumerate(rows):
                book.expire_codes_(c, r.detach())
        # assemble: (rows, heads, d) in the peer's order
        if separate:
            quantized = torch.stack(outs, dim=1)
            index = torch.stack(idx_out, dim=1)
        else:
            quantized = outs[0].reshape(R, H, d)
            index = idx_out[0].reshape(R, H)
        quantized = self.project_out(quantized.reshape(*lead, H * d).to(dtype))
        index = index.reshape(*lead, H) if H > 1 else index.reshape(lead)
        if mask is not None:
            fill = torch.zeros_like(orig) if self.return_zeros_for_masked_padding else orig
            quantized = torch.where(mask[..., None], quantized.to(fill.dtype), fill)
        quantized = quantized.to(x.dtype)
        if channels_first:
            quantized = quantized.movedim(-1, 1)
        if only_one:
            quantized, index = quantized[:, 0], index[:, 0]
        loss = commit_loss = self.zero
        if self.training:
            if self.has_commitment_loss and commit:
                commit_loss = torch.stack(commit).mean()
                loss = commit_loss * self.commitment_weight
            else:
                loss = self.zero.clone().requires_grad_()
        if not return_loss_breakdown:
            return quantized, index, loss
        return quantized, index, loss, LossBreakdown(commit_loss, self.zero, self.zero, self.zero)


def _sync_seed(device) -> int:
    """The peer's dropout seed: one draw of the global torch RNG (summed over ranks)."""
    draw = torch.randint(0, 10_000, (), device=device)
    if _synced():
        dist.all_reduce(draw)
    return int(draw.item())


class ResidualVQ(nn.Module):
    """vector-quantize-pytorch's `ResidualVQ` (its arguments, defaults, returns and state names):
    a stack of compat `VectorQuantize` layers, each quantizing what the stages before it left. See the
    module docstring for what differs (notably: the gradient reaches the input once per stage, as in
    the peer; vqvae_fast.ResidualVectorQuantizer passes it once)."""

    def __init__(self, *, dim, num_quantizers=None, codebook_size, codebook_dim=None, shared_codebook=False,
                 quantize_dropout=False, quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
                 return_zeros_for_masked_padding=True, diveq=False, heads=1, accept_image_fmap=False,
                 implicit_neural_codebook=False, mlp_kwargs=None, beam_size=None, eval_beam_size=None,
                 beam_score_quantizer_weights=None, quant_grad_frac=0.0, **vq_kwargs):
        super().__init__()
        _reject("ResidualVQ", dict(diveq=diveq, heads=heads, accept_image_fmap=accept_image_fmap,
                                   implicit_neural_codebook=implicit_neural_codebook, mlp_kwargs=mlp_kwargs or {},
                                   beam_size=beam_size, eval_beam_size=eval_beam_size,
                                   beam_score_quantizer_weights=beam_score_quantizer_weights,
                                   quant_grad_frac=quant_grad_frac), RVQ_UNSUPPORTED)
        sizes = tuple(codebook_size) if isinstance(codebook_size, (tuple, list)) else None
        if num_quantizers is None and sizes is None:
            raise InputError("ResidualVQ: pass num_quantizers, or codebook_size as a tuple (one size per stage)")
        sizes = sizes or (codebook_size,) * num_quantizers
        num_quantizers = len(sizes) if num_quantizers is None else num_quantizers
        if len(sizes) != num_quantizers:
            raise InputError(f"ResidualVQ: {len(sizes)} codebook sizes for num_quantizers={num_quantizers}")
        if quantize_dropout_cutoff_index < 0:
            raise InputError("ResidualVQ: quantize_dropout_cutoff_index must be >= 0")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim, self.num_quantizers, self.codebook_sizes = codebook_dim, num_quantizers, sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = False
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.layers = nn.ModuleList(
            VectorQuantize(dim=codebook_dim, codebook_size=k, codebook_dim=codebook_dim,
                           return_zeros_for_masked_padding=return_zeros_for_masked_padding, **vq_kwargs)
            for k in sizes)
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.quant_grad_frac = 0.0
        self.shared_codebook = shared_codebook
        if shared_codebook:
            if not self.uniform_codebook_size:
                raise InputError("ResidualVQ: shared_codebook needs one codebook size for every stage")
            shared = self.layers[0]._codebook
            shared.manual_ema_update = True
            for layer in self.layers[1:]:
                layer._codebook = shared

    @property
    def codebook_size(self):
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        books = tuple(layer._codebook.embed[0] for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(num_quantizers, ..., codebook_dim) codes of `indices` (..., q), q <= num_quantizers
        (fewer only with quantize_dropout, as the peer); -1 gives a zero code."""
        q = indices.shape[-1]
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise InputError("ResidualVQ: indices for fewer stages need quantize_dropout (as in the peer)")
            indices = F.pad(indices, (0, self.num_quantizers - q), value=-1)
        codes = []
        for layer, idx in zip(self.layers, indices.unbind(-1)):
            book = layer._codebook.embed[0]
            codes.append(book[idx.clamp_min(0)].masked_fill((idx < 0)[..., None], 0.0))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def forward(self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        _forward_reject("ResidualVQ", indices=indices, sample_codebook_temp=sample_codebook_temp, beam_size=beam_size)
        num_quant, device = self.num_quantizers, x.device
        projected = self.project_in(x)
        quantized_out = torch.zeros_like(projected)
        residual = projected
        dropout = self.training and self.quantize_dropout
        last = num_quant - 1
        if dropout:
            seed = _sync_seed(device) if rand_quantize_dropout_fixed_seed is None else rand_quantize_dropout_fixed_seed
            last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, num_quant)
            if self.quantize_dropout_multiple_of != 1:
                multiple = self.quantize_dropout_multiple_of
                last = ceil((last + 1) / multiple) * multiple - 1
        all_indices, all_losses, residuals = [], [], []
        for s, layer in enumerate(self.layers):
            if s > last:
                all_indices.append(torch.full(projected.shape[:-1], -1, dtype=torch.long, device=device))
                all_losses.append(torch.zeros((), device=device))
                continue
            residuals.append(residual)
            quantized, index, loss = layer(residual, mask=mask, freeze_codebook=freeze_codebook)
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            all_indices.append(index)
            all_losses.append(loss.reshape(()).float())
        if self.training and self.shared_codebook:  # as the peer, freeze_codebook or not
            shared = self.layers[0]._codebook
            if self.vq_is_ema_updating:
                shared.update_ema()
            rows = torch.cat([r.detach().reshape(-1, self.codebook_dim).float() for r in residuals])
            if mask is not None:
                rows = rows[mask.reshape(-1).bool().repeat(len(residuals))]
            shared.expire_codes_(0, rows)
        quantized_out = self.project_out(quantized_out)
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else x
            quantized_out = torch.where(mask[..., None], quantized_out, fill)
        all_indices = torch.stack(all_indices, dim=-1)
        ret = (quantized_out, all_indices, torch.stack(all_losses))
        if return_all_codes:
            ret = (*ret, self.get_codes_from_indices(all_indices))
        return ret
