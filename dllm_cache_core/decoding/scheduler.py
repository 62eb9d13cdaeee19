"""Which rows decode in the next step: slots, each row's block / step, admission and completion.

Pure Python, no tensors (the split of vLLM v1: a scheduler that knows rows, blocks and slots; a
runner that executes one step for a set of slots). Two policies:

- continuous: every occupied slot advances its own row by one step; a row that completes a block goes
  on with its next block at the next step; a finished row (a stop token in a completed block, or the
  last block done) leaves at once and a queued row takes its slot.
- static: the batch of today's generate(): rows are admitted together, a row that completes its block
  waits for the batch's slowest row (blocks are synchronised), finished rows stay until the whole batch
  is done, and a policy that may compute idle rows computes the whole batch every step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

SCHEDULING = ("continuous", "static")


@dataclass
class Row:
    index: int
    """Position in the caller's order."""
    row_id: Any
    prompt: list[int]
    slot: int = -1
    block: int = 0
    step: int = 0
    """Forwards done in the current block (0 = its first forward is next)."""
    n_left: int = 0
    """Fixed schedules: masked positions the schedule still has to commit in the block."""
    steps: int = 0
    """Forwards this row decoded in (its stats' `steps`)."""
    block_done: bool = False
    finished: bool = False
    stopped: bool = False
    t_admit: float = 0.0
    end_block: int = -1
    """The block the row finished in (static scheduling moves a finished row along with its batch)."""
    max_blocks: Optional[int] = None
    """A block budget: the row finishes after this many blocks as if its last one held a stop token.
    Benchmarks use it to give random-weight models (which never stop) a spread of output lengths."""


@dataclass
class StepPlan:
    decode: list[Row]
    """Rows that decode in this step (ascending slot)."""
    ride: list[Row] = field(default_factory=list)
    """Rows computed only for a static batch shape; their results are discarded (static scheduling)."""
    queued: int = 0
    """Rows still waiting for a slot when the step was planned."""


class Scheduler:
    def __init__(self, slots: int, num_blocks: int, mode: str = "continuous", compute_idle: bool = True):
        if mode not in SCHEDULING:
            raise ValueError(f"scheduling={mode!r} is not allowed; allowed: {', '.join(SCHEDULING)}")
        if slots < 1:
            raise ValueError(f"slots={slots!r} is not allowed; allowed: a positive integer")
        self.mode, self.num_blocks, self.compute_idle = mode, num_blocks, compute_idle
        self.slots: list[Optional[Row]] = [None] * slots
        self.queue: deque[Row] = deque()

    # -- rows in and out --------------------------------------------------------------------------
    def reset(self) -> None:
        self.slots = [None] * len(self.slots)
        self.queue.clear()

    def add(self, row: Row) -> None:
        self.queue.append(row)

    @property
    def idle(self) -> bool:
        return not self.queue and all(r is None for r in self.slots)

    def free_slots(self) -> int:
        return sum(r is None for r in self.slots)

    def admit(self) -> list[Row]:
        """Queued rows that take a free slot now (static: only into an empty batch)."""
        if self.mode == "static" and any(r is not None for r in self.slots):
            return []
        out = []
        for s, r in enumerate(self.slots):
            if r is None and self.queue:
                row = self.queue.popleft()
                row.slot = s
                self.slots[s] = row
                out.append(row)
        return out

    def plan(self) -> Optional[StepPlan]:
        rows = [r for r in self.slots if r is not None]
        if not rows:
            return None
        if self.mode == "continuous":
            return StepPlan(decode=rows, queued=len(self.queue))
        decode = [r for r in rows if not (r.finished or r.block_done)]
        ride = [r for r in rows if (r.finished or r.block_done)] if self.compute_idle else []
        if ride:  # riders sit where the batch is: its block and step
            for r in ride:
                r.block, r.step = decode[0].block, decode[0].step
        return StepPlan(decode=decode, ride=ride, queued=len(self.queue))

    def complete(self, row: Row, block_done: bool, stop: bool) -> None:
        """Record one decoded step of `row`; `stop` is read only when the block is done."""
        row.steps += 1
        row.step += 1
        if not block_done:
            return
        if row.max_blocks is not None and row.block + 1 >= row.max_blocks:
            stop = True  # the row's block budget is spent: it ends as if this block held a stop token
        row.stopped = stop
        if stop or row.block + 1 >= self.num_blocks:
            row.finished, row.end_block = True, row.block
        elif self.mode == "continuous":
            row.block, row.step = row.block + 1, 0
        else:
            row.block_done = True

    def release(self) -> list[Row]:
        """Rows that leave their slots after a step: continuous, every finished row; static, the whole
        batch once every row finished (otherwise the batch moves on to its next block when every row
        completed the current one)."""
        rows = [r for r in self.slots if r is not None]
        if self.mode == "continuous":
            done = [r for r in rows if r.finished]
        elif all(r.finished for r in rows):
            done = rows
        else:
            if all(r.finished or r.block_done for r in rows):
                for r in rows:
                    if not r.finished:
                        r.block, r.step, r.block_done = r.block + 1, 0, False
            done = []
        for r in done:
            self.slots[r.slot] = None
        return done
