"""Per-task held-out accuracy of an exported model folder with vanilla decoding (policy `none`).

Run at the end of training (on the GPU, where it costs seconds) so that one lease both trains and
checks the model. Three decodings per task: one block with a fixed schedule (one token per step),
semi-AR blocks of 32 with the fixed schedule, and blocks of 32 with threshold 0.9.
"""
from __future__ import annotations

from typing import Any

from ..config import CacheConfig, GenerationConfig
from ..eval import encode_prompts, run
from ..tasks import TASKS, eval_set

MODES = {"one_block": {}, "block32": {"block_length": 32}, "block32_t0.9": {"block_length": 32, "threshold": 0.9}}


def evaluate_tasks(model_dir: str, size: int, device: str = "cpu", batch_size: int = 256,
                   tasks: tuple[str, ...] = tuple(TASKS), modes: tuple[str, ...] = tuple(MODES)) -> dict[str, Any]:
    """{task: {mode: accuracy, ..., 'failures': first few wrong outputs}}."""
    from ..models.loading import load_model

    model, tok = load_model(model_dir, device=device, dtype="float32")
    out: dict[str, Any] = {}
    for name in tasks:
        task = TASKS[name]
        exs = eval_set(name, size)
        prompts = encode_prompts(tok, exs)
        rec: dict[str, Any] = {"n": size}
        for mode in modes:
            gen = GenerationConfig(gen_length=task.gen_length, **MODES[mode])
            res = run(model, tok, prompts, gen, CacheConfig(), batch_size)
            ok = [task.check(t, e) for t, e in zip(res.texts, exs)]
            rec[mode] = round(sum(ok) / len(ok), 4)
            rec[f"{mode}_nfe"] = round(sum(s.nfe for s in res.stats) / len(ok), 2)
            if mode == "block32":
                rec["failures"] = [{"prompt": e.prompt[-80:], "answer": e.answer, "output": t}
                                   for e, t, k in zip(exs, res.texts, ok) if not k][:3]
        out[name] = rec
        print(name, {k: v for k, v in rec.items() if k != "failures"}, flush=True)
    return out
