"""Static vs continuous scheduling through the whole Ray pipeline: rows/s of each job, one actor.

    python benchmarks/make_random_checkpoint.py --shape llada-8b --out /tmp/ckpt/llada-8b
    python benchmarks/bench_pipeline.py --checkpoint /tmp/ckpt/llada-8b              # 1 GPU
    python benchmarks/bench_pipeline.py --cpu --rows 96 --gen-length 64 --block-length 16 --batch-size 8 \\
        --length-grouping 2 --out /tmp/bench_pipeline/pipeline_cpu.json           # CPU check (not a measure)

The jobs run as bench_scaling.py runs its jobs (its prompts, job spec, subprocess, report, checks and
GPU sampler: `measure`), on the same prompts, with one actor:

- static: generation.scheduling static, compute.batches_in_flight 1: one Ray Data batch at a time,
  engine calls of batch_size rows, each static batch waiting for its slowest row;
- continuous: generation.scheduling continuous, compute.batches_in_flight N (--in-flight, default 2):
  the actor's batches share one engine stream, rows of the next batch take the slots freed by the
  previous batch's rows (the engine decodes generation.slots, default batch_size, rows at once).

Output lengths: random weights never emit a stop token, and a row's block budget (bench_continuous.py's
mechanism, Row.max_blocks) is not part of the job spec. So each job runs through this script's
--run-job mode: run_job.py's main with an engine_factory that loads the job's engine and gives every
row a block budget keyed by its id (common.block_budget: uniform from gen_length / 8 to gen_length),
in both jobs alike (--no-budgets: every row generates gen_length tokens).

Each record is bench_scaling's (rows/s and tokens/s over the wall time after start-up, engine time,
overhead, GPU utilisation, rows in = rows out with every id once) plus the mode; the continuous record
also has speedup = its rows/s / the static job's, and outputs_equal_static (the same tokens per id).
Records are appended to --out (JSON list) and the markdown table beside it is rebuilt.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scaling as bs  # noqa: E402
from common import ROOT  # noqa: E402

BENCH_DIR = str(Path(__file__).resolve().parent)


class BudgetEngine:
    """engine_factory: the job's engine (pipeline.actor.build_engine) with a block budget per row id.
    Defined in the script run as __main__, so Ray pickles it by value into the actors."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks

    def __call__(self, cfg: Any) -> Any:
        from pipeline.actor import build_engine

        if BENCH_DIR not in sys.path:  # an actor process: the benchmarks folder is not on its path
            sys.path.insert(0, BENCH_DIR)
        from common import block_budget

        engine = build_engine(cfg)
        n = self.num_blocks
        engine.block_budget = lambda row_id: block_budget(row_id, n)
        return engine


def run_job_with_budgets(argv: list[str]) -> int:
    """--run-job NUM_BLOCKS SPEC: run_job.py's main, every row with a block budget (0 blocks = none)."""
    import run_job

    num_blocks, spec = int(argv[0]), argv[1]
    return run_job.main([spec], engine_factory=BudgetEngine(num_blocks) if num_blocks else None)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Every other option is bench_scaling.py's (--rows, --prompt-min/max, "
                                        "--gen-length, --block-length, --threshold, --batch-size, "
                                        "--length-grouping, --cpu, --checkpoint, --shape, --dtype, --timeout-s, ...).")
    ap.add_argument("--in-flight", type=int, default=2, help="compute.batches_in_flight of the continuous job")
    ap.add_argument("--slots", type=int, default=None, help="generation.slots of both jobs (default batch_size)")
    ap.add_argument("--modes", default="static,continuous", help="jobs to run, in order")
    ap.add_argument("--no-budgets", action="store_true", help="no block budgets: every row runs gen_length tokens")
    mine, rest = ap.parse_known_args(argv)
    if "--out" not in rest:
        rest += ["--out", "benchmarks/results/pipeline.json"]
    if "--workdir" not in rest:
        rest += ["--workdir", "/tmp/bench_pipeline"]
    a = bs.parse_args(rest + ["--gpus", "1"])
    for k, v in vars(mine).items():
        setattr(a, k, v)
    a.modes = [m for m in a.modes.split(",") if m]
    return a


def edit_for(a: argparse.Namespace, mode: str):
    def edit(spec: dict[str, Any]) -> None:
        spec["name"] = f"pipeline-{mode}"
        spec["generation"]["scheduling"] = mode
        spec["generation"]["slots"] = a.slots
        spec["compute"]["batches_in_flight"] = a.in_flight if mode == "continuous" else 1
    return edit


def markdown(records: list[dict]) -> str:
    lines = ["# Pipeline: static vs continuous scheduling (one actor)", "",
             "Written by `benchmarks/bench_pipeline.py` (method: its docstring) from the records beside it.", "",
             "| gpu | mode | batches in flight | rows | rows/s | tok/s | speedup | wall s | engine s | overhead | "
             "GPU util % | rows in = out | outputs = static |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if not r.get("rows_per_s"):
            lines.append(f"| {r.get('gpu')} | {r['mode']} | {r['batches_in_flight']} | failed (exit {r.get('exit_code')}) "
                         "| | | | | | | | | |")
            continue
        g = r.get("gpu_util") or {}
        lines.append(f"| {r['gpu']} | {r['mode']} | {r['batches_in_flight']} | {r['rows']} | {bs.fmt(r['rows_per_s'])} | "
                     f"{bs.fmt(r['tokens_per_s'])} | {bs.fmt(r.get('speedup'))} | {bs.fmt(r['wall_time_s'])} | "
                     f"{bs.fmt(r['engine_time_s'])} | {r['overhead']:.1%} | {bs.fmt(g.get('mean_used'))} | "
                     f"{'yes' if r['checks']['ok'] else 'NO ' + json.dumps(r['checks'])} | "
                     f"{bs.fmt(r.get('outputs_equal_static'))} |")
    lines += ["", "## Commands and settings", ""]
    for cmd, sett in dict.fromkeys((r["command"], json.dumps(r["settings"])) for r in records):
        lines += ["```bash", cmd, "```", "", f"settings: `{sett}`", ""]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-job"]:
        return run_job_with_budgets(argv[1:])
    a = parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = bs.environment()
    if a.cpu:
        env["gpu"] = "cpu"
    ckpt = Path(a.checkpoint)
    ck_facts = bs.ensure_checkpoint(ckpt, a.shape, a.dtype, "cpu" if a.cpu else "cuda")
    data = work / "prompts"
    data_facts = bs.write_prompts(data, a.rows, a.prompt_min, a.prompt_max, a.seed, a.input_files)
    ids_in = pa.array([f"p{i:06d}" for i in range(a.rows)], pa.string())
    num_blocks = 0 if a.no_budgets else a.gen_length // a.block_length
    sett = {**bs.settings(a, data_facts), "slots": a.slots, "block_budgets": not a.no_budgets}
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT), *argv])
    runner = [sys.executable, str(Path(__file__).resolve()), "--run-job", str(num_blocks)]
    out_path = Path(a.out)
    records = bs.load_records(out_path)
    new: list[dict] = []
    static: Optional[dict] = None
    for mode in a.modes:
        flight = a.in_flight if mode == "continuous" else 1
        print(f"[pipeline] {mode} (batches in flight {flight}): running the job ...", flush=True)
        rec, table = bs.measure(a, 1, ckpt, data, ids_in, work, tag=mode, edit=edit_for(a, mode), runner=runner)
        rec.update(mode=mode, batches_in_flight=flight, gpu=env["gpu"], settings=sett, command=command, env=env,
                   checkpoint=ck_facts, data=data_facts)
        if table is not None:
            got = bs.token_ids_by_id(table)
            if mode == "static":
                static = {"rows_per_s": rec["rows_per_s"], "tokens": got}
            elif static is not None:
                rec["speedup"] = rec["rows_per_s"] / static["rows_per_s"]
                rec["outputs_equal_static"] = bs.same_outputs(static["tokens"], got)
        new.append(rec)
        print(f"[pipeline] {json.dumps({k: rec.get(k) for k in ('mode', 'rows', 'rows_per_s', 'tokens_per_s', 'wall_time_s', 'engine_time_s', 'overhead', 'speedup', 'outputs_equal_static', 'exit_code')})}",
              flush=True)
    records += new
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1, default=str))
    out_path.with_suffix(".md").write_text(markdown(records))
    print(f"[pipeline] records -> {out_path}, table -> {out_path.with_suffix('.md')}")
    return 0 if all(r.get("exit_code") == 0 and (r.get("checks") or {}).get("ok") for r in new) else 1


if __name__ == "__main__":
    raise SystemExit(main())
