"""Image tensors as the models and the training code exchange them: uint8 pixels <-> floats in [0, 1]."""
from __future__ import annotations

import torch


def to_images(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1], channels_last (the fast conv layout)."""
    return batch_uint8.float().div_(255).contiguous(memory_format=torch.channels_last)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8, rounded as torchvision's save_image rounds them."""
    return images.float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
