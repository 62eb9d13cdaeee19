"""`prefix` (Fast-dLLM prefix cache): K/V of everything before the block are stored by the block's
first (full) forward; later steps recompute the block and every later position against them."""
from __future__ import annotations

from .base import CachePolicy, StepInfo
from .registry import register


def check_refresh_interval(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"cache.{name}={value!r} is not allowed; allowed: a positive integer or None")


@register
class PrefixCache(CachePolicy):
    name = "prefix"
    defaults = {"refresh_interval": None}

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        self.kv = self.kv_buffers()

    @classmethod
    def check_param(cls, name, value):
        check_refresh_interval(name, value)

    def refresh(self, step: StepInfo) -> bool:
        k = self.params.get("refresh_interval")
        return step.step == 0 or (k is not None and step.step % k == 0)

    def forward(self, x, step: StepInfo):
        if self.refresh(step):
            return self.full_forward(x, step, store=self.kv)
        return self.cached_range_forward(x, step, step.start, self.ctx.seq_len, self.kv)
