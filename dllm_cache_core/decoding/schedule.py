"""How many masked tokens each step commits: LLaDA's linear schedule and Dream's timestep schedule."""
from __future__ import annotations

import functools

import torch


def llada_transfer_counts(n_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masks in the block -> (B, steps): base = n // steps, the remainder on the EARLIEST steps."""
    base = (n_mask // steps).unsqueeze(1)
    rem = (n_mask % steps).unsqueeze(1)
    idx = torch.arange(steps, device=n_mask.device).unsqueeze(0)
    return (base + (idx < rem).long()).long()


def dream_timesteps(steps: int, eps: float, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_transfer_count(n_mask: torch.Tensor, i: int, steps: int, timesteps: torch.Tensor) -> torch.Tensor:
    """int(n * (1 - s/t)) in float32 as diffusion_generate computes it (per row, not the batch mean:
    a row's schedule must not depend on its batch); the last step commits everything left."""
    if i >= steps - 1:
        return n_mask.long()
    t, s = timesteps[i], timesteps[i + 1]
    return (n_mask.to(torch.float32) * (1 - s / t)).long()


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
