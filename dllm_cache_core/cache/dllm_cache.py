"""`dllm_cache` (dLLM-Cache, arXiv 2506.06295): per layer, prompt and response features are cached
separately and refreshed on their own intervals; between refreshes the response tokens whose fresh V
moved most are recomputed.

Per layer the policy stores K, V (post-RoPE; bit-identical to the reference's pre-RoPE cache since the
rotation is per position), the attention sublayer output (after the output projection) and the MLP
sublayer output. The residual stream itself is never cached: each layer's output is
``x + attn + mlp`` with fresh x and cached-or-fresh sublayer outputs.

Schedule (forward counter c since the start of generation, 1-based, not reset per block):
refresh prompt when (c - 1) % kp == 0, response when (c - 1) % kr == 0; layer 0 always in full.
Between response refreshes, when 0 < rou <= 1: V of every response token is recomputed, the
n = floor(rou * G) tokens whose new V is least cosine-similar to the cached V (per row) get their
K, attention rows and MLP rows recomputed, and V is replaced for all response tokens.

Differences from the reference hooks: the padding mask and per-row positions are honoured (the hooks
attend to left padding), so a row's result does not depend on its batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import CachePolicy, StepInfo, copy_rows_, device_tensor
from .params import Param, PolicyDecl

POLICY = PolicyDecl(
    name="dllm_cache",
    params=(
        Param("kp", int, 50, "prompt features refreshed every kp forwards", ge=1),
        Param("kr", int, 2, "response features refreshed every kr forwards", ge=1),
        Param("rou", float, 0.25, "share of response tokens recomputed between refreshes (0 = none)", ge=0, le=1),
    ),
    reuses="per-layer K/V, attention and MLP outputs, prompt and response refreshed separately, "
           "V-similarity adaptive updates",
    exact_when="kp=kr=1, or kp=1 and rou=1",
    exact=({"kp": 1, "kr": 1}, {"kp": 1, "rou": 1.0}),
    order=3,
    calibration=({"kr": 1},),
)


def _flat(B: int, L: int, idx: torch.Tensor) -> torch.Tensor:
    """(B * n,) row indices into a (B * L, ...) view for positions idx (B, n)."""
    return (idx + torch.arange(B, device=idx.device).unsqueeze(1) * L).reshape(-1)


def _rows(t: torch.Tensor, flat: torch.Tensor, n: int) -> torch.Tensor:
    """t (B, L, ...) at the positions of `flat` (see _flat): (B, n, ...). One index_select of whole
    feature rows (a gather with an index per element moved 5x the bytes)."""
    B, L = t.shape[:2]
    return t.reshape(B * L, *t.shape[2:]).index_select(0, flat).view(B, n, *t.shape[2:])


def _put(t: torch.Tensor, flat: torch.Tensor, src: torch.Tensor) -> None:
    B, L = t.shape[:2]
    copy_rows_(t.view(B * L, *t.shape[2:]), flat, src.reshape(-1, *t.shape[2:]))


class DLLMCache(CachePolicy):
    decl = POLICY
    computes_idle_rows = False  # a forward advances the row's refresh schedule and rewrites its features

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        cfg = self.model.config
        B, L = ctx.batch, ctx.seq_len
        dev, dt = ctx.positions.device, self.model.dtype
        self.kv = self.kv_buffers()
        self.attn = [torch.empty(B, L, cfg.d_model, dtype=dt, device=dev) for _ in range(cfg.n_layers)]
        self.mlp = [torch.empty(B, L, cfg.d_model, dtype=dt, device=dev) for _ in range(cfg.n_layers)]
        self.P, self.G = ctx.prompt_len, ctx.gen_length
        self.n_sel = int(self.G * float(params["rou"]))
        self.calls = [0] * B  # forwards each row took part in: a row's schedule is its own
        d, kvd = cfg.d_model, cfg.kv_dim
        # V projection of every response token, plus the cosine similarity
        self.select_overhead = 2.0 * d * kvd * self.G + 6.0 * kvd * self.G

    def _layer(self, st: "_State", i, layer, h, cos, sin, q_idx: Optional[torch.Tensor],
               v_gen: Optional[torch.Tensor], flat: Optional[torch.Tensor] = None,
               gen_flat: Optional[torch.Tensor] = None):
        """Recompute attention + MLP rows at q_idx (B, n) (None = every position) against the stored
        K/V; every other row's sublayer outputs come from the cache. v_gen replaces the response V
        (rows gen_flat) first. Rows move by index_select / copy_rows_ on flat (B * L) views (`flat`:
        q_idx's, when precomputed) and the residual adds run over the whole contiguous stream, in
        place: strided slices took the slow non-vectorised elementwise path on GPUs."""
        m = self.model
        K, V, A, M = st.kv[i][0], st.kv[i][1], st.attn[i], st.mlp[i]
        if v_gen is not None:
            _put(V, gen_flat, v_gen)
        if q_idx is None:
            def kv(k, v):
                K.copy_(k)
                V.copy_(v)
                return K, V

            out = m.layer(layer, h, cos, sin, st.mask, kv)
            A.copy_(out.attn)
            M.copy_(out.mlp)
            return out.h
        B, L = h.shape[:2]
        n = q_idx.shape[1]
        if n == 0:
            return h.add_(A).add_(M)
        if flat is None:
            flat = _flat(B, L, q_idx)
        cq, sq = _rows(cos, flat, n), _rows(sin, flat, n)
        q, k, v = layer.qkv(layer.attn_in(_rows(h, flat, n)))
        _put(K, flat, m.apply_rope(k, cq, sq))
        _put(V, flat, v)
        _put(A, flat, layer.attn_proj(m.attend(m.apply_rope(q, cq, sq), K, V, st.mask)))
        h.add_(A)
        _put(M, flat, layer.ffn(_rows(h, flat, n)))
        return h.add_(M)

    def _select(self, st: "_State", i, layer, h, gen_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(new response V, absolute indices of the n least-similar response tokens per row)."""
        v_new = layer.v_only(layer.attn_in(_rows(h, gen_flat, self.G)))
        sim = F.cosine_similarity(v_new, st.kv[i][1][:, self.P:], dim=-1)
        idx = torch.topk(sim, self.n_sel, dim=-1, largest=False).indices + self.P
        return v_new, idx

    def admit(self, rows: list[int]) -> None:
        for r in rows:
            self.calls[r] = 0

    def forward(self, x, step: StepInfo):
        """Rows are grouped by where they are in their own refresh schedule; a row not in the step
        (its block already done, or its slot empty) is left untouched, so its state is what it would
        be alone."""
        kp, kr = int(self.params["kp"]), int(self.params["kr"])
        groups: dict[tuple[bool, bool], list[int]] = {}
        for j, r in enumerate(step.row_list):
            c = self.calls[r]
            self.calls[r] += 1
            groups.setdefault((c % kp == 0, c % kr == 0), []).append(j)
        if len(groups) == 1 and step.full:
            return self._run(x, step, next(iter(groups)))
        V = self.model.config.vocab_size
        out = torch.zeros(step.n, step.block_length, V, dtype=self.model.dtype, device=x.device)
        for flags, js in groups.items():
            keep = [False] * step.n
            for j in js:
                keep[j] = True
            out[device_tensor(js, torch.long, x.device)] = self._run(x, step.subset(keep), flags)
        return out

    def _run(self, x, step: StepInfo, flags: tuple[bool, bool]):
        """One forward of the step's rows (which share refresh flags). The whole batch's forward is a
        static step per flags (a CUDA graph on GPUs: the selection is topk on the device, the shapes
        depend only on the flags); a part of the batch runs on gathered copies of its rows' state."""
        self._account(step, flags)
        out_index = step.out_index(self.ctx.shift)
        if step.full:
            body = lambda ids, rows, oidx: self._forward(_State.of(self, None), ids, oidx, flags)  # noqa: E731
            return self.canvas_step(("dllm", flags), step.n, True, body)(x, step.rows, out_index)
        st = _State.of(self, step.rows)
        logits = self._forward(st, x.index_select(0, step.rows), out_index, flags)
        st.write_back(self, step.rows)
        return logits

    def _account(self, step: StepInfo, flags: tuple[bool, bool]) -> None:
        """Which case each layer takes is known on the host, so the FLOPs are accounted once per
        forward (every recomputed query attends to all real keys)."""
        ctx = self.ctx
        prompt_all, gen_all = flags
        adaptive = 0 < self.n_sel
        n_layers = self.model.config.n_layers
        full = n_layers if (prompt_all and gen_all) else 1
        gen_only = 0 if (prompt_all and gen_all) else (n_layers - 1 if gen_all else 0)
        partial = n_layers - full - gen_only
        real = ctx.real_len.index_select(0, step.rows).double()
        q_partial = (real - self.G if prompt_all else 0.0) + \
            (self.n_sel if adaptive else 0)
        q_total = full * real + gen_only * self.G + partial * q_partial
        extra = partial * self.select_overhead if adaptive else 0.0
        ctx.counters.forward(step.rows, step.charge, q_total, real, head_rows=step.block_length, layers=1,
                             extra=extra)

    def _forward(self, st: "_State", ids: torch.Tensor, out_index: torch.Tensor, flags: tuple[bool, bool]):
        prompt_all, gen_all = flags
        adaptive = 0 < self.n_sel
        B, L = ids.shape
        prompt_idx = torch.arange(self.P, device=ids.device).expand(B, -1)
        gen_idx = torch.arange(self.P, L, device=ids.device).expand(B, -1)
        gen_flat = _flat(B, L, gen_idx)

        def layer_fn(i, layer, h, cos, sin):
            rp, rg = prompt_all or i == 0, gen_all or i == 0
            if rp and rg:
                return self._layer(st, i, layer, h, cos, sin, None, None)
            if rg:  # response refreshed, prompt from cache
                return self._layer(st, i, layer, h, cos, sin, gen_idx, None, gen_flat)
            v_gen, sel = self._select(st, i, layer, h, gen_flat) if adaptive else (None, None)
            parts = ([prompt_idx] if rp else []) + ([sel] if adaptive else [])
            q_idx = torch.cat(parts, 1) if parts else prompt_idx[:, :0]
            return self._layer(st, i, layer, h, cos, sin, q_idx, v_gen, gen_flat=gen_flat)

        return self.model(ids, st.positions, st.mask, layer_fn=layer_fn, out_index=out_index)


class _State:
    """The per-layer buffers (and mask/positions) of a subset of rows: views for the whole batch,
    gathered copies for a subset (written back after the forward)."""

    def __init__(self, kv, attn, mlp, positions, mask):
        self.kv, self.attn, self.mlp, self.positions, self.mask = kv, attn, mlp, positions, mask

    @classmethod
    def of(cls, p: DLLMCache, rows: Optional[torch.Tensor]) -> "_State":
        ctx = p.ctx
        if rows is None:
            return cls(list(p.kv), p.attn, p.mlp, ctx.positions, ctx.attn_mask)
        return cls([(k[rows], v[rows]) for k, v in p.kv], [a[rows] for a in p.attn], [b[rows] for b in p.mlp],
                   ctx.positions[rows], None if ctx.attn_mask is None else ctx.attn_mask[rows])

    def write_back(self, p: DLLMCache, rows: Optional[torch.Tensor]) -> None:
        if rows is None:
            return
        for (k, v), (ks, vs) in zip(p.kv, self.kv):
            copy_rows_(k, rows, ks)
            copy_rows_(v, rows, vs)
        for a, s in zip(p.attn + p.mlp, self.attn + self.mlp):
            copy_rows_(a, rows, s)
