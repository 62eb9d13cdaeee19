"""Training batches: synthetic SFT pairs, token-budget batching, left padding as at inference.

Every batch is a pure function of (seed, step): a resumed run sees exactly the batches that an
uninterrupted one would have, and DataLoader workers need no shared state.
Each batch holds one task (so that a 500-token retrieval prompt does not pad 30-token sums) and as
many samples as fit `tokens_per_batch`. Rows are left-padded and positions count from each row's
first real token, the layout the decoding loop uses, so the model never sees padding it was not
trained with.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..tasks import TASKS, Example, sample
from .tokenizer import EOS, EOT, chat_text

DEFAULT_WEIGHTS = {"addition": 0.17, "multiplication": 0.22, "sort": 0.17, "reverse": 0.14,
                   "kv_retrieval": 0.18, "json": 0.12}


@dataclass(frozen=True)
class DataConfig:
    tokens_per_batch: int = 65536
    """Token budget of one batch (prompt + canvas, padding included)."""
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    """Probability of each task per batch; harder tasks get more."""
    raw_prompt_prob: float = 0.1
    """Share of samples without the chat template, so plain-text prompts work too."""
    clean_prefix_prob: float = 0.15
    """Share of samples whose first c response tokens are given (never masked): the situation of a
    later semi-AR block, whose earlier blocks are already decoded."""
    max_canvas: int = 256
    """Longest response canvas trained (gen_length up to this generalises)."""
    canvas_mix: tuple[float, float, float] = (0.4, 0.75, 0.9)
    """Cumulative probabilities of a tight / default / doubled canvas (the rest: max_canvas)."""

    def __post_init__(self) -> None:
        m = tuple(float(x) for x in self.canvas_mix)
        object.__setattr__(self, "canvas_mix", m)
        if len(m) != 3 or not 0 <= m[0] <= m[1] <= m[2] <= 1:
            raise ValueError(f"data.canvas_mix={self.canvas_mix!r}: three non-decreasing probabilities in [0, 1]")
        bad = sorted(set(self.task_weights) - set(TASKS))
        if bad:
            raise ValueError(f"data.task_weights: unknown task {bad[0]!r}; allowed: {', '.join(TASKS)}")


def canvas_length(rng: random.Random, task: str, answer_len: int, max_canvas: int,
                  mix: tuple[float, float, float] = DataConfig.canvas_mix) -> int:
    """The response canvas (answer + EOT + EOS padding): tight (answer rounded up to 32) or the task's
    default gen_length most of the time, sometimes much longer, so the model learns to stop and pad at
    any gen_length a user picks. Tight canvases spend more of the token budget on answer tokens (EOS
    runs are learned quickly; the first run gave 10% tight and learned the answers too slowly)."""
    default = TASKS[task].gen_length
    tight = -(-(answer_len + 1) // 32) * 32
    r = rng.random()
    g = tight if r < mix[0] else default if r < mix[1] else min(2 * default, max_canvas) if r < mix[2] else max_canvas
    return max(g, tight)


class BatchMaker:
    """Builds the batch of a step; picklable (the tokenizer loads lazily in each worker)."""

    def __init__(self, tokenizer_file: str, cfg: DataConfig, seed: int):
        self.tokenizer_file, self.cfg, self.seed = tokenizer_file, cfg, seed
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.tokenizer_file)
        return self._tok

    def encode(self, ex: Example, rng: random.Random) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids + EOT)."""
        text = chat_text(ex.prompt) if rng.random() >= self.cfg.raw_prompt_prob else ex.prompt
        return self.tok.encode(text).ids, self.tok.encode(ex.answer).ids + [self.tok.token_to_id(EOT)]

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"train:{self.seed}:{step}")
        names, weights = zip(*self.cfg.task_weights.items())
        task = rng.choices(names, weights)[0]
        rows: list[tuple[list[int], list[int]]] = []
        max_p = canvas = 0
        while True:
            p, a = self.encode(sample(task, rng), rng)
            if not rows:
                canvas = canvas_length(rng, task, len(a), self.cfg.max_canvas, self.cfg.canvas_mix)
            if len(a) > canvas:
                continue
            mp = max(max_p, len(p))
            if rows and (len(rows) + 1) * (mp + canvas) > self.cfg.tokens_per_batch:
                break
            rows.append((p, a))
            max_p = mp
        return collate(rows, max_p, canvas, self.tok.token_to_id(EOS), rng, self.cfg.clean_prefix_prob, task)


def collate(rows: list[tuple[list[int], list[int]]], P: int, G: int, eos: int, rng: random.Random,
            clean_prefix_prob: float, task: str = "") -> dict:
    """Left-pad prompts to P, pad answers with EOS to the canvas G.

    Returns ids (B, P+G), positions, key_mask (False on padding), clean (B,) = response tokens at the
    start that are given rather than masked, and the plain values prompt_len = P and padded (so the
    training step needs no device-to-host sync to read them). The EOS padding of the canvas is a real target
    (LLaDA SFT trains on it); only the left padding is masked out of attention.
    """
    B = len(rows)
    ids = torch.full((B, P + G), eos, dtype=torch.long)
    key_mask = torch.ones(B, P + G, dtype=torch.bool)
    positions = torch.zeros(B, P + G, dtype=torch.long)
    clean = torch.zeros(B, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        off = P - len(p)
        ids[i, off:P] = torch.tensor(p)
        ids[i, P:P + len(a)] = torch.tensor(a)
        key_mask[i, :off] = False
        positions[i, off:] = torch.arange(len(p) + G)
        if rng.random() < clean_prefix_prob:
            clean[i] = rng.randint(0, len(a))
    return {"ids": ids, "positions": positions, "key_mask": key_mask, "clean": clean,
            "prompt_len": P, "padded": bool((~key_mask).any()), "task": task}


class StepDataset(torch.utils.data.Dataset):
    """Item i = the batch of step `start + i` (a map-style dataset: workers need no coordination)."""

    def __init__(self, maker: BatchMaker, start: int, stop: int):
        self.maker, self.start, self.stop = maker, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> dict:
        return self.maker(self.start + i)
