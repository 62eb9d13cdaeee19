"""One Triton kernel for d2Cache's rollout input: the head-mean of the scaled, masked softmax of q k^T,
(B, n, L) fp32, straight from half-precision q (B, n, H*D) and the K cache (B, L, G*D).

The generic path materialises the (B, H, n, L) fp32 scores (a bmm, then the softmax and the head
mean read them again): at batch 32 and L 512 that was 0.6 ms per layer on an H200. Here each program
owns BM queries of one row: pass 1 runs the online max / sum of every head over the keys (kept in
registers, one column per head), pass 2 recomputes each key tile's scores per head and accumulates
the normalised probabilities, so only q, K and the (B, n, L) result touch memory. The scores are
tensor-core products with fp32 accumulation, as the bmm's.

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
                    stride_ob, stride_on, scale, inv_h,
                    H: tl.constexpr, HP: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, HAS_MASK: tl.constexpr):
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        heads = tl.arange(0, HP)
        m_ok = offs_m < n
        q_ptr = Q + b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :]
        k_ptr = K + b * stride_kb + offs_d[None, :]
        mx_all = tl.zeros([BM, HP], dtype=tl.float32)
        sm_all = tl.zeros([BM, HP], dtype=tl.float32) + 1.0
        for h in range(H):
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
            col = heads[None, :] == h
            mx_all = tl.where(col, mx[:, None], mx_all)
            sm_all = tl.where(col, sm[:, None], sm_all)
        for start in range(0, L, BN):
            offs_n = start + tl.arange(0, BN)
            n_ok = offs_n < L
            ok = n_ok
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for h in range(H):
                q = tl.load(q_ptr + h * D, mask=m_ok[:, None], other=0.0)
                k = tl.load(k_ptr + offs_n[:, None] * stride_kl + (h // REP) * D, mask=n_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) / scale
                s = tl.where(ok[None, :], s, float("-inf"))
                col = heads[None, :] == h
                mx = tl.sum(tl.where(col, mx_all, 0.0), 1)
                sm = tl.sum(tl.where(col, sm_all, 0.0), 1)
                acc += tl.exp(s - mx[:, None]) / sm[:, None]
            tl.store(OUT + b * stride_ob + offs_m[:, None] * stride_on + offs_n[None, :], acc * inv_h,
                     mask=m_ok[:, None] & n_ok[None, :])


def available(q: torch.Tensor, head_dim: int) -> bool:
    return (triton is not None and not _broken and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def probs_mean(q: torch.Tensor, k: torch.Tensor, head_dim: int, mask: Optional[torch.Tensor],
               block_m: int = 16, block_n: int = 64) -> Optional[torch.Tensor]:
    """(B, n, L) fp32 head-mean probabilities, or None when the kernel failed (then never again)."""
    B, n, _ = q.shape
    L = k.shape[1]
    H = q.shape[2] // head_dim
    G = k.shape[2] // head_dim
    if q.stride(2) != 1 or k.stride(2) != 1:
        q, k = q.contiguous(), k.contiguous()
    out = torch.empty(B, n, L, dtype=torch.float32, device=q.device)
    m = mask.reshape(B, L) if mask is not None else None
    if m is not None:
        m = m.contiguous().view(torch.uint8)
    try:
        grid = (triton.cdiv(n, block_m), B)
        _probs_mean[grid](q, k, m if m is not None else out, out, n, L, q.stride(0), q.stride(1), k.stride(0),
                          k.stride(1), m.stride(0) if m is not None else 0, out.stride(0), out.stride(1),
                          math.sqrt(head_dim), 1.0 / H, H=H, HP=triton.next_power_of_2(H), REP=H // G, D=head_dim,
                          BM=block_m, BN=block_n, HAS_MASK=m is not None, num_warps=4)
    except Exception as e:  # noqa: BLE001
        if torch.cuda.is_current_stream_capturing():
            raise
        _broken.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"d2cache probability kernel failed, using the generic path: {_broken[0][:300]}",
                      RuntimeWarning, stacklevel=3)
        return None
    return out


def self_check(device="cuda") -> dict:
    """The kernel against the generic path on random inputs (MHA and GQA, a padding mask): max abs
    error and ms per call of each; for benchmark logs."""
    from .layers import attention_probs_mean

    out: dict = {"triton": triton is not None}
    if triton is None or not torch.cuda.is_available():
        return out
    import os
    import time
    g = torch.Generator(device=device).manual_seed(0)
    for B, n, H, G, L in ((32, 128, 32, 32, 512), (8, 96, 28, 4, 300)):
        D = 128
        q = torch.randn(B, n, H * D, device=device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, L, G * D, device=device, dtype=torch.bfloat16, generator=g)
        mask = (torch.arange(L, device=device) >= torch.arange(B, device=device).unsqueeze(1) * 3)[:, None, None, :]
        res, ms = {}, {}
        for flag in ("0", "1"):
            old = os.environ.get("DLLM_PROBS_KERNEL")
            os.environ["DLLM_PROBS_KERNEL"] = flag
            try:
                res[flag] = attention_probs_mean(q, k, D, mask)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    attention_probs_mean(q, k, D, mask)
                torch.cuda.synchronize()
                ms[flag] = (time.perf_counter() - t0) / 10 * 1e3
            finally:
                if old is None:
                    os.environ.pop("DLLM_PROBS_KERNEL")
                else:
                    os.environ["DLLM_PROBS_KERNEL"] = old
        out[f"B{B}_n{n}_H{H}_G{G}_L{L}"] = dict(max_abs_err=float((res["1"] - res["0"]).abs().max()),
                                                 ms_generic=round(ms["0"], 4), ms_kernel=round(ms["1"], 4))
    out["broken"] = _broken[:1]
    return out
