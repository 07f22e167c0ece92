"""Plain-PyTorch versions of the ops: the ground truth every test trusts.

Slow and memory-hungry on purpose (they form the N x K distance matrix, in chunks),
but simple enough to be obviously right.
"""
from __future__ import annotations

import torch

# Rows per chunk of the N x K float64 distance matrix: bounds the reference's memory.
_CHUNK_ELEMENTS = 1 << 24


def exact_sq_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """float64 squared distances (N, K) between rows of z (N, D) and codebook (K, D).

    Summed from the differences (no ||z||^2 - 2 z.e + ||e||^2 expansion), so a large
    shared offset cannot cancel and identical codes get identical distances.
    """
    z64, e64 = z.detach().double(), codebook.detach().double()
    return torch.cdist(z64, e64, compute_mode="donot_use_mm_for_euclid_dist").square()


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (N,) int64 of the nearest code, computed in float64; ties to the lowest index.

    A code with a NaN/Inf entry is never chosen unless every code has one; a row of z with
    a NaN/Inf entry still gets an index in [0, K).
    """
    rows = max(1, _CHUNK_ELEMENTS // max(1, codebook.shape[0]))
    bad_codes = ~torch.isfinite(codebook).all(1)

    def distances(chunk, codes):
        d = exact_sq_distances(chunk, codes)
        return torch.where(torch.isnan(d) | bad_codes, torch.inf, d)  # torch.argmin would pick a NaN

    def argmin(chunk):
        d = distances(chunk, codebook)
        beyond = (d == torch.inf).all(1, keepdim=True)
        if bool(beyond.any()):  # float64 distances beyond its range compare at 2^-600 (exact: a power of two)
            d = torch.where(beyond, distances(chunk.double() * 2.0 ** -600, codebook.double() * 2.0 ** -600), d)
        tiny = d.min(1, keepdim=True).values < 2.0 ** -900  # may have lost bits to underflow: compare at 2^600
        if bool(tiny.any()):
            d = torch.where(tiny, distances(chunk.double() * 2.0 ** 600, codebook.double() * 2.0 ** 600), d)
        return d.argmin(1)

    out = [argmin(chunk) for chunk in z.split(rows)]
    if not out:
        return torch.empty(0, dtype=torch.long, device=z.device)
    return torch.cat(out)


class _StraightThrough(torch.autograd.Function):
    """Forward: the chosen codes, bit for bit. Backward: the gradient goes to z unchanged."""

    @staticmethod
    def forward(ctx, z, chosen):
        return chosen.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# The rotation trick's guards: the straight-through gradient where the rescale ||e|| / ||z||
# leaves [1e-6, 1e6] (z or the code near the origin), and the reflection I - 2 u u^T (w = 0)
# where z points almost exactly away from its code (||u + q|| <= 1e-6).
ROTATION_MAX_SCALE = 1e6
ROTATION_MIN_SUM = 1e-6


def rotation_gradient(grad: torch.Tensor, z: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The rotation trick's gradient to z (Fifty et al., 2024), in float64, rows independent.

    The output is treated as lam * R z with lam = ||e|| / ||z|| and R the rotation that takes
    u = z / ||z|| to q = e / ||e|| in their plane, R = I - 2 w w^T + 2 q u^T with
    w = (u + q) / ||u + q||, both held constant, so the gradient is
    lam * R^T g = lam * (g - 2 w (w . g) + 2 u (q . g)).
    """
    g, z64, e64 = grad.double(), z.detach().double(), chosen.detach().double()
    # Each row pair scaled by a power of two, its largest finite entry to [0.5, 1) (exact): the
    # norms of float64 rows underflow below ~1e-162 and overflow beyond ~1e154.
    both = torch.cat([z64, e64], 1).abs()
    peak = torch.where(torch.isfinite(both), both, 0.0).amax(1, keepdim=True)
    exponent = -torch.frexp(peak).exponent.clamp(-1000, 1000)  # 2^1074 would overflow
    z64, e64 = torch.ldexp(z64, exponent), torch.ldexp(e64, exponent)
    nz, ne = z64.norm(dim=1, keepdim=True), e64.norm(dim=1, keepdim=True)
    regular = (nz * ROTATION_MAX_SCALE >= ne) & (ne * ROTATION_MAX_SCALE >= nz) & (nz > 0)
    nz_safe, ne_safe = torch.where(regular, nz, 1.0), torch.where(regular, ne, 1.0)
    u, q = z64 / nz_safe, e64 / ne_safe
    s = u + q
    ns = s.norm(dim=1, keepdim=True)
    w = torch.where(ns > ROTATION_MIN_SUM, s / torch.where(ns > 0, ns, 1.0), 0.0)
    rotated = (ne_safe / nz_safe) * (g - 2 * w * (w * g).sum(1, keepdim=True) + 2 * u * (q * g).sum(1, keepdim=True))
    return torch.where(regular, rotated, g).to(grad.dtype)


class _Rotation(torch.autograd.Function):
    """Forward: the chosen codes, bit for bit. Backward: the rotation trick's gradient to z."""

    @staticmethod
    def forward(ctx, z, chosen):
        ctx.save_for_backward(z, chosen)
        return chosen.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        z, chosen = ctx.saved_tensors
        return rotation_gradient(grad, z, chosen), None


GRADIENTS = ("ste", "rotation")


def quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, gradient: str = "ste"):
    """Quantization with the VQ-VAE codebook and commitment losses.

    Returns (quantized, indices, loss) where quantized == codebook[indices] in the forward
    pass and passes its gradient to z unchanged ("ste") or rotated and rescaled
    ("rotation", see rotation_gradient), and
    loss = mean((codebook[indices] - sg[z])**2) + beta * mean((z - sg[codebook[indices]])**2).
    """
    indices = nearest_code(z, codebook)
    chosen = codebook[indices]
    # Both terms in float64, rounded once: squares of fp32 values beyond ~1e19 or below ~1e-19
    # (and of 16-bit values) would overflow or underflow in their own dtype.
    z64, chosen64 = z.double(), chosen.double()
    codebook_loss = torch.mean((chosen64 - z64.detach()) ** 2)
    commitment_loss = torch.mean((z64 - chosen64.detach()) ** 2)
    loss = (codebook_loss + beta * commitment_loss).to(z.dtype)
    quantized = (_Rotation if gradient == "rotation" else _StraightThrough).apply(z, chosen)
    return quantized, indices, loss
