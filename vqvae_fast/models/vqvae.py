"""VQVAE (conv encoder -> VectorQuantizer -> conv decoder), the two-level VQVAE2, checkpoints.

Images in [0, 1] (B, 3, H, W) go in; each stride-2 level halves the resolution, so the default
two levels map 32x32 images to an 8x8 grid of codes (VQVAE2: 4x4 top codes and 8x8 bottom codes).
`VQVAE(stages=S)` quantizes with a ResidualVectorQuantizer of S stages instead (the RQ-VAE,
`--model rqvae`): its codes are (B, h, w, S). Both models expose their codes as a tuple of grids,
top level (or first stage) first (`encode_levels`, `decode_levels`), which is what the prior models.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_save, read_checkpoint
from ..functional import InputError
from ..residual_quantizer import ResidualVectorQuantizer
from ..vector_quantizer import VectorQuantizer

# Per-channel statistics of the CIFAR-10 training set, for the model's own normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# Activations of the encoder and decoder: ReLU as in the VQ-VAE paper, or SiLU (x * sigmoid(x)),
# which trains faster at short budgets (README, "Tuning").
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


class ResidualBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))): the VQ-VAE paper's residual block (act: ReLU there)."""

    def __init__(self, channels: int, hidden: int, activation: str = "relu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.body = nn.Sequential(
            act(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            act(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def check_images(x: torch.Tensor, channels: int) -> None:
    """Raise InputError unless x is a float batch (B, channels, H, W) of images in [0, 1]: uint8
    images (0..255) would be encoded as if 255 times too bright, and (B, H, W, C) has the wrong layout."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"images must be floats in [0, 1], got {x.dtype} (uint8 images: x.float() / 255)")
    if x.dim() != 4 or x.shape[1] != channels:
        hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.dim() == 4 and x.shape[-1] == channels else ""
        raise InputError(f"images must have shape (B, {channels}, H, W), got {tuple(x.shape)}{hint}")


def warn_unless_unit_range(x: torch.Tensor) -> None:
    """Warn when images are clearly not in [0, 1] (0..255 floats, say): they would be encoded as
    if far too bright. A host sync, so only encode and reconstruct check, not the training forward."""
    if x.numel() and (float(x.amax()) > 1.5 or float(x.amin()) < -0.5):
        warnings.warn(f"images should be floats in [0, 1], these range from {float(x.amin()):.3g} to "
                      f"{float(x.amax()):.3g} (0..255 pixels? divide by 255)", stacklevel=3)


def check_codes(codes: torch.Tensor, num_codes: int, what: str = "codes") -> None:
    """Raise InputError unless `codes` are integers in [0, num_codes) (a host sync: decoding only)."""
    if not isinstance(codes, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor of code indices, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise InputError(f"{what} must be integer code indices, got {codes.dtype}")
    if codes.numel() and not bool(((codes >= 0) & (codes < num_codes)).all()):
        low, high = int(codes.min()), int(codes.max())
        raise InputError(f"{what} must be in [0, {num_codes}), got values from {low} to {high}")


def make_encoder(in_channels: int, channels: int, res_channels: int, num_res_blocks: int, levels: int,
                 code_dim: int, activation: str = "relu") -> nn.Sequential:
    """(B, in_channels, H, W) -> (B, code_dim, H / 2**levels, W / 2**levels)."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    width = in_channels
    for level in range(levels):
        out = channels // 2 ** (levels - 1 - level)  # widths grow to `channels` at the last level
        layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), act()]
        width = out
    layers.append(nn.Conv2d(width, channels, 3, padding=1))
    layers += [ResidualBlock(channels, res_channels, activation) for _ in range(num_res_blocks)]
    layers += [act(), nn.Conv2d(channels, code_dim, 1)]
    return nn.Sequential(*layers)


def make_decoder(out_channels: int, channels: int, res_channels: int, num_res_blocks: int, levels: int,
                 code_dim: int, activation: str = "relu") -> nn.Sequential:
    """(B, code_dim, h, w) -> (B, out_channels, h * 2**levels, w * 2**levels)."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Conv2d(code_dim, channels, 3, padding=1)]
    layers += [ResidualBlock(channels, res_channels, activation) for _ in range(num_res_blocks)]
    layers.append(act())
    width = channels
    for level in range(levels):
        last = level == levels - 1
        out = out_channels if last else channels // 2 ** (level + 1)
        layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
        if not last:
            layers.append(act())
        width = out
    return nn.Sequential(*layers)


class VQVAEOutput(NamedTuple):
    """What VQVAE.forward returns; all losses and statistics are 0-dim tensors (no host sync)."""

    reconstruction: torch.Tensor  # (B, C, H, W) in image scale ([0, 1] when perfect), not clamped
    indices: torch.Tensor  # (B, h, w) int64; (B, h, w, S) with S residual stages
    loss: torch.Tensor  # recon_loss + vq_loss: what training minimises
    recon_loss: torch.Tensor  # MSE in normalised space (pixel MSE / per-channel variance)
    vq_loss: torch.Tensor  # codebook + beta * commitment loss (summed over residual stages)
    mse: torch.Tensor  # pixel MSE of the clamped reconstruction, images in [0, 1]
    perplexity: torch.Tensor  # residual stages: their mean
    codes_used: torch.Tensor  # residual stages: their sum
    dead_codes: torch.Tensor  # residual stages: their sum


class VQVAE(nn.Module):
    """VQ-VAE for images in [0, 1].

    Args:
        num_codes, code_dim, beta: the codebook (K codes of size D) and commitment weight.
        channels, res_channels, num_res_blocks, levels: encoder/decoder sizes; `levels` stride-2
            stages, so codes form an (H / 2**levels, W / 2**levels) grid.
        ema_decay, kmeans_init, restart_dead, dead_threshold, usage_decay: codebook health, see
            VectorQuantizer. The defaults are the project's recipe; `VQVAE.plain()` the classic one.
        backend: the quantizer backend ("auto": C++ kernel on CPU, Triton on GPU).
        gradient: "ste" (straight through) or "rotation" (the rotation trick), see VectorQuantizer.
        stages: residual quantization with this many codebooks of num_codes each (1: one
            VectorQuantizer); quantizer_dropout: see ResidualVectorQuantizer.
        activation: "relu" (the paper's) or "silu", in the encoder and decoder.
        mean, std: per-channel normalisation applied inside the model.
    The constructor's arguments are kept in `self.config`, which checkpoints store.
    """

    def __init__(self, num_codes: int = 512, code_dim: int = 64, beta: float = 0.25, *, in_channels: int = 3,
                 channels: int = 160, res_channels: int = 128, num_res_blocks: int = 2, levels: int = 2,
                 ema_decay: float | None = 0.9, kmeans_init: bool = True, restart_dead: bool = True,
                 dead_threshold: float = 0.1, usage_decay: float = 0.9, backend: str = "auto",
                 gradient: str = "ste", activation: str = "relu",
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD,
                 stages: int = 1, quantizer_dropout: float = 0.0):
        super().__init__()
        self.config = dict(num_codes=num_codes, code_dim=code_dim, beta=beta, in_channels=in_channels,
                           channels=channels, res_channels=res_channels, num_res_blocks=num_res_blocks,
                           levels=levels, ema_decay=ema_decay, kmeans_init=kmeans_init, restart_dead=restart_dead,
                           dead_threshold=dead_threshold, usage_decay=usage_decay, backend=backend,
                           gradient=gradient, activation=activation, mean=tuple(mean), std=tuple(std),
                           stages=stages, quantizer_dropout=quantizer_dropout)
        if activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.encoder = make_encoder(in_channels, channels, res_channels, num_res_blocks, levels, code_dim, activation)
        health = dict(backend=backend, ema_decay=ema_decay, kmeans_init=kmeans_init, restart_dead=restart_dead,
                      dead_threshold=dead_threshold, usage_decay=usage_decay, gradient=gradient)
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise InputError(f"stages must be an int >= 1, got {stages!r}")
        if stages == 1:
            self.quantizer = VectorQuantizer(num_codes, code_dim, beta, **health)
        else:
            self.quantizer = ResidualVectorQuantizer(stages, num_codes, code_dim, beta,
                                                     quantizer_dropout=quantizer_dropout, **health)
        self.residual = stages > 1
        self.decoder = make_decoder(in_channels, channels, res_channels, num_res_blocks, levels, code_dim, activation)
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
        check_images(x, self.config["in_channels"])
        normalised = (x - self.mean) / self.std
        vq = self._quantize(self.encoder(normalised))
        decoded = self.decoder(vq.quantized)
        recon_loss = torch.mean((decoded.float() - normalised.float()) ** 2)
        reconstruction = decoded * self.std + self.mean
        with torch.no_grad():
            mse = torch.mean((reconstruction.float().clamp(0, 1) - x.float()) ** 2)
        perplexity, codes_used, dead_codes = vq.perplexity, vq.codes_used, vq.dead_codes
        if self.residual:  # per stage: their mean perplexity, the codes and dead codes of all stages
            perplexity, codes_used, dead_codes = perplexity.mean(), codes_used.sum(), dead_codes.sum()
        return VQVAEOutput(reconstruction, vq.indices, recon_loss + vq.loss, recon_loss, vq.loss, mse,
                           perplexity, codes_used, dead_codes)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) int64 ((B, h, w, S) with S stages) of images x (B, C, H, W) in [0, 1];
        never changes the model."""
        check_images(x, self.config["in_channels"])
        warn_unless_unit_range(x)
        return self._quantize(self.encoder((x - self.mean) / self.std), update=False).indices

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] from codes (B, h, w) int64 ((B, h, w, S') with stages,
        S' <= S: fewer stages decode a coarser image)."""
        # codebook[codes] is (B, h, w, D); as (B, D, h, w) it has the quantizer output's layout.
        if self.residual:  # residual_decode checks the codes (and takes -1 for a stage left out)
            quantized = self.quantizer.decode(codes).permute(0, 3, 1, 2)
        else:
            check_codes(codes, self.quantizer.num_codes)
            quantized = self.quantizer.codebook[codes].permute(0, 3, 1, 2)
        return self._decode_quantized(quantized).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions (B, C, H, W) in [0, 1] of images x in [0, 1]; equals decode(encode(x))."""
        check_images(x, self.config["in_channels"])
        warn_unless_unit_range(x)
        vq = self._quantize(self.encoder((x - self.mean) / self.std), update=False)
        return self._decode_quantized(vq.quantized).clamp(0, 1)

    # The level interface shared with VQVAE2 (one level here; with residual stages, one per stage).
    @property
    def quantizers(self) -> list[VectorQuantizer]:
        return list(self.quantizer.stages) if self.residual else [self.quantizer]

    def level_indices(self, out: VQVAEOutput) -> tuple[torch.Tensor, ...]:
        """The code grids of a forward's output, one per entry of `quantizers`."""
        return tuple(out.indices.unbind(-1)) if self.residual else (out.indices,)

    def encode_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes = self.encode(x)
        return tuple(codes.unbind(-1)) if self.residual else (codes,)

    def decode_levels(self, codes: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.decode(torch.stack(codes, dim=-1) if self.residual else codes[0])


class VQVAE2Output(NamedTuple):
    """What VQVAE2.forward returns: VQVAEOutput's fields (bottom level), then the top level's."""

    reconstruction: torch.Tensor
    indices: torch.Tensor  # (B, H/4, W/4) bottom codes
    loss: torch.Tensor
    recon_loss: torch.Tensor
    vq_loss: torch.Tensor  # both levels
    mse: torch.Tensor
    perplexity: torch.Tensor  # bottom level
    codes_used: torch.Tensor
    dead_codes: torch.Tensor
    top_indices: torch.Tensor  # (B, H/8, W/8) top codes
    top_perplexity: torch.Tensor
    top_codes_used: torch.Tensor


class VQVAE2(nn.Module):
    """Two-level VQ-VAE (Razavi et al., 2019) for images in [0, 1].

    The bottom encoder maps the image to features at 1/4 resolution; the top encoder maps those
    to 1/8 and quantizes them (top codes: global structure). The top codes are decoded back to
    1/4 resolution and, with the bottom features, quantized again (bottom codes: detail, given
    the top). The decoder sees both, the top codes upsampled. Both levels use the fused quantizer
    with the same codebook-health options as VQVAE; the arguments mean what they mean there
    (`top_codes`: the top codebook's size, default num_codes).
    """

    def __init__(self, num_codes: int = 512, code_dim: int = 64, beta: float = 0.25, *, top_codes: int | None = None,
                 in_channels: int = 3, channels: int = 160, res_channels: int = 128, num_res_blocks: int = 2,
                 ema_decay: float | None = 0.9, kmeans_init: bool = True, restart_dead: bool = True,
                 dead_threshold: float = 0.1, usage_decay: float = 0.9, backend: str = "auto",
                 gradient: str = "ste", activation: str = "relu",
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD):
        super().__init__()
        top_codes = top_codes or num_codes
        self.config = dict(num_codes=num_codes, code_dim=code_dim, beta=beta, top_codes=top_codes,
                           in_channels=in_channels, channels=channels, res_channels=res_channels,
                           num_res_blocks=num_res_blocks, ema_decay=ema_decay, kmeans_init=kmeans_init,
                           restart_dead=restart_dead, dead_threshold=dead_threshold, usage_decay=usage_decay,
                           backend=backend, gradient=gradient, activation=activation, mean=tuple(mean),
                           std=tuple(std))
        if activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        health = dict(backend=backend, ema_decay=ema_decay, kmeans_init=kmeans_init, restart_dead=restart_dead,
                      dead_threshold=dead_threshold, usage_decay=usage_decay, gradient=gradient)
        self.encoder = make_encoder(in_channels, channels, res_channels, num_res_blocks, 2, channels, activation)
        self.top_encoder = make_encoder(channels, channels, res_channels, num_res_blocks, 1, code_dim, activation)
        self.top_quantizer = VectorQuantizer(top_codes, code_dim, beta, **health)
        self.top_decoder = make_decoder(channels, channels, res_channels, num_res_blocks, 1, code_dim, activation)
        self.bottom_in = nn.Conv2d(2 * channels, code_dim, 1)
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta, **health)
        self.upsample_top = nn.ConvTranspose2d(code_dim, code_dim, 4, stride=2, padding=1)
        self.decoder = make_decoder(in_channels, channels, res_channels, num_res_blocks, 2, 2 * code_dim, activation)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def _quantize(quantizer: VectorQuantizer, z: torch.Tensor, update: bool | None = None):
        with torch.autocast(z.device.type, enabled=False):  # fp32 quantizer, as in VQVAE
            return quantizer(z, update=update)

    def _encode(self, x: torch.Tensor, update: bool | None = None):
        check_images(x, self.config["in_channels"])
        if update is False:  # encode_levels and reconstruct (inference): the range is worth a sync
            warn_unless_unit_range(x)
        features = self.encoder((x - self.mean) / self.std)
        top = self._quantize(self.top_quantizer, self.top_encoder(features), update)
        bottom_in = self.bottom_in(torch.cat([features, self.top_decoder(top.quantized).to(features.dtype)], 1))
        bottom = self._quantize(self.quantizer, bottom_in, update)
        return top, bottom

    def _decode_quantized(self, top_quantized: torch.Tensor, bottom_quantized: torch.Tensor) -> torch.Tensor:
        """Normalised-space output of the decoder."""
        return self.decoder(torch.cat([self.upsample_top(top_quantized), bottom_quantized], 1))

    def forward(self, x: torch.Tensor) -> VQVAE2Output:
        check_images(x, self.config["in_channels"])
        normalised = (x - self.mean) / self.std
        top, bottom = self._encode(x)
        decoded = self._decode_quantized(top.quantized, bottom.quantized)
        recon_loss = torch.mean((decoded.float() - normalised.float()) ** 2)
        reconstruction = decoded * self.std + self.mean
        with torch.no_grad():
            mse = torch.mean((reconstruction.float().clamp(0, 1) - x.float()) ** 2)
        return VQVAE2Output(reconstruction, bottom.indices, recon_loss + top.loss + bottom.loss, recon_loss,
                            top.loss + bottom.loss, mse, bottom.perplexity, bottom.codes_used, bottom.dead_codes,
                            top.indices, top.perplexity, top.codes_used)

    @property
    def quantizers(self) -> list[VectorQuantizer]:
        return [self.top_quantizer, self.quantizer]

    def level_indices(self, out: VQVAE2Output) -> tuple[torch.Tensor, torch.Tensor]:
        return out.top_indices, out.indices

    @torch.no_grad()
    def encode_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top codes (B, H/8, W/8), bottom codes (B, H/4, W/4)) int64; never changes the model."""
        top, bottom = self._encode(x, update=False)
        return top.indices, bottom.indices

    @torch.no_grad()
    def decode_levels(self, codes: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] from (top codes, bottom codes)."""
        top, bottom = codes
        check_codes(top, self.top_quantizer.num_codes, "top codes")
        check_codes(bottom, self.quantizer.num_codes, "bottom codes")
        top_quantized = self.top_quantizer.codebook[top].permute(0, 3, 1, 2)
        bottom_quantized = self.quantizer.codebook[bottom].permute(0, 3, 1, 2)
        return (self._decode_quantized(top_quantized, bottom_quantized) * self.std + self.mean).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions in [0, 1]; equals decode_levels(encode_levels(x))."""
        top, bottom = self._encode(x, update=False)
        return (self._decode_quantized(top.quantized, bottom.quantized) * self.std + self.mean).clamp(0, 1)


MODELS = {"vqvae": VQVAE, "vqvae2": VQVAE2}
KINDS = ("rqvae", "vqvae", "vqvae2")  # a VQVAE with residual stages is an "rqvae"


def model_kind(checkpoint: dict) -> str:
    """"vqvae", "vqvae2" or "rqvae" (a VQVAE with stages > 1) of a checkpoint's model."""
    kind = checkpoint.get("model_class", "vqvae")
    return "rqvae" if kind == "vqvae" and checkpoint.get("config", {}).get("stages", 1) > 1 else kind


def save_checkpoint(path, model: VQVAE | VQVAE2, **extra) -> None:
    """Write {"format", "model_class", "config", "model", **extra} to `path` atomically."""
    kind = next(name for name, cls in MODELS.items() if isinstance(model, cls))
    atomic_save({"format": "vqvae_fast/1", "model_class": kind, "config": model.config, "model": model.state_dict(),
                 **extra}, path)


def model_from_checkpoint(checkpoint: dict, source: str = "the checkpoint") -> VQVAE | VQVAE2:
    """The model a loaded checkpoint dict describes, with its weights, in eval mode."""
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        keys = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{source}: not a vqvae_fast model checkpoint (no 'config' and 'model'; found {keys})")
    kind = checkpoint.get("model_class", "vqvae")
    if kind not in MODELS:
        raise CheckpointError(f"{source}: unknown model class {kind!r}; this version knows {sorted(MODELS)}")
    config = checkpoint["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: its 'config' is a {type(config).__name__}, not a dict of {kind} settings")
    try:
        model = MODELS[kind](**config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:  # unknown settings, weights of other shapes or names
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{source}: its config and weights do not make a {kind} of this version "
                              f"({type(error).__name__}: {reason})") from None
    return model.eval()


def load_checkpoint(path, map_location: str | torch.device | None = "cpu") -> VQVAE | VQVAE2:
    """The VQVAE (or VQVAE2) stored in checkpoint `path`, with its weights, in eval mode; a
    missing, damaged or foreign file raises CheckpointError naming it."""
    model = model_from_checkpoint(read_checkpoint(path, map_location=map_location), str(path))
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model
