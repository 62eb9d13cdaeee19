"""`prefix` (Fast-dLLM prefix cache): K/V of everything before the block are stored by the block's
first (full) forward; later steps recompute the block and every later position against them.

Rows refresh on their own schedule (each row's block start, every refresh_interval steps of its
block): a forward splits into the rows refreshing (full forward, storing K/V) and the rows reusing
the cache (one gathered-query step of static shape over every row of the forward; a refreshing row's
writes there are overwritten by its refresh right after, so it is run only to keep the shape fixed).
"""
from __future__ import annotations

import torch

from .base import CachePolicy, StepInfo, device_tensor
from .params import Param, PolicyDecl

REFRESH_INTERVAL = Param("refresh_interval", int, None, "also refresh the cache every k steps inside a block "
                         "(None = once per block; 1 = every step)", ge=1)
POLICY = PolicyDecl(name="prefix", params=(REFRESH_INTERVAL,), reuses="K/V before the current block",
                    exact_when="refresh_interval=1", exact=({"refresh_interval": 1},), order=1)


class PrefixCache(CachePolicy):
    decl = POLICY

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        self.kv = self.kv_buffers()

    def refresh(self, step_in_block: int) -> bool:
        k = self.params.get("refresh_interval")
        return step_in_block == 0 or (k is not None and step_in_block % k == 0)

    def query_count(self, step: StepInfo, cached: list[bool]) -> int:
        """Queries per row of the cached step: from the block start to the canvas end (the earliest
        block start among the cached rows sets the static count; later rows pad into the trash row)."""
        return self.ctx.seq_len - min(s for s, c in zip(step.start_list, cached) if c)

    def forward(self, x, step: StepInfo):
        fresh = [self.refresh(s) for s in step.steps]
        if all(fresh):
            return self.full_forward(x, step, store=self.kv)
        cached = StepInfo(step.rows, step.row_list, step.starts, step.start_list, step.steps,
                          step.charge & ~device_tensor(fresh, torch.bool, step.rows.device),
                          [c and not f for c, f in zip(step.charge_list, fresh)], step.block_length, step.batch)
        out = self.cached_range_forward(x, cached, self.query_count(step, [not f for f in fresh]), self.kv)
        if any(fresh):
            sub = step.subset(fresh)
            out = out.clone()
            out[device_tensor([i for i, f in enumerate(fresh) if f], torch.long, out.device)] = \
                self.full_forward(x, sub, store=self.kv)
        return out
