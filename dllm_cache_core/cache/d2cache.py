"""`d2cache` (d2Cache, arXiv 2509.23094): per step only a chosen set of positions runs through the
network; every other position's K/V is reused from the cache.

Forward
    A row's first forward (after its admission into a slot) is a full forward; it stores the rotated
    K/V of every position. Each later forward feeds only the positions selected at the end of the previous step
    (``self.sel``, (B, L) bool): per layer their q/k/v are computed, their K/V written into the cache in
    place, their queries attend over the whole cached sequence (padding masked) and the FFN runs on
    them only. The selected positions of all rows are packed into one token axis for everything
    that is per token (norms, projections, MLP, head: no work on padding beyond rounding the total
    up); only attention (and its probabilities for the rollout) runs per row, on slots padded to the
    batch's largest count with *invalid* query slots: an invalid
    slot writes its K/V into a trash row behind the cache, never produces logits, and carries no
    weight in the rollout, so a row's result does not depend on its batch. For the same reason a row
    that is not in a forward (``StepInfo.rows``: its block is done while the rest of a static batch
    still decodes, or its slot is empty) computes nothing and keeps its cache, confidences, importance and selection.
    Logits: the LM head runs only on the selected queries that predict a still-masked response
    position (Dream: the query for position j is j - 1; response index 0 is predicted by the last
    prompt token). Block positions that were not computed get all-zero logits (uniform, confidence
    1/V), as in the reference. Rank with a non-negative confidence when certainty-prior decoding is on
    (LLaDA low_confidence, Dream maskgit_plus, as the paper): with Dream's negative entropy score the
    prior product prefers low-density positions, and uncomputed (zero-logit) ones can then be committed.

Selection for the next forward (``end_step``, per row, batched)
    Stage 1 (masked tokens): score = confidence x certainty_density(decoded, sigma), where confidence is
    the latest top-1 probability (mask token excluded from the argmax, as the sampler) of each masked
    position, refreshed whenever its prediction is computed. Window: from the start of the row's
    current block (the block holding its first still-masked position, i.e. the block the next forward
    decodes) to the end of the block holding its current_k-th still-masked position (end of the
    response if fewer remain); tokens of the current block rank before all others; top current_k.
    Plus every token committed this step (its input id changed). Dream: a picked masked position j
    selects query j - 1.
    Stage 2 (everything else, prompt included, padding excluded): nucleus over attention-rollout
    importance, the sorted prefix whose cumulative share is <= rollout_p, at least one; rollout_p >= 1
    takes every candidate (so that float rounding of the cumulative sum cannot drop one).
    Inflate: an unselected position i between selected a < i < b with b - a <= inflate_w is selected
    (the reference's gap rule). With semi-AR blocks the query that predicts a block's first position is
    also forced into the block's first forward (Dream's block sampler commits that position from it).

Attention rollout without T x T matrices (see ``rollout_importance``).

Differences from the reference implementation (Kamichanw/d2Cache, src/cache/d2cache.py)
    1. Confidence refresh. The reference means to refresh ``_conf_cache`` each step with the new
       confidences of positions computed while masked, but ``conf_cache[active][valid] = ...`` writes
       into a temporary copy made by the chained boolean indexing (a no-op), and its valid mask
       ``a[:, P:] & b == mask_id`` parses as ``(a & b) == mask_id`` (operator precedence); net effect:
       the confidences stay frozen at the first step's values. We implement the paper's intent: each
       masked position's confidence is the one from the latest forward that computed its prediction
       (the first forward computes all of them). It is the top-1 probability computed here from the
       logits (the reference's default maskgit_plus confidence), independent of the sampler's ranking
       score (Dream's default entropy is negative, which would invert the density product), and it
       covers positions beyond the current block, which the decoding loop does not rank.
    2. Per-row choices. The reference's block bias adds the *batch-global* max score, and its
       top_up_mask pads rows to equal counts with extra real tokens chosen by a batch-dependent rule;
       here the block preference is a per-row lexicographic rank and padding slots are inert, so a
       row's selection never depends on the other rows.
    3. Dream: the reference *assigns* ``q_mask[:, P-1] = picked[0]`` after stage 2, which can drop a
       last-prompt-token chosen by the rollout; we OR it.
    4. Rollout in fp32 (the reference casts the attention probabilities to the model dtype).
    5. Current block. The reference biases and starts the window at the block decoded in the step
       that just ended, also right after that block completed; we use the block the next forward
       decodes (the row's first still-masked block), and with semi-AR blocks always compute the query
       that predicts a new block's first position at that block's first forward.
    6. CFG (cfg_scale > 0): the unconditional rows reuse the conditional rows' selection; confidences
       and rollout importance come from the conditional rows.

Cost (stats, per row and forward; padding and invalid slots never counted)
    - layers: n_sel real queries per layer, each attending to real_len keys (``counters.forward``);
    - LM head: the rows actually computed (queries predicting still-masked positions);
    - overhead, per layer: attention probabilities for the n_sel queries, recomputed in fp32 next to
      the fused SDPA call: (2 * n_heads * head_dim + 5 * n_heads) FLOPs per (query, key) pair (QK^T
      again, plus scale, exp, sum, divide and head-mean per head); and the rollout vector product:
      2 * n_sel * real_len + 3 * n_sel.
    Memory: the head-mean probabilities (B, n_sel, L) fp32 of every layer live until the end of the
    forward; the first forward (all L queries, padding included, counted as real_len) holds
    n_layers x B x L x L floats, as much as the reference's dense rollout.
"""
from __future__ import annotations

import torch

from ..models.layers import attention_probs_mean
from .base import CachePolicy, DecodeContext, StaticStep, StepInfo, copy_rows_
from .certainty import certainty_density
from .params import Param, PolicyDecl

POLICY = PolicyDecl(
    name="d2cache",
    params=(
        Param("rollout_p", float, 0.1, "top-p mass over attention-rollout importance", gt=0, le=1),
        Param("current_k", int, 32, "masked tokens recomputed per step by certainty density", ge=1),
        Param("sigma", float, 10.0, "Gaussian kernel width of the certainty density", gt=0),
        Param("inflate_w", int, None, "fill gaps of width <= inflate_w (None = 4 with semi-AR blocks, else 0)",
              ge=0),
    ),
    reuses="K/V of all but the selected tokens (certainty density + attention rollout)",
    exact_when="current_k >= gen_length and rollout_p=1",
    exact=({"current_k": 4096, "rollout_p": 1.0},),
    order=4,
)


QUANTUM = 32
"""Slot counts are padded to a multiple of this: each count is one static step (a CUDA graph). The
stats count real queries only (the method's FLOPs), as for rows padded to the batch's largest count."""


def rollout_importance(probs: list[torch.Tensor], slots: torch.Tensor, weight: torch.Tensor,
                       seq_len: int) -> torch.Tensor:
    """Column sums of the attention rollout, 1^T M_L ... M_1, per row: (B, seq_len) fp32.

    probs[l] (B, n, L): head-mean attention rows of layer l's computed queries; slots (B, n): their
    positions (distinct per row); weight (B, n): 1 for a real query, 0 for an invalid slot.

    The reference builds M_l = rownorm(A_l + I) as a dense T x T matrix whose rows are identity rows
    for tokens not computed, and multiplies them (T^3 per layer). Since a computed row a_i sums to 1,
    M_l has rows e_i for non-computed i and (a_i + e_i) / 2 for computed i, so the product vector
    v <- v M_l needs only the n stored rows:
        (v M_l)_j = v_j * (1 - [j computed] / 2) + sum_{i computed} (v_i / 2) a_ij,
    i.e. one (1 x n) @ (n x L) product per layer, evaluated right to left from v = 1^T (last layer
    first). Cost 2 n L + 3 n per layer instead of 2 T^3.
    """
    B = slots.shape[0]
    v = torch.ones(B, seq_len, dtype=torch.float32, device=slots.device)
    for a in reversed(probs):
        half = 0.5 * v.gather(1, slots) * weight
        v = v.scatter_add(1, slots, -half) + torch.bmm(half.unsqueeze(1), a).squeeze(1)
    return v


def nucleus(scores: torch.Tensor, cand: torch.Tensor, p: float) -> torch.Tensor:
    """(B, L) bool: per row the highest-share candidates whose cumulative share is <= p, at least one
    (when the row has a candidate); p >= 1 takes every candidate."""
    if p >= 1.0:
        return cand.clone()
    s = torch.where(cand, scores.float(), 0.0)
    share = s / s.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    sp, si = torch.sort(share, dim=1, descending=True, stable=True)
    keep = sp.cumsum(1) <= p
    keep[:, 0] = True
    keep &= cand.gather(1, si)
    return torch.zeros_like(cand).scatter_(1, si, keep)


def inflate(sel: torch.Tensor, w: int) -> torch.Tensor:
    """Select every position i with selected neighbours a < i < b and b - a <= w (reference rule)."""
    if w <= 0:
        return sel
    B, L = sel.shape
    ar = torch.arange(L, device=sel.device).expand(B, L)
    prev = torch.cummax(torch.where(sel, ar, -1), dim=1).values
    nxt = torch.flip(torch.cummin(torch.flip(torch.where(sel, ar, L), [1]), dim=1).values, [1])
    return sel | ((nxt - prev <= w) & (prev >= 0) & (nxt < L))


def stage1_pick(remaining: torch.Tensor, score: torch.Tensor, k: int, block_length: int) -> torch.Tensor:
    """(B, G) bool: the <= k still-masked positions of highest score inside each row's window, those of
    the row's current block (the block of its first masked position) ranked first."""
    B, G = remaining.shape
    if k <= 0:
        return torch.zeros_like(remaining)
    ar = torch.arange(G, device=remaining.device).unsqueeze(0)
    first = remaining.int().argmax(1, keepdim=True)
    bstart = (first // block_length) * block_length
    in_block = (ar >= bstart) & (ar < bstart + block_length)
    meets = remaining.long().cumsum(1) >= k
    kth = torch.where(meets.any(1, keepdim=True), meets.int().argmax(1, keepdim=True), G - 1)
    end = (kth // block_length + 1) * block_length - 1
    window = remaining & (ar >= bstart) & (ar <= end)
    key = score.double() + 2.0 * in_block.double()  # score <= 1: the block ranks first, per row
    key = key.masked_fill(~window, float("-inf"))
    idx = torch.topk(key, min(k, G), dim=1).indices
    return torch.zeros_like(remaining).scatter_(1, idx, True) & window


def top1_confidence(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Probability of the argmax token (the mask token never chosen), fp32."""
    lf = logits.float()
    x0 = lf.masked_fill(torch.arange(lf.shape[-1], device=lf.device) == mask_id, float("-inf")).argmax(-1)
    return lf.softmax(-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)


class D2Cache(CachePolicy):
    decl = POLICY
    computes_idle_rows = False  # a forward rewrites the row's selection, confidences and importance

    def __init__(self, ctx: DecodeContext, **params):
        super().__init__(ctx, **params)
        p = dict(self.defaults, **params)
        self.rollout_p = float(p["rollout_p"])
        self.current_k = int(p["current_k"])
        self.sigma = float(p["sigma"])
        w = p["inflate_w"]
        self.semi_ar = ctx.block_length < ctx.gen_length
        self.inflate_w = (4 if self.semi_ar else 0) if w is None else int(w)
        cfg, B, L, dev = self.model.config, ctx.batch, ctx.seq_len, ctx.positions.device
        # per layer one flat (B*L + 1, kv_dim) buffer: rows b*L + j, then a trash row for invalid slots
        self.kv = self.kv_buffers()
        G = ctx.gen_length
        self.conf_flat = torch.zeros(B * G + 1, dtype=torch.float32, device=dev)  # + trash
        self.conf = self.conf_flat[:B * G].view(B, G)
        self.importance = torch.zeros(B, L, dtype=torch.float32, device=dev)
        self.sel = torch.zeros(B, L, dtype=torch.bool, device=dev)  # queries of the next forward
        self.started = torch.zeros(B, dtype=torch.bool, device=dev)  # per row: its first (full) forward ran
        self.started_list = [False] * B
        self.quantum = QUANTUM
        H, D = cfg.n_heads, cfg.head_dim
        self.probs_per_pair = 2.0 * H * D + 5.0 * H

    # -- forward --------------------------------------------------------------------------------
    def admit(self, rows: list[int]) -> None:
        for r in rows:
            self.started_list[r] = False
        self.started[torch.tensor(rows, device=self.started.device)] = False

    def begin_block(self, step: StepInfo) -> None:
        if self.semi_ar:
            for r, s in zip(step.row_list, step.start_list):
                if self.started_list[r]:
                    self.sel[r, s - self.ctx.shift] = True

    def forward(self, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        ctx = self.ctx
        B, L = x.shape
        dev = x.device
        P, G, sh = ctx.prompt_len, ctx.gen_length, ctx.shift
        # rows taking part in this forward; a row not in it computes nothing and keeps its state
        active = torch.zeros(B, dtype=torch.bool, device=dev).index_fill_(0, step.rows, True)
        started = self.started.unsqueeze(1)
        # a row's first forward: every position, padding included (its keys are masked)
        sel = torch.where(started, self.sel, True) & active.unsqueeze(1)
        weight_sel = torch.where(started, self.sel, ctx.key_mask) & active.unsqueeze(1)
        self.started |= active
        for r in step.row_list:
            self.started_list[r] = True
        # queries that predict a still-masked response position
        predicts = torch.zeros_like(sel)
        predicts[:, P - sh:P - sh + G] = x[:, P:] == ctx.mask_id
        predicts &= sel
        counts = torch.stack([sel.sum(1), predicts.sum(1)])
        # Slot and head-row counts are rounded up to a multiple of QUANTUM (padding slots are inert),
        # so a few static steps serve the whole generation. One host sync: the three sizes.
        q = self.quantum
        cmax, pmax, total = torch.cat([counts.max(1).values.clamp(min=1), counts[0].sum().view(1)]).tolist()
        n, m = (min(L, -(-c // q) * q) for c in (cmax, pmax))
        qt = q * min(4, max(1, B // 4))  # the packed total: a multiple of 32 / 64 / 128 from batch 1 / 8 / 16
        T = min(B * L, max(qt, -(-total // qt) * qt))
        slots = torch.argsort((~sel).to(torch.uint8), dim=1, stable=True)[:, :n]  # selected, ascending
        valid = torch.arange(n, device=dev).unsqueeze(0) < counts[0].unsqueeze(1)
        rows = torch.arange(B, device=dev).unsqueeze(1)
        dst = torch.where(valid, rows * L + slots, B * L)
        pred_slot = predicts.gather(1, slots) & valid
        out = torch.argsort((~pred_slot).to(torch.uint8), dim=1, stable=True)[:, :m]
        out_valid = torch.arange(m, device=dev).unsqueeze(0) < counts[1].unsqueeze(1)
        weight = (weight_sel.gather(1, slots) & valid).float()
        pack = _Packing.of(valid, T)
        logits, imp = self.static_step(("slots", n, m, T), lambda: _SlotStep(self, n, m, T))(
            x, slots, dst, out, weight, pack)

        # rollout importance of this forward (read by end_step)
        self.importance.copy_(torch.where(active.unsqueeze(1), imp, self.importance))

        # confidences of every computed masked position; block logits (zeros where not computed)
        g = slots.gather(1, out) + sh - P  # response index each head row predicts
        conf_dst = torch.where(out_valid, rows * G + g, B * G)
        self.conf_flat.index_copy_(0, conf_dst.reshape(-1), top1_confidence(logits, ctx.mask_id).reshape(-1))
        BL = step.block_length
        starts = torch.zeros(B, dtype=torch.long, device=dev).index_copy_(0, step.rows, step.starts)
        col = g - (starts.unsqueeze(1) - P)
        col = torch.where(out_valid & (col >= 0) & (col < BL), col, BL)
        V = logits.shape[-1]
        blk = torch.zeros(B, BL + 1, V, dtype=logits.dtype, device=dev)
        blk.scatter_(1, col.unsqueeze(-1).expand(-1, -1, V), logits)

        # stats: real queries per layer over real keys, head rows computed, overhead
        n_real = weight.sum(1).double().index_select(0, step.rows)
        keys = ctx.real_len.double().index_select(0, step.rows)
        nl = self.model.config.n_layers
        extra = nl * (n_real * keys * self.probs_per_pair + 2.0 * n_real * keys + 3.0 * n_real)
        ctx.counters.forward(step.rows, step.charge, n_real, keys,
                             head_rows=counts[1].double().index_select(0, step.rows), extra=extra)
        return blk[:, :BL].index_select(0, step.rows)

    # -- selection for the next forward ----------------------------------------------------------
    def end_step(self, x: torch.Tensor, committed: torch.Tensor, confidence: torch.Tensor,
                 step: StepInfo) -> None:
        ctx = self.ctx
        B = x.shape[0]  # decoding rows; with CFG ctx.batch == 2 * B
        P, G, L, sh = ctx.prompt_len, ctx.gen_length, ctx.seq_len, ctx.shift
        remaining = x[:, P:] == ctx.mask_id
        score = self.conf[:B] * certainty_density(~remaining, self.sigma)
        picked = stage1_pick(remaining, score, self.current_k, ctx.block_length)
        s1 = torch.zeros(B, L, dtype=torch.bool, device=x.device)
        s1[:, P - sh:P - sh + G] = picked
        dec = step.rows[:committed.shape[0]]
        cols = step.starts[:committed.shape[0]].unsqueeze(1) + torch.arange(committed.shape[1], device=x.device)
        s1_dec = s1.index_select(0, dec)
        s1_dec.scatter_(1, cols, s1_dec.gather(1, cols) | committed)
        s1.index_copy_(0, dec, s1_dec)
        cand = ctx.key_mask[:B] & ~s1
        sel = s1 | nucleus(self.importance[:B], cand, self.rollout_p)
        sel = inflate(sel, self.inflate_w)
        sel = sel.repeat(ctx.batch // B, 1)
        active = torch.zeros(ctx.batch, dtype=torch.bool, device=x.device).index_fill_(0, step.rows, True)
        self.sel.copy_(torch.where(active.unsqueeze(1), sel, self.sel))


class _Packing:
    """The valid query slots of every row packed into T tokens (row-major, then padding tokens): the
    row-independent work of a layer (norms, projections, MLP, head) runs on the packed tokens, only
    attention and its probabilities on the per-row (B, n) slot layout. Padding tokens compute on
    copies of token 0 and write only the trash row."""

    def __init__(self, tok_slot: torch.Tensor, slot_tok: torch.Tensor, tok_valid: torch.Tensor):
        self.tok_slot, self.slot_tok, self.tok_valid = tok_slot, slot_tok, tok_valid

    @classmethod
    def of(cls, valid: torch.Tensor, T: int) -> "_Packing":
        """valid (B, n): the real slots. tok_slot (T,): the flat slot b * n + j of each packed token;
        slot_tok (B * n,): the packed token of each slot (invalid slots: token 0)."""
        fv = valid.reshape(-1)
        rank = fv.long().cumsum(0) - 1
        slot_tok = torch.where(fv, rank, 0)
        tok_slot = torch.zeros(T + 1, dtype=torch.long, device=fv.device)
        tok_slot.scatter_(0, torch.where(fv, rank, T), torch.arange(fv.shape[0], device=fv.device))
        tok_valid = torch.arange(T, device=fv.device) <= rank[-1].clamp(min=-1)
        return cls(tok_slot[:T], slot_tok, tok_valid)


class _SlotStep(StaticStep):
    """The forward over n query slots per row packed into T tokens, m slots per row through the head
    (and the rollout of the attention rows) with every input in a static buffer: one per padded
    (n, m, T), a CUDA graph on GPUs from its third call (sizes vary from step to step)."""

    eager_calls = 2

    def __init__(self, policy: D2Cache, n: int, m: int, T: int):
        super().__init__(policy)
        ctx = self.ctx
        B, L, dev = ctx.batch, ctx.seq_len, ctx.positions.device
        self.p = policy
        self.ids = torch.zeros(1, T, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, T, dtype=torch.long, device=dev)
        self.dst = torch.zeros(T, dtype=torch.long, device=dev)
        self.tok_slot = torch.zeros(T, dtype=torch.long, device=dev)
        self.slot_tok = torch.zeros(B * n, dtype=torch.long, device=dev)
        self.out = torch.zeros(1, B * m, dtype=torch.long, device=dev)
        self.slots = torch.zeros(B, n, dtype=torch.long, device=dev)
        self.weight = torch.zeros(B, n, dtype=torch.float32, device=dev)
        self.m = m

    def _body(self):
        p, ctx, model = self.p, self.ctx, self.model
        B, n = self.slots.shape
        hd, mask = model.config.head_dim, ctx.attn_mask
        dst, tok_slot, slot_tok = self.dst, self.tok_slot, self.slot_tok
        T = dst.shape[0]
        probs: list[torch.Tensor] = []

        def attend(q, K, V, mask):
            qs = q.view(T, -1).index_select(0, slot_tok).view(B, n, -1)
            probs.append(attention_probs_mean(qs, K, hd, mask))
            o = model.attend(qs, K, V, mask)
            return o.view(B * n, -1).index_select(0, tok_slot).view(1, T, -1)

        def layer_fn(i, layer, h, cos, sin):
            def write(k, v):
                kf, vf = p.kv.flat[i]
                copy_rows_(kf, dst, k.view(T, -1))
                copy_rows_(vf, dst, v.view(T, -1))
                return p.kv[i]

            return model.layer(layer, h, cos, sin, mask, write, attend).h

        logits = model(self.ids, self.pos, None, layer_fn=layer_fn, out_index=self.out)
        return logits.view(B, self.m, -1), rollout_importance(probs, self.slots, self.weight, ctx.seq_len)

    def __call__(self, x, slots, dst, out, weight, pack: _Packing):
        ctx = self.ctx
        B, n = slots.shape
        L = ctx.seq_len
        flat = (slots + torch.arange(B, device=slots.device).unsqueeze(1) * L).reshape(-1).index_select(
            0, pack.tok_slot)
        self.ids.copy_(x.reshape(-1).index_select(0, flat).view(1, -1))
        self.pos.copy_(ctx.positions.reshape(-1).index_select(0, flat).view(1, -1))
        self.dst.copy_(torch.where(pack.tok_valid, dst.reshape(-1).index_select(0, pack.tok_slot), B * L))
        self.tok_slot.copy_(pack.tok_slot)
        self.slot_tok.copy_(pack.slot_tok)
        self.out.copy_(pack.slot_tok.view(B, n).gather(1, out).view(1, -1))
        self.slots.copy_(slots)
        self.weight.copy_(weight)
        return self._call(x)
