"""How many masked tokens each step commits: LLaDA's linear schedule and Dream's timestep schedule.

`GenerationConfig.schedule` picks one by name (`auto` = the model's decoding profile's); the block
loop asks the schedule's per-block plan for each step's count. Counts are host integers: a fixed
schedule is the same for every live row (each block starts fully masked), so no device sync.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..cache.certainty import certainty_density  # noqa: F401  (the certainty-prior score, re-exported)


def llada_transfer_counts(n_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masks in the block -> (B, steps): base = n // steps, the remainder on the EARLIEST steps."""
    base = (n_mask // steps).unsqueeze(1)
    rem = (n_mask % steps).unsqueeze(1)
    idx = torch.arange(steps, device=n_mask.device).unsqueeze(0)
    return (base + (idx < rem).long()).long()


def dream_timesteps(steps: int, eps: float, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_transfer_count(n_mask: torch.Tensor, i: int, steps: int, timesteps: torch.Tensor) -> torch.Tensor:
    """int(n * (1 - s/t)) in float32 as diffusion_generate computes it (per row, not the batch mean:
    a row's schedule must not depend on its batch); the last step commits everything left."""
    if i >= steps - 1:
        return n_mask.long()
    t, s = timesteps[i], timesteps[i + 1]
    return (n_mask.to(torch.float32) * (1 - s / t)).long()


class BlockPlan:
    """One block's fixed-schedule steps: how many tokens step i commits, given n_left still masked."""

    def count(self, i: int, n_left: int) -> int:
        raise NotImplementedError

    def reveal_prob(self, i: int, n_left: int) -> float:
        """Probability that a masked position is revealed at step i (random reveal, Dream's `origin`)."""
        raise NotImplementedError


class Schedule:
    name: ClassVar[str] = ""

    def __init__(self, eps: float):
        self.eps = eps

    def block(self, n_mask: int, first: int, steps: int) -> BlockPlan:
        """The plan for steps first..steps-1 of a block that has n_mask masked positions at step `first`."""
        raise NotImplementedError


class _LinearPlan(BlockPlan):
    def __init__(self, n_mask: int, first: int, steps: int):
        self.first = first
        self.counts = llada_transfer_counts(torch.tensor([n_mask]), steps - first)[0].tolist()

    def count(self, i: int, n_left: int) -> int:
        return self.counts[i - self.first]

    def reveal_prob(self, i: int, n_left: int) -> float:
        return min(1.0, self.counts[i - self.first] / max(n_left, 1))


class LinearSchedule(Schedule):
    """LLaDA: the block's masks spread evenly over its steps, the remainder on the earliest ones."""

    name = "llada"

    def block(self, n_mask: int, first: int, steps: int) -> BlockPlan:
        return _LinearPlan(n_mask, first, steps)


class _TimestepPlan(BlockPlan):
    def __init__(self, steps: int, eps: float):
        self.steps = steps
        self.ts = dream_timesteps(steps, eps)

    def count(self, i: int, n_left: int) -> int:
        return int(dream_transfer_count(torch.tensor([n_left]), i, self.steps, self.ts)[0])

    def reveal_prob(self, i: int, n_left: int) -> float:
        return 1.0 if i >= self.steps - 1 else float(1 - self.ts[i + 1] / self.ts[i])


class TimestepSchedule(Schedule):
    """Dream: timesteps linspace(1, eps, steps + 1); step i commits n_left * (1 - t_{i+1} / t_i)."""

    name = "dream"

    def block(self, n_mask: int, first: int, steps: int) -> BlockPlan:
        return _TimestepPlan(steps, self.eps)


SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (LinearSchedule, TimestepSchedule)}


def schedule_for(name: str, profile_schedule: str, eps: float) -> Schedule:
    """The schedule `name` (GenerationConfig.schedule); `auto` = the decoding profile's."""
    key = profile_schedule if name == "auto" else name
    if key not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not allowed; allowed: auto, {', '.join(SCHEDULES)}")
    return SCHEDULES[key](eps)
