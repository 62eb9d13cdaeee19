"""Continuous vs static batching on non-uniform work: tokens/s, rows/s and row-step utilisation.

Row-step utilisation = useful row-steps (a row decoding in a step) / slot-steps paid for (slots x
engine steps). It is reported overall, while rows are still queued (the steady state) and for the
final drain (no row left to admit) separately.

CPU workload (default): the embedded model builtin:tiny on its own task mix, held-out instances of
every task in dllm_cache_core/tasks.py (--per-task each, shuffled with a fixed seed), chat template,
gen_length 256 in blocks of 32, stop at EOS; policies none and dual, fixed schedule (one token per
step) and threshold 0.9; the same slots for both schedulings (static = batches of `slots` rows that
wait for their slowest row at every block and until every row stopped).

    python benchmarks/bench_continuous.py                       # CPU, writes results/continuous.{json,md}

GPU workload (--gpu): a random checkpoint of LLaDA-8B's shape (benchmarks/make_random_checkpoint.py).
Random weights never emit a stop token, so each row gets a block budget (DecodeLoop rows' 4th field,
Row.max_blocks): row i finishes after b_i blocks, b_i drawn uniformly from {ceil(n/8), ..., n} for n =
gen_length / block_length blocks (seeded per row), i.e. output lengths spread uniformly from about
gen_length / 8 to gen_length; the row then leaves exactly as if its block b_i had held a stop token.
Prompts: random token ids, lengths uniform in [--prompt-min, --prompt-max]. Schedule: threshold
(default 0.9; on random weights confidences are ~1/vocab, so it commits the one top token per step)
or --threshold none for a fixed schedule (steps = gen_length). Tokens committed per step are therefore
NOT spread on this workload (one per step); only lengths are.

    python benchmarks/make_random_checkpoint.py --shape llada-8b --out /tmp/ckpt/llada-8b
    python benchmarks/bench_continuous.py --gpu --ckpt /tmp/ckpt/llada-8b --slots 32,64 \\
        --policies dual,dllm_cache --rows-per-slot 4

Every run also checks that continuous and static scheduling produced the same tokens (same_tokens).
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dllm_cache_core import CacheConfig, GenerationConfig, load_model  # noqa: E402
from dllm_cache_core.decoding.generate import generate_rows  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import block_budget, write_markdown  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KEY = ("device", "model", "workload", "scheduling", "policy", "threshold", "slots")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return "cpu"


def task_mix(tok, per_task: int, seed: int = 0) -> list[list[int]]:
    from dllm_cache_core.eval import encode_prompts
    from dllm_cache_core.tasks import TASKS, eval_set

    examples = [ex for t in TASKS for ex in eval_set(t, per_task)]
    random.Random(seed).shuffle(examples)
    return encode_prompts(tok, examples)


def run_once(model, prompts: list[list[int]], budgets: Optional[list[int]], gen: GenerationConfig,
             cache: CacheConfig, slots: int, device: str) -> dict[str, Any]:
    """One timed pass of every row. Static: one generate() per batch of `slots` rows in arrival order
    (the batch's canvas as wide as its longest prompt: what a batch job did per batch). Continuous:
    one generate_rows() over all rows with `slots` slots (rows grouped by prompt-width bucket)."""
    loops: list = []
    outs: list = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    if gen.scheduling == "static":
        for i in range(0, len(prompts), slots):
            chunk = prompts[i:i + slots]
            outs += generate_rows(model, chunk, gen, cache, row_ids=list(range(i, i + len(chunk))), loops_out=loops,
                                  block_budgets=None if budgets is None else budgets[i:i + slots])
    else:
        outs = generate_rows(model, prompts, gen, cache, row_ids=list(range(len(prompts))), loops_out=loops,
                             block_budgets=budgets)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    paid_q = sum(lp.utilisation.slots * lp.utilisation.steps_queued for lp in loops)
    paid_d = sum(lp.utilisation.slots * lp.utilisation.steps_drain for lp in loops)
    use_q = sum(lp.utilisation.useful_queued for lp in loops)
    use_d = sum(lp.utilisation.useful_drain for lp in loops)
    tokens = sum(o.stats.num_generated_tokens for o in outs)
    return {
        "wall_s": round(wall, 4), "tokens": tokens, "tokens_per_s": round(tokens / wall, 3),
        "rows_per_s": round(len(prompts) / wall, 4),
        # CPU seconds of this process: on a shared machine wall time swings with other load
        "cpu_s": round(cpu, 3), "tokens_per_cpu_s": round(tokens / cpu, 3),
        "row_step_utilization": round((use_q + use_d) / max(paid_q + paid_d, 1), 4),
        "utilization_while_queued": round(use_q / paid_q, 4) if paid_q else None,
        "utilization_drain": round(use_d / paid_d, 4) if paid_d else None,
        "engine_steps": sum(lp.utilisation.engine_steps for lp in loops),
        "steps_while_queued": sum(lp.utilisation.steps_queued for lp in loops),
        "steps_drain": sum(lp.utilisation.steps_drain for lp in loops),
        "forwards": sum(lp.utilisation.forwards for lp in loops), "useful_row_steps": use_q + use_d,
        "canvases": len(loops),
        "finish_reasons": {r: sum(o.stats.finish_reason == r for o in outs)
                           for r in sorted({o.stats.finish_reason for o in outs})},
        "_tokens": [o.token_ids for o in outs],
    }


def save(records: list[dict[str, Any]], path: Path) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    keep = {tuple(r.get(k) for k in KEY): r for r in old}
    for r in records:
        keep[tuple(r.get(k) for k in KEY)] = r
    path.write_text(json.dumps(list(keep.values()), indent=1) + "\n")
    write_table(list(keep.values()), path.with_suffix(".md"))


def write_table(records: list[dict[str, Any]], path: Path) -> None:
    lines = ["# Continuous vs static batching", "",
             "Written by benchmarks/bench_continuous.py (its docstring defines the workloads and measures). "
             "Utilisation = useful row-steps / (slots x engine steps); `queued` = steps while rows were "
             "still waiting for a slot, `drain` = the steps after the last admission.", ""]
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["device"], r["model"], r["workload"]), []).append(r)
    for (dev, model, wl), rs in groups.items():
        lines += [f"## {model} on {dev}: {wl}", "",
                  f"gen_length {rs[0].get('gen_length')}, blocks of "
                  f"{rs[0].get('block_length')}, {rs[0].get('threads', '-')} CPU threads; command: "
                  f"`{rs[0].get('command', '')}`", "",
                  "| policy | schedule | slots | scheduling | rows | tokens/s | rows/s | tokens/CPU-s | utilisation | queued | "
                  "drain | engine steps | speedup (wall) | speedup (CPU) | same tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rs = sorted(rs, key=lambda r: (r["policy"], str(r["threshold"]), r["slots"], r["scheduling"] != "static"))
        base = {(r["policy"], r["threshold"], r["slots"]): r for r in rs if r["scheduling"] == "static"}
        for r in rs:
            b = base.get((r["policy"], r["threshold"], r["slots"]))
            sp = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b and r["scheduling"] != "static" else ""
            spc = f"{r['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x" if (
                b and r["scheduling"] != "static" and b.get("tokens_per_cpu_s")) else ""
            sched = "fixed" if r["threshold"] is None else f"threshold {r['threshold']}"
            fmt = (lambda v: "-" if v is None else f"{v:.3f}")
            tpc = r.get("tokens_per_cpu_s")
            lines.append(f"| {r['policy']} | {sched} | {r['slots']} | {r['scheduling']} | {r.get('rows', '-')} | {r['tokens_per_s']:.1f} | "
                         f"{r['rows_per_s']:.2f} | {'-' if tpc is None else f'{tpc:.1f}'} | "
                         f"{r['row_step_utilization']:.3f} | {fmt(r['utilization_while_queued'])} | "
                         f"{fmt(r['utilization_drain'])} | {r['engine_steps']} | {sp} | {spc} | "
                         f"{r.get('same_tokens', '')} |")
        lines.append("")
    write_markdown(path, "\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="LLaDA-8B-shaped random checkpoint on CUDA")
    ap.add_argument("--ckpt", default=None, help="--gpu: checkpoint folder (make_random_checkpoint.py)")
    ap.add_argument("--device", default=None, help="--gpu workload on another device (e.g. cpu, a dry run)")
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--policies", default="none,dual")
    ap.add_argument("--thresholds", default="0.9,none", help="comma list; none = fixed schedule")
    ap.add_argument("--slots", default="16")
    ap.add_argument("--per-task", type=int, default=20, help="CPU: held-out rows per task (6 tasks)")
    ap.add_argument("--rows-per-slot", type=int, default=4, help="GPU: rows = slots x this")
    ap.add_argument("--static-rows-per-slot", type=int, default=None,
                    help="GPU: static runs only the first slots x this rows (its rate does not depend on how "
                         "many batches it runs; continuous needs many rows per slot for its queued phase to "
                         "dominate the final drain); same_tokens then compares those rows")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads")
    ap.add_argument("--out", default=str(RESULTS / "continuous.json"))
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if a.gpu else "cpu")
    if a.gpu:
        if not a.ckpt:
            raise SystemExit("--gpu needs --ckpt (benchmarks/make_random_checkpoint.py --shape llada-8b)")
        model, tok = load_model(a.ckpt, device=device, dtype="bfloat16" if device.startswith("cuda") else "float32")
        model_name = f"{Path(a.ckpt).name} (random weights)"
        workload = "random prompts, block budgets uniform 1/8..1 of gen_length"
    else:
        torch.set_num_threads(a.threads)
        model, tok = load_model(a.model, device="cpu", dtype="float32")
        model_name, workload = a.model, f"task mix ({a.per_task} held-out rows per task, stop at EOS)"
    G, BL = a.gen_length, a.block_length
    nb = G // BL
    thresholds = [None if t == "none" else float(t) for t in a.thresholds.split(",")]
    cmd = "python benchmarks/bench_continuous.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for slots in [int(s) for s in a.slots.split(",")]:
        budgets = None
        if a.gpu:
            n = slots * a.rows_per_slot
            rng = random.Random(0)
            vocab_hi = min(model.config.vocab_size, model.config.mask_id, model.config.eos_id)
            lo = min(1000, vocab_hi // 8)  # ordinary token ids, below every special id
            prompts = [[rng.randrange(lo, vocab_hi) for _ in range(rng.randint(a.prompt_min, a.prompt_max))]
                       for _ in range(n)]
            budgets = [block_budget(i, nb) for i in range(n)]
        else:
            prompts = task_mix(tok, a.per_task)
        for thr in thresholds:
            for policy in a.policies.split(","):
                recs, toks = [], {}
                for sched in ("static", "continuous"):
                    n_rows = len(prompts)
                    if sched == "static" and a.gpu and a.static_rows_per_slot:
                        n_rows = min(n_rows, slots * a.static_rows_per_slot)
                    gen = GenerationConfig(gen_length=G, block_length=BL, steps=G, threshold=thr,
                                           stop_at_eos=not a.gpu, scheduling=sched, slots=slots)
                    cache = CacheConfig(policy=policy)
                    if a.gpu:  # warm-up: compile the fused kernels, initialise cuBLAS
                        run_once(model, prompts[:slots], None if budgets is None else budgets[:slots], gen, cache,
                                 slots, device)
                    m = run_once(model, prompts[:n_rows], None if budgets is None else budgets[:n_rows], gen,
                                 cache, slots, device)
                    toks[sched] = m.pop("_tokens")
                    rec = {"device": device_name(device), "model": model_name, "workload": workload,
                           "scheduling": sched, "policy": policy, "threshold": thr, "slots": slots,
                           "rows": n_rows, "gen_length": G, "block_length": BL,
                           "threads": None if a.gpu else a.threads, "command": cmd.strip(), **m}
                    recs.append(rec)
                    print(json.dumps(rec), flush=True)
                common = min(len(toks["static"]), len(toks["continuous"]))
                for r in recs:
                    r["same_tokens"] = toks["static"][:common] == toks["continuous"][:common]
                save(recs, Path(a.out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
