"""`cache.policy: auto` on the embedded model's task mix: one job over held-out rows of every task.

Two jobs over the same JSONL (held-out instances of every task, shuffled; greedy, threshold 0.9
parallel decoding, blocks of 32, stop at EOS, gen_length = the longest task canvas): `cache: none` and `cache: auto`
(default candidates and floors, 64 calibration rows). Accuracy per task uses each task's own checker
on the written generations (as benchmarks/quality_tiny.py does); agreement is the token agreement of
each row with the `none` job's row. Records go into benchmarks/results/quality_tiny.json with label
`auto (job)` (replacing earlier ones) and the markdown is re-rendered.

    python benchmarks/quality_auto.py [--per-task 34] [--workdir /tmp/quality_auto]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dllm_cache_core.stats import token_agreement  # noqa: E402
from dllm_cache_core.tasks import TASKS, Example, eval_set  # noqa: E402

LABEL = "auto (job)"


def write_input(path: Path, per_task: int) -> dict[str, Example]:
    rows, examples = [], {}
    for task in TASKS:
        for i, ex in enumerate(eval_set(task, per_task)):
            rid = f"{task}-{i:03d}"
            examples[rid] = ex
            rows.append({"id": rid, "prompt": ex.prompt, "answer": ex.answer, "task": task})
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return examples


def job(name: str, inp: Path, out: Path, cache: str, gen_length: int,
        calibration: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from pipeline.runner import run
    from pipeline.spec import load_spec

    spec = load_spec(data={
        "name": name, "model": {"path": "builtin:tiny", "dtype": "float32"},
        "input": {"path": str(inp), "format": "jsonl", "chat_template": True},
        "output": {"path": str(out), "on_existing": "overwrite", "min_rows_per_file": 1000},
        "generation": {"gen_length": gen_length, "steps": gen_length, "block_length": 32, "threshold": 0.9},
        "cache": cache, "compute": {"num_actors": 1, "batch_size": 16, "length_grouping": 4, "progress_interval_s": 30},
        "evaluation": {"answer_column": "answer", "scorer": "contains", "group_by": ["task"]},
        **({"calibration": calibration} if calibration else {})})
    t0 = time.time()
    res = run(spec, stream=sys.stderr)
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    return {"rows": rows, "wall_s": time.time() - t0, "engine_s": res.engine_s, "run": res.to_dict(),
            "job": json.loads((out / "_job.json").read_text())}


def records(examples: dict[str, Example], none: dict, auto: dict) -> list[dict[str, Any]]:
    cal = auto["job"]["calibration"]
    out = []
    for task in TASKS:
        ids = [i for i, ex in examples.items() if ex.task == task]
        acc = lambda res: sum(TASKS[task].check(res["rows"][i]["generation"] or "", examples[i]) for i in ids) / len(ids)  # noqa: E731
        a_rows, n_rows = [auto["rows"][i] for i in ids], [none["rows"][i] for i in ids]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out.append({
            "task": task, "label": LABEL, "policy": cal["winner"], "schedule": "threshold 0.9", "threshold": 0.9, "n": len(ids),
            "accuracy": acc(auto), "baseline_accuracy": acc(none),
            "agreement": mean([token_agreement(a["generation_token_ids"] or [], n["generation_token_ids"] or [])
                               for a, n in zip(a_rows, n_rows)]),
            "nfe": mean([a["nfe"] for a in a_rows]),
            "flops_speedup": sum(n["flops"] for n in n_rows) / sum(a["flops"] for a in a_rows),
            "flops_speedup_total": mean([a["flops_speedup_total"] for a in a_rows]),
            # engine seconds per row run by the job (the auto job's main run excludes the calibration rows)
            "measured_speedup": (none["engine_s"] / none["run"]["rows_run"]) / (auto["engine_s"] / auto["run"]["rows_run"])
            if auto["engine_s"] else None,
            "measured_cpu_speedup": None, "calibration": cal,
            "calibration_wall_s": None, "job_wall_s": {"none": none["wall_s"], "auto": auto["wall_s"]},
            "command": "python benchmarks/quality_auto.py " + " ".join(sys.argv[1:])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-task", type=int, default=34, help="held-out rows per task (6 tasks)")
    ap.add_argument("--workdir", default="/tmp/quality_auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_tiny"))
    ap.add_argument("--calibration-rows", type=int, default=None, help="calibration.calibration_rows (default 64)")
    ap.add_argument("--min-score-ratio", type=float, default=None,
                    help="calibration.min_score_ratio: the candidate's score on the calibration rows / none's")
    a = ap.parse_args()
    import ray
    import torch

    import quality_tiny

    torch.set_num_threads(1)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "mix.jsonl"
    examples = write_input(inp, a.per_task)
    gen_length = max(t.gen_length for t in TASKS.values())
    gen_length = -(-gen_length // 32) * 32
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    none = job("quality-none", inp, work / "none", "none", gen_length)
    calibration = {k: v for k, v in (("calibration_rows", a.calibration_rows),
                                     ("min_score_ratio", a.min_score_ratio)) if v is not None}
    auto = job("quality-auto", inp, work / "auto", "auto", gen_length, calibration)
    recs = records(examples, none, auto)
    path = Path(a.out + ".json")
    old = [r for r in json.loads(path.read_text()) if r.get("label") != LABEL] if path.exists() else []
    merged = old + recs
    path.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    r0 = old[0] if old else recs[0]
    meta = {"size": r0.get("n"), "device": r0.get("device", "cpu"), "model_sha256": r0.get("model_sha256", "")}
    quality_tiny.write_markdown(a.out + ".md", quality_tiny.markdown(merged, meta))
    for r in recs:
        print(f"{r['task']:15s} auto={r['policy']} acc {r['accuracy']:.3f} none {r['baseline_accuracy']:.3f} "
              f"agree {r['agreement']:.3f} flops x{r['flops_speedup']:.2f}")


if __name__ == "__main__":
    main()
