"""Building blocks shared by LLaDA and Dream, and the small per-layer API that cache policies use.

A layer is split into the pieces a cache policy may want to run separately:
``attn_in`` (norm) -> ``qkv`` -> RoPE (model level) -> ``attend`` -> ``attn_proj`` (+ residual) -> ``ffn`` (+ residual).
(The names avoid the checkpoints' own submodule names: LLaDA's attn_norm/attn_out, Dream's mlp.)
Shapes: B batch, n query positions, L key positions, H query heads, G kv heads, D head dim.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from . import probs_kernel
from .fused import fused


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then multiply by the weight (both references do this order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin in fp32 for absolute positions (B, n) -> (B, n, 1, D), NeoX (rotate-half) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
    return emb.cos(), emb.sin()


@fused
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, fp32: bool) -> torch.Tensor:
    """Rotate (B, n, heads*D). LLaDA rotates in fp32; Dream casts cos/sin to x's dtype first."""
    B, n, _ = x.shape
    xh = x.view(B, n, -1, head_dim)
    if fp32:
        xf = xh.float()
        out = (xf * cos + rotate_half(xf) * sin).to(x.dtype)
    else:
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        out = xh * c + rotate_half(xh) * s
    return out.reshape(B, n, -1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional SDPA of queries (B, n, H*D) over keys/values (B, L, G*D); mask (B, 1, 1|n, L) bool."""
    B, n, _ = q.shape
    L = k.shape[1]
    qh = q.view(B, n, -1, head_dim).transpose(1, 2)
    kh = k.view(B, L, -1, head_dim).transpose(1, 2)
    vh = v.view(B, L, -1, head_dim).transpose(1, 2)
    gqa = qh.shape[1] != kh.shape[1]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=False, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(B, n, -1)


def attention_probs_mean(q: torch.Tensor, k: torch.Tensor, head_dim: int,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """Head-mean attention probabilities (B, n, L) for a few queries, in fp32 (d2Cache's rollout input).

    Half-precision inputs on a GPU: the scores come from one tensor-core bmm with fp32 output (the
    products of bf16/fp16 values are exact in fp32, as after an upcast; only the summation order
    differs) and GQA groups share their keys without repeating them; the scale, mask, softmax and
    head mean are one compiled chain; with Triton one kernel does it all (models/probs_kernel.py;
    DLLM_PROBS_KERNEL=0 turns it off). Elsewhere the plain fp32 path."""
    B, n, _ = q.shape
    L = k.shape[1]
    if (mask is None or mask.shape[-2] == 1) and probs_kernel.available(q, head_dim) \
            and os.environ.get("DLLM_PROBS_KERNEL", "1") != "0":
        out = probs_kernel.probs_mean(q, k, head_dim, mask)
        if out is not None:
            return out
    scores = _scores_half(q, k, head_dim) if (q.is_cuda and q.dtype in _HALF and not _half_broken) else None
    if scores is None:
        qh = q.view(B, n, -1, head_dim).transpose(1, 2).float()
        kh = k.view(B, L, -1, head_dim).transpose(1, 2).float()
        rep = qh.shape[1] // kh.shape[1]
        if rep > 1:
            kh = kh.repeat_interleave(rep, dim=1)
        scores = qh @ kh.transpose(-1, -2)
    return softmax_head_mean(scores, mask, head_dim)


_HALF = (torch.bfloat16, torch.float16)
_half_broken: list[str] = []


def _scores_half(q: torch.Tensor, k: torch.Tensor, head_dim: int) -> torch.Tensor | None:
    """(B, H, n, L) fp32 raw scores q k^T from half-precision q, k (bmm with out_dtype); None when this
    torch has no such bmm (then the fp32 path runs from then on)."""
    B, n, _ = q.shape
    L = k.shape[1]
    G = k.shape[2] // head_dim
    rep = q.shape[2] // head_dim // G
    # (B, G, rep * n, D) queries against (B, G, L, D) keys: one batch entry per (row, KV head)
    qg = q.view(B, n, G, rep, head_dim).permute(0, 2, 3, 1, 4).reshape(B * G, rep * n, head_dim)
    kg = k.view(B, L, G, head_dim).transpose(1, 2).reshape(B * G, L, head_dim)
    try:
        s = torch.bmm(qg, kg.transpose(1, 2), out_dtype=torch.float32)
    except (TypeError, RuntimeError) as e:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        _half_broken.append(f"{type(e).__name__}: {e}")
        return None
    return s.view(B, G * rep, n, L)


@fused
def softmax_head_mean(scores: torch.Tensor, mask: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """(B, H, n, L) raw scores -> head-mean of the scaled, masked softmax: (B, n, L) fp32."""
    scores = scores / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).mean(1)


class DecoderLayer(nn.Module):
    """The per-layer API; subclasses only bind the checkpoint's module names."""

    head_dim: int

    def attn_in(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, hn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def v_only(self, hn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attn_proj(self, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """Normed MLP sublayer output (the residual is added by the caller)."""
        raise NotImplementedError


def linear(i: int, o: int, bias: bool) -> nn.Linear:
    return nn.Linear(i, o, bias=bias)


@fused
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def gated_mlp(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    return down(silu_mul(gate(x), up(x)))


def check_config(cfg: ModelConfig) -> None:
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"config: n_heads={cfg.n_heads} not a multiple of n_kv_heads={cfg.n_kv_heads}")
