"""The LLaDA SFT objective (masked diffusion), as in the LLaDA paper's SFT recipe.

Per sample t ~ U(eps, 1]; each response token is masked with probability t; cross-entropy on the
masked positions, weighted 1/t (the ELBO weight), normalised by the number of response tokens; the
prompt is never masked. The response includes the end-of-turn token and the EOS padding up to the
canvas, so the model learns where to stop and to fill the rest with EOS, which is what lets the
decoder cut at the first stop token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import DiffusionLM


def sample_t(batch: int, eps: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Stratified draws of U(eps, 1]: each sample's t is still uniform, the batch covers [eps, 1] evenly
    (lower variance of the loss than independent draws)."""
    u = (torch.rand(1, generator=gen, device=device) + torch.arange(batch, device=device) / batch) % 1.0
    return eps + (1 - eps) * (1 - u)


def diffusion_loss(model: DiffusionLM, batch: dict, mask_id: int, eps: float,
                   gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) for one batch from `data.collate` (tensors already on the model's device).
    Metrics stay on the device (no host sync per step)."""
    ids, pos, key_mask, clean = batch["ids"], batch["positions"], batch["key_mask"], batch["clean"]
    P = int(batch["prompt_len"])
    B, L = ids.shape
    G = L - P
    dev = ids.device
    t = sample_t(B, eps, gen, dev)
    eligible = torch.arange(G, device=dev).unsqueeze(0) >= clean.unsqueeze(1)  # (B, G)
    masked = (torch.rand(B, G, generator=gen, device=dev) < t.unsqueeze(1)) & eligible
    x = ids.clone()
    x[:, P:] = torch.where(masked, torch.full_like(x[:, P:], mask_id), ids[:, P:])
    attn = key_mask[:, None, None, :] if batch.get("padded", True) else None
    out_index = torch.arange(P, L, device=dev).expand(B, G)
    logits = model(x, positions=pos, attn_mask=attn, out_index=out_index)  # (B, G, V)
    ce = F.cross_entropy(logits.float().reshape(B * G, -1), ids[:, P:].reshape(-1), reduction="none").view(B, G)
    denom = eligible.sum().clamp(min=1)
    w = float(batch.get("answer_weight", 1.0))
    answer = (torch.arange(G, device=dev).unsqueeze(0) < batch["answer_len"].unsqueeze(1)
              if "answer_len" in batch else None)
    if w != 1.0 and answer is not None:  # answer tokens weighted w, EOS padding 1 (data.DataConfig.answer_weight)
        loss = (ce * masked * (1.0 + (w - 1.0) * answer) / t.unsqueeze(1)).sum() / denom
    else:
        loss = (ce * masked / t.unsqueeze(1)).sum() / denom
    with torch.no_grad():
        n_masked = masked.sum().clamp(min=1)
        hit = (logits.argmax(-1) == ids[:, P:]) & masked
        acc = hit.sum() / n_masked
        metrics = {"ce_masked": (ce * masked).sum() / n_masked, "acc_masked": acc}
        if answer is not None:  # accuracy on masked answer tokens only (the EOS padding is easy)
            metrics["acc_answer"] = (hit & answer).sum() / (masked & answer).sum().clamp(min=1)
    return loss, metrics
