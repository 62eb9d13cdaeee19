"""The job report beside the Parquet parts, in `_report/`: report.json, report.md and PNG plots
(matplotlib, Agg).

Plots: flops_speedup histogram, speedup vs prompt length, latency distribution, errors by kind,
audit token agreement. A plot with no data says so in the image, so every file always exists.
`python -m pipeline.report OUT` rebuilds the report from the parts alone.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from . import fs as fsx
from . import manifest, output

REPORT_DIR = "_report"
"""The report lives in `<output>/_report/`: readers of the output folder (pyarrow, pandas, Ray Data)
skip `_`-prefixed entries, so `pd.read_parquet(output)` reads the parts and nothing else."""
PLOTS = {
    "flops_speedup_hist": "plots/flops_speedup_hist.png",
    "speedup_vs_prompt_len": "plots/speedup_vs_prompt_len.png",
    "latency_hist": "plots/latency_hist.png",
    "errors_by_kind": "plots/errors_by_kind.png",
    "audit_agreement": "plots/audit_agreement.png",
    "calibration": "plots/calibration.png",
}


def report_files() -> list[str]:
    """Every file `write_report` writes, relative to the report folder (what an overwrite may delete)."""
    return ["report.json", "report.md", *PLOTS.values()]


_COLUMNS = ["num_prompt_tokens", "num_generated_tokens", "tokens_per_step", "flops_speedup", "flops_speedup_total",
            "latency_s", "finish_reason", "error_type", "cache_policy", "cache_config", "audit_speedup", "audit_token_agreement",
            "score", "extracted_answer"]


def _summary(values: list[float]) -> Optional[dict[str, float]]:
    v = sorted(x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x)))
    if not v:
        return None
    q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]  # noqa: E731
    return {"n": len(v), "mean": sum(v) / len(v), "min": v[0], "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[-1]}


def _counts(values: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in values:
        if x is not None:
            out[str(x)] = out.get(str(x), 0) + 1
    return dict(sorted(out.items()))


def accuracy_by(table: pa.Table, columns: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{column: {value: {accuracy, n}}} over scored rows."""
    scored = table.filter(pc.is_valid(table.column("score")))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for col in columns:
        if col not in scored.column_names:
            continue
        groups: dict[str, list[float]] = {}
        for k, s in zip(scored.column(col).to_pylist(), scored.column("score").to_pylist()):
            groups.setdefault(str(k), []).append(s)
        out[col] = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}
    return out


def summarize(table: pa.Table, evaluation: Optional[dict] = None) -> dict[str, Any]:
    col = lambda name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows  # noqa: E731
    errors = _counts(col("error_type"))
    ok_rows = table.num_rows - sum(errors.values())
    rep: dict[str, Any] = {
        "rows": table.num_rows, "ok_rows": ok_rows, "error_rows": sum(errors.values()), "errors": errors,
        "finish_reason": _counts(col("finish_reason")),
        "cache_policy": _counts(col("cache_policy")),
        "generated_tokens": int(sum(x or 0 for x in col("num_generated_tokens"))),
        "stats": {k: _summary(col(k)) for k in ("flops_speedup", "flops_speedup_total", "latency_s",
                                                 "tokens_per_step", "num_generated_tokens", "num_prompt_tokens")},
    }
    agree = [x for x in col("audit_token_agreement") if x is not None]
    rep["audit"] = {"rows": len(agree), "token_agreement": _summary(agree),
                    "speedup": _summary([x for x in col("audit_speedup") if x is not None])}
    scores = [x for x in col("score") if x is not None]
    if evaluation is not None or scores:
        group_cols = ["cache_policy", *((evaluation or {}).get("group_by") or [])]
        rep["evaluation"] = {
            "scorer": (evaluation or {}).get("scorer"), "scored": len(scores),
            "accuracy": sum(scores) / len(scores) if scores else None,
            "by": accuracy_by(table, group_cols),
        }
    return rep


# ----------------------------------------------------------------------------- plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _hist(values: list, title: str, xlabel: str, empty: str, bins: int = 30, **kw: Any) -> bytes:
    """A histogram of the non-null values as PNG ("no <empty>" when there are none)."""
    plt, fig, ax = _figure()
    v = [x for x in values if x is not None]
    ax.hist(v, bins=bins, **kw) if v else _no_data(ax, empty)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _png(plt, fig)


def calibration_plot(cal: Optional[dict]) -> bytes:
    """tokens/s against token agreement with `none`, one point per candidate, the floor as a line."""
    plt, fig, ax = _figure()
    pts = [e for e in (cal or {}).get("table", []) if e.get("tokens_per_s") and e.get("token_agreement") is not None]
    if pts:
        for e in pts:
            won = e["candidate"] == cal["winner"]
            ax.scatter(e["token_agreement"], e["tokens_per_s"], s=40 if won else 16, c="C3" if won else "C0")
            ax.annotate(e["candidate"], (e["token_agreement"], e["tokens_per_s"]), fontsize=7)
        ax.axvline(cal.get("min_agreement", 0.0), color="grey", linestyle="--", linewidth=1)
    else:
        _no_data(ax, "calibration (cache.policy is not auto)")
    ax.set_title("Calibration: speed against agreement with none")
    ax.set_xlabel("token agreement with none")
    ax.set_ylabel("generated tokens/s")
    return _png(plt, fig)


def make_plots(table: pa.Table, calibration: Optional[dict] = None) -> dict[str, bytes]:
    col = lambda name: table.column(name).to_pylist() if name in table.column_names else []  # noqa: E731
    out = {}
    out["flops_speedup_hist"] = _hist(col("flops_speedup"), "FLOPs speedup of the cache policy (per row)",
                                      "flops_vanilla / flops", "speedups (all rows errored)")

    plt, fig, ax = _figure()
    pts = [(p, s) for p, s in zip(col("num_prompt_tokens"), col("flops_speedup")) if p is not None and s is not None]
    if pts:
        ax.scatter([p for p, _ in pts], [s for _, s in pts], s=8, alpha=0.6)
    else:
        _no_data(ax, "speedups")
    ax.set_title("Speedup vs prompt length")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("flops_speedup")
    out["speedup_vs_prompt_len"] = _png(plt, fig)

    out["latency_hist"] = _hist(col("latency_s"), "Per-row latency", "latency_s", "latencies")

    plt, fig, ax = _figure()
    errs = _counts(col("error_type"))
    if errs:
        ax.bar(list(errs), list(errs.values()))
    else:
        _no_data(ax, "errors")
    ax.set_title("Error rows by kind")
    out["errors_by_kind"] = _png(plt, fig)

    out["audit_agreement"] = _hist(col("audit_token_agreement"), "Audit: token agreement with policy none",
                                   "token agreement", "audited rows", bins=20, range=(0, 1))
    out["calibration"] = calibration_plot(calibration)
    return out


# ----------------------------------------------------------------------------- markdown
def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def to_markdown(rep: dict[str, Any], name: str = "") -> str:
    lines = [f"# Job report{': ' + name if name else ''}", ""]
    run = rep.get("run") or {}
    lines += ["| rows | ok | errors | generated tokens | wall s | rows/s | tokens/s | pipeline overhead |",
              "|---|---|---|---|---|---|---|---|",
              f"| {rep['rows']} | {rep['ok_rows']} | {rep['error_rows']} | {rep['generated_tokens']} | "
              f"{_fmt(run.get('wall_s'))} | {_fmt(run.get('rows_per_s'))} | {_fmt(run.get('tokens_per_s'))} | "
              f"{_fmt(run.get('overhead'))} |", ""]
    if run.get("steady_wall_s") is not None:
        lines += [f"Start-up: preflight model load {_fmt(run.get('preflight_s'))} s, actor pool ready after "
                  f"{_fmt(run.get('pool_ready_s'))} s of the wall time; after start-up {_fmt(run.get('steady_wall_s'))} s, "
                  f"pipeline overhead {_fmt(run.get('steady_overhead'))}.", ""]
    lines += ["## Per-row stats", "", "| stat | mean | p50 | p90 | min | max |", "|---|---|---|---|---|---|"]
    for k, s in rep["stats"].items():
        if s:
            lines.append(f"| {k} | {_fmt(s['mean'])} | {_fmt(s['p50'])} | {_fmt(s['p90'])} | {_fmt(s['min'])} | {_fmt(s['max'])} |")
    lines += ["", "## Errors", ""]
    lines += [f"- {k}: {v}" for k, v in rep["errors"].items()] or ["none"]
    lines += ["", f"finish_reason: {rep['finish_reason']}", ""]
    a = rep["audit"]
    lines += ["## Audit (policy none on a hashed subset)", ""]
    if a["rows"]:
        lines.append(f"{a['rows']} rows; token agreement mean {_fmt(a['token_agreement']['mean'])}, "
                     f"measured speedup mean {_fmt((a['speedup'] or {}).get('mean'))}")
    else:
        lines.append("no audited rows")
    cal = rep.get("calibration")
    if cal:
        lines += ["", "## Calibration (cache.policy auto)", "",
                  f"{cal['rows']} calibration rows; chose **{cal['winner']}** (floor: token agreement >= "
                  f"{_fmt(cal.get('min_agreement'))}" + (f", score ratio >= {_fmt(cal['min_score_ratio'])}"
                                                         if cal.get("min_score_ratio") else "") + ")", "",
                  "| candidate | rows | token agreement | tokens/s | FLOPs speedup | score | meets floors |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['candidate']} | {e['rows']} | {_fmt(e['token_agreement'])} | {_fmt(e['tokens_per_s'])} | "
                  f"{_fmt(e['flops_speedup'])} | {_fmt(e.get('score'))} | {'yes' if e['meets_floors'] else 'no'} |"
                  for e in cal["table"]]
        d = cal.get("drift")
        events = cal.get("drift_events") or []
        fell_back = any(e["action"] == "fallback" for e in events)
        if d:
            lines += ["", f"Audit of the chosen policy on {d['rows']} rows: agreement {_fmt(d['mean'])} "
                      f"(standard error {_fmt(d['standard_error'])}, floor {_fmt(d['floor'])})"
                      + ((": **below the floor**; the job fell back to a safer candidate (below)" if fell_back else
                          ": **below the floor**; the choice no longer holds on this data") if d["below_floor"] else ".")]
        chain = cal.get("chain") or []
        if len(chain) > 1:
            lines += ["", f"on_drift: {cal.get('on_drift', 'flag')}; fallback order: "
                      + " -> ".join(e["candidate"] for e in chain)]
        lines += [""] if events else []
        for e in events:
            lines.append(f"- {e['at']}, after {e['rows_done']} row(s) of the run: agreement under {e['from']} "
                         f"{_fmt(e['agreement'])} over {e['audited_rows']} audited row(s) (standard error "
                         f"{_fmt(e['standard_error'])}) below the floor {_fmt(e['floor'])}: "
                         + (f"**switched to {e['to']}** for the rows started after" if e["action"] == "fallback"
                            else "flagged, kept"))
        by = cal.get("rows_by_config") or {}
        if by:
            lines += ["", "Rows by cache configuration (`cache_config`): "
                      + ", ".join(f"{k} {v}" for k, v in by.items())]
        for name, dd in (cal.get("drift_by_config") or {}).items():
            if dd and name != (chain[0]["candidate"] if chain else None):
                lines += ["", f"Audit under {name} on {dd['rows']} rows: agreement {_fmt(dd['mean'])} "
                          f"(standard error {_fmt(dd['standard_error'])})" + (": **below the floor**" if
                                                                                dd["below_floor"] else ".")]
    ev = rep.get("evaluation")
    if ev:
        lines += ["", "## Evaluation", "", f"scorer {ev['scorer']}: accuracy {_fmt(ev['accuracy'])} over {ev['scored']} scored rows", ""]
        for col, groups in ev["by"].items():
            lines += [f"| {col} | accuracy | n |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(g['accuracy'])} | {g['n']} |" for k, g in groups.items()]
            lines.append("")
    lines += ["", "## Plots", ""] + [f"![{k}]({p})" for k, p in PLOTS.items()]
    return "\n".join(lines) + "\n"


def write_report(out_uri: str, run: Optional[dict] = None, evaluation: Any = None) -> dict[str, str]:
    """Write report.json, report.md and the plots; returns {kind: URI} of what was written."""
    fs, d = fsx.resolve(out_uri)
    table = output.read_output(fs, d)
    cols = [c for c in _COLUMNS if table is not None and c in table.column_names]
    ev = evaluation.model_dump() if hasattr(evaluation, "model_dump") else evaluation
    job = manifest.read_job(out_uri) or {}
    if ev is None:
        ev = (job.get("spec") or {}).get("evaluation")
    if ev:
        cols += [c for c in ev.get("group_by", []) if table is not None and c in table.column_names and c not in cols]
    table = table.select(cols) if table is not None else pa.table({c: pa.array([], pa.string()) for c in _COLUMNS})
    rep = summarize(table, ev)
    rep["run"] = run if run is not None else job.get("run")
    rep["plots"] = dict(PLOTS)
    cal = job.get("calibration")
    if cal:
        from .calibrate import drift

        col = lambda name: (table.column(name).to_pylist() if name in table.column_names  # noqa: E731
                            else [None] * table.num_rows)
        pairs = list(zip(col("cache_config"), col("audit_token_agreement")))
        per: dict[str, list[float]] = {}
        for c, a in pairs:
            if a is not None:
                per.setdefault(c, []).append(a)
        rep["calibration"] = {**cal, "rows_by_config": _counts([c for c, _ in pairs])}
        chain = cal.get("chain") or [{"candidate": cal["winner"], "cache": cal["cache"]}]
        # each entry's running agreement over its own rows; an output written before `cache_config` existed
        # ran under the choice alone: all its audited rows
        legacy = not any(c for c, _ in pairs)
        rep["calibration"]["drift_by_config"] = {
            e["candidate"]: drift({**cal, "cache": e["cache"]}, [a for _, a in pairs if a is not None]
                                  if legacy and k == 0 else per.get(e["candidate"], []))
            for k, e in enumerate(chain)}
        rep["calibration"]["drift"] = rep["calibration"]["drift_by_config"].get(chain[0]["candidate"])
    paths = {}
    rd, ru = fsx.join(d, REPORT_DIR), fsx.join(out_uri, REPORT_DIR)
    fs.create_dir(fsx.join(rd, "plots"), recursive=True)
    for key, png in make_plots(table, rep.get("calibration")).items():
        fsx.write_bytes_atomic(fs, fsx.join(rd, PLOTS[key]), png)
        paths[key] = fsx.join(ru, PLOTS[key])
    fsx.write_bytes_atomic(fs, fsx.join(rd, "report.json"), json.dumps(rep, indent=1, default=str).encode())
    fsx.write_bytes_atomic(fs, fsx.join(rd, "report.md"), to_markdown(rep, job.get("name", "")).encode())
    paths["json"] = fsx.join(ru, "report.json")
    paths["md"] = fsx.join(ru, "report.md")
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Rebuild the report of a job output folder.")
    ap.add_argument("output")
    args = ap.parse_args(argv)
    for k, p in write_report(args.output).items():
        print(f"{k}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
