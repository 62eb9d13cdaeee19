"""Quality harness: accuracy and speed of one cache policy against vanilla decoding.

    python -m dllm_cache_core.eval dataset.name=kv_retrieval cache=dual generation.block_length=32 \
        generation.threshold=0.9 model=builtin:tiny dataset.size=100

Datasets: the synthetic tasks (`dllm_cache_core.tasks`, held-out split) or a GSM8K-style JSONL file
(`dataset.path=...`, fields question/answer, answer extracted after '####'). Unless the policy is
`none`, the same prompts also run with `none` and the same generation settings, back to back, for
token agreement and the measured (wall-clock) speedup. Prints and writes a JSON summary.
Values are parsed by dllm_cache_core.overrides and GSM8K answers scored by dllm_cache_core.scoring,
the same code the batch pipeline uses.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .cache.registry import param_names
from .config import CacheConfig, GenerationConfig
from .overrides import parse_value
from .scoring import score_gsm8k
from .stats import token_agreement
from .tasks import Example, eval_set, get_task

RUN_KEYS = {"model": "builtin:tiny", "device": "cpu", "dtype": "float32", "batch_size": 32, "seed": 0,
            "output": None, "baseline": True, "chat_template": True, "samples": True}
DATASET_KEYS = {"name": "kv_retrieval", "size": 100, "seed": 0, "path": None}


# -- overrides ----------------------------------------------------------------------------------
def parse_overrides(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`a.b=v` pairs -> {'run': {...}, 'dataset': {...}, 'generation': {...}, 'cache': {...}};
    `cache=dual` means `cache.policy=dual`. Unknown keys are errors naming the allowed ones."""
    out: dict[str, dict[str, Any]] = {"run": {}, "dataset": {}, "generation": {}, "cache": {}}
    gen_keys = {f.name for f in fields(GenerationConfig)}
    cache_keys = {"policy", *param_names()}
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected key=value")
        key, raw = arg.split("=", 1)
        val = parse_value(raw)
        if key == "cache":
            key = "cache.policy"
        head, _, rest = key.partition(".")
        allowed = {"dataset": DATASET_KEYS, "generation": gen_keys, "cache": cache_keys}.get(head)
        if rest and allowed is not None:
            if rest not in allowed:
                raise ValueError(f"{key}: unknown key; allowed: {', '.join(sorted(allowed))}")
            out[head][rest] = val
        elif not rest and head in RUN_KEYS:
            out["run"][head] = val
        else:
            raise ValueError(f"{key}: unknown key; allowed: {', '.join(RUN_KEYS)}, dataset.*, generation.*, cache.*")
    return out


# -- datasets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    name: str
    examples: list[Example]
    check: Callable[[str, Example], bool]
    gen_length: int


def load_jsonl(path: str, size: Optional[int]) -> list[Example]:
    """GSM8K layout: {"question": ..., "answer": "... #### 42"} (or prompt/answer)."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                r = json.loads(line)
                rows.append(Example("gsm8k", r.get("question", r.get("prompt")), str(r["answer"]), f"jsonl:{i}"))
            if size and len(rows) >= size:
                break
    return rows


def load_dataset(d: dict[str, Any]) -> Dataset:
    d = {**DATASET_KEYS, **d}
    if d["path"]:
        return Dataset(Path(d["path"]).stem, load_jsonl(d["path"], d["size"]),
                       lambda text, ex: score_gsm8k(text, ex.answer).score == 1.0, 256)
    task = get_task(d["name"])
    return Dataset(task.name, eval_set(task.name, int(d["size"]), int(d["seed"])), task.check, task.gen_length)


# -- running ------------------------------------------------------------------------------------
@dataclass
class RunResult:
    texts: list[str]
    token_ids: list[list[int]]
    stats: list[Any]
    wall_s: float
    cpu_s: float = 0.0
    """Process CPU time of the generate() calls: on a shared CPU machine it tracks the work done
    better than wall time, which other load inflates."""


def encode_prompts(tok, examples: Sequence[Example], chat_template: bool = True) -> list[list[int]]:
    if not chat_template:
        return [list(tok(e.prompt)["input_ids"]) for e in examples]
    texts = [tok.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True,
                                     tokenize=False) for e in examples]
    return [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def run(model, tok, prompts: list[list[int]], gen: GenerationConfig, cache: CacheConfig, batch_size: int,
        seed: int = 0) -> RunResult:
    """Generate in batches (order kept), timing only the generate() calls."""
    from .decoding.generate import generate

    texts, ids, stats, wall, cpu = [], [], [], 0.0, 0.0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = generate(model, chunk, gen, cache, seed=seed, row_ids=range(i, i + len(chunk)))
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        for o in outs:
            ids.append(o.token_ids)
            stats.append(o.stats)
            texts.append(tok.decode(o.token_ids, skip_special_tokens=True))
    return RunResult(texts, ids, stats, wall, cpu)


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def summarize(ds: Dataset, res: RunResult, base: Optional[RunResult]) -> dict[str, Any]:
    """Accuracy, mean nfe, tokens/s (tokens before the stop token / wall), mean FLOPs speedups, and
    against the `none` run: token agreement, the wall-clock speedup and the process-CPU-time speedup
    (the steadier of the two on a shared CPU machine; meaningless on GPU, where the host waits)."""
    correct = [ds.check(t, e) for t, e in zip(res.texts, ds.examples)]
    n_tok = sum(s.num_generated_tokens for s in res.stats)
    out = {
        "accuracy": _mean([float(c) for c in correct]), "n": len(correct),
        "nfe": _mean([s.nfe for s in res.stats]), "tokens_per_s": n_tok / res.wall_s if res.wall_s else 0.0,
        "flops_speedup": _mean([s.flops_speedup for s in res.stats]),
        "flops_speedup_total": _mean([s.flops_speedup_total for s in res.stats]), "wall_s": res.wall_s,
    }
    if base is not None:
        base_correct = [ds.check(t, e) for t, e in zip(base.texts, ds.examples)]
        out["baseline_accuracy"] = _mean([float(c) for c in base_correct])
        out["baseline_wall_s"] = base.wall_s
        out["agreement"] = _mean([token_agreement(a, b) for a, b in zip(res.token_ids, base.token_ids)])
        out["measured_speedup"] = base.wall_s / res.wall_s if res.wall_s else 0.0
        out["measured_cpu_speedup"] = base.cpu_s / res.cpu_s if res.cpu_s else 0.0
    out["_correct"] = correct
    return out


def warm_up(model, prompts: list[list[int]], gen: GenerationConfig, cache: CacheConfig) -> None:
    """One tiny call first, so one-time costs (allocator, kernels) are in neither timing."""
    from .decoding.generate import generate

    generate(model, prompts[:1], gen, cache)


def evaluate(argv: Sequence[str]) -> dict[str, Any]:
    from .models.loading import load_model

    o = parse_overrides(argv)
    r = {**RUN_KEYS, **o["run"]}
    ds = load_dataset(o["dataset"])
    gen = GenerationConfig(**{"gen_length": ds.gen_length, **o["generation"]})
    cache = CacheConfig(**o["cache"])
    model, tok = load_model(r["model"], device=r["device"], dtype=r["dtype"])
    prompts = encode_prompts(tok, ds.examples, bool(r["chat_template"]))
    none = CacheConfig()
    warm_up(model, prompts, gen, cache)
    base = None
    if r["baseline"] and cache.policy != "none":
        base = run(model, tok, prompts, gen, none, int(r["batch_size"]), int(r["seed"]))
    res = run(model, tok, prompts, gen, cache, int(r["batch_size"]), int(r["seed"]))
    s = summarize(ds, res, base)
    correct = s.pop("_correct")
    if cache.policy == "none":
        s.update(baseline_accuracy=s["accuracy"], agreement=1.0, measured_speedup=1.0, measured_cpu_speedup=1.0)
    report = {"model": r["model"], "dataset": ds.name, "device": str(model.device), "dtype": r["dtype"],
              "generation": gen.to_dict(), "cache": cache.to_dict(), **s}
    if r["samples"]:
        report["samples"] = [{"prompt": e.prompt, "answer": e.answer, "output": t, "correct": c}
                             for e, t, c in zip(ds.examples, res.texts, correct)]
    path = Path(r["output"] or f"out/eval/{ds.name}_{cache.policy}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    report["output"] = str(path)
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    try:
        rep = evaluate(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    short = {k: v for k, v in rep.items() if k != "samples"}
    print(json.dumps(short, indent=1))


if __name__ == "__main__":
    main()
