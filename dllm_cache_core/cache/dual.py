"""`dual` (Fast-dLLM dual cache): the block's first forward stores K/V of every position; later
steps feed only the block, overwrite its K/V in place and attend to the stored prefix and suffix."""
from __future__ import annotations

from .base import StepInfo
from .prefix import PrefixCache
from .registry import register


@register
class DualCache(PrefixCache):
    name = "dual"

    def query_count(self, step: StepInfo, cached: list[bool]) -> int:
        return step.block_length
