"""Retrieval accuracy by pair count, and a small CPU check that the retrieval curriculum learns.

    python -m dllm_cache_core.training.kv_probe eval dllm_cache_core/builtin/tiny --per-bucket 32
    python -m dllm_cache_core.training.kv_probe learn --out /tmp/kvcheck --minutes 6

`eval` prints held-out kv_retrieval accuracy (blocks of 32, one token per step, greedy) in pair-count
buckets, so one sees whether a model fails to match-then-copy at all or only over long contexts.
`learn` trains a ~0.5M-parameter model from scratch on retrieval only with the curriculum held at its
first stage (1-4 pairs, tight canvases, answer weight 4) for a few CPU minutes, and reports its
accuracy on held-out 1-4-pair problems before and after: evidence, not a unit test.
"""
from __future__ import annotations

import argparse
import json
import random
import time

from ..tasks import sample

BUCKETS = ((1, 4), (5, 12), (13, 25), (26, 50))


def kv_eval_set(lo: int, hi: int, size: int, seed: int = 0):
    rng = random.Random(f"kvprobe:{lo}:{hi}:{seed}")
    return [sample("kv_retrieval", rng, "test", min_pairs=lo, max_pairs=hi) for _ in range(size)]


def kv_accuracy(model_dir: str, buckets=BUCKETS, size: int = 32, device: str = "cpu") -> dict[str, float]:
    from ..config import CacheConfig, GenerationConfig
    from ..eval import encode_prompts, run
    from ..models.loading import load_model

    model, tok = load_model(model_dir, device=device, dtype="float32")
    out = {}
    for lo, hi in buckets:
        exs = kv_eval_set(lo, hi, size)
        res = run(model, tok, encode_prompts(tok, exs), GenerationConfig(gen_length=32, block_length=32),
                  CacheConfig(), 64)
        out[f"{lo}-{hi}"] = round(sum(t.strip() == e.answer for t, e in zip(res.texts, exs)) / size, 3)
    return out


def learn(out: str, minutes: float, steps: int, size: int, init_from: str | None = None, lr: float = 3e-3,
          tokens_per_batch: int = 4096) -> dict:
    from .data import DataConfig
    from .export import ArchConfig
    from .trainer import TrainConfig, train

    data = DataConfig(tokens_per_batch=tokens_per_batch, task_weights={"kv_retrieval": 1.0}, raw_prompt_prob=0.0,
                      clean_prefix_prob=0.0, kv_pairs_start=4, kv_pairs_ramp=(10 ** 9, 10 ** 9),
                      task_canvas_mix={"kv_retrieval": (1.0, 1.0, 1.0)}, answer_weight={"kv_retrieval": 4.0})
    if init_from:  # fine-tune an exported model (its architecture: the default one)
        arch = ArchConfig()
        before = kv_accuracy(init_from, ((1, 4),), size)
    else:  # a ~0.46M-parameter model from scratch
        arch = ArchConfig(d_model=128, n_layers=2, n_heads=4, mlp_hidden_size=256, max_sequence_length=1024)
        cfg0 = TrainConfig(out=f"{out}/init", steps=1, max_minutes=0.0, device="cpu", workers=0, eval_size=0,
                           export=f"{out}/init_model", arch=arch, data=data, resume=False)
        train(cfg0)  # exports the untrained weights (0 steps: the time budget is 0)
        before = kv_accuracy(f"{out}/init_model", ((1, 4),), size)
    print(json.dumps({"before": before}), flush=True)
    t = time.time()
    cfg = TrainConfig(out=f"{out}/run", steps=steps, max_minutes=minutes, lr=lr, warmup_steps=min(50, steps // 10 + 1),
                      device="cpu", workers=1, log_every=10 if init_from else 50, eval_size=0,
                      export=f"{out}/model", arch=arch, data=data, init_from=init_from)
    s = train(cfg)
    after = kv_accuracy(f"{out}/model", ((1, 4),), size)
    rep = {"before": before, "after": after, "steps": s["step"], "train_minutes": round((time.time() - t) / 60, 2)}
    print(json.dumps(rep), flush=True)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m dllm_cache_core.training.kv_probe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("model")
    e.add_argument("--per-bucket", type=int, default=32)
    e.add_argument("--device", default="cpu")
    lr = sub.add_parser("learn")
    lr.add_argument("--out", required=True)
    lr.add_argument("--minutes", type=float, default=6.0)
    lr.add_argument("--steps", type=int, default=1500)
    lr.add_argument("--size", type=int, default=100)
    lr.add_argument("--init-from", default=None)
    lr.add_argument("--lr", type=float, default=3e-3)
    lr.add_argument("--tokens-per-batch", type=int, default=4096)
    a = ap.parse_args()
    if a.cmd == "eval":
        print(json.dumps(kv_accuracy(a.model, BUCKETS, a.per_bucket, a.device)), flush=True)
    else:
        learn(a.out, a.minutes, a.steps, a.size, a.init_from, a.lr, a.tokens_per_batch)


if __name__ == "__main__":
    main()
