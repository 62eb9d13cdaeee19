"""`prefix` (Fast-dLLM prefix cache): K/V of everything before the block are stored by the block's
first (full) forward; later steps recompute the block and every later position against them."""
from __future__ import annotations

from .base import CachePolicy, StepInfo
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

    def refresh(self, step: StepInfo) -> bool:
        k = self.params.get("refresh_interval")
        return step.step == 0 or (k is not None and step.step % k == 0)

    def forward(self, x, step: StepInfo):
        if self.refresh(step):
            return self.full_forward(x, step, store=self.kv)
        return self.cached_range_forward(x, step, step.start, self.ctx.seq_len, self.kv)
