"""Token choice and confidence, per decoding profile (reference semantics), never committing the mask token.

All maths in fp32 (fp64 for the LLaDA Gumbel noise, as the reference). Per-row generators make
sampled outputs independent of batch composition.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..config import GenerationConfig


def _per_row_rand(shape: tuple, gens: Sequence[Optional[torch.Generator]], dtype, device) -> torch.Tensor:
    """Uniforms from each row's own generator; rows whose generator is None (inactive this step)
    draw nothing, so a row's random stream depends only on its own steps, not on its batch."""
    return torch.stack([torch.rand(shape[1:], generator=g, dtype=dtype, device=device) if g is not None
                        else torch.full(shape[1:], 0.5, dtype=dtype, device=device) for g in gens])


def top_p_top_k(logits: torch.Tensor, top_p: Optional[float], top_k: Optional[int]) -> torch.Tensor:
    """Dream's filters: nucleus keeps the first token past top_p; fill with finfo.min."""
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    if top_k is not None:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1:]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    return logits


def llada_choose(logits: torch.Tensor, *, temperature: float, remasking: str, mask_id: int,
                 eos_id: int, eot_id: Optional[int], logits_eos_inf: bool, confidence_eos_eot_inf: bool,
                 gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, confidence) for (B, n, V) logits, as LLaDA generate.py (softmax in fp32)."""
    logits = logits.float()
    if logits_eos_inf:
        logits[..., eos_id] = float("-inf")
    # exclude the mask token from the choice without copying the (B, n, V) logits
    saved = logits[..., mask_id].clone()
    logits[..., mask_id] = float("-inf")
    if temperature > 0:
        u = _per_row_rand(logits.shape, gens, torch.float64, logits.device)
        # argmax exp(l) / (-log u)^T == argmax l - T log(-log u): Gumbel-max, in float64
        x0 = torch.argmax(logits.double() - temperature * torch.log(-torch.log(u)), dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    logits[..., mask_id] = saved
    if confidence_eos_eot_inf:
        # The reference's chained assignment `noisy[..., EOS] = logits[..., EoT] = -inf` runs after x0
        # is chosen; at temperature 0 `noisy` IS `logits`, so the confidence loses both EOS and EoT.
        if eot_id is not None:
            logits[..., eot_id] = float("-inf")
        if temperature == 0:
            logits[..., eos_id] = float("-inf")
    if remasking == "low_confidence":
        # softmax(l)[x0] = exp(l[x0] - logsumexp(l)): one reduction instead of a (B, n, V) softmax
        conf = torch.exp(torch.gather(logits, -1, x0.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1))
    elif remasking == "random":
        conf = _per_row_rand(x0.shape, gens, torch.float32, x0.device)
    else:
        raise ValueError(f"remasking={remasking!r} is not allowed for LLaDA; allowed: low_confidence, random")
    return x0, conf


def dream_choose(logits: torch.Tensor, *, temperature: float, top_p: Optional[float], top_k: Optional[int],
                 alg: str, mask_id: int, gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, confidence) as Dream's sample_tokens: confidence by alg (maskgit_plus / origin: top-1 prob,
    topk_margin: top1 - top2, entropy: negative entropy)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logits = top_p_top_k(logits, top_p, top_k)  # Dream filters at any temperature: it changes confidences
    probs = F.softmax(logits, dim=-1)
    if temperature > 0:
        choice = probs.clone()
        choice[..., mask_id] = 0
        B, n, V = choice.shape
        flat = choice.view(B, n, V)
        x0 = torch.stack([torch.multinomial(flat[b], 1, generator=gens[b]).squeeze(-1) if gens[b] is not None
                          else flat[b].argmax(-1) for b in range(B)])
    else:
        choice = logits.clone()
        choice[..., mask_id] = float("-inf")
        x0 = torch.argmax(choice, dim=-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1)[0]
        conf = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    else:
        conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, conf


def topk_commit(score: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) bool: each row's k highest-score candidates (torch.topk per row, as the references)."""
    out = torch.zeros_like(candidates)
    k = min(int(k), score.shape[-1])
    if k <= 0:
        return out
    _, idx = torch.topk(score.masked_fill(~candidates, float("-inf")), k, dim=-1)
    out.scatter_(1, idx, True)
    return out & candidates


def threshold_commit(score: torch.Tensor, confidence: torch.Tensor, candidates: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """Fast-dLLM parallel decoding: every candidate with confidence >= threshold, plus the top one."""
    s = score.masked_fill(~candidates, float("-inf"))
    best = torch.zeros_like(candidates).scatter_(1, s.argmax(-1, keepdim=True), True)
    return candidates & ((confidence >= threshold) | best)


def sample_commit(score: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor, alg_temp: float,
                  gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Dream alg_temp > 0: k positions drawn without replacement from softmax(score / alg_temp)."""
    out = torch.zeros_like(candidates)
    for b in range(score.shape[0]):
        kb = min(int(k[b]), int(candidates[b].sum()))
        if kb <= 0 or gens[b] is None:
            continue
        p = F.softmax(score[b].masked_fill(~candidates[b], float("-inf")) / alg_temp, dim=-1)
        idx = torch.multinomial(p, kb, replacement=False, generator=gens[b])
        out[b, idx] = True
    return out & candidates


def llada_sampler(logits: torch.Tensor, gen: "GenerationConfig", *, remasking: str, mask_id: int, eos_id: int,
                  eot_id: Optional[int], gens: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    return llada_choose(logits, temperature=gen.temperature, remasking=remasking, mask_id=mask_id, eos_id=eos_id,
                        eot_id=eot_id, logits_eos_inf=gen.logits_eos_inf,
                        confidence_eos_eot_inf=gen.confidence_eos_eot_inf, gens=gens)


def dream_sampler(logits: torch.Tensor, gen: "GenerationConfig", *, remasking: str, mask_id: int, eos_id: int,
                  eot_id: Optional[int], gens: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    return dream_choose(logits, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, alg=remasking,
                        mask_id=mask_id, gens=gens)


Sampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]
SAMPLERS: dict[str, Sampler] = {"llada": llada_sampler, "dream": dream_sampler}
"""DecodingProfile.sampler -> (x0, confidence) for (B, n, V) logits, one signature for the loop."""
