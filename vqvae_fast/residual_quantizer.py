"""ResidualVectorQuantizer: a stack of VectorQuantizers, each quantizing the residual the stages
before it left (the quantizer of neural audio codecs and RQ-VAEs)."""
from __future__ import annotations

import random

import torch
from torch import nn

from . import reference
from .functional import InputError, check_distance, check_options, resolve_backend
from .residual import (StageLosses, fused_stages, fused_triton_codebooks, residual_decode, residual_nearest_code,
                       stage_residual)
from .vector_quantizer import VectorQuantizer, channel_dim, usage_stats


def _seed_weights(residual: torch.Tensor) -> torch.Tensor:
    """A later stage's k-means seed and restart draw weights: the error the stages before left,
    |residual|^2 per row, in float64 (no N x D float64 copy)."""
    return torch.linalg.vector_norm(residual.detach(), dim=1, dtype=torch.float64).square()


class RVQOutput(tuple):
    """(quantized, indices, loss), with per-stage statistics as attributes.

    Unpacks as three values: quantized (input's layout), indices (input's layout without the
    channel dim, plus a last dim of S stages; -1 for a stage quantizer dropout left out), loss
    (the sum of the stage losses). `stage_losses`, `perplexity`, `codes_used` and `dead_codes`
    are (S,) tensors (0 for a stage left out of this step).
    """

    def __new__(cls, quantized, indices, loss, stage_losses, perplexity, codes_used, dead_codes):
        out = super().__new__(cls, (quantized, indices, loss))
        out.stage_losses, out.perplexity, out.codes_used, out.dead_codes = (stage_losses, perplexity, codes_used,
                                                                           dead_codes)
        return out

    quantized = property(lambda self: self[0])
    indices = property(lambda self: self[1])
    loss = property(lambda self: self[2])


class ResidualVectorQuantizer(nn.Module):
    """`num_stages` codebooks of `num_codes` vectors of size `dim`, each quantizing the residual
    of the stages before it; `quantized` is the sum of the stages' codes.

    Gradients and losses as `vqvae_fast.residual_quantize` (straight through of the sum to the
    input, or the rotation trick; each stage's codebook and commitment terms). Every stage is a
    VectorQuantizer, with its own codebook health (`ema_decay`, `kmeans_init`, `restart_dead`,
    `dead_threshold`, `usage_decay`, torch.distributed `sync`): k-means initialises stage s from
    the residuals of the already initialised stages before it, and usage, perplexity and dead
    codes are kept per stage. From stage 1 on, k-means seeds and dead-code restarts are drawn
    from the residuals in proportion to their squared norm (the error the stages before left):
    a uniform draw would seed codes on the vectors earlier stages already fit, whose residuals are
    near zero, wasting those codes (and making the exact search re-score many near-ties).
    Euclidean training keeps O(N*D + S*K*D) for autograd whatever S: the stages search without a
    graph and `residual.StageLosses` forms their loss gradients in one backward. On triton
    (dim <= 128, every stage initialised; Euclidean or cosine) every stage's search, the sum of the codes
    and the losses come from one fused kernel, each stage's EMA counts and sums from one more
    launch and the loss gradients from one backward launch (ops/triton_residual.py); each stage's
    update then runs from its counts and sums (a stage that restarts dead codes forms its residual
    for the candidates).
    The first step (k-means init) and torch.use_deterministic_algorithms take the stage loop.

    quantizer_dropout: in training, with this probability a step uses only a random prefix of
        1..S stages (SoundStream, DAC), so that fewer stages decode well too (bitrate scalability).
        The draws are a function of the module's step count (kept in its state dict), so every
        torch.distributed rank draws the same prefix.
    num_stages (forward, encode): quantize with the first stages only, at inference.
    distance: "euclidean", or "cosine" (DAC's l2-normalised codes; vector-quantize-pytorch's
        ResidualVQ(use_cosine_sim=True)): every stage is a cosine VectorQuantizer, so it adds the
        unit code of highest cosine similarity with its residual, the next residual subtracts
        that unit code, the losses compare unit vectors, k-means init is spherical k-means of the
        stage's residuals; `decode` sums the unit codes (see `residual_quantize`).

    Input layout as VectorQuantizer: (B, dim, H, W) unless channels_last=True, else (..., dim).
    Precision: the stages search in the codebooks' dtype (the input is cast to it once, as in
    `encode`) and the sum of the chosen codes is kept in at least fp32, so a bf16 input (autocast)
    gets the codes `encode` gives and `quantized` is that sum rounded once to the input's dtype.
    """

    def __init__(self, num_stages: int, num_codes: int, dim: int, beta: float = 0.25, *, backend: str = "auto",
                 channels_last: bool | None = None, quantizer_dropout: float = 0.0, ema_decay: float | None = None,
                 kmeans_init: bool = False, kmeans_iters: int = 10, restart_dead: bool = False,
                 dead_threshold: float = 0.1, usage_decay: float = 0.9, gradient: str = "ste",
                 sync: bool | None = None, seed: int = 0, distance: str = "euclidean"):
        super().__init__()
        check_options(beta, gradient)
        check_distance(distance)
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {quantizer_dropout}")
        self.num_stages, self.num_codes, self.dim, self.beta = num_stages, num_codes, dim, beta
        self.channels_last, self.gradient, self.distance = channels_last, gradient, distance
        self.quantizer_dropout, self.seed = quantizer_dropout, seed
        self.stages = nn.ModuleList(
            VectorQuantizer(num_codes, dim, beta, backend=backend, channels_last=True, ema_decay=ema_decay,
                            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, restart_dead=restart_dead,
                            dead_threshold=dead_threshold, usage_decay=usage_decay, sync=sync, distance=distance)
            for _ in range(num_stages))
        self._dropout_draws = 0  # training steps that drew a prefix (extra state: resuming keeps the draws)

    def extra_repr(self) -> str:
        extras = f", quantizer_dropout={self.quantizer_dropout}" if self.quantizer_dropout else ""
        extras += f", gradient={self.gradient!r}" if self.gradient != "ste" else ""
        extras += f", distance={self.distance!r}" if self.distance != "euclidean" else ""
        return f"num_stages={self.num_stages}, num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}{extras}"

    def get_extra_state(self) -> dict:
        return {"dropout_draws": self._dropout_draws}

    def set_extra_state(self, state: dict) -> None:
        self._dropout_draws = int(state["dropout_draws"])

    def codebooks(self) -> list[torch.Tensor]:
        """The stages' (num_codes, dim) codebooks, in order."""
        return [stage.codebook for stage in self.stages]

    def _active_stages(self, update: bool, num_stages: int | None) -> int:
        if num_stages is not None:
            if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= self.num_stages:
                raise InputError(f"num_stages must be an int in [1, {self.num_stages}], got {num_stages!r}")
            return num_stages
        if not (update and self.quantizer_dropout > 0):
            return self.num_stages
        draw = random.Random(self.seed * 1_000_003 + self._dropout_draws)
        self._dropout_draws += 1
        if draw.random() >= self.quantizer_dropout:
            return self.num_stages
        return draw.randint(1, self.num_stages)

    def forward(self, x: torch.Tensor, *, update: bool | None = None, num_stages: int | None = None) -> RVQOutput:
        """Quantize x with the first `num_stages` stages (default: all, or in training a prefix
        quantizer dropout draws); `update` (default: self.training) runs each active stage's
        init, running statistics, EMA and restarts."""
        update = self.training if update is None else update
        channels = channel_dim(x, self.dim, self.channels_last)
        moved = x.movedim(channels, -1)
        flat = moved.reshape(-1, self.dim)
        active = self._active_stages(update, num_stages)
        # The stages work in the codebooks' precision and keep the sum of their codes in at least
        # fp32, as `encode` (residual_quantize) does: a bf16 input (autocast) is rounded once, not
        # its residual at every stage, so forward and encode choose the same codes.
        source = flat.to(self.stages[0].codebook.dtype)
        stacked = self._fused_codebooks(source, active, update)
        if stacked is not None:
            total, index, losses, stats = self._fused_stages(source, stacked, update)
        else:
            total, index, losses, stats = self._stage_loop(source, active, update)
        straight = reference._Rotation if self.gradient == "rotation" else reference._StraightThrough
        quantized = straight.apply(flat, total.to(flat.dtype))  # the sum, rounded once; its gradient goes to x
        skipped = self.num_stages - active
        if skipped:
            index = torch.cat([index, index.new_full((*index.shape[:-1], skipped), -1)], dim=-1)
        stage_losses = torch.cat([losses, flat.new_zeros(skipped, dtype=torch.float32)])
        stats = torch.cat([stats, flat.new_zeros(skipped, 3, dtype=torch.float32)])
        quantized = quantized.reshape(moved.shape).movedim(-1, channels)
        return RVQOutput(quantized, index.reshape(*moved.shape[:-1], self.num_stages), stage_losses.sum(),
                         stage_losses, stats[:, 0], stats[:, 1].long(), stats[:, 2].long())

    def _stage_loop(self, source: torch.Tensor, active: int, update: bool):
        """The first `active` stages one after another, each its VectorQuantizer's search and step:
        (sum of the codes (N, D) in at least fp32, indices (N, S), stage losses (S,) with their
        gradients, statistics (S, 3))."""
        total_dtype = torch.promote_types(source.dtype, torch.float32)
        total = source.new_zeros(source.shape, dtype=total_dtype)
        # Euclidean: the stages search without an autograd graph and StageLosses forms the loss
        # gradients from x, the codebooks searched and the indices (no residual kept per stage).
        cosine = self.distance == "cosine"
        # Without a graph through the residuals, one buffer serves every stage (no page faults of a
        # new N x D tensor a stage).
        buffer = torch.empty_like(total) if not cosine and source.dtype == total_dtype else None
        indices, losses, stats, books = [], [], [], []
        for s, stage in enumerate(self.stages[:active]):
            residual = stage_residual(source.detach() if buffer is not None else source, total, buffer)
            weights = None  # stage 0 seeds as a flat quantizer does
            if update and s > 0 and (stage._needs_init or stage.restart_dead):
                weights = _seed_weights(residual)
            chosen, idx, loss, stage_stats, book = stage.quantize_flat(residual, update, weights, graph=cosine)
            total.add_(chosen.detach())  # in place: a new N x D sum a stage costs its page faults
            indices.append(idx)
            losses.append(loss.float())
            books.append(book)
            stats.append(torch.stack([value.float() for value in stage_stats]))
        index, losses = torch.stack(indices, dim=-1), torch.stack(losses)
        if not cosine:
            losses = StageLosses.apply(source, self.beta, index, losses, total_dtype, *books)
        return total, index, losses, torch.stack(stats)

    def _fused_codebooks(self, source: torch.Tensor, active: int, update: bool) -> torch.Tensor | None:
        """The active stages' codebooks stacked (S, K, D) when the fused Triton kernels take this
        step (D <= 128, every stage initialised, no deterministic-algorithms mode: the kernels
        sum the EMA statistics and the codebook gradient with atomics), else None (the stage loop)."""
        stages = self.stages[:active]
        backend = resolve_backend(stages[0].backend, source.device)
        initialising = any(stage._needs_init for stage in stages)
        deterministic = torch.are_deterministic_algorithms_enabled()
        if (backend != "triton" or (update and (initialising or deterministic))
                or (deterministic and self.distance == "cosine" and torch.is_grad_enabled())):
            return None
        # A copy: the stages' updates below rewrite their codebooks in place, not what was searched.
        stacked = torch.stack([stage.codebook for stage in stages])
        return fused_triton_codebooks(source, stacked, active, backend)

    def _fused_stages(self, source: torch.Tensor, stacked: torch.Tensor, update: bool):
        """_stage_loop's results from the fused kernels: every stage's search, the sum of the codes
        and the losses in one kernel, each stage's code counts and residual sums in one more
        (ops/triton_residual.py), the loss gradients in one backward launch; then each stage's
        step (EMA, usage, restarts) from its counts and sums. Only a stage that restarts dead codes
        needs its residual (its candidates), formed from z and the codes before it."""
        stages = self.stages[:stacked.shape[0]]
        ema = update and any(stage.ema_decay is not None for stage in stages)
        cosine = self.distance == "cosine"
        total, index, losses, counts, sums, books = fused_stages(source, stacked, self.beta, torch.float32,
                                                                 2 if ema else 1, cosine=cosine)
        restarts = [update and stage.restart_dead for stage in stages]
        running = torch.zeros_like(total) if any(restarts) else None
        stats = []
        for s, stage in enumerate(stages):
            if update:
                residual, weights = source.detach(), None  # without restarts, the step reads no rows
                if restarts[s]:
                    residual = stage_residual(source.detach(), running)
                    weights = _seed_weights(residual) if s > 0 else None
                stage_sums = sums[s] if stage.ema_decay is not None else sums.new_zeros(0)
                stage_stats = stage._step(residual, counts[s], stage_sums, stage._synced(), weights)
            else:
                stage_stats = (*usage_stats(counts[s]), stage.dead_mask().sum())
            stats.append(torch.stack([value.float() for value in stage_stats]))
            if running is not None and any(restarts[s + 1:]):
                running.add_(books[s].index_select(0, index[:, s]))
        return total, index, losses, torch.stack(stats)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_stages: int | None = None) -> torch.Tensor:
        """Codes (input's layout without the channel dim, then num_stages) of x; no state changes,
        no loss or statistics: `residual_nearest_code` (one fused kernel on triton)."""
        stages = self._active_stages(False, num_stages)
        moved = x.movedim(channel_dim(x, self.dim, self.channels_last), -1)
        books = torch.stack([book.detach() for book in self.codebooks()[:stages]])
        flat = moved.reshape(-1, self.dim).to(books.dtype)  # in the codebooks' precision, as forward
        codes = residual_nearest_code(flat, books, backend=self.stages[0].backend, distance=self.distance)
        return codes.reshape(*moved.shape[:-1], stages)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., dim) the sum of the codes of `indices` (..., S'), S' <= num_stages (-1: no code;
        cosine: of the unit codes)."""
        flat = indices.reshape(-1, indices.shape[-1])
        return residual_decode(flat, self.codebooks(), distance=self.distance).reshape(*indices.shape[:-1], self.dim)
