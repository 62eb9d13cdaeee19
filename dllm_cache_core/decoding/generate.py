"""Batched diffusion decoding: semi-AR blocks, fixed or threshold schedules, stop tokens, stats.

The loop only talks to the cache policy through CachePolicy (begin_block / forward / end_step).
Batch rows are independent: left padding is masked, positions count from each row's first real
token, and every per-row choice (counts, top-k, sampling) is made per row.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..cache.base import DecodeContext, StepInfo
from ..cache.registry import policy_class
from ..config import CacheConfig, GenerationConfig
from ..models.base import DiffusionLM
from ..stats import FlopsModel, RowCounters, SampleStats
from .sampling import SAMPLERS, sample_commit, threshold_commit, topk_commit
from .schedule import certainty_density, schedule_for


@dataclass
class GenerationOutput:
    token_ids: list[int]
    """Generated tokens only; ends before the first stop token when stop_at_eos."""
    stats: SampleStats


def row_seed(seed: int, row_id) -> int:
    h = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def validate_prompts(prompts: Sequence[Sequence[int]], gen: GenerationConfig, model: DiffusionLM) -> None:
    if len(prompts) == 0:
        raise ValueError("prompts: empty batch")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt")
        if len(p) + gen.gen_length > model.config.max_len:
            raise ValueError(f"prompts[{i}]: prompt length {len(p)} + gen_length {gen.gen_length} exceeds the "
                             f"model's max length {model.config.max_len}")


class _Decoder:
    """One generate() call's state; methods are the pieces of the loop."""

    def __init__(self, model: DiffusionLM, prompts, gen: GenerationConfig, cache: CacheConfig, seed: int,
                 row_ids):
        self.model, self.gen, self.cfg = model, gen, model.config
        self.profile = self.cfg.profile
        self.remasking = gen.remasking_for(self.profile)
        self.schedule = schedule_for(gen.schedule, self.profile.schedule, gen.eps)
        self.mask_id = self.profile.mask_id if gen.mask_id is None else gen.mask_id
        dev = model.device
        B = self.B = len(prompts)
        plen = torch.tensor([len(p) for p in prompts], device=dev)
        P = self.P = int(plen.max())
        G = gen.gen_length
        L = P + G
        pad = self.cfg.pad_id if self.cfg.pad_id is not None else self.cfg.eos_id
        x = torch.full((B, L), self.mask_id, dtype=torch.long, device=dev)
        x[:, :P] = pad
        for i, p in enumerate(prompts):
            x[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long, device=dev)
        self.x = x
        ar = torch.arange(L, device=dev).unsqueeze(0)
        offset = (P - plen).unsqueeze(1)
        key_mask = ar >= offset
        positions = (ar - offset).clamp(min=0)
        padded = bool((plen < P).any())
        self.cfg_on = gen.cfg_scale > 0
        reps = 2 if self.cfg_on else 1
        self.plen, self.real_len = plen, plen + G
        km, pos = key_mask.repeat(reps, 1), positions.repeat(reps, 1)
        self.counters = RowCounters(B * reps, dev, FlopsModel.of(self.cfg))
        self.ctx = DecodeContext(
            model=model, prompt_len=P, gen_length=G, block_length=gen.block_len, positions=pos, key_mask=km,
            attn_mask=km[:, None, None, :] if padded else None, real_len=self.real_len.repeat(reps),
            counters=self.counters, mask_id=self.mask_id)
        self.policy = policy_class(cache.policy)(self.ctx, **cache.params())
        ids = list(range(B)) if row_ids is None else list(row_ids)
        self.gens = [torch.Generator(device=dev).manual_seed(row_seed(seed, r)) for r in ids]
        stops = gen.stop_token_ids or self.profile.stop_ids
        self.stop_ids = torch.tensor(sorted(set(stops)), device=dev)
        self.stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        self.steps = torch.zeros(B, dtype=torch.long, device=dev)
        self.nfe = 0

    # -- model call ---------------------------------------------------------------------------
    def predict(self, step: StepInfo, active: torch.Tensor) -> torch.Tensor:
        """Block logits (B, BL, V) in fp32, CFG combined."""
        self.counters.active = active.repeat(2) if self.cfg_on else active
        x = self.x
        if self.cfg_on:
            un = x.clone()
            un[:, :self.P] = self.mask_id
            x = torch.cat([x, un])
        logits = self.policy.forward(x, step).float()
        self.nfe += 1
        self.steps += active.long()
        if self.cfg_on:
            cond, un = logits.chunk(2)
            logits = un + (self.gen.cfg_scale + 1) * (cond - un)
        return logits

    @property
    def stochastic(self) -> bool:
        g = self.gen
        return g.temperature > 0 or g.alg_temp > 0 or self.remasking in ("random", "origin")

    def row_gens(self, active: torch.Tensor) -> list:
        """Generators of the rows active this step (None for the others), so that a row draws random
        numbers only on its own steps. Syncs with the host, hence only for stochastic decoding."""
        if not self.stochastic:
            return [None] * self.B
        return [g if a else None for g, a in zip(self.gens, active.tolist())]

    def choose(self, logits: torch.Tensor, threshold_mode: bool, gens: list) -> tuple[torch.Tensor, torch.Tensor]:
        g, prof = self.gen, self.profile
        # Threshold decoding and the certainty prior rank by the profile's threshold confidence when it
        # has one (Dream: the top-1 probability, as Fast-dLLM's confidence_threshold; d2Cache's prior
        # multiplies a probability, and Dream's negative entropy would flip its sign).
        ranked = threshold_mode or g.certainty_prior_sigma is not None
        remasking = prof.threshold_remasking if ranked and prof.threshold_remasking else self.remasking
        return SAMPLERS[prof.sampler](logits, g, remasking=remasking, mask_id=self.mask_id, eos_id=prof.eos_id,
                                      eot_id=prof.eot_id, gens=gens)

    def score(self, conf: torch.Tensor, s: int, e: int) -> torch.Tensor:
        sigma = self.gen.certainty_prior_sigma
        if sigma is None:
            return conf
        density = certainty_density(self.x[:, self.P:] != self.mask_id, sigma)
        return conf * density[:, s - self.P:e - self.P]

    def commit(self, s: int, e: int, x0: torch.Tensor, chosen: torch.Tensor) -> None:
        blk = self.x[:, s:e]
        self.x[:, s:e] = torch.where(chosen, x0, blk)

    # -- one block ----------------------------------------------------------------------------
    def run_block(self, b: int) -> None:
        g, P, BL = self.gen, self.P, self.gen.block_len
        s, e = P + b * BL, P + (b + 1) * BL
        spb = g.steps_per_block
        live = ~self.stopped
        first_commit = self.profile.commit_first_of_block and g.num_blocks > 1
        step = StepInfo(block=b, start=s, end=e, step=0, nfe=self.nfe)
        self.policy.begin_block(step)
        i = 0
        if first_commit:  # Fast-dLLM's Dream block sampler: the block's first position from its first forward
            logits = self.predict(step, live)
            x0, conf = self.choose(logits, g.threshold is not None, self.row_gens(live))
            first = torch.zeros_like(x0, dtype=torch.bool)
            first[:, 0] = live
            self.commit(s, e, x0, first)
            self.policy.end_step(self.x, first, conf, step)
            i = 1
        # Fixed schedules are the same for every live row (each block starts fully masked), so the
        # per-step counts live on the host: no device sync in the step loop.
        plan = self.schedule.block(BL - i, i, spb)
        n_left = BL - i
        while True:
            if g.threshold is None and (i >= spb or n_left <= 0):
                break
            cand = (self.x[:, s:e] == self.mask_id) & live.unsqueeze(1)
            if g.threshold is not None and not bool(cand.any()):
                break  # data-dependent end of a threshold block
            active = cand.any(1)
            step = StepInfo(block=b, start=s, end=e, step=i, nfe=self.nfe)
            logits = self.predict(step, active)
            gens = self.row_gens(active)
            x0, conf = self.choose(logits, g.threshold is not None, gens)
            score = self.score(conf, s, e)
            if g.threshold is not None:
                chosen = threshold_commit(score, conf, cand, g.threshold)
            else:
                k = plan.count(i, n_left)
                if self.remasking == "origin":
                    p = plan.reveal_prob(i, n_left)
                    u = torch.stack([torch.rand(BL, generator=gg, device=self.x.device) if gg is not None
                                     else torch.ones(BL, device=self.x.device) for gg in gens])
                    chosen = cand & (u < p)
                    n_left = BL  # random reveal: counts differ per row, track on the device
                    if i + 1 < spb and not bool((cand & ~chosen).any()):
                        n_left = 0
                elif g.alg_temp > 0:
                    chosen = sample_commit(score, cand, torch.full((self.B,), k), g.alg_temp, gens)
                    n_left -= k
                else:
                    chosen = topk_commit(score, cand, k)
                    n_left -= k
            self.commit(s, e, x0, chosen)
            self.policy.end_step(self.x, chosen, conf, step)
            i += 1
        if g.stop_at_eos:
            self.stopped |= torch.isin(self.x[:, P:e], self.stop_ids).any(1)

    def run(self) -> list[GenerationOutput]:
        g = self.gen
        if self.profile.commit_first_of_block and g.num_blocks > 1 and g.threshold is None and g.steps_per_block < 2:
            raise ValueError(f"steps={g.total_steps}: {self.profile.name} with {g.num_blocks} blocks needs at least "
                             "2 steps per block (the first forward of a block commits only its first position)")
        t0 = time.perf_counter()
        try:
            for b in range(g.num_blocks):
                if g.stop_at_eos and bool(self.stopped.all()):
                    break
                self.run_block(b)
        finally:
            self.policy.release()
        if self.x.is_cuda:
            torch.cuda.synchronize(self.x.device)
        wall = time.perf_counter() - t0
        return self.outputs(wall)

    def outputs(self, wall: float) -> list[GenerationOutput]:
        g, c, B = self.gen, self.counters, self.B
        tl, fl = c.token_layers, c.flops
        # nfe per row = the forwards it was active in (both CFG passes count)
        steps = self.steps
        nfe_row = steps * (2 if self.cfg_on else 1)
        if self.cfg_on:
            tl, fl = tl[:B] + tl[B:], fl[:B] + fl[B:]
        fm = c.fm
        per_fwd = fm.full_forward(self.real_len, g.block_len)
        vanilla = nfe_row.double() * per_fwd
        total = g.gen_length * per_fwd * (2 if self.cfg_on else 1)
        share = tl / tl.sum().clamp(min=1)
        gen_tok = self.x[:, self.P:].tolist()
        stops = set(self.stop_ids.tolist())
        rows = list(zip(steps.tolist(), nfe_row.tolist(), tl.tolist(), fl.tolist(), vanilla.tolist(),
                        total.tolist(), share.tolist(), self.plen.tolist()))
        outs = []
        for toks, (st, nf, tlr, flr, van, tot, sh, pl) in zip(gen_tok, rows):
            reason = "length"
            if g.stop_at_eos:
                cut = next((j for j, t in enumerate(toks) if t in stops), None)
                if cut is not None:
                    toks, reason = toks[:cut], "stop"
            stats = SampleStats(
                num_prompt_tokens=pl, num_generated_tokens=len(toks), steps=st, nfe=nf,
                tokens_per_step=g.gen_length / max(st, 1), token_layers_computed=int(tlr), flops=flr,
                flops_vanilla=van, flops_speedup=van / flr if flr else 1.0,
                flops_speedup_total=tot / flr if flr else 1.0, latency_s=wall * sh, finish_reason=reason)
            outs.append(GenerationOutput(token_ids=toks, stats=stats))
        return outs


@torch.no_grad()
def generate(model: DiffusionLM, prompts: Sequence[Sequence[int]], gen: Optional[GenerationConfig] = None,
             cache: Optional[CacheConfig] = None, seed: int = 0, row_ids: Optional[Sequence] = None
             ) -> list[GenerationOutput]:
    """Generate for a batch of token-id prompts (no padding); outputs in the same order."""
    gen = gen or GenerationConfig()
    cache = cache or CacheConfig()
    validate_prompts(prompts, gen, model)
    return _Decoder(model, prompts, gen, cache, seed, row_ids).run()
