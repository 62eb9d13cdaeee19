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

from ..tasks import KV_MAX_PAIRS, TASKS, Example, sample
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
    task_canvas_mix: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """Per-task override of canvas_mix, e.g. {"kv_retrieval": [0.8, 0.95, 1.0]}: retrieval answers are
    1-5 tokens, so a tight (32-token) canvas makes them ~10% of the trained canvas instead of ~5% at 64."""
    kv_pairs_start: int = KV_MAX_PAIRS
    """Retrieval curriculum: the largest pair count of a retrieval batch at the start of kv_pairs_ramp;
    it grows linearly to 50 over the ramp. 50 (the default) = no curriculum: every sample draws 1..50
    pairs as before. With a curriculum, each retrieval batch draws its cap m ~ U(1, current largest)
    and its samples n ~ U(ceil(m/2), m) pairs: contexts of one batch have similar lengths (little
    padding; a short-context batch holds several times more samples, hence more answer tokens per
    step), and short contexts stay in the mix after the ramp (m <= 8 in 16% of batches)."""
    kv_pairs_ramp: tuple[int, int] = (0, 0)
    """Steps (absolute, like the batches) between which the retrieval cap grows from kv_pairs_start to
    50; before the first the cap is kv_pairs_start, from the second on 50."""
    answer_weight: dict[str, float] = field(default_factory=dict)
    """Per-task loss weight of the answer tokens (answer + end-of-turn) relative to the EOS padding of
    the canvas (weight 1), e.g. {"kv_retrieval": 4}. Missing tasks: 1 = LLaDA's SFT objective exactly.
    A weight != 1 keeps the objective's form (masked positions only, 1/t, divided by the number of
    response tokens) and only re-weights which response tokens matter: still a masked-diffusion
    loss, no longer the uniform-token ELBO of LLaDA's SFT; the EOS padding is still trained."""

    def __post_init__(self) -> None:
        m = tuple(float(x) for x in self.canvas_mix)
        object.__setattr__(self, "canvas_mix", m)
        if len(m) != 3 or not 0 <= m[0] <= m[1] <= m[2] <= 1:
            raise ValueError(f"data.canvas_mix={self.canvas_mix!r}: three non-decreasing probabilities in [0, 1]")
        tm = {}
        for t, mix in self.task_canvas_mix.items():
            mix = tuple(float(x) for x in mix)
            if len(mix) != 3 or not 0 <= mix[0] <= mix[1] <= mix[2] <= 1:
                raise ValueError(f"data.task_canvas_mix[{t!r}]={mix!r}: three non-decreasing probabilities in [0, 1]")
            tm[t] = mix
        object.__setattr__(self, "task_canvas_mix", tm)
        ramp = tuple(int(x) for x in self.kv_pairs_ramp)
        object.__setattr__(self, "kv_pairs_ramp", ramp)
        if len(ramp) != 2 or ramp[0] < 0 or ramp[1] < ramp[0]:
            raise ValueError(f"data.kv_pairs_ramp={self.kv_pairs_ramp!r}: two steps, start <= end")
        if not 1 <= self.kv_pairs_start <= KV_MAX_PAIRS:
            raise ValueError(f"data.kv_pairs_start={self.kv_pairs_start}: 1..{KV_MAX_PAIRS}")
        if any(w <= 0 for w in self.answer_weight.values()):
            raise ValueError(f"data.answer_weight={self.answer_weight!r}: weights must be > 0")
        bad = sorted((set(self.task_weights) | set(self.task_canvas_mix) | set(self.answer_weight)) - set(TASKS))
        if bad:
            raise ValueError(f"data: unknown task {bad[0]!r}; allowed: {', '.join(TASKS)}")

    def kv_cap(self, step: int) -> int:
        """Largest retrieval pair count at `step` under the curriculum."""
        a, b = self.kv_pairs_ramp
        if step >= b:
            return KV_MAX_PAIRS if step >= a else self.kv_pairs_start
        if step < a:
            return self.kv_pairs_start
        return round(self.kv_pairs_start + (KV_MAX_PAIRS - self.kv_pairs_start) * (step - a) / (b - a))

    @property
    def kv_curriculum(self) -> bool:
        return self.kv_pairs_start < KV_MAX_PAIRS


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
        kw = {}
        if task == "kv_retrieval" and self.cfg.kv_curriculum:
            m = rng.randint(1, self.cfg.kv_cap(step))
            kw = {"min_pairs": -(-m // 2), "max_pairs": m}
        mix = self.cfg.task_canvas_mix.get(task, self.cfg.canvas_mix)
        rows: list[tuple[list[int], list[int]]] = []
        max_p = canvas = 0
        while True:
            p, a = self.encode(sample(task, rng, **kw), rng)
            if not rows:
                canvas = canvas_length(rng, task, len(a), self.cfg.max_canvas, mix)
            if len(a) > canvas:
                continue
            mp = max(max_p, len(p))
            if rows and (len(rows) + 1) * (mp + canvas) > self.cfg.tokens_per_batch:
                break
            rows.append((p, a))
            max_p = mp
        return collate(rows, max_p, canvas, self.tok.token_to_id(EOS), rng, self.cfg.clean_prefix_prob, task,
                       self.cfg.answer_weight.get(task, 1.0))


def collate(rows: list[tuple[list[int], list[int]]], P: int, G: int, eos: int, rng: random.Random,
            clean_prefix_prob: float, task: str = "", answer_weight: float = 1.0) -> dict:
    """Left-pad prompts to P, pad answers with EOS to the canvas G.

    Returns ids (B, P+G), positions, key_mask (False on padding), clean (B,) = response tokens at the
    start that are given rather than masked, and the plain values prompt_len = P and padded (so the
    training step needs no device-to-host sync to read them). The EOS padding of the canvas is a real target
    (LLaDA SFT trains on it); only the left padding is masked out of attention. answer_len (B,) counts
    the answer + end-of-turn tokens; answer_weight (a float) is their loss weight against the padding's 1.
    """
    B = len(rows)
    ids = torch.full((B, P + G), eos, dtype=torch.long)
    key_mask = torch.ones(B, P + G, dtype=torch.bool)
    positions = torch.zeros(B, P + G, dtype=torch.long)
    clean = torch.zeros(B, dtype=torch.long)
    answer_len = torch.tensor([len(a) for _, a in rows], dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        off = P - len(p)
        ids[i, off:P] = torch.tensor(p)
        ids[i, P:P + len(a)] = torch.tensor(a)
        key_mask[i, :off] = False
        positions[i, off:] = torch.arange(len(p) + G)
        if rng.random() < clean_prefix_prob:
            clean[i] = rng.randint(0, len(a))
    return {"ids": ids, "positions": positions, "key_mask": key_mask, "clean": clean,
            "prompt_len": P, "padded": bool((~key_mask).any()), "task": task, "answer_len": answer_len,
            "answer_weight": float(answer_weight)}


class StepDataset(torch.utils.data.Dataset):
    """Item i = the batch of step `start + i` (a map-style dataset: workers need no coordination)."""

    def __init__(self, maker: BatchMaker, start: int, stop: int):
        self.maker, self.start, self.stop = maker, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> dict:
        return self.maker(self.start + i)
