"""`dual` (Fast-dLLM dual cache): the block's first forward stores K/V of every position; later
steps feed only the block, overwrite its K/V in place and attend to the stored prefix and suffix."""
from __future__ import annotations

from .base import StepInfo
from .params import PolicyDecl
from .prefix import REFRESH_INTERVAL, PrefixCache

POLICY = PolicyDecl(name="dual", params=(REFRESH_INTERVAL,), reuses="K/V of the prefix and the masked suffix",
                    exact_when="refresh_interval=1", exact=({"refresh_interval": 1},), order=2,
                    calibration=({"refresh_interval": 4},))


class DualCache(PrefixCache):
    decl = POLICY

    def query_count(self, step: StepInfo, cached: list[bool]) -> int:
        return step.block_length
