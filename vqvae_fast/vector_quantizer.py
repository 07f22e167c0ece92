"""VectorQuantizer: the fused quantizer as an nn.Module for feature maps and sequences.

Beyond the plain quantizer, it keeps the codebook healthy, each part optional:
k-means initialisation from the first training batch, EMA codebook updates, and restart of
dead codes from recent encoder outputs. All state lives in buffers (so it checkpoints),
and the per-step updates are tensor ops with no host syncs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .functional import (InputError, check_distance, check_options, code_counts, l2_normalize, nearest_code,
                         quantize_with_code_stats, resolve_backend)


class VQOutput(tuple):
    """(quantized, indices, loss), with the batch statistics as attributes.

    Unpacks as three values; `perplexity` (exp of the code-usage entropy), `codes_used`
    (distinct codes chosen in the batch) and `dead_codes` (codes whose running usage is below
    the dead threshold) are 0-dim tensors alongside.
    """

    def __new__(cls, quantized, indices, loss, perplexity, codes_used, dead_codes=None):
        out = super().__new__(cls, (quantized, indices, loss))
        out.perplexity = perplexity
        out.codes_used = codes_used
        out.dead_codes = dead_codes
        return out

    quantized = property(lambda self: self[0])
    indices = property(lambda self: self[1])
    loss = property(lambda self: self[2])


LAPLACE_EPS = 1e-5  # pseudo-count of the EMA counts' Laplace smoothing


def usage_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, codes_used) from per-code counts (K,)."""
    probs = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
    return perplexity, (counts > 0).sum()


def code_usage(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, codes_used) of a batch of code indices, without host syncs."""
    return usage_stats(code_counts(indices, num_codes))


@torch.no_grad()
def update_codebook_state(usage, ema_count, ema_sum, codebook, counts, sums, candidates, candidate_rows, *,
                          usage_decay: float, ema_decay: float | None, dead_threshold: float, restart: bool,
                          normalize: bool, laplace_eps: float = LAPLACE_EPS):
    """One step's update of a codebook's state, in place; returns the step's perplexity (0-dim
    float32) and (codes used, dead codes) (int64 (2,)). The Triton form
    (ops/triton_codebook_update.py) does the same in two launches.

    counts (K,), sums (K, D): the step's rows per code and their sum (summed over ranks when
    synced); rows = sum(counts). usage <- usage_decay usage + (1 - usage_decay) K counts / rows.
    Dead codes: usage below dead_threshold. EMA (ema_decay set): ema_count and ema_sum follow
    the counts and sums. restart: each dead code moves onto its candidate (rows `candidate_rows`
    of `candidates`, or row k of `candidates` (K, D) when None), with usage 1 (a grace period)
    and, EMA, ema_count 1 and ema_sum = the candidate. EMA: codebook = ema_sum / the Laplace-
    smoothed count; otherwise only restarted codes change. `normalize` (cosine): candidates and
    the EMA codebook are l2-normalised.
    """
    K = usage.shape[0]  # codebook: None when neither EMA nor restarts change it
    rows = counts.sum().clamp_min(1.0)  # every row has one code
    usage.mul_(usage_decay).add_(counts * (K / rows), alpha=1.0 - usage_decay)
    dead = usage < dead_threshold
    probs = counts / rows
    entropy = (probs * torch.log(torch.where(counts > 0, probs, 1.0))).sum()
    report = torch.exp(-entropy), torch.stack([(counts > 0).sum(), dead.sum()])
    if restart:
        chosen = candidates if candidate_rows is None else candidates[candidate_rows]
        if normalize:
            chosen = l2_normalize(chosen)
        usage.masked_fill_(dead, 1.0)
    if ema_decay is not None:
        ema_count.mul_(ema_decay).add_(counts, alpha=1.0 - ema_decay)
        ema_sum.mul_(ema_decay).add_(sums.to(ema_sum.dtype), alpha=1.0 - ema_decay)
        if restart:
            ema_count.masked_fill_(dead, 1.0)
            ema_sum.copy_(torch.where(dead[:, None], chosen.to(ema_sum.dtype), ema_sum))
        # Laplace smoothing of the counts: a code unused for long keeps a finite, sensible value.
        total = ema_count.sum()
        smoothed = (ema_count + laplace_eps) / (total + K * laplace_eps) * total
        vectors = ema_sum / smoothed[:, None]
        codebook.copy_(l2_normalize(vectors) if normalize else vectors)
    elif restart:
        codebook.copy_(torch.where(dead[:, None], chosen.to(codebook.dtype), codebook))
    return report


def process_group_size() -> int:
    """Processes in the default torch.distributed group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of x (n_r, D) of every rank, concatenated in rank order (n_r may differ)."""
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), x.shape[1])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def _sampling_weights(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 draw weights (NaN counts as 0); uniform where all are 0."""
    w = torch.nan_to_num(weights.double(), nan=0.0, posinf=torch.finfo(torch.float64).max).clamp_min(0)
    return w + (w.sum() == 0)  # a tensor op: no host sync


def weighted_rows(weights: torch.Tensor, count: int) -> torch.Tensor:
    """`count` row indices drawn with replacement, row i with probability proportional to
    weights[i] (uniform where every weight is 0), from the device's global RNG; no host sync."""
    cdf = _sampling_weights(weights).cumsum(0)
    draws = torch.rand(count, dtype=torch.float64, device=cdf.device) * cdf[-1]
    return torch.searchsorted(cdf, draws, right=True).clamp_max(cdf.shape[0] - 1)  # a 0-weight row is never hit


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, backend: str = "auto", *,
           spherical: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(k, D) centroids of x (N, D) by Lloyd's algorithm, seeded with k random rows of x.

    Uses the global torch RNG of x's device (deterministic given the seed). A cluster that
    empties keeps its previous centroid. `spherical`: spherical k-means, on the l2-normalised
    rows of x with the centroids re-normalised every iteration (unit-norm centroids; the
    Euclidean nearest centroid of unit vectors is the one of highest cosine similarity).
    `weights` (N,): seeds are drawn without replacement with probability proportional to these
    (a row of weight 0 only once every positive-weight row is taken); default uniform.
    """
    if spherical:
        x = l2_normalize(x)
    n = x.shape[0]
    if weights is None:
        seeds = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(n, (k,), device=x.device)
    elif n >= k:  # weighted draws without replacement: the k smallest of Exp(1) / weight (Efraimidis-Spirakis)
        w = _sampling_weights(weights)
        keys = torch.empty_like(w).exponential_()
        keys = torch.where(w > 0, keys / w, torch.inf)
        seeds = keys.topk(k, largest=False).indices
    else:
        seeds = weighted_rows(weights, k)
    centroids = x[seeds].clone()
    for _ in range(iters):
        assign = nearest_code(x, centroids, backend=backend)
        counts = code_counts(assign, k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        if spherical:
            centroids = l2_normalize(centroids)
    return centroids


def channel_dim(x: torch.Tensor, dim: int, channels_last: bool | None) -> int:
    """The dim of x holding the `dim` channels: 1 for 4-D input unless channels_last, else the
    last; InputError naming the expected layout when its size is not `dim`."""
    channels_first = x.dim() == 4 if channels_last is None else not channels_last
    found = 1 if channels_first else x.dim() - 1
    if x.dim() < 1 or x.shape[found] != dim:
        layout = "(B, dim, H, W)" if channels_first else "(..., dim)"
        raise InputError(f"expected input of layout {layout} with dim={dim}, got shape {tuple(x.shape)}")
    return found


class VectorQuantizer(nn.Module):
    """Learned codebook of `num_codes` vectors of size `dim`, with straight-through gradients.

    Input: feature maps (B, dim, H, W) (4-D input is taken as channels-first unless
    `channels_last=True`), or channel-last (..., dim). Returns VQOutput(quantized, indices,
    loss) in the input's layout, indices shaped like the input without its channel dim.

    Codebook health (all off by default: the classic quantizer):
        ema_decay: if set, the codebook follows an exponential moving average of the encoder
            outputs assigned to each code (the codebook gets no gradient; `loss` still carries
            the commitment term for the encoder). The codebook is then ema_sum / ema_count
            (buffers): writing the codebook by hand needs the same write to ema_sum.
        kmeans_init: replace the codebook by k-means centroids (`kmeans_iters` Lloyd steps)
            of the first training batch's vectors.
        restart_dead: after each training step, codes whose running usage fell below
            `dead_threshold` are re-placed on random vectors of the step's batch (drawn in
            proportion to forward's `seed_weights` when given, as are the k-means seeds).
        Running usage is an EMA (`usage_decay`) of each code's share of the vectors, scaled so
        that uniform use is 1; it is tracked in training mode whatever the options.
        The whole update (usage, EMA, restarts, the codebook, the batch statistics) is
        `update_codebook_state`; on the triton backend two launches do it, and the per-code
        counts and sums it needs come out of the search itself (`quantize_with_code_stats`).
    State changes happen only in training mode (or with `update=True` in forward).
    gradient: "ste" (straight through) or "rotation" (the rotation trick); see `quantize`.
    distance: "euclidean", or "cosine" (as in LlamaGen's VQ-16 and DAC): the input vectors and the
        codes are l2-normalised, the nearest code is found between the normalised vectors
        (`quantize(..., distance="cosine")`, normalised inside the kernels on triton: nearest in
        Euclidean distance is highest cosine similarity for unit vectors), `quantized` is the
        normalised code and the loss compares normalised vectors.
        Gradients reach the input, and a learned codebook, through the normalisation. The codebook
        is kept unit-norm: unit-norm random init, spherical k-means, the EMA codebook is the
        normalised running mean of the normalised vectors, restarts use normalised vectors. A
        codebook learned by gradient may drift off unit norm; only its direction is used
        (`code_vectors()` returns the codes as quantized).

    Under torch.distributed (DDP or any loop of your own; `sync=None` detects a process group),
    the codebook state stays identical on every rank: k-means runs on rank 0 over the vectors
    of all ranks and is broadcast; EMA counts and sums, usage and the batch statistics are
    summed over ranks in one packed all-reduce per step; dead codes are decided from that global
    usage and refilled from vectors gathered from all ranks. Every rank issues the same
    collectives every training step whatever its data (an empty batch included), so none can
    wait on another. Wrap the model with DistributedDataParallel(forward_sync_buffers=False) (torch < 2.13:
    broadcast_buffers=False; distributed.ddp_without_buffer_sync() picks): the
    buffers are kept in step here, and DDP's broadcast would overwrite them with rank 0's.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, *, backend: str = "auto",
                 channels_last: bool | None = None, ema_decay: float | None = None,
                 kmeans_init: bool = False, kmeans_iters: int = 10, restart_dead: bool = False,
                 dead_threshold: float = 0.1, usage_decay: float = 0.9, gradient: str = "ste",
                 sync: bool | None = None, distance: str = "euclidean"):
        super().__init__()
        check_options(beta, gradient)
        check_distance(distance)
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be >= 1, got {num_codes} and {dim}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.backend, self.gradient, self.sync = backend, gradient, sync
        self.channels_last = channels_last
        self.ema_decay, self.kmeans_iters = ema_decay, kmeans_iters
        self.kmeans_init, self.restart_dead = kmeans_init, restart_dead
        self.dead_threshold, self.usage_decay = dead_threshold, usage_decay
        self.distance = distance
        if distance == "cosine":  # unit-norm random directions
            init = l2_normalize(torch.randn(num_codes, dim))
        else:  # the classic VQ-VAE init: uniform in +-1/K
            init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        self.codebook = nn.Parameter(init, requires_grad=ema_decay is None)
        self.register_buffer("usage", torch.ones(num_codes))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._needs_init = kmeans_init  # host copy of `initialized`: no sync per step
        if ema_decay is not None:
            # codebook = ema_sum / ema_count; a count of 1 makes the initial codebook a weak prior.
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", self.codebook.detach().clone())

    def extra_repr(self) -> str:
        extras = "".join(f", {name}={getattr(self, name)}" for name in ("ema_decay", "kmeans_init", "restart_dead")
                         if getattr(self, name))
        extras += f", gradient={self.gradient!r}" if self.gradient != "ste" else ""
        extras += f", distance={self.distance!r}" if self.distance != "euclidean" else ""
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, backend={self.backend!r}{extras}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._needs_init = not bool(self.initialized)

    def _channel_dim(self, x: torch.Tensor) -> int:
        return channel_dim(x, self.dim, self.channels_last)

    def code_vectors(self) -> torch.Tensor:
        """(num_codes, dim) the codes as `quantized` returns them (normalised for cosine; the triton
        kernels normalise with a float64 norm, so theirs may differ in the last bit); differentiable."""
        return l2_normalize(self.codebook) if self.distance == "cosine" else self.codebook

    def dead_mask(self) -> torch.Tensor:
        """(num_codes,) bool: codes whose running usage is below `dead_threshold`."""
        return self.usage < self.dead_threshold

    def forward(self, x: torch.Tensor, *, update: bool | None = None,
                seed_weights: torch.Tensor | None = None) -> VQOutput:
        """Quantize x; `update` (default: self.training) runs init, the running statistics, the
        EMA and restarts. `dead_codes`: codes whose usage fell below the threshold this step
        (restarted, with restart_dead). `seed_weights` (x's shape without the channel dim, or
        (rows,)): k-means seeds and restart vectors are drawn from x's vectors with probability
        proportional to these (ResidualVectorQuantizer passes the error the stages before left,
        so no code is seeded on a vector they already fit); default uniform."""
        update = self.training if update is None else update
        channel_dim = self._channel_dim(x)
        moved = x.movedim(channel_dim, -1)
        # Quantize in the codebook's precision (fp32 under bf16 autocast): argmin and the
        # codebook gradient stay accurate; the result goes back to the input's dtype.
        # Cosine: `quantize` normalises (inside the kernels on triton), and so do k-means and
        # the codebook update: they all see the normalised vectors.
        flat = moved.reshape(-1, self.dim).to(self.codebook.dtype)
        quantized, indices, loss, stats, _ = self.quantize_flat(flat, update, seed_weights)
        quantized = quantized.to(x.dtype).reshape(moved.shape).movedim(-1, channel_dim)
        return VQOutput(quantized, indices.reshape(moved.shape[:-1]), loss, *stats)

    def quantize_flat(self, flat: torch.Tensor, update: bool, seed_weights: torch.Tensor | None = None,
                      graph: bool = True):
        """forward's work on (N, dim) vectors in the codebook's dtype: returns (quantized,
        indices, loss, (perplexity, codes_used, dead_codes), the codebook searched). graph=False:
        the search records no autograd graph (a caller that forms the gradients itself, as
        ResidualVectorQuantizer does, gets the codebook searched: the parameter, or the copy of
        it that autograd links to the parameter when the update rewrites the codebook)."""
        synced = update and self._synced()
        stepping = update and (synced or flat.shape[0] > 0)  # synced: every rank joins the collectives
        if seed_weights is not None:
            if seed_weights.numel() != flat.shape[0]:
                raise InputError(f"seed_weights must hold one weight per vector ({flat.shape[0]}), got shape "
                                 f"{tuple(seed_weights.shape)}")
            seed_weights = seed_weights.detach().reshape(-1).to(flat.device)
        if stepping and self._needs_init:
            self.init_codebook(flat.detach(), synced, seed_weights)
        codebook = self.codebook
        if stepping and (self.ema_decay is not None or self.restart_dead):
            codebook = codebook.clone()  # the update below rewrites the codebook in place
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            quantized, indices, loss, counts, sums = quantize_with_code_stats(
                flat, codebook, beta=self.beta, backend=self.backend, gradient=self.gradient,
                with_sums=stepping and self.ema_decay is not None, distance=self.distance)
        if stepping:
            perplexity, codes_used, dead_codes = self._step(flat.detach(), counts, sums, synced, seed_weights)
        else:
            perplexity, codes_used = usage_stats(counts)
            dead_codes = self.dead_mask().sum()
        return quantized, indices, loss, (perplexity, codes_used, dead_codes), codebook

    def _synced(self) -> bool:
        return process_group_size() > 1 if self.sync is None else self.sync

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor, synced: bool = False,
                      weights: torch.Tensor | None = None) -> None:
        """Set the codebook to k-means centroids of `vectors` (N, dim) and mark it initialised;
        `synced`: of the vectors of all ranks, computed on rank 0 and broadcast. Cosine: spherical
        k-means (unit-norm centroids of the normalised vectors). `weights` (N,): the seeds' draw
        weights (see `kmeans`)."""
        vectors = vectors.to(self.codebook.dtype)
        spherical = self.distance == "cosine"
        if synced:
            vectors = gather_rows(vectors)
            if weights is not None:
                weights = gather_rows(weights.double()[:, None])[:, 0]
            centroids = torch.empty_like(self.codebook)
            if dist.get_rank() == 0:
                centroids = kmeans(vectors, self.num_codes, self.kmeans_iters, self.backend, spherical=spherical,
                                   weights=weights)
            dist.broadcast(centroids, src=0)
        else:
            centroids = kmeans(vectors, self.num_codes, self.kmeans_iters, self.backend, spherical=spherical,
                               weights=weights)
        self.codebook.copy_(centroids)
        if self.ema_decay is not None:
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(centroids)
        self.usage.fill_(1.0)
        self.initialized.fill_(True)
        self._needs_init = False

    @torch.no_grad()
    def _step(self, flat: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, synced: bool,
              seed_weights: torch.Tensor | None = None):
        """The step's update (update_codebook_state) from its counts and sums; synced: summed over
        ranks first, in one packed all-reduce. Returns (perplexity, codes used, dead codes)."""
        if synced:
            parts = [counts] + ([sums.reshape(-1)] if self.ema_decay is not None else [])
            dtype = torch.promote_types(sums.dtype, torch.float32)
            packed = torch.cat([part.to(dtype) for part in parts])
            dist.all_reduce(packed)
            counts = packed[:self.num_codes].float()
            if self.ema_decay is not None:
                sums = packed[self.num_codes:].view(self.num_codes, self.dim)
        candidates, candidate_rows = flat, None
        if self.restart_dead:
            candidates, candidate_rows = self._restart_candidates(flat, synced, seed_weights)
        ema = self.ema_decay is not None
        # The codebook only when it changes (then forward quantized a copy): an op that declares it
        # mutated bumps its version, which autograd, having saved it, would refuse.
        state = (self.usage, self.ema_count if ema else None, self.ema_sum if ema else None,
                 self.codebook if ema or self.restart_dead else None)
        if resolve_backend(self.backend, flat.device) == "triton":
            update = torch.ops.vqvae_fast.triton_update_codebook_state  # registered with the triton ops
        else:
            update = update_codebook_state
        perplexity, tallies = update(*state, counts, sums, candidates, candidate_rows, usage_decay=self.usage_decay,
                                     ema_decay=self.ema_decay, dead_threshold=self.dead_threshold,
                                     restart=self.restart_dead, normalize=self.distance == "cosine",
                                     laplace_eps=LAPLACE_EPS)
        return perplexity, tallies[0], tallies[1]

    @torch.no_grad()
    def _restart_candidates(self, flat: torch.Tensor, synced: bool, weights: torch.Tensor | None = None):
        """(candidates, rows): code k restarts on candidates[rows[k]] (rows None: candidates[k]),
        a random recent encoder output (drawn in proportion to `weights` when given); synced: code
        k takes rank k % world's draw, so every rank gets the same candidates (a rank without
        vectors offers the codebook)."""
        if flat.shape[0] == 0:
            candidates, rows = self.codebook.detach().clone(), None
        elif weights is None:
            candidates, rows = flat, torch.randint(flat.shape[0], (self.num_codes,), device=flat.device)
        else:
            candidates, rows = flat, weighted_rows(weights, self.num_codes)
        if not synced:
            return candidates, rows
        if rows is not None:
            candidates = candidates[rows]
        world = dist.get_world_size()
        every = [torch.empty_like(candidates) for _ in range(world)]
        dist.all_gather(every, candidates.contiguous())
        owner = torch.arange(self.num_codes, device=candidates.device) % world
        return torch.stack(every)[owner, torch.arange(self.num_codes, device=candidates.device)], None
