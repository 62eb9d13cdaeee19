"""`none`: the reference path, a full forward every step."""
from __future__ import annotations

from .base import CachePolicy, StepInfo
from .registry import register


@register
class NoCache(CachePolicy):
    name = "none"
    defaults: dict = {}

    def forward(self, x, step: StepInfo):
        return self.full_forward(x, step)
