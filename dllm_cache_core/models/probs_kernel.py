"""One Triton kernel for d2Cache's rollout input: the head-mean of the scaled, masked softmax of q k^T,
(B, n, L) fp32, straight from half-precision q (B, n, H*D) and the K cache (B, L, G*D).

The generic path materialises the (B, H, n, L) fp32 scores (a bmm, then the softmax and the head
mean read them again): at batch 32, n 128, L 512 that was 0.61 ms per layer on an H200; this kernel
0.28 ms (max abs difference 7e-9). Each program owns BM queries of one row and a group of heads:
pass 1 runs the online max / sum of each head over the keys (kept in registers, one column per
head), pass 2 recomputes each key tile's scores per head and accumulates the normalised
probabilities; each head group writes its own partial plane, summed after (deterministic). The
scores are tensor-core products with fp32 accumulation, as the bmm's.

CUDA only; `available()` is False without Triton or for shapes it does not cover (head_dim not a
power of two), and the caller falls back to the generic path.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

try:  # pragma: no cover - GPU images only
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None

_broken: list[str] = []


if triton is not None:  # pragma: no cover - GPU images only
    @triton.jit
    def _probs_mean(Q, K, MASK, OUT, n, L, stride_qb, stride_qn, stride_kb, stride_kl, stride_mb,
                    stride_ob, stride_og, stride_on, scale, inv_h,
                    HPG: tl.constexpr, HPGP: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, HAS_MASK: tl.constexpr):
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        hg = tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        heads = tl.arange(0, HPGP)
        m_ok = offs_m < n
        q_ptr = Q + b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :]
        k_ptr = K + b * stride_kb + offs_d[None, :]
        mx_all = tl.zeros([BM, HPGP], dtype=tl.float32)
        sm_all = tl.zeros([BM, HPGP], dtype=tl.float32) + 1.0
        for hh in range(HPG):
            h = hg * HPG + hh
            q = tl.load(q_ptr + h * D, mask=m_ok[:, None], other=0.0)
            mx = tl.zeros([BM], dtype=tl.float32) - 1e30
            sm = tl.zeros([BM], dtype=tl.float32)
            for start in range(0, L, BN):
                offs_n = start + tl.arange(0, BN)
                ok = offs_n < L
                k = tl.load(k_ptr + offs_n[:, None] * stride_kl + (h // REP) * D, mask=ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) / scale
                if HAS_MASK:
                    ok = ok & (tl.load(MASK + b * stride_mb + offs_n, mask=ok, other=0) != 0)
                s = tl.where(ok[None, :], s, float("-inf"))
                new = tl.maximum(mx, tl.max(s, 1))
                sm = sm * tl.exp(mx - new) + tl.sum(tl.exp(s - new[:, None]), 1)
                mx = new
            col = heads[None, :] == hh
            mx_all = tl.where(col, mx[:, None], mx_all)
            sm_all = tl.where(col, sm[:, None], sm_all)
        for start in range(0, L, BN):
            offs_n = start + tl.arange(0, BN)
            n_ok = offs_n < L
            ok = n_ok
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for hh in range(HPG):
                h = hg * HPG + hh
                q = tl.load(q_ptr + h * D, mask=m_ok[:, None], other=0.0)
                k = tl.load(k_ptr + offs_n[:, None] * stride_kl + (h // REP) * D, mask=n_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) / scale
                s = tl.where(ok[None, :], s, float("-inf"))
                col = heads[None, :] == hh
                mx = tl.sum(tl.where(col, mx_all, 0.0), 1)
                sm = tl.sum(tl.where(col, sm_all, 0.0), 1)
                acc += tl.exp(s - mx[:, None]) / sm[:, None]
            tl.store(OUT + b * stride_ob + hg * stride_og + offs_m[:, None] * stride_on + offs_n[None, :],
                     acc * inv_h, mask=m_ok[:, None] & n_ok[None, :])


def available(q: torch.Tensor, head_dim: int) -> bool:
    return (triton is not None and not _broken and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def probs_mean(q: torch.Tensor, k: torch.Tensor, head_dim: int, mask: Optional[torch.Tensor],
               block_m: int = 64, block_n: int = 64, heads_per_program: int = 4,
               num_warps: int = 8) -> Optional[torch.Tensor]:
    """(B, n, L) fp32 head-mean probabilities, or None when the kernel failed (then never again).
    Programs: (query block of block_m, row, group of heads_per_program heads); each group's partial
    mean goes to its own plane and the planes are summed after (deterministic, no atomics)."""
    B, n, _ = q.shape
    L = k.shape[1]
    H = q.shape[2] // head_dim
    G = k.shape[2] // head_dim
    hpg = max(d for d in range(1, heads_per_program + 1) if H % d == 0)
    if q.stride(2) != 1 or k.stride(2) != 1:
        q, k = q.contiguous(), k.contiguous()
    part = torch.empty(B, H // hpg, n, L, dtype=torch.float32, device=q.device)
    m = mask.reshape(B, L) if mask is not None else None
    if m is not None:
        m = m.contiguous().view(torch.uint8)
    try:
        grid = (triton.cdiv(n, block_m), B, H // hpg)
        _probs_mean[grid](q, k, m if m is not None else part, part, n, L, q.stride(0), q.stride(1), k.stride(0),
                          k.stride(1), m.stride(0) if m is not None else 0, part.stride(0), part.stride(1),
                          part.stride(2), math.sqrt(head_dim), 1.0 / H, HPG=hpg, HPGP=triton.next_power_of_2(hpg),
                          REP=H // G, D=head_dim, BM=block_m, BN=block_n, HAS_MASK=m is not None,
                          num_warps=num_warps)
    except Exception as e:  # noqa: BLE001
        if torch.cuda.is_current_stream_capturing():
            raise
        _broken.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"d2cache probability kernel failed, using the generic path: {_broken[0][:300]}",
                      RuntimeWarning, stacklevel=3)
        return None
    return part.sum(1) if part.shape[1] > 1 else part[:, 0]

