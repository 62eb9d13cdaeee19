"""The engine inside one's own Ray Data pipeline: JSONL -> chat messages -> generate -> answer -> Parquet.

    python examples/ray_data_stage.py out/stage                 # the 20 demo prompts, embedded model, CPU
    python examples/ray_data_stage.py out/stage --limit 4 --gen-length 32

Reads jobs/data/demo_prompts.jsonl (id, prompt, answer, task) with `ray.data.read_json`, builds chat
messages in `preprocess`, generates with `pipeline.build_processor` on `builtin:tiny`, takes the
answer out of each generation in `postprocess`, and writes Parquet with `write_parquet`.
A bad row (empty or missing prompt) comes out as a row with `error_type` / `error` and no answer.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

import pyarrow as pa  # noqa: E402

from pipeline import ProcessorConfig, build_processor  # noqa: E402

ANSWERS = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()), ("reference", pa.string()),
                     ("predicted", pa.string()), ("correct", pa.bool_()), ("num_generated_tokens", pa.int64()),
                     ("error_type", pa.string()), ("error", pa.string())])
"""The Parquet schema: every file gets it, also one whose rows are all errors (all-null columns)."""


def preprocess(row: dict[str, Any]) -> dict[str, Any]:
    """The row plus the chat messages the engine reads (messages_column='messages')."""
    return {**row, "messages": [{"role": "user", "content": row.get("prompt")}]}


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """The answer and whether it matches the reference. The embedded model ends worked arithmetic with
    `#### <answer>` (GSM8K style) and answers the other tasks on the first line."""
    text = row["generation"] or ""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    answer = lines[0] if lines else None
    reference = row.get("answer")
    return {"id": row["id"], "task": row.get("task"), "prompt": row.get("prompt"), "reference": reference,
            "predicted": answer, "correct": None if answer is None or reference is None else answer == reference,
            "num_generated_tokens": row["num_generated_tokens"], "error_type": row["error_type"],
            "error": row["error"]}


def make_config(gen_length: int, block_length: int) -> ProcessorConfig:
    """The demo job's model and settings (jobs/demo.yaml), as a processor config."""
    return ProcessorConfig(
        model={"path": "builtin:tiny", "dtype": "float32"},
        generation={"gen_length": gen_length, "steps": gen_length, "block_length": block_length},
        cache="dual",
        compute={"num_actors": 1, "gpus_per_actor": 0, "batch_size": 4, "length_grouping": 2},
        messages_column="messages", id_column="id")


def run(input_path: str, output: str, limit: Optional[int] = None, gen_length: int = 64,
        block_length: int = 32) -> None:
    """The whole pipeline, lazily built, executed once by write_parquet."""
    import ray

    ds = ray.data.read_json(input_path)
    if limit:
        ds = ds.limit(limit)
    processor = build_processor(make_config(gen_length, block_length), preprocess=preprocess,
                                postprocess=postprocess)
    processor(ds).write_parquet(output, schema=ANSWERS)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="folder for the Parquet files")
    ap.add_argument("--input", default=str(REPO / "jobs" / "data" / "demo_prompts.jsonl"), help="JSONL prompts")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    args = ap.parse_args(argv)

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a cluster (as under `ray job submit`)
            ray.init()
        else:  # a new local Ray (not some other one running here) whose workers import this checkout
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            ray.init(address="local", include_dashboard=False)
    run(args.input, args.output, args.limit, args.gen_length, args.block_length)
    t = pq.read_table(args.output)
    correct = int(pc.sum(pc.fill_null(t.column("correct"), False)).as_py() or 0)
    errors = t.num_rows - int(pc.sum(pc.is_null(t.column("error_type"))).as_py() or 0)
    print(f"{t.num_rows} rows -> {args.output}: {correct} answers match the reference, {errors} error rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
