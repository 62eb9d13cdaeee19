"""`cache.policy: auto`: calibrate on a sample of the job, then run the fastest policy that keeps quality.

Which cache policy is safe depends on the task, so the job measures it on its own rows before the
main run: a seeded sample of the input, stratified by prompt length, runs under `none` and under each
candidate on actors with the job's resources and generation settings. Per candidate: token agreement
with `none`, task score when the job has a scorer, tokens/s measured in that same run, FLOPs speedup.
The fastest candidate meeting the floors wins (`none` when none does). The sample's rows are written
like any other row, with the winner's outputs and the `none` outputs as their audit; the table and the
choice go into `_job.json`, so a resumed job uses the same choice without calibrating again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Optional, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from . import fs as fsx
from . import output
from .actor import ActorConfig, GenerationActor, cache_label, prompt_length
from .io import ReadPlan, read_dataset
from .schema import INTERNAL_PREFIX, conform
from .spec import JobSpec

def default_candidates() -> list[dict[str, Any]]:
    """Every declared policy but `none` at its defaults, then the settings it declares for calibration
    (safer, more often refreshed variants: e.g. dual every 4 steps, dllm_cache's response every step)."""
    from dllm_cache_core.cache.registry import declarations

    return [c for d in declarations() if d.name != "none"
            for c in ({"policy": d.name}, *({"policy": d.name, **g} for g in d.calibration))]

POOL_FACTOR = 8
"""The stratified sample is drawn from about this many times calibration_rows hashed rows."""
CANDIDATE = INTERNAL_PREFIX + "candidate"
ENGINE_S = INTERNAL_PREFIX + "engine_s"


label = cache_label


def candidates(spec: JobSpec) -> list[dict[str, Any]]:
    """`none` first (the reference), then the configured or default candidates."""
    cands = spec.calibration.candidates
    return [{"policy": "none"}, *[dict(c) for c in (default_candidates() if cands is None else cands)]]


def sample_key(row_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the row id and the calibration seed."""
    h = hashlib.sha256(f"calibration:{seed}:{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def stratified(ids: list[str], lengths: list[int], n: int, seed: int) -> list[int]:
    """Indices of n rows: the hashed pool sorted by prompt length, taken at evenly spaced quantiles."""
    keys = [sample_key(i, seed) for i in ids]
    pool = sorted(range(len(ids)), key=lambda i: keys[i])[:POOL_FACTOR * n]
    pool.sort(key=lambda i: (lengths[i], keys[i]))
    if len(pool) <= n:
        return sorted(pool)
    return sorted(pool[int((k + 0.5) * len(pool) / n)] for k in range(n))


class CalibrationActor(GenerationActor):
    """A GenerationActor that runs each batch under every candidate, one engine call set per candidate,
    each timed; the first batch is preceded by one untimed row per candidate (compilation, graphs)."""

    def __init__(self, config: ActorConfig, caches: list[dict[str, Any]]):
        super().__init__(config)
        from dllm_cache_core import CacheConfig

        base = self.engine
        self.engines = [base.with_cache(CacheConfig(**c)) for c in caches]
        self.warm = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self.warm:
            for e in self.engines:
                self.engine = e
                super().__call__(batch.slice(0, 1))
            self.warm = True
        out = []
        for k, e in enumerate(self.engines):
            self.engine = e
            before = self.engine_s
            t = super().__call__(batch)
            n = t.num_rows
            t = t.append_column(CANDIDATE, pa.array([k] * n, pa.int32()))
            out.append(t.append_column(ENGINE_S, pa.array([self.engine_s - before] + [0.0] * (n - 1), pa.float64())))
        return pa.concat_tables(out)


def draw_sample(spec: JobSpec, plan: ReadPlan) -> pa.Table:
    """The calibration rows among those still to run (one read pass; only the hashed pool reaches the driver)."""
    import ray

    cal = spec.calibration
    n, seed = cal.calibration_rows, cal.seed if cal.seed is not None else spec.seed
    share = min(1.0, POOL_FACTOR * n / max(plan.todo_rows, 1) * 1.5)
    id_col = plan.id_column

    def keep(batch: pa.Table) -> pa.Table:
        ids = pc.cast(batch.column(id_col), pa.string()).to_pylist()
        return batch.filter(pa.array([sample_key(i, seed) < share for i in ids]))

    refs = read_dataset(plan).map_batches(keep, batch_format="pyarrow").to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return pa.table({})
    pool = pa.concat_tables(tables, promote_options="permissive")
    col = spec.input.messages_column or spec.input.prompt_column
    values = pool.column(col).to_pylist() if col in pool.column_names else [None] * pool.num_rows
    ids = pc.cast(pool.column(id_col), pa.string()).to_pylist()
    return pool.take(stratified(ids, [prompt_length(v) for v in values], n, seed))


def measure(spec: JobSpec, sample: pa.Table, cfg: ActorConfig, caches: list[dict[str, Any]]) -> pa.Table:
    """Every candidate over the sample, on actors with the job's resources."""
    import ray

    from .processor import generation_stage

    c = spec.compute
    cfg = dataclasses.replace(cfg, cache={"policy": "none"}, audit_fraction=0.0, progress=None)
    actors = max(1, min(c.num_actors, math.ceil(sample.num_rows / c.batch_size)))
    ds = generation_stage(ray.data.from_arrow(sample), cfg, c, CalibrationActor, {"caches": caches}, actors,
                          c.batch_size)
    return pa.concat_tables(ray.get(ds.to_arrow_refs()), promote_options="permissive")


def score_table(results: pa.Table, caches: list[dict[str, Any]], id_col: str, scored: bool,
                min_agreement: float, min_score_ratio: Optional[float]) -> tuple[list[dict[str, Any]], int]:
    """Per candidate: agreement with `none`, score ratio, tokens/s, FLOPs speedup; and the winner's index."""
    from dllm_cache_core import token_agreement

    per = [results.filter(pc.equal(results.column(CANDIDATE), k)) for k in range(len(caches))]
    rows = [{str(i): r for i, r in zip(pc.cast(t.column(id_col), pa.string()).to_pylist(), t.to_pylist())} for t in per]
    ref = rows[0]
    table = []
    for k, (cache, got) in enumerate(zip(caches, rows)):
        both = [i for i, r in got.items() if r["error_type"] is None and ref.get(i, {}).get("error_type", "x") is None]
        agree = [token_agreement(got[i]["generation_token_ids"] or [], ref[i]["generation_token_ids"] or []) for i in both]
        tokens = sum(got[i]["num_generated_tokens"] or 0 for i in both)
        seconds = float(pc.sum(per[k].column(ENGINE_S)).as_py() or 0.0)
        flops, flops_ref = (sum(r[i]["flops"] or 0.0 for i in both) for r in (got, ref))
        entry: dict[str, Any] = {
            "candidate": label(cache), "cache": cache, "rows": len(both),
            "token_agreement": sum(agree) / len(agree) if agree else None,
            "tokens_per_s": tokens / seconds if seconds else None, "engine_s": seconds,
            "flops_speedup": flops_ref / flops if flops else None}
        if scored:
            s = [got[i]["score"] for i in both if got[i]["score"] is not None]
            entry["score"] = sum(s) / len(s) if s else None
        table.append(entry)
    for e in table:
        if scored:
            ref_score, score = table[0].get("score"), e.get("score")
            e["score_ratio"] = (score / ref_score if ref_score else (1.0 if score is not None and score >= 0 else None))
        e["meets_floors"] = e["cache"]["policy"] == "none" or (
            e["token_agreement"] is not None and e["token_agreement"] >= min_agreement
            and (min_score_ratio is None or not scored or (e.get("score_ratio") or 0.0) >= min_score_ratio))
    ok = [k for k, e in enumerate(table) if e["meets_floors"] and e["tokens_per_s"]]
    winner = max(ok, key=lambda k: (table[k]["tokens_per_s"], table[k]["token_agreement"] or 0.0)) if ok else 0
    return table, winner


def write_winner(spec: JobSpec, results: pa.Table, winner: int, caches: list[dict[str, Any]],
                 schema: pa.Schema, output_id: str) -> int:
    """The sample rows under the winner, with the `none` run as their audit, as one output part."""
    from dllm_cache_core import token_agreement

    id_col = spec.input.id_column
    ref = results.filter(pc.equal(results.column(CANDIDATE), 0))
    won = results.filter(pc.equal(results.column(CANDIDATE), winner))
    ref_rows = {str(r[id_col]): r for r in ref.to_pylist()}
    speedup = None
    ref_s, won_s = (float(pc.sum(t.column(ENGINE_S)).as_py() or 0.0) for t in (ref, won))
    if winner and won_s:
        speedup = ref_s / won_s
    agree, speed = [], []
    for r in won.to_pylist():
        a = ref_rows.get(str(r[id_col]))
        ok = winner and r["error_type"] is None and a is not None and a["error_type"] is None
        agree.append(token_agreement(r["generation_token_ids"] or [], a["generation_token_ids"] or []) if ok else None)
        speed.append(speedup if ok else None)
    won = won.drop_columns([CANDIDATE, ENGINE_S])
    won = won.set_column(won.column_names.index("cache_policy"), "cache_policy",
                         pa.array([caches[winner]["policy"]] * won.num_rows, pa.string()))
    won = won.set_column(won.column_names.index("cache_config"), "cache_config",
                         pa.array([label(caches[winner])] * won.num_rows, pa.string()))
    won = won.set_column(won.column_names.index("audit_token_agreement"), "audit_token_agreement", pa.array(agree, pa.float64()))
    won = won.set_column(won.column_names.index("audit_speedup"), "audit_speedup", pa.array(speed, pa.float64()))
    fs, d = fsx.resolve(spec.output.path)
    fs.create_dir(d, recursive=True)
    output.write_part(fs, d, conform(won, schema), id_col, output_id)
    return won.num_rows


def calibrate(spec: JobSpec, plan: ReadPlan, cfg: ActorConfig, schema: pa.Schema, stream: TextIO,
              output_id: str) -> dict[str, Any]:
    """Run the calibration and write its rows; returns the record kept in `_job.json`."""
    cal = spec.calibration
    caches = candidates(spec)
    sample = draw_sample(spec, plan)
    print(f"calibration: {sample.num_rows} row(s) x {len(caches)} configuration(s) ...", file=stream, flush=True)
    if not sample.num_rows:
        return {"winner": "none", "cache": {"policy": "none"}, "rows": 0, "table": []}
    results = measure(spec, sample, cfg, caches)
    table, winner = score_table(results, caches, spec.input.id_column, spec.evaluation is not None,
                                cal.min_agreement, cal.min_score_ratio)
    written = write_winner(spec, results, winner, caches, schema, output_id)
    for e in table:
        print(f"  {e['candidate']:<32} agreement {_fmt(e['token_agreement'])}  tokens/s {_fmt(e['tokens_per_s'])}"
              f"  flops x{_fmt(e['flops_speedup'])}" + (f"  score {_fmt(e.get('score'))}" if 'score' in e else "")
              + ("" if e["meets_floors"] else "  (below the floor)"), file=stream)
    chain = fallback_chain(table, winner)
    print(f"calibration: chose {table[winner]['candidate']}"
          + (f" (on drift: {cal.on_drift}; fallback order {' -> '.join(e['candidate'] for e in chain[1:])})"
             if len(chain) > 1 else ""), file=stream, flush=True)
    return {"winner": table[winner]["candidate"], "cache": caches[winner], "rows": written, "table": table,
            "min_agreement": cal.min_agreement, "min_score_ratio": cal.min_score_ratio,
            "on_drift": cal.on_drift, "chain": chain, "active": 0, "drift_events": []}


def fallback_chain(table: list[dict[str, Any]], winner: int) -> list[dict[str, Any]]:
    """The chosen candidate, then each next safer one, `none` last: from the current one, the fastest other
    candidate that met the floors, is slower (tokens/s) and agreed with `none` at least as well on the
    calibration rows; when there is none left, `none`. Entries: {"candidate": label, "cache": settings}."""
    entry = lambda e: {"candidate": e["candidate"], "cache": dict(e["cache"])}  # noqa: E731
    chain, cur = [entry(table[winner])], table[winner]
    while cur["cache"]["policy"] != "none":
        nxt = [e for e in table if e["cache"]["policy"] != "none" and e["meets_floors"] and e.get("tokens_per_s")
               and cur.get("tokens_per_s") and e["tokens_per_s"] < cur["tokens_per_s"]
               and (e["token_agreement"] or 0.0) >= (cur["token_agreement"] or 0.0)]
        cur = max(nxt, key=lambda e: e["tokens_per_s"]) if nxt else {"candidate": "none", "cache": {"policy": "none"}}
        chain.append(entry(cur))
    return chain


def recorded_chain(cal: dict[str, Any]) -> list[dict[str, Any]]:
    """The fallback chain of a calibration record (computed for records written before chains were kept)."""
    if cal.get("chain"):
        return cal["chain"]
    names = [e["candidate"] for e in cal.get("table", [])]
    return fallback_chain(cal["table"], names.index(cal["winner"])) if cal["winner"] in names else \
        [{"candidate": cal["winner"], "cache": cal["cache"]}]


class DriftWatch:
    """The running audit agreement of the active entry of a fallback chain, fed batch by batch (in the
    progress tracker): when drift() finds it below the floor, one event, and with mode `fallback` the next
    entry becomes active (its agreement counted from zero). Agreements of rows that ran under an entry
    that is no longer active (batches started before a switch) are not counted."""

    def __init__(self, chain: list[dict[str, Any]], active: int, floor: float, mode: str,
                 seed: Optional[list[float]] = None):
        self.chain, self.active, self.floor, self.mode = chain, active, floor, mode
        self.values: list[float] = list(seed or [])
        self.events: list[dict[str, Any]] = []
        self.flagged = False

    def add(self, level: int, agreement: list[float], rows_done: int) -> Optional[dict[str, Any]]:
        if level != self.active or not agreement:
            return None
        self.values.extend(agreement)
        cur = self.chain[self.active]
        d = drift({"cache": cur["cache"], "min_agreement": self.floor}, self.values)
        if d is None or not d["below_floor"]:
            return None
        fallback = self.mode == "fallback" and self.active + 1 < len(self.chain)
        if not fallback and self.flagged:
            return None
        import datetime as dt

        event = {"action": "fallback" if fallback else "flag", "from": cur["candidate"],
                 "to": self.chain[self.active + 1]["candidate"] if fallback else None,
                 "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows_done": rows_done,
                 "audited_rows": d["rows"], "agreement": d["mean"], "standard_error": d["standard_error"],
                 "floor": self.floor}
        self.events.append(event)
        if fallback:
            self.active += 1
            self.values = []
        else:
            self.flagged = True
        return event

    def state(self) -> dict[str, Any]:
        return {"active": self.active, "events": list(self.events)}


def drift(calibration: dict[str, Any], agreement: list[float]) -> Optional[dict[str, Any]]:
    """The audit's running agreement for the chosen policy against the floor: flagged when even its upper
    two-standard-error bound is below it."""
    if not agreement or calibration.get("cache", {}).get("policy") == "none":
        return None
    n = len(agreement)
    mean = sum(agreement) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in agreement) / (n - 1) / n) if n > 1 else float("inf")
    floor = calibration.get("min_agreement", 0.0)
    return {"rows": n, "mean": mean, "standard_error": se if math.isfinite(se) else None, "floor": floor,
            "below_floor": mean + 2 * se < floor}


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
