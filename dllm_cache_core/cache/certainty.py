"""d2Cache's certainty density: where decoded tokens cluster. d2Cache selects by it and the decoding
loop's certainty-prior option scores by it, so it lives below both."""
from __future__ import annotations

import functools

import torch


def certainty_density(decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """d2Cache's certainty density of a (B, G) decoded indicator: Gaussian-weighted share of decoded
    neighbours, with the prompt side counted as decoded and the right side as decoded only when the
    last response token is, normalised by the full kernel sum (direct sum instead of the reference's FFT)."""
    B, G = decoded.shape
    ind = decoded.float()
    ext = torch.cat([torch.ones(B, G, device=decoded.device), ind, ind[:, -1:].expand(B, G)], dim=1)  # (B, 3G)
    return ext @ _density_weights(G, float(sigma), decoded.device)


@functools.lru_cache(maxsize=16)
def _density_weights(G: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(3G, G) Gaussian weights over the extended canvas, already divided by the kernel sum."""
    i = torch.arange(G, device=device).unsqueeze(1) + G
    j = torch.arange(3 * G, device=device).unsqueeze(0)
    w = torch.exp(-((i - j).float() ** 2) / (2 * sigma ** 2))  # (G, 3G)
    d = torch.arange(-3 * G, 3 * G, device=device).float()
    z = torch.exp(-(d ** 2) / (2 * sigma ** 2)).sum()
    return (w / z).t().contiguous()
