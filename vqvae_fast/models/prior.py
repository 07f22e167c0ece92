"""A class-conditional autoregressive prior over VQ-VAE code grids, and sampling from it.

Why a small causal transformer rather than the papers' gated PixelCNN: the grids are short
(64 codes for an 8x8 grid, 16 + 64 for VQ-VAE-2), so full attention costs little and sees the
whole past (a PixelCNN needs many layers for that receptive field and has a blind spot); the
class and the top level condition it simply by coming first in the sequence; PyTorch's fused
`scaled_dot_product_attention` runs it on CPUs and GPUs; and sampling with cached keys and
values costs one token's work per step.

The sequence of one image is [class, top-level codes (raster order), ..., bottom-level codes]:
one model is then p(top | class) p(bottom | top, class) for VQ-VAE-2 and p(codes | class) for
the flat model. All levels share one vocabulary (level l's codes offset by the sizes of the
levels before it); each position's logits are restricted to its level's codes.

Classifier-free guidance (Ho & Salimans, 2022): one extra class, "no class" (label
`num_classes`), stands in for the label of a share of the training grids, so the same model is
also p(codes). Sampling with guidance g > 1 draws from logits u + g (c - u) (c: given the class,
u: without), which makes the class show more clearly at some cost in diversity; g = 1 is the
plain conditional model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


class _Block(nn.Module):
    """Pre-norm transformer block; `cache` (a dict) makes attention incremental for sampling."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # one new position: attend to everything before it, no mask needed
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None,
                                                   dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(attention.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training)
        return x + self.mlp(self.norm2(x))


class CodePrior(nn.Module):
    """p(codes | class) over the code grids of one or more levels (top level first).

    Args:
        level_shapes: (h, w) of each level's grid; level_codes: each level's codebook size.
        num_classes: class labels 0..num_classes-1 condition the model.
        dim, depth, heads, dropout: the transformer's size.
    """

    def __init__(self, level_shapes, level_codes, num_classes: int = 10, dim: int = 256, depth: int = 6,
                 heads: int = 8, dropout: float = 0.1):
        super().__init__()
        level_shapes = [tuple(int(x) for x in shape) for shape in level_shapes]
        level_codes = [int(k) for k in level_codes]
        if len(level_shapes) != len(level_codes) or not level_shapes:
            raise ValueError("level_shapes and level_codes must describe the same (non-zero) number of levels")
        self.config = dict(level_shapes=level_shapes, level_codes=level_codes, num_classes=num_classes, dim=dim,
                           depth=depth, heads=heads, dropout=dropout)
        lengths = [h * w for h, w in level_shapes]
        self.length, self.vocab = sum(lengths), sum(level_codes)
        offsets = [sum(level_codes[:i]) for i in range(len(level_codes))]
        level_of_position = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        allowed = torch.zeros(self.length, self.vocab, dtype=torch.bool)
        for position, level in enumerate(level_of_position.tolist()):
            allowed[position, offsets[level]:offsets[level] + level_codes[level]] = True
        self.register_buffer("offset_of_position", torch.tensor(offsets)[level_of_position], persistent=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, dim)  # + "no class", for guidance
        self.token_embed = nn.Embedding(self.vocab, dim)
        self.position_embed = nn.Parameter(torch.randn(self.length, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.vocab)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def flatten(self, codes: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(B, L) int64 tokens, vocabulary offsets applied, from per-level grids (B, h, w)."""
        flat = torch.cat([c.reshape(c.shape[0], -1).long() for c in codes], 1)
        if flat.shape[1] != self.length:
            raise ValueError(f"codes of {flat.shape[1]} positions given, the prior models {self.length}")
        return flat + self.offset_of_position

    def unflatten(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-level grids (B, h, w) of codes from (B, L) tokens."""
        codes = tokens - self.offset_of_position
        out, start = [], 0
        for h, w in self.config["level_shapes"]:
            out.append(codes[:, start:start + h * w].reshape(-1, h, w))
            start += h * w
        return tuple(out)

    def _inputs(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Input embeddings: the class, then every token but the last, each with its position."""
        x = torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens[:, :-1])], 1)
        return x + self.position_embed[:x.shape[1]]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, vocab) for every position (other levels' codes masked to -inf)."""
        x = self._inputs(tokens, labels)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return logits.masked_fill(~self.allowed, float("-inf"))

    def nll(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, L) negative log-likelihood of each position, in nats."""
        logits = self(tokens, labels).float()
        return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")

    def drop_labels(self, labels: torch.Tensor, rate: float) -> torch.Tensor:
        """Labels with a `rate` share replaced by "no class" (training for guidance; global RNG)."""
        if rate <= 0:
            return labels
        dropped = torch.rand(labels.shape, device=labels.device) < rate
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
               guidance: float = 1.0, generator: torch.Generator | None = None,
               progress: bool = False) -> tuple[torch.Tensor, ...]:
        """Code grids of every level for one sample per label, token by token with cached keys and values.

        temperature scales the logits (1: the model's distribution); top_k keeps the k most likely
        codes of each step; guidance > 1 applies classifier-free guidance (a second, unconditional
        pass in the same batch). Deterministic given `generator`'s state.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        was_training = self.training
        self.eval()
        b = labels.shape[0]
        guided = guidance != 1.0
        if guided:  # rows b.. run without the class
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        caches = [{} for _ in self.blocks]
        tokens = torch.empty(b, self.length, dtype=torch.long, device=labels.device)
        x = self.class_embed(labels)[:, None] + self.position_embed[0]
        for t in tqdm(range(self.length), disable=not progress, desc="sampling", unit="code", leave=False):
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache)
            logits = self.head(self.norm(x[:, -1])).float()
            if guided:
                conditional, unconditional = logits[:b], logits[b:]
                logits = unconditional + guidance * (conditional - unconditional)
            logits = (logits / temperature).masked_fill(~self.allowed[t], float("-inf"))
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            tokens[:, t] = token
            if t + 1 < self.length:
                x = self.token_embed(token.repeat(2) if guided else token)[:, None] + self.position_embed[t + 1]
        self.train(was_training)
        return self.unflatten(tokens)


@torch.no_grad()
def bits_per_code(prior: CodePrior, codes: tuple[torch.Tensor, ...], labels: torch.Tensor,
                  batch_size: int = 256) -> dict:
    """Held-out negative log-likelihood in bits per code: overall and per level (`level<i>_bits`)."""
    was_training = prior.training
    prior.eval()
    device = prior.position_embed.device
    total = torch.zeros(prior.length, dtype=torch.float64, device=device)
    n = labels.shape[0]
    for i in range(0, n, batch_size):
        tokens = prior.flatten(tuple(c[i:i + batch_size].to(device) for c in codes))
        total += prior.nll(tokens, labels[i:i + batch_size].to(device)).double().sum(0)
    prior.train(was_training)
    per_position = total / max(n, 1) / math.log(2)
    out = {"bits_per_code": float(per_position.mean())}
    start = 0
    for level, (h, w) in enumerate(prior.config["level_shapes"]):
        out[f"level{level}_bits_per_code"] = float(per_position[start:start + h * w].mean())
        start += h * w
    return out


def unigram_bits_per_code(train_codes: tuple[torch.Tensor, ...], test_codes: tuple[torch.Tensor, ...],
                          level_codes) -> dict:
    """The baseline: each level's code frequencies in the training codes (add-one smoothed), as a
    model of the held-out codes: bits per code, and the entropy of the training frequencies."""
    bits = entropy = 0.0
    positions = 0
    for train, test, k in zip(train_codes, test_codes, level_codes):
        counts = torch.bincount(train.reshape(-1).long(), minlength=k).double()
        frequencies = counts / counts.sum()
        smoothed = (counts + 1) / (counts.sum() + k)
        n = test[0].numel()
        bits -= float(torch.log2(smoothed[test.reshape(-1).long()]).sum()) / max(test.shape[0], 1)
        entropy -= float((frequencies * torch.log2(frequencies.clamp_min(1e-300))).sum()) * n
        positions += n
    return {"unigram_bits_per_code": bits / positions, "unigram_entropy_bits": entropy / positions}
