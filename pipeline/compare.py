"""Compare two job outputs side by side (e.g. the same prompts under two cache policies).

    python -m pipeline.compare OUT_A OUT_B [--json]

Rows are matched by id. Prints, for A and B: rows, errors, accuracy (when scored), mean FLOPs
speedup (cache alone and with parallel decoding), mean latency and generated tokens; and over the
ids present in both without error: the token agreement of B with A (dllm_cache_core.token_agreement,
the one definition) and the share of identical generations.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from . import fs as fsx
from . import manifest, output

_COLS = ["generation_token_ids", "error_type", "score", "flops_speedup", "flops_speedup_total", "latency_s",
         "num_generated_tokens", "cache_policy"]


def _load(out_uri: str) -> tuple[pa.Table, str]:
    job = manifest.read_job(out_uri)
    if job is None:
        raise SystemExit(f"{out_uri}: no _job.json; not a job output folder")
    id_col = job["spec"]["input"]["id_column"]
    fs, d = fsx.resolve(out_uri)
    t = output.read_output(fs, d)
    if t is None:
        raise SystemExit(f"{out_uri}: no parts")
    t = t.select([id_col] + [c for c in _COLS if c in t.column_names])
    return t.rename_columns(["id"] + t.column_names[1:]), job.get("name", out_uri)


def _mean(t: pa.Table, col: str) -> Optional[float]:
    if col not in t.column_names:
        return None
    return pc.mean(t.column(col)).as_py()


def side(t: pa.Table) -> dict[str, Any]:
    err = t.column("error_type")
    return {
        "rows": t.num_rows,
        "errors": int(pc.sum(pc.is_valid(err)).as_py() or 0),
        "accuracy": _mean(t, "score"),
        "flops_speedup": _mean(t, "flops_speedup"),
        "flops_speedup_total": _mean(t, "flops_speedup_total"),
        "latency_s": _mean(t, "latency_s"),
        "generated_tokens": int(pc.sum(t.column("num_generated_tokens")).as_py() or 0),
        "cache_policy": ", ".join(sorted(set(x for x in t.column("cache_policy").to_pylist() if x))),
    }


def compare(a_uri: str, b_uri: str) -> dict[str, Any]:
    from dllm_cache_core import token_agreement

    a, name_a = _load(a_uri)
    b, name_b = _load(b_uri)
    ta = {str(i): (tok, e) for i, tok, e in zip(a.column("id").to_pylist(), a.column("generation_token_ids").to_pylist(),
                                                a.column("error_type").to_pylist())}
    agree, same, both = [], 0, 0
    for i, tok, e in zip(b.column("id").to_pylist(), b.column("generation_token_ids").to_pylist(),
                         b.column("error_type").to_pylist()):
        other = ta.get(str(i))
        if other is None or other[1] is not None or e is not None:
            continue
        both += 1
        agree.append(token_agreement(other[0] or [], tok or []))
        same += int((other[0] or []) == (tok or []))
    return {
        "a": {"path": a_uri, "name": name_a, **side(a)},
        "b": {"path": b_uri, "name": name_b, **side(b)},
        "common_ok_rows": both,
        "token_agreement": sum(agree) / len(agree) if agree else None,
        "identical_generations": same / both if both else None,
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def to_text(res: dict[str, Any]) -> str:
    keys = ["name", "cache_policy", "rows", "errors", "accuracy", "flops_speedup", "flops_speedup_total",
            "latency_s", "generated_tokens"]
    w = max(len(k) for k in keys) + 2
    lines = [f"{'':{w}}{'A':>24}  {'B':>24}"]
    for k in keys:
        lines.append(f"{k:{w}}{_fmt(res['a'][k]):>24}  {_fmt(res['b'][k]):>24}")
    lines.append(f"\nids in both without error: {res['common_ok_rows']}")
    lines.append(f"token agreement (B vs A):  {_fmt(res['token_agreement'])}")
    lines.append(f"identical generations:     {_fmt(res['identical_generations'])}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_a")
    ap.add_argument("out_b")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    res = compare(args.out_a, args.out_b)
    print(json.dumps(res, indent=1) if args.json else to_text(res), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
