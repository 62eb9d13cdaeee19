"""Quality table: accuracy and speed of every cache policy on the trained builtin:tiny.

Per task (held-out instances), each policy runs with the fixed schedule (one token per step) and
with threshold 0.9; `none` with the same generation settings runs back to back as the reference for
token agreement and the wall-clock speedup. Rows: none, prefix, dual, dllm_cache (defaults; blocks of
32), d2cache defaults (one block, certainty prior sigma 10) and d2cache semi-AR (blocks of 32,
inflate_w 4). Unlike benchmarks/policy_table.py (random weights), a lost answer here is lost quality.

Usage: python benchmarks/quality_tiny.py [--size 25] [--tasks addition,sort] [--device cpu]
Writes benchmarks/results/quality_tiny.json (records) and .md (tables), after every task.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dllm_cache_core import CacheConfig, GenerationConfig, load_model  # noqa: E402
from dllm_cache_core.cache import policy_names  # noqa: E402
from dllm_cache_core.eval import Dataset, encode_prompts, run, summarize, warm_up  # noqa: E402
from dllm_cache_core.models.loading import resolve_path  # noqa: E402
from dllm_cache_core.tasks import TASKS, eval_set  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import write_markdown  # noqa: E402

# label -> (policy, generation overrides (gen_length filled per task), cache overrides)
ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "none": ("none", {"block_length": 32}, {}),
    "prefix": ("prefix", {"block_length": 32}, {}),
    "dual": ("dual", {"block_length": 32}, {}),
    "dllm_cache": ("dllm_cache", {"block_length": 32}, {}),
    "d2cache": ("d2cache", {"block_length": None, "certainty_prior_sigma": 10.0}, {}),
    "d2cache semi-AR": ("d2cache", {"block_length": 32}, {"inflate_w": 4}),
}
SCHEDULES = {"fixed": None, "threshold 0.9": 0.9}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def task_records(model, tok, task: str, size: int, device: str, rows: list[str]) -> list[dict[str, Any]]:
    t = TASKS[task]
    ds = Dataset(task, eval_set(task, size), t.check, t.gen_length)
    prompts = encode_prompts(tok, ds.examples)
    out = []
    for sched, thr in SCHEDULES.items():
        baselines: dict[str, Any] = {}
        for label in rows:
            policy, g_over, c_over = ROWS[label]
            g = {"gen_length": t.gen_length, "threshold": thr, **g_over}
            gen = GenerationConfig(**g)
            key = json.dumps(gen.to_dict(), sort_keys=True)
            if key not in baselines:
                warm_up(model, prompts, gen, CacheConfig())
                baselines[key] = run(model, tok, prompts, gen, CacheConfig(), size)
            base = baselines[key]
            cache = CacheConfig(policy=policy, **c_over)
            if policy == "none":
                res, ref = base, None
            else:
                warm_up(model, prompts, gen, cache)
                res, ref = run(model, tok, prompts, gen, cache, size), base
            s = summarize(ds, res, ref)
            s.pop("_correct")
            if ref is None:
                s.update(baseline_accuracy=s["accuracy"], baseline_wall_s=s["wall_s"], agreement=1.0,
                         measured_speedup=1.0, measured_cpu_speedup=1.0)
            rec = {"task": task, "size": size, "policy": policy, "label": label, "schedule": sched, "threshold": thr,
                   "gen_length": gen.gen_length, "block_length": gen.block_len, "steps": gen.total_steps,
                   "certainty_prior_sigma": gen.certainty_prior_sigma, "cache": cache.to_dict(), **s,
                   "device": device_name(device)}
            out.append(rec)
            print(f"{task:15s} {label:16s} {sched:14s} acc {s['accuracy']:.2f} (none {s['baseline_accuracy']:.2f}) "
                  f"agree {s['agreement']:.3f} nfe {s['nfe']:.1f} flops x{s['flops_speedup']:.2f} "
                  f"total x{s['flops_speedup_total']:.2f} wall x{s['measured_speedup']:.2f} "
                  f"cpu x{s['measured_cpu_speedup']:.2f}", flush=True)
    return out


def f2(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def auto_section(records: list[dict[str, Any]]) -> list[str]:
    """The `cache.policy: auto` job (benchmarks/quality_auto.py) against the `none` job on the same mix."""
    auto = [r for r in records if r["label"] == "auto (job)"]
    if not auto:
        return []
    cal = auto[0]["calibration"]
    worst = max(r["baseline_accuracy"] - r["accuracy"] for r in auto)
    lines = ["", "## `cache.policy: auto` on the task mix", "",
             f"One job over {sum(r['n'] for r in auto)} held-out rows of every task, shuffled "
             f"(`{auto[0].get('command', 'python benchmarks/quality_auto.py')}`), against a `none` job over the same "
             "rows: calibration on "
             f"{cal['rows']} of them chose **{cal['winner']}** (floors: token agreement >= {cal['min_agreement']}"
             + (f", score >= {cal['min_score_ratio']} x none's" if cal.get("min_score_ratio") else "") + "). "
             f"Largest per-task accuracy loss against `none`: {worst * 100:.1f} points.", "",
             "| candidate | token agreement | tokens/s | FLOPs speedup | score (contains) | meets floor |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {e['candidate']} | {f2(e['token_agreement'], '.3f')} | {f2(e['tokens_per_s'], '.1f')} | "
              f"{f2(e['flops_speedup'])} | {f2(e.get('score'))} | {'yes' if e['meets_floors'] else 'no'} |"
              for e in cal["table"]]
    return lines


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in records))
    keys = list(dict.fromkeys((r["label"], r["schedule"]) for r in records))
    by = {(r["task"], r["label"], r["schedule"]): r for r in records}
    lines = ["# Quality of each cache policy on builtin:tiny", "",
             f"Held-out instances per task: {meta['size']}; device: {meta['device']}; model sha256 "
             f"{meta['model_sha256'][:12]}; greedy; blocks of 32 unless noted (d2cache defaults: one block, "
             "certainty prior sigma 10). `fixed` = one token per step; `threshold 0.9` = Fast-dLLM "
             "parallel decoding. Command: `python benchmarks/quality_tiny.py --size "
             f"{meta['size']}{'' if meta['device'].startswith('cpu') else ' --device cuda'}`.", "",
             f"Accuracy on {meta['size']} instances has a standard error of up to {50 / meta['size'] ** 0.5:.0f} "
             "points: read small differences between policies as noise.", "", "## Exact-match accuracy", "",
             "| policy | schedule | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for label, sched in keys:
        cells = [f"{by[(t, label, sched)]['accuracy']:.2f}" if (t, label, sched) in by else "" for t in tasks]
        lines.append(f"| {label} | {sched} | " + " | ".join(cells) + " |")
    drops = [r for r in records if r["policy"] != "none" and r["baseline_accuracy"] - r["accuracy"] >= 0.15]
    lines += ["", "Rows at least 15 points below `none` with the same generation settings: " + (
        "; ".join(f"{r['task']} / {r['label']} / {r['schedule']}: {r['accuracy']:.2f} vs {r['baseline_accuracy']:.2f}"
                  for r in drops) or "none") + ". Where the model itself fails (accuracy ~0), token agreement "
              "is the only signal of a policy's drift."]
    lines += ["", "## Per task: accuracy, agreement with `none` (same schedule) and speed", "",
              "| task | policy | schedule | acc | acc none | agreement | nfe | FLOPs x | FLOPs x total | wall x "
              "| CPU x |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['label']} | {r['schedule']} | {r['accuracy']:.2f} | "
                     f"{r['baseline_accuracy']:.2f} | {r['agreement']:.3f} | {r['nfe']:.1f} | "
                     f"{r['flops_speedup']:.2f} | {r['flops_speedup_total']:.2f} | {f2(r['measured_speedup'])} | "
                     f"{f2(r['measured_cpu_speedup'])} |")
    lines += ["", "`acc none` is policy none with the row's generation settings (for the d2cache default row: "
              "one block with the certainty prior). FLOPs x = the cache's gain alone (same steps); FLOPs x total "
              "= against none at one token per step; wall x = measured wall-clock ratio against the `none` run "
              "of the same settings on the same machine; CPU x = the same ratio of process CPU time, steadier than "
              "wall time when other jobs share the machine (as they did for this run).", ""]
    return "\n".join(lines + auto_section(records)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=25)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_tiny"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 keeps CPU time a fair work measure when other jobs share the "
                         "machine (idle OpenMP threads spin and bill CPU time under contention)")
    ap.add_argument("--md-only", action="store_true", help="re-render the .md from the existing .json")
    a = ap.parse_args()
    if a.md_only:
        records = json.loads(Path(a.out + ".json").read_text())
        r0 = records[0]
        meta = {"size": r0["n"], "device": r0["device"], "model_sha256": r0["model_sha256"]}
        write_markdown(a.out + ".md", markdown(records, meta))
        return
    if a.device == "cpu":
        import torch

        torch.set_num_threads(a.threads)
    have = set(policy_names())
    rows = [r for r in a.rows.split(",") if ROWS[r][0] in have]
    missing = [r for r in a.rows.split(",") if r not in rows]
    model, tok = load_model(a.model, device=a.device, dtype="float32")
    sha = hashlib.sha256((resolve_path(a.model) / "model.safetensors").read_bytes()).hexdigest()
    meta = {"size": a.size, "device": device_name(a.device) + (f", {a.threads} thread(s)" if a.device == "cpu" else ""),
            "model": a.model, "model_sha256": sha,
            "missing_policies": missing, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    records: list[dict[str, Any]] = []
    for task in a.tasks.split(","):
        records += [dict(r, device=meta["device"], model_sha256=sha)
                    for r in task_records(model, tok, task, a.size, a.device, rows)]
        Path(a.out + ".json").write_text(json.dumps(records, indent=1) + "\n")
        write_markdown(a.out + ".md", markdown(records, meta))
    if missing:
        print(f"policies not available: {', '.join(missing)}")


if __name__ == "__main__":
    main()
