"""VQVAE: conv encoder -> VectorQuantizer -> conv decoder, and load_checkpoint.

Images in [0, 1] (B, 3, H, W) go in; each stride-2 level halves the resolution, so the default
two levels map 32x32 images to an 8x8 grid of codes.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from .vector_quantizer import VectorQuantizer

# Per-channel statistics of the CIFAR-10 training set, for the model's own normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the VQ-VAE paper's residual block."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def make_encoder(in_channels: int, channels: int, res_channels: int, num_res_blocks: int, levels: int,
                 code_dim: int) -> nn.Sequential:
    """(B, in_channels, H, W) -> (B, code_dim, H / 2**levels, W / 2**levels)."""
    layers: list[nn.Module] = []
    width = in_channels
    for level in range(levels):
        out = channels // 2 ** (levels - 1 - level)  # widths grow to `channels` at the last level
        layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.ReLU()]
        width = out
    layers.append(nn.Conv2d(width, channels, 3, padding=1))
    layers += [ResidualBlock(channels, res_channels) for _ in range(num_res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(channels, code_dim, 1)]
    return nn.Sequential(*layers)


def make_decoder(out_channels: int, channels: int, res_channels: int, num_res_blocks: int, levels: int,
                 code_dim: int) -> nn.Sequential:
    """(B, code_dim, h, w) -> (B, out_channels, h * 2**levels, w * 2**levels)."""
    layers: list[nn.Module] = [nn.Conv2d(code_dim, channels, 3, padding=1)]
    layers += [ResidualBlock(channels, res_channels) for _ in range(num_res_blocks)]
    layers.append(nn.ReLU())
    width = channels
    for level in range(levels):
        last = level == levels - 1
        out = out_channels if last else channels // 2 ** (level + 1)
        layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        width = out
    return nn.Sequential(*layers)


class VQVAEOutput(NamedTuple):
    """What VQVAE.forward returns; all losses and statistics are 0-dim tensors (no host sync)."""

    reconstruction: torch.Tensor  # (B, C, H, W) in image scale ([0, 1] when perfect), not clamped
    indices: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # recon_loss + vq_loss: what training minimises
    recon_loss: torch.Tensor  # MSE in normalised space (pixel MSE / per-channel variance)
    vq_loss: torch.Tensor  # codebook + beta * commitment loss
    mse: torch.Tensor  # pixel MSE of the clamped reconstruction, images in [0, 1]
    perplexity: torch.Tensor
    codes_used: torch.Tensor
    dead_codes: torch.Tensor


class VQVAE(nn.Module):
    """VQ-VAE for images in [0, 1].

    Args:
        num_codes, code_dim, beta: the codebook (K codes of size D) and commitment weight.
        channels, res_channels, num_res_blocks, levels: encoder/decoder sizes; `levels` stride-2
            stages, so codes form an (H / 2**levels, W / 2**levels) grid.
        ema_decay, kmeans_init, restart_dead, dead_threshold, usage_decay: codebook health, see
            VectorQuantizer. The defaults are the project's recipe; `VQVAE.plain()` the classic one.
        backend: the quantizer backend ("auto": C++ kernel on CPU, Triton on GPU).
        mean, std: per-channel normalisation applied inside the model.
    The constructor's arguments are kept in `self.config`, which checkpoints store.
    """

    def __init__(self, num_codes: int = 512, code_dim: int = 64, beta: float = 0.25, *, in_channels: int = 3,
                 channels: int = 160, res_channels: int = 128, num_res_blocks: int = 2, levels: int = 2,
                 ema_decay: float | None = 0.9, kmeans_init: bool = True, restart_dead: bool = True,
                 dead_threshold: float = 0.1, usage_decay: float = 0.9, backend: str = "auto",
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD):
        super().__init__()
        self.config = dict(num_codes=num_codes, code_dim=code_dim, beta=beta, in_channels=in_channels,
                           channels=channels, res_channels=res_channels, num_res_blocks=num_res_blocks,
                           levels=levels, ema_decay=ema_decay, kmeans_init=kmeans_init, restart_dead=restart_dead,
                           dead_threshold=dead_threshold, usage_decay=usage_decay, backend=backend,
                           mean=tuple(mean), std=tuple(std))
        self.encoder = make_encoder(in_channels, channels, res_channels, num_res_blocks, levels, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta, backend=backend, ema_decay=ema_decay,
                                         kmeans_init=kmeans_init, restart_dead=restart_dead,
                                         dead_threshold=dead_threshold, usage_decay=usage_decay)
        self.decoder = make_decoder(in_channels, channels, res_channels, num_res_blocks, levels, code_dim)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def plain(cls, **kwargs) -> VQVAE:
        """The classic recipe: uniform codebook init, gradient codebook, no restarts, cdist lookup."""
        return cls(**{"kmeans_init": False, "restart_dead": False, "ema_decay": None, "backend": "reference",
                      **kwargs})

    def _quantize(self, z: torch.Tensor, update: bool | None = None):
        # The quantizer runs in fp32 even under bf16 autocast (VectorQuantizer casts z to the
        # codebook's dtype); autocast is off so no op inside it is downcast.
        with torch.autocast(z.device.type, enabled=False):
            return self.quantizer(z, update=update)

    def _decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized) * self.std + self.mean

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Reconstruction, codes (B, h, w), losses and codebook statistics for images x (B, C, H, W) in [0, 1].

        In training mode the quantizer also updates its codebook state (init, EMA, restarts).
        """
        normalised = (x - self.mean) / self.std
        vq = self._quantize(self.encoder(normalised))
        decoded = self.decoder(vq.quantized)
        recon_loss = torch.mean((decoded.float() - normalised.float()) ** 2)
        reconstruction = decoded * self.std + self.mean
        with torch.no_grad():
            mse = torch.mean((reconstruction.float().clamp(0, 1) - x.float()) ** 2)
        return VQVAEOutput(reconstruction, vq.indices, recon_loss + vq.loss, recon_loss, vq.loss, mse,
                           vq.perplexity, vq.codes_used, vq.dead_codes)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) int64 of images x (B, C, H, W) in [0, 1]; never changes the model."""
        return self._quantize(self.encoder((x - self.mean) / self.std), update=False).indices

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] from codes (B, h, w) int64."""
        # codebook[codes] is (B, h, w, D); as (B, D, h, w) it has the quantizer output's layout.
        quantized = self.quantizer.codebook[codes].permute(0, 3, 1, 2)
        return self._decode_quantized(quantized).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions (B, C, H, W) in [0, 1] of images x in [0, 1]; equals decode(encode(x))."""
        vq = self._quantize(self.encoder((x - self.mean) / self.std), update=False)
        return self._decode_quantized(vq.quantized).clamp(0, 1)


def save_checkpoint(path, model: VQVAE, **extra) -> None:
    """Write {"config", "model", **extra} to `path` atomically (temp file, then rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    torch.save({"format": "vqvae_fast/1", "config": model.config, "model": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location: str | torch.device | None = "cpu") -> VQVAE:
    """A VQVAE built from the config stored in checkpoint `path`, with its weights, in eval mode."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    model = VQVAE(**checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()
