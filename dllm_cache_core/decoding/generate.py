"""Batched diffusion decoding: semi-AR blocks, fixed or threshold schedules, stop tokens, stats.

The engine is a Scheduler (which rows decode next: slots, blocks, admission, completion) driving a
Runner (the tensors: one step for a set of slots, through the cache policy). Rows are independent:
left padding is masked, positions count from each row's first real token, and every per-row choice
(counts, top-k, sampling) is made per row, so a row's tokens and stats are a function of the row
alone (prompt, settings, seed, id), whichever rows share its steps and whenever it was admitted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from ..config import CacheConfig, GenerationConfig
from ..models.base import DiffusionLM
from ..stats import SampleStats
from .output import GenerationOutput
from .runner import Runner, row_seed  # noqa: F401  (row_seed is part of this module's API)
from .scheduler import Row, Scheduler


def validate_prompts(prompts: Sequence[Sequence[int]], gen: GenerationConfig, model: DiffusionLM) -> None:
    if len(prompts) == 0:
        raise ValueError("prompts: empty batch")
    for i, p in enumerate(prompts):
        validate_prompt(p, gen, model, f"prompts[{i}]")


def validate_prompt(p: Sequence[int], gen: GenerationConfig, model: DiffusionLM, name: str) -> None:
    if len(p) == 0:
        raise ValueError(f"{name}: empty prompt")
    if len(p) + gen.gen_length > model.config.max_len:
        raise ValueError(f"{name}: prompt length {len(p)} + gen_length {gen.gen_length} exceeds the "
                         f"model's max length {model.config.max_len}")


def check_schedule(model: DiffusionLM, gen: GenerationConfig) -> None:
    prof = model.config.profile
    if prof.commit_first_of_block and gen.num_blocks > 1 and gen.threshold is None and gen.steps_per_block < 2:
        raise ValueError(f"steps={gen.total_steps}: {prof.name} with {gen.num_blocks} blocks needs at least "
                         "2 steps per block (the first forward of a block commits only its first position)")


@dataclass
class Utilisation:
    """Useful row-steps against the slot-steps paid for (slots x engine steps), split by whether rows
    were still queued at the step (steady state) or not (the final drain)."""

    slots: int
    engine_steps: int = 0
    useful_queued: int = 0
    steps_queued: int = 0
    useful_drain: int = 0
    steps_drain: int = 0
    forwards: int = 0

    def add(self, useful: int, queued: bool) -> None:
        self.engine_steps += 1
        if queued:
            self.useful_queued += useful
            self.steps_queued += 1
        else:
            self.useful_drain += useful
            self.steps_drain += 1

    @property
    def overall(self) -> float:
        paid = self.slots * self.engine_steps
        return (self.useful_queued + self.useful_drain) / paid if paid else 0.0

    @property
    def while_queued(self) -> Optional[float]:
        return self.useful_queued / (self.slots * self.steps_queued) if self.steps_queued else None

    @property
    def drain(self) -> Optional[float]:
        return self.useful_drain / (self.slots * self.steps_drain) if self.steps_drain else None


@dataclass
class DecodeLoop:
    """Rows in, outputs out as rows finish: the scheduler decides, the runner runs."""

    model: DiffusionLM
    gen: GenerationConfig
    cache: CacheConfig
    seed: int
    slots: int
    prompt_len: int
    padded: bool = True
    keep: bool = False
    """Keep the runner (its buffers and static steps: CUDA graphs on GPUs) after a run, for the next
    run of the same shape; close() frees it."""
    utilisation: Utilisation = field(init=False)

    def __post_init__(self) -> None:
        check_schedule(self.model, self.gen)
        self.runner = Runner(self.model, self.gen, self.cache, self.seed, self.slots, self.prompt_len, self.padded)
        self.scheduler = Scheduler(self.slots, self.gen.num_blocks, self.gen.scheduling,
                                   self.runner.policy.computes_idle_rows)
        self.utilisation = Utilisation(self.slots)

    def run(self, rows: Iterable[tuple]) -> Iterator[tuple[int, Any, GenerationOutput]]:
        """rows: (index, row_id, prompt ids[, block budget]), pulled only as slots free up; yields
        (index, row_id, output) in the order rows finish."""
        src = iter(rows)
        sched = self.scheduler
        self.begin()
        exhausted = False
        try:
            while True:
                # read rows only as slots free up (+1 queued, so that "rows still waiting" is visible)
                while not exhausted and self.wants_rows():
                    nxt = next(src, None)
                    if nxt is None:
                        exhausted = True
                        break
                    self.add(*nxt)
                if sched.idle:
                    break
                yield from self.step(more=not exhausted)
        finally:
            self.end()

    # -- the steps of run(), for a caller that feeds rows itself (dllm_cache_core.stream.EngineStream) --
    def begin(self) -> None:
        """Start a run: empty slots and queue (a kept loop whose previous run was abandoned starts clean)."""
        self.scheduler.reset()
        self.utilisation = Utilisation(self.slots)

    def wants_rows(self) -> bool:
        """Whether run() would read another row now: a free slot for each queued row, plus one row queued
        ahead under continuous scheduling (so that "rows still waiting" is visible)."""
        sched = self.scheduler
        ahead = 1 if sched.mode == "continuous" else 0
        return len(sched.queue) < sched.free_slots() + ahead

    def add(self, index: int, row_id: Any, prompt: Sequence[int], max_blocks: Optional[int] = None) -> None:
        """Queue one row (it takes a slot at the next step that has one free)."""
        validate_prompt(prompt, self.gen, self.model, f"row {row_id!r}")
        self.scheduler.add(Row(index=index, row_id=row_id, prompt=list(prompt), max_blocks=max_blocks))

    @property
    def rows(self) -> int:
        """Rows in slots or queued."""
        return len(self.scheduler.queue) + sum(r is not None for r in self.scheduler.slots)

    def step(self, more: bool = False) -> list[tuple[int, Any, GenerationOutput]]:
        """One engine step: queued rows take free slots, every slotted row advances, finished rows leave;
        returns their (index, row_id, output). more: rows are still to come (the utilisation's split)."""
        sched, run = self.scheduler, self.runner
        if sched.idle:
            return []
        run.admit(sched.admit())
        plan = sched.plan()
        for r, (done, stop) in zip(plan.decode, run.step(plan)):
            sched.complete(r, done, stop)
        self.utilisation.add(len(plan.decode), plan.queued > 0 or more)
        return [(r.index, r.row_id, run.output(r)) for r in sched.release()]

    def abort(self) -> tuple[list[Row], list[Row]]:
        """Drop every row (after a failed step): (rows that were in slots, rows still queued)."""
        slotted = [r for r in self.scheduler.slots if r is not None]
        queued = list(self.scheduler.queue)
        self.scheduler.reset()
        return slotted, queued

    def end(self) -> None:
        """End a run: the forward count goes to the utilisation; a loop not kept frees its runner."""
        self.utilisation.forwards = self.runner.forwards
        self.runner.forwards = 0
        if not self.keep:
            self.runner.release()

    def close(self) -> None:
        self.runner.release()


@torch.no_grad()
def generate(model: DiffusionLM, prompts: Sequence[Sequence[int]], gen: Optional[GenerationConfig] = None,
             cache: Optional[CacheConfig] = None, seed: int = 0, row_ids: Optional[Sequence] = None
             ) -> list[GenerationOutput]:
    """Generate for a batch of token-id prompts (no padding); outputs in the same order."""
    return generate_rows(model, prompts, gen, cache, seed, row_ids)


def prompt_bucket(n: int) -> int:
    """Canvas prompt width for a prompt of n tokens under continuous scheduling: a power of two >= 64.
    Every row of a canvas pays for its width, so rows are grouped by bucket, not padded to the longest."""
    return max(64, 1 << max(0, n - 1).bit_length())


def width_groups(prompts: Sequence[Sequence[int]], slots: int) -> list[list[int]]:
    """Row indices grouped by prompt_bucket, narrowest first. A group that cannot fill its slots twice
    joins the next wider one (the widest joins the one before): such a group would spend most of its
    steps draining, and a group of one or two rows would run its whole canvas at batch one or two.
    slots=0 keeps every width group apart."""
    by_width: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_width.setdefault(prompt_bucket(len(p)), []).append(i)
    groups: list[list[int]] = []
    carry: list[int] = []
    for k in sorted(by_width):
        carry += by_width[k]
        if len(carry) >= 2 * slots:
            groups.append(carry)
            carry = []
    if carry:
        if groups:
            groups[-1] += carry
        else:
            groups.append(carry)
    return groups


def generate_rows(model: DiffusionLM, prompts: Sequence[Sequence[int]], gen: Optional[GenerationConfig] = None,
                  cache: Optional[CacheConfig] = None, seed: int = 0, row_ids: Optional[Sequence] = None,
                  loops_out: Optional[list] = None, block_budgets: Optional[Sequence[int]] = None
                  ) -> list[GenerationOutput]:
    """generate(); loops_out, when given, receives each DecodeLoop (their utilisation counters);
    block_budgets (benchmarks): per row, the blocks after which it ends as if a stop token had come.

    Static scheduling: one canvas as wide as the longest prompt, batches of `slots` rows in order.
    Continuous: rows are grouped by width_groups (one canvas per group, in order of width) and each
    group streams through its own slots."""
    gen = gen or GenerationConfig()
    cache = cache or CacheConfig()
    validate_prompts(prompts, gen, model)
    ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if gen.scheduling == "continuous":
        # no slots given: every width group runs all its rows at once, so none of them drains alone
        order = width_groups(prompts, gen.slots or 0)
    else:
        order = [list(range(len(prompts)))]
    outs: list[Optional[GenerationOutput]] = [None] * len(prompts)
    for idx in order:
        ps = [prompts[i] for i in idx]
        rows = [(ids[i], prompts[i]) if block_budgets is None else (ids[i], prompts[i], block_budgets[i])
                for i in idx]
        for j, _, o in stream(model, rows, gen, cache, seed,
                              prompt_len=max(len(p) for p in ps), padded=any(len(p) != len(ps[0]) for p in ps),
                              slots=min(gen.slots or len(prompts), len(idx)), loop_out=loops_out):
            outs[idx[j]] = o
    return outs  # type: ignore[return-value]


def stream(model: DiffusionLM, rows: Iterable[tuple[Any, Sequence[int]]], gen: Optional[GenerationConfig] = None,
           cache: Optional[CacheConfig] = None, seed: int = 0, *, slots: Optional[int] = None,
           prompt_len: Optional[int] = None, padded: bool = True,
           loop_out: Optional[list] = None) -> Iterator[tuple[int, Any, GenerationOutput]]:
    """Rows (row_id, prompt ids) in, (index, row_id, output) out as rows finish; rows are read only as
    slots free up. prompt_len: the canvas' prompt width (default: the longest prompt when `rows` is a
    sequence, else the model's max length minus gen_length). loop_out, when given, receives the
    DecodeLoop (its utilisation counters)."""
    gen = gen or GenerationConfig()
    cache = cache or CacheConfig()
    if prompt_len is None:
        if isinstance(rows, Sequence):
            prompt_len = max(len(r[1]) for r in rows)
        else:
            prompt_len = model.config.max_len - gen.gen_length
    n_slots = slots or gen.slots or (len(rows) if isinstance(rows, Sequence) else 32)
    loop = DecodeLoop(model, gen, cache, seed, n_slots, prompt_len, padded)
    if loop_out is not None:
        loop_out.append(loop)
    yield from loop.run((i, *row) for i, row in enumerate(rows))
