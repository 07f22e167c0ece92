"""VectorQuantizer: the fused quantizer as an nn.Module for feature maps and sequences."""
from __future__ import annotations

import torch
from torch import nn

from .functional import InputError, quantize


class VQOutput(tuple):
    """(quantized, indices, loss), with the batch statistics as attributes.

    Unpacks as three values; `perplexity` (exp of the code-usage entropy) and `codes_used`
    (distinct codes chosen in the batch) are 0-dim tensors alongside.
    """

    def __new__(cls, quantized, indices, loss, perplexity, codes_used):
        out = super().__new__(cls, (quantized, indices, loss))
        out.perplexity = perplexity
        out.codes_used = codes_used
        return out

    quantized = property(lambda self: self[0])
    indices = property(lambda self: self[1])
    loss = property(lambda self: self[2])


def code_usage(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, codes_used) of a batch of code indices, without host syncs."""
    counts = torch.zeros(num_codes, device=indices.device, dtype=torch.float32)
    counts.index_put_((indices.reshape(-1),), torch.ones_like(indices, dtype=torch.float32).reshape(-1),
                      accumulate=True)
    probs = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
    return perplexity, (counts > 0).sum()


class VectorQuantizer(nn.Module):
    """Learned codebook of `num_codes` vectors of size `dim`, with straight-through gradients.

    Input: feature maps (B, dim, H, W) (4-D input is taken as channels-first unless
    `channels_last=True`), or channel-last (..., dim). Returns VQOutput(quantized, indices,
    loss) in the input's layout, indices shaped like the input without its channel dim.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, *, backend: str = "auto",
                 channels_last: bool | None = None):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be >= 1, got {num_codes} and {dim}")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.backend = backend
        self.channels_last = channels_last
        # The classic VQ-VAE init: uniform in +-1/K.
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, backend={self.backend!r}"

    def _channel_dim(self, x: torch.Tensor) -> int:
        channels_first = x.dim() == 4 if self.channels_last is None else not self.channels_last
        channel_dim = 1 if channels_first else x.dim() - 1
        if x.dim() < 1 or x.shape[channel_dim] != self.dim:
            layout = "(B, dim, H, W)" if channels_first else "(..., dim)"
            raise InputError(f"expected input of layout {layout} with dim={self.dim}, got shape {tuple(x.shape)}")
        return channel_dim

    def forward(self, x: torch.Tensor) -> VQOutput:
        channel_dim = self._channel_dim(x)
        moved = x.movedim(channel_dim, -1)
        # Quantize in the codebook's precision (fp32 under bf16 autocast): argmin and the
        # codebook gradient stay accurate; the result goes back to the input's dtype.
        flat = moved.reshape(-1, self.dim).to(self.codebook.dtype)
        quantized, indices, loss = quantize(flat, self.codebook, beta=self.beta, backend=self.backend)
        perplexity, codes_used = code_usage(indices, self.num_codes)
        quantized = quantized.to(x.dtype).reshape(moved.shape).movedim(-1, channel_dim)
        return VQOutput(quantized, indices.reshape(moved.shape[:-1]), loss, perplexity, codes_used)
