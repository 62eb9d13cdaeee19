"""`none`: the reference path, a full forward every step."""
from __future__ import annotations

from .base import CachePolicy, StepInfo
from .params import PolicyDecl

POLICY = PolicyDecl(name="none", reuses="nothing (reference path)", exact_when="always", exact=({},), order=0)


class NoCache(CachePolicy):
    decl = POLICY

    def forward(self, x, step: StepInfo):
        return self.full_forward(x, step)
