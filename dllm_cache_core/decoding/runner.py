"""The runner: the tensors of a fixed set of slots, and one decoding step for the rows a Scheduler
chose. Each row is at its own block and step; its choices (counts, top-k, thresholds, sampling) are
made per row, so a row's tokens and stats never depend on the rows that share its step.

The policy sees a batch of slots (x2 with CFG: conditional rows, then their unconditional twins) whose
canvases are left-padded to one prompt length P; a newly admitted row overwrites its slot's canvas,
positions and key mask, and the policy forgets the slot's state (``CachePolicy.admit``).
"""
from __future__ import annotations

import hashlib
import time
from typing import Optional

import torch

from ..cache.base import DecodeContext, StepInfo, device_tensor
from ..cache.registry import policy_class
from ..config import CacheConfig, GenerationConfig
from ..models.base import DiffusionLM
from ..stats import FlopsModel, RowCounters, SampleStats
from .output import GenerationOutput
from .sampling import SAMPLERS, sample_commit, threshold_commit, topk_commit
from .schedule import certainty_density, schedule_for
from .scheduler import Row, StepPlan


def row_seed(seed: int, row_id) -> int:
    h = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class Runner:
    def __init__(self, model: DiffusionLM, gen: GenerationConfig, cache: CacheConfig, seed: int, slots: int,
                 prompt_len: int, padded: bool = True):
        """prompt_len: P, the canvas' prompt width (every admitted prompt fits in it); padded=False
        promises that every prompt is exactly P long, so attention runs without a mask."""
        self.model, self.gen, self.cfg, self.seed = model, gen, model.config, seed
        self.profile = self.cfg.profile
        self.remasking = gen.remasking_for(self.profile)
        self.mask_id = self.profile.mask_id if gen.mask_id is None else gen.mask_id
        dev = self.device = model.device
        S = self.S = slots
        P, G = self.P, self.G = prompt_len, gen.gen_length
        L = self.L = P + G
        self.BL = gen.block_len
        self.pad = self.cfg.pad_id if self.cfg.pad_id is not None else self.cfg.eos_id
        self.cfg_on = gen.cfg_scale > 0
        self.reps = 2 if self.cfg_on else 1
        B = S * self.reps
        self.x = torch.full((S, L), self.mask_id, dtype=torch.long, device=dev)
        key_mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        positions = torch.arange(L, device=dev).repeat(B, 1)
        self.counters = RowCounters(B, dev, FlopsModel.of(self.cfg))
        self.ctx = DecodeContext(
            model=model, prompt_len=P, gen_length=G, block_length=self.BL, positions=positions, key_mask=key_mask,
            attn_mask=key_mask[:, None, None, :] if padded else None,
            real_len=torch.full((B,), L, dtype=torch.long, device=dev), counters=self.counters,
            mask_id=self.mask_id)
        self.policy = policy_class(cache.policy)(self.ctx, **cache.params())
        self.gens: list[Optional[torch.Generator]] = [None] * S
        stops = gen.stop_token_ids or self.profile.stop_ids
        self.stop_ids = torch.tensor(sorted(set(stops)), device=dev)
        self.latency = torch.zeros(B, dtype=torch.float64, device=dev)
        self._tl_prev = torch.zeros(B, dtype=torch.float64, device=dev)
        spb = gen.steps_per_block
        self.spb = spb
        # Fast-dLLM's Dream block sampler: a block's first forward commits its first position
        self.first_commit = self.profile.commit_first_of_block and gen.num_blocks > 1
        first = 1 if self.first_commit else 0
        self.plan = schedule_for(gen.schedule, self.profile.schedule, gen.eps).block(self.BL - first, first, spb)
        self.forwards = 0

    def policy_rows(self, slot: int) -> list[int]:
        return [slot + k * self.S for k in range(self.reps)]

    # -- admission ------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, rows: list[Row]) -> None:
        if not rows:
            return
        P = self.P
        ctx = self.ctx
        for row in rows:
            s, n = row.slot, len(row.prompt)
            if n > P:
                raise ValueError(f"prompt length {n} exceeds the canvas' prompt width {P}")
            self.x[s, :P - n] = self.pad
            self.x[s, P - n:P] = torch.as_tensor(list(row.prompt), dtype=torch.long, device=self.device)
            self.x[s, P:] = self.mask_id
            off = P - n
            for r in self.policy_rows(s):
                ctx.key_mask[r] = torch.arange(self.L, device=self.device) >= off
                ctx.positions[r] = (torch.arange(self.L, device=self.device) - off).clamp(min=0)
                ctx.real_len[r] = n + self.G
            self.gens[s] = torch.Generator(device=self.device).manual_seed(row_seed(self.seed, row.row_id))
            self.counters.take(self.policy_rows(s))
            self.latency[self.policy_rows(s)] = 0
            row.block, row.step, row.n_left, row.steps = 0, 0, self.BL, 0
            row.t_admit = time.perf_counter()
        self.policy.admit([r for row in rows for r in self.policy_rows(row.slot)])

    # -- one step -------------------------------------------------------------------------------
    def step_info(self, plan: StepPlan) -> StepInfo:
        rows = sorted([(r.slot, r, True) for r in plan.decode] + [(r.slot, r, False) for r in plan.ride],
                      key=lambda t: t[0])
        slots = [s + k * self.S for k in range(self.reps) for s, _, _ in rows]
        starts = [self.P + r.block * self.BL for _ in range(self.reps) for _, r, _ in rows]
        steps = [r.step for _ in range(self.reps) for _, r, _ in rows]
        charge = [c for _ in range(self.reps) for _, _, c in rows]
        return StepInfo.of(slots, starts, steps, charge, self.BL, self.S * self.reps, self.device)

    @property
    def stochastic(self) -> bool:
        g = self.gen
        return g.temperature > 0 or g.alg_temp > 0 or self.remasking in ("random", "origin")

    def predict(self, step: StepInfo) -> torch.Tensor:
        """Logits (n, BL, V) in fp32 for the step's rows (conditional half), CFG combined."""
        x = self.x
        if self.cfg_on:
            un = x.clone()
            un[:, :self.P] = self.mask_id
            x = torch.cat([x, un])
        logits = self.policy.forward(x, step).float()
        self.forwards += 1
        if self.cfg_on:
            cond, un = logits.chunk(2)
            logits = un + (self.gen.cfg_scale + 1) * (cond - un)
        return logits

    def choose(self, logits: torch.Tensor, threshold_mode: bool, gens: list) -> tuple[torch.Tensor, torch.Tensor]:
        g, prof = self.gen, self.profile
        # Threshold decoding and the certainty prior rank by the profile's threshold confidence when it
        # has one (Dream: the top-1 probability, as Fast-dLLM's confidence_threshold; d2Cache's prior
        # multiplies a probability, and Dream's negative entropy would flip its sign).
        ranked = threshold_mode or g.certainty_prior_sigma is not None
        remasking = prof.threshold_remasking if ranked and prof.threshold_remasking else self.remasking
        return SAMPLERS[prof.sampler](logits, g, remasking=remasking, mask_id=self.mask_id, eos_id=prof.eos_id,
                                      eot_id=prof.eot_id, gens=gens)

    @torch.no_grad()
    def step(self, plan: StepPlan) -> list[tuple[bool, bool]]:
        """Run one step; per decoding row (plan.decode order): (block done, stop token in the response
        so far). One host sync per step."""
        t0 = time.perf_counter()
        g, BL, P = self.gen, self.BL, self.P
        step = self.step_info(plan)
        first = [j for j, s in enumerate(step.steps) if s == 0]
        if first:
            keep = [s == 0 for s in step.steps]
            self.policy.begin_block(step.subset(keep))
        logits = self.predict(step)
        half = step.n // self.reps
        dec_pos = [j for j in range(half) if step.charge_list[j]]
        by_slot = {r.slot: r for r in plan.decode}
        rows = [by_slot[step.row_list[j]] for j in dec_pos]
        if len(dec_pos) < half:
            logits = logits[device_tensor(dec_pos, torch.long, logits.device)]
        dev = self.device
        slots = device_tensor([r.slot for r in rows], torch.long, dev)
        cols = device_tensor([P + r.block * BL for r in rows], torch.long, dev).unsqueeze(1) + \
            torch.arange(BL, device=dev)
        xs = self.x.index_select(0, slots)
        blk = xs.gather(1, cols)
        cand = blk == self.mask_id
        gens = [self.gens[r.slot] for r in rows] if self.stochastic else [None] * len(rows)
        thr = g.threshold is not None
        x0, conf = self.choose(logits, thr, gens)
        score = conf
        if g.certainty_prior_sigma is not None:
            density = certainty_density(xs[:, P:] != self.mask_id, g.certainty_prior_sigma)
            score = conf * density.gather(1, cols - P)
        chosen = self.commit_choice(rows, score, conf, cand, gens)
        new_blk = torch.where(chosen, x0, blk)
        xs.scatter_(1, cols, new_blk)
        self.x.index_copy_(0, slots, xs)
        self.policy.end_step(self.x, chosen, conf, step)
        # block done: no masked position left, or (fixed schedules) the block's steps are spent
        left = (new_blk == self.mask_id).any(1)
        if g.stop_at_eos:
            resp = xs[:, P:]
            upto = torch.arange(self.G, device=dev).unsqueeze(0) < (cols[:, -1:] + 1 - P)
            stop = (torch.isin(resp, self.stop_ids) & upto).any(1)
        else:
            stop = torch.zeros_like(left)
        flags = torch.stack([left, stop]).tolist()
        out = []
        for j, r in enumerate(rows):
            done = not flags[0][j]
            if not thr and (r.step + 1 >= self.spb or r.n_left <= 0):
                done = True
            out.append((done, bool(flags[1][j])))
        self._account_latency(time.perf_counter() - t0)
        return out

    def commit_choice(self, rows: list[Row], score: torch.Tensor, conf: torch.Tensor, cand: torch.Tensor,
                      gens: list) -> torch.Tensor:
        """(n, BL) bool: the positions each row commits this step, by its own place in its block."""
        g, BL = self.gen, self.BL
        groups: dict = {}
        for j, r in enumerate(rows):
            i = r.step
            if i == 0:
                r.n_left = BL
            if self.first_commit and i == 0:  # the block's first position, from its first forward
                key = ("first",)
                r.n_left -= 1
            elif g.threshold is not None:
                key = ("threshold",)
            else:
                k = self.plan.count(i, r.n_left)
                if self.remasking == "origin":
                    key = ("origin", self.plan.reveal_prob(i, r.n_left))
                elif g.alg_temp > 0:
                    key = ("sample", k)
                    r.n_left -= k
                else:
                    key = ("topk", k)
                    r.n_left -= k
            groups.setdefault(key, []).append(j)
        if len(groups) == 1:
            key, js = next(iter(groups.items()))
            return self._commit(key, score, conf, cand, gens)
        chosen = torch.zeros_like(cand)
        for key, js in groups.items():
            idx = device_tensor(js, torch.long, cand.device)
            chosen[idx] = self._commit(key, score[idx], conf[idx], cand[idx], [gens[j] for j in js])
        return chosen

    def _commit(self, key: tuple, score, conf, cand, gens) -> torch.Tensor:
        g, BL = self.gen, self.BL
        kind = key[0]
        if kind == "first":
            first = torch.zeros_like(cand)
            first[:, 0] = True
            return first
        if kind == "threshold":
            return threshold_commit(score, conf, cand, g.threshold)
        if kind == "topk":
            return topk_commit(score, cand, key[1])
        if kind == "sample":
            return sample_commit(score, cand, torch.full((cand.shape[0],), key[1]), g.alg_temp, gens)
        p = key[1]  # origin: random reveal with the step's probability
        u = torch.stack([torch.rand(BL, generator=gg, device=cand.device) if gg is not None
                         else torch.ones(BL, device=cand.device) for gg in gens])
        return cand & (u < p)

    def _account_latency(self, dt: float) -> None:
        """The step's wall time, shared among its rows by the token-layers each was charged."""
        tl = self.counters.token_layers
        d = tl - self._tl_prev
        self.latency += dt * d / d.sum().clamp(min=1)
        self._tl_prev = tl.clone()

    # -- completion -----------------------------------------------------------------------------
    def output(self, row: Row) -> GenerationOutput:
        g, s = self.gen, row.slot
        prs = self.policy_rows(s)
        tl, fl = self.counters.take(prs)
        lat = float(self.latency[prs].sum())
        self.latency[prs] = 0
        self._tl_prev[prs] = 0
        nfe = row.steps * self.reps
        real = self.ctx.real_len[s:s + 1]
        per_fwd = float(self.counters.fm.full_forward(real, g.block_len)[0])
        vanilla = float(torch.tensor(nfe, dtype=torch.float64) * per_fwd)
        total = g.gen_length * per_fwd * self.reps
        toks = self.x[s, self.P:].tolist()
        reason = "length"
        if g.stop_at_eos:
            stops = set(self.stop_ids.tolist())
            cut = next((j for j, t in enumerate(toks) if t in stops), None)
            if cut is not None:
                toks, reason = toks[:cut], "stop"
        if reason == "length" and row.max_blocks is not None and row.end_block + 1 < g.num_blocks:
            toks, reason = toks[:(row.end_block + 1) * self.BL], "budget"  # the row's block budget ended it
        stats = SampleStats(
            num_prompt_tokens=len(row.prompt), num_generated_tokens=len(toks), steps=row.steps, nfe=nfe,
            tokens_per_step=g.gen_length / max(row.steps, 1), token_layers_computed=int(tl), flops=fl,
            flops_vanilla=vanilla, flops_speedup=vanilla / fl if fl else 1.0,
            flops_speedup_total=total / fl if fl else 1.0, latency_s=lat, finish_reason=reason)
        return GenerationOutput(token_ids=toks, stats=stats)

    def release(self) -> None:
        self.policy.release()
