"""`calibration.on_drift`: the fallback chain, the running check, and whole jobs whose calibration sample
was easier than the rest of the data (the chosen policy's audit agreement drifts below the floor): with
`fallback` the later rows run under the next safer candidate, each row says which, `_job.json` records
the switch and a resumed job keeps the fallback; with `flag` nothing switches and the report flags it."""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import calibrate as cb  # noqa: E402
from pipeline.runner import run  # noqa: E402
from pipeline.spec import SpecError  # noqa: E402
from test_pipeline_jobs import _jsonl, _spec, assert_exactly_once, tiny  # noqa: E402,F401

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # DriftEngine travels to the Ray actors


# ----------------------------------------------------------------------------- the chain and the watch
def _entry(name, agreement, tps, meets=True):
    cache = {"policy": name.split("(")[0], **({"refresh_interval": 4} if "(" in name else {})}
    return {"candidate": name, "cache": cache, "token_agreement": agreement, "tokens_per_s": tps, "meets_floors": meets}


def test_fallback_chain_goes_to_slower_candidates_that_agreed_at_least_as_well_then_none():
    table = [_entry("none", 1.0, 10.0), _entry("dual", 0.985, 50.0), _entry("prefix", 0.99, 30.0),
             _entry("dual(refresh_interval=4)", 0.995, 40.0), _entry("dllm_cache", 0.97, 45.0, meets=False),
             _entry("d2cache", 0.98, 20.0)]
    names = lambda chain: [e["candidate"] for e in chain]  # noqa: E731
    assert names(cb.fallback_chain(table, 1)) == ["dual", "dual(refresh_interval=4)", "none"]
    # from prefix: nothing slower agreed as well (d2cache 0.98 < 0.99): straight to none
    assert names(cb.fallback_chain(table, 2)) == ["prefix", "none"]
    assert names(cb.fallback_chain(table, 0)) == ["none"]
    assert cb.fallback_chain(table, 1)[1]["cache"] == {"policy": "dual", "refresh_interval": 4}
    # a record written before chains were kept gets its chain from its table
    rec = {"winner": "dual", "cache": {"policy": "dual"}, "table": table}
    assert names(cb.recorded_chain(rec)) == ["dual", "dual(refresh_interval=4)", "none"]


def test_drift_watch_switches_once_clearly_below_and_ignores_rows_of_the_old_entry():
    chain = [{"candidate": "dual", "cache": {"policy": "dual"}}, {"candidate": "prefix", "cache": {"policy": "prefix"}},
             {"candidate": "none", "cache": {"policy": "none"}}]
    w = cb.DriftWatch(chain, 0, 0.98, "fallback", seed=[1.0] * 4)
    assert w.add(0, [0.99, 1.0], 2) is None and w.active == 0  # fine
    assert w.add(0, [0.5], 3) is None and w.active == 0  # one bad row: within the margin
    ev = None
    for k in range(10):
        ev = ev or w.add(0, [0.5, 0.55], 5 + 2 * k)
    assert ev is not None and ev["action"] == "fallback" and (ev["from"], ev["to"]) == ("dual", "prefix")
    assert ev["agreement"] + 2 * ev["standard_error"] < 0.98 and w.active == 1
    assert w.add(0, [0.0] * 50, 100) is None and w.active == 1  # late rows of dual: not prefix's agreement
    for _ in range(10):
        w.add(1, [0.2, 0.3], 200)
    assert w.active == 2 and w.add(2, [0.0] * 10, 300) is None  # none is the reference: never drifts
    assert [e["to"] for e in w.state()["events"]] == ["prefix", "none"]
    flag = cb.DriftWatch(chain, 0, 0.98, "flag")
    events = [flag.add(0, [0.5, 0.6] * 5, 10 * k) for k in range(5)]
    assert [e["action"] for e in events if e] == ["flag"] and flag.active == 0  # flagged once, never switched


def test_on_drift_is_validated(tiny):
    s = _spec(tiny, "in.jsonl", "out", "cache=auto", "calibration.on_drift=fallback", "audit.fraction=0.1")
    assert s.calibration.on_drift == "fallback"
    assert _spec(tiny, "in.jsonl", "out", "cache=auto").calibration.on_drift == "flag"
    with pytest.raises(SpecError, match=r"on_drift: fallback needs audited rows.*audit.fraction"):
        _spec(tiny, "in.jsonl", "out", "cache=auto", "calibration.on_drift=fallback")
    with pytest.raises(SpecError, match=r"calibration.on_drift"):
        _spec(tiny, "in.jsonl", "out", "cache=auto", "calibration.on_drift=switch", "audit.fraction=0.1")


def test_report_of_an_output_written_before_cache_config_checks_all_audited_rows(tmp_path):
    """An auto job's output from before `cache_config` and chains: its rows ran under the choice alone."""
    import pyarrow as pa

    from pipeline.report import write_report

    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(20)], "cache_policy": ["dual"] * 20,
                             "audit_token_agreement": [0.6, 0.7] * 10}), out / "part-00000000000000000000.parquet")
    table = [{**_entry("none", 1.0, 10.0), "rows": 4, "flops_speedup": 1.0},
             {**_entry("dual", 0.99, 50.0), "rows": 4, "flops_speedup": 2.0}]
    (out / "_job.json").write_text(json.dumps({"name": "old", "calibration": {
        "winner": "dual", "cache": {"policy": "dual"}, "rows": 4, "table": table, "min_agreement": 0.98}}))
    write_report(str(out))
    cal = json.loads((out / "_report" / "report.json").read_text())["calibration"]
    assert cal["drift"]["rows"] == 20 and cal["drift"]["below_floor"] is True
    assert "the choice no longer holds" in (out / "_report" / "report.md").read_text()


# ----------------------------------------------------------------------------- whole jobs
class DriftEngine:
    """Fake engine. `none` returns the prompt's characters; `prefix` the same; `dual` the same on 'easy'
    prompts but every other token wrong on 'hard' ones (agreement 4/7): the calibration sample holds only
    easy rows, the rest of the job is hard. The text names the policy that generated it. Each call sleeps
    per policy, so tokens/s orders them dual > prefix > none."""

    SLEEP = {"none": 0.08, "prefix": 0.05, "dual": 0.002}  # wide margins: a busy machine must not reorder them

    def __init__(self, policy):
        self.policy = policy

    def generate(self, prompts, row_ids=None, chat_template=False):
        from dllm_cache_core.engine import TextOutput
        from dllm_cache_core.stats import SampleStats

        time.sleep(self.SLEEP[self.policy])
        outs = []
        for p in prompts:
            ids = [ord(c) for c in p]
            if self.policy == "dual" and p.startswith("hard"):
                ids = [0 if k % 2 else t for k, t in enumerate(ids)]
            outs.append(TextOutput(text=f"{self.policy}:{p}", token_ids=ids, stats=SampleStats(
                num_prompt_tokens=len(p), num_generated_tokens=len(ids), flops=1.0, flops_vanilla=2.0,
                finish_reason="length")))
        return outs

    def with_cache(self, cache):
        return DriftEngine(cache if isinstance(cache, str) else cache.policy)

    def model_fingerprint(self):
        return "fake"


def drift_factory(cfg):
    return DriftEngine(cfg.cache["policy"])


ROWS = 40
CAL_ROWS = 4


def _drift_input(tmp_path):
    """40 rows of equal length; the calibration sample (the module's own stratified draw: with 40 rows
    every row is in its pool) is easy, every other row hard."""
    ids = [f"r{i:02d}" for i in range(ROWS)]
    easy = {ids[i] for i in cb.stratified(ids, [7] * ROWS, CAL_ROWS, seed=0)}
    rows = [{"id": i, "prompt": f"{'easy' if i in easy else 'hard'} {i[1:]}"} for i in ids]
    return _jsonl(tmp_path / "in.jsonl", rows), easy


def _drift_spec(tiny, inp, out, *over):
    return _spec(tiny, inp, out, "cache=auto", "calibration.candidates=[dual, prefix]",
                 f"calibration.calibration_rows={CAL_ROWS}", "calibration.seed=0", "audit.fraction=1.0",
                 "compute.batch_size=2", *over)


def _rows(out):
    return pq.read_table(out, columns=["id", "generation", "cache_policy", "cache_config",
                                       "audit_token_agreement"]).to_pylist()


def _check_rows_say_their_policy(rows):
    for r in rows:  # the engine that generated the row is the one the row names
        assert r["generation"].split(":")[0] == r["cache_config"] == r["cache_policy"], r


@pytest.fixture(scope="module")
def fallback_run(ray_local, tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("fallback")
    inp, easy = _drift_input(d)
    spec = _drift_spec(tiny, inp, str(d / "out"), "calibration.on_drift=fallback")
    log = io.StringIO()
    res = run(spec, stream=log, engine_factory=drift_factory)
    return spec, res, d / "out", easy, log.getvalue()


def test_fallback_switches_the_remaining_rows_to_the_next_safer_candidate(fallback_run):
    spec, res, out, easy, log = fallback_run
    assert res.status == "complete"
    assert_exactly_once(str(out), [f"r{i:02d}" for i in range(ROWS)])  # rows in = rows out
    job = json.loads((out / "_job.json").read_text())
    cal = job["calibration"]
    assert cal["winner"] == "dual" and [e["candidate"] for e in cal["chain"]] == ["dual", "prefix", "none"]
    assert cal["on_drift"] == "fallback" and cal["active"] == 1
    [ev] = cal["drift_events"]
    assert ev["action"] == "fallback" and (ev["from"], ev["to"]) == ("dual", "prefix")
    assert ev["agreement"] + 2 * ev["standard_error"] < ev["floor"] == 0.98

    rows = _rows(out)
    _check_rows_say_their_policy(rows)
    dual = [r for r in rows if r["cache_config"] == "dual"]
    prefix = [r for r in rows if r["cache_config"] == "prefix"]
    assert len(dual) + len(prefix) == ROWS
    assert easy <= {r["id"] for r in dual}  # the calibration rows keep the choice
    # one actor: every main-run row finished before the switch ran under dual, and so did the rows of a
    # batch already in flight then (compute.batches_in_flight: 2 by default); every later one under prefix
    c = spec.compute
    in_flight_rows = (c.in_flight(spec.generation.scheduling) - 1) * c.batch_size * c.length_grouping
    assert ev["rows_done"] <= len(dual) - CAL_ROWS <= ev["rows_done"] + in_flight_rows
    assert ev["rows_done"] >= 2 and len(prefix) >= ROWS // 2
    assert all(r["audit_token_agreement"] == 1.0 for r in prefix)  # prefix holds on the hard rows
    assert cal["rows_by_config"] == {"dual": len(dual), "prefix": len(prefix)}
    assert "on_drift fallback: rows started from now on run under prefix" in log

    report = json.loads((out / "_report" / "report.json").read_text())
    assert report["calibration"]["drift"]["below_floor"] is True
    assert report["calibration"]["drift_by_config"]["prefix"]["below_floor"] is False
    md = (out / "_report" / "report.md").read_text()
    assert "**switched to prefix**" in md and f"dual {len(dual)}, prefix {len(prefix)}" in md


def test_resumed_job_continues_with_the_fallback(fallback_run):
    spec, res, out, easy, _ = fallback_run
    lost = set()
    for part in out.glob("part-*.parquet"):
        t = pq.read_table(part, columns=["id", "cache_config"]).to_pylist()
        if all(r["cache_config"] == "prefix" for r in t):
            lost |= {r["id"] for r in t}
            part.unlink()
    assert lost
    (out / "_SUCCESS").unlink()
    before = {r["id"]: r["cache_config"] for r in _rows(out)}
    log = io.StringIO()
    again = run(spec, stream=log, engine_factory=drift_factory)
    assert again.status == "complete" and again.rows_run == len(lost)
    assert "continuing with the fallback prefix" in log.getvalue() and "calibration: chose" not in log.getvalue()
    assert_exactly_once(str(out), [f"r{i:02d}" for i in range(ROWS)])
    rows = _rows(out)
    _check_rows_say_their_policy(rows)
    for r in rows:  # rows already written keep theirs; the regenerated ones ran under the fallback
        assert r["cache_config"] == before.get(r["id"], "prefix")
    cal = json.loads((out / "_job.json").read_text())["calibration"]
    assert cal["active"] == 1 and len(cal["drift_events"]) == 1  # no new switch


def test_flag_keeps_the_choice_and_flags_the_drift(ray_local, tiny, tmp_path):
    inp, easy = _drift_input(tmp_path)
    out = tmp_path / "out"
    log = io.StringIO()
    res = run(_drift_spec(tiny, inp, str(out)), stream=log, engine_factory=drift_factory)
    assert res.status == "complete"
    assert_exactly_once(str(out), [f"r{i:02d}" for i in range(ROWS)])
    rows = _rows(out)
    _check_rows_say_their_policy(rows)
    assert {r["cache_config"] for r in rows} == {"dual"}  # no switch
    cal = json.loads((out / "_job.json").read_text())["calibration"]
    assert cal["on_drift"] == "flag" and cal["active"] == 0
    assert [e["action"] for e in cal["drift_events"]] == ["flag"]
    assert "on_drift flag: the job keeps it" in log.getvalue()
    report = json.loads((out / "_report" / "report.json").read_text())
    assert report["calibration"]["drift"]["below_floor"] is True
    assert "the choice no longer holds on this data" in (out / "_report" / "report.md").read_text()
