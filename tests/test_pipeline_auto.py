"""`cache.policy: auto`: the sample, the choice rule, the spec, and whole jobs (choice recorded and applied,
calibration rows written once with their audit, resume reuses the choice, report section)."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import calibrate as cb  # noqa: E402
from pipeline.runner import run  # noqa: E402
from pipeline.spec import SpecError  # noqa: E402
from test_pipeline_jobs import QA, _jsonl, _spec, assert_exactly_once, tiny  # noqa: E402,F401


# ----------------------------------------------------------------------------- the sample
def test_sample_is_seeded_and_spans_prompt_lengths():
    ids = [f"r{i}" for i in range(2000)]
    lengths = list(range(2000))  # row i has length i
    pick = cb.stratified(ids, lengths, 10, seed=0)
    assert len(pick) == 10 and pick == cb.stratified(ids, lengths, 10, seed=0)
    assert pick != cb.stratified(ids, lengths, 10, seed=1)
    # one pick per length decile of the hashed pool: the shortest and the longest tenth are both there
    assert min(lengths[i] for i in pick) < 200 and max(lengths[i] for i in pick) > 1800
    assert cb.stratified(ids[:5], lengths[:5], 10, seed=0) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- the choice
def _results(per_candidate):
    """A calibration result table: per candidate (rows of (id, tokens, score, flops), engine seconds)."""
    cols = {k: [] for k in ("id", "generation_token_ids", "num_generated_tokens", "flops", "score", "error_type",
                            cb.CANDIDATE, cb.ENGINE_S)}
    for k, (rows, seconds) in enumerate(per_candidate):
        for j, (i, toks, score, flops) in enumerate(rows):
            for name, v in zip(cols, (i, toks, len(toks), flops, score, None, k, seconds if j == 0 else 0.0)):
                cols[name].append(v)
    return pa.table(cols)


REF = [("a", [1, 2, 3, 4], 1.0, 100.0), ("b", [5, 6, 7, 8], 1.0, 100.0)]
CACHES = [{"policy": "none"}, {"policy": "dual"}, {"policy": "prefix"}, {"policy": "dllm_cache"}]


def test_fastest_candidate_meeting_the_floor_wins():
    res = _results([(REF, 8.0),
                    ([("a", [1, 2, 3, 0], 1.0, 10.0), ("b", [5, 6, 7, 8], 1.0, 10.0)], 1.0),  # 0.875, fastest
                    ([("a", [1, 2, 3, 4], 1.0, 50.0), ("b", [5, 6, 7, 8], 1.0, 50.0)], 4.0),  # exact
                    ([("a", [1, 2, 3, 4], 1.0, 40.0), ("b", [5, 6, 7, 8], 0.0, 40.0)], 2.0)])  # exact tokens, worse score
    table, winner = cb.score_table(res, CACHES, "id", False, 0.98, None)
    assert [e["token_agreement"] for e in table] == [1.0, 0.875, 1.0, 1.0]
    assert table[1]["meets_floors"] is False and table[2]["meets_floors"] is True
    assert winner == 3 and table[3]["tokens_per_s"] == 4.0 and table[3]["flops_speedup"] == pytest.approx(2.5)
    _, winner = cb.score_table(res, CACHES, "id", False, 0.8, None)
    assert winner == 1  # a lower floor admits the fastest
    scored, winner = cb.score_table(res, CACHES, "id", True, 0.98, 0.99)
    assert scored[3]["score_ratio"] == 0.5 and winner == 2  # the score floor rules dllm_cache out
    far_off = _results([(REF, 1.0), ([("a", [0, 0, 0, 0], 1.0, 1.0), ("b", [0, 0, 0, 0], 1.0, 1.0)], 0.1)])
    _, winner = cb.score_table(far_off, CACHES[:2], "id", False, 0.98, None)
    assert winner == 0  # nothing meets the floor: none


def test_drift_flagged_only_when_clearly_below_the_floor():
    cal = {"cache": {"policy": "dual"}, "min_agreement": 0.98}
    assert cb.drift(cal, [0.99, 0.97, 1.0, 0.98] * 10)["below_floor"] is False
    d = cb.drift(cal, [0.9, 0.92, 0.88, 0.91] * 10)
    assert d["below_floor"] is True and d["rows"] == 40
    assert cb.drift({"cache": {"policy": "none"}}, [0.5]) is None


# ----------------------------------------------------------------------------- the spec
def test_spec_validates_the_calibration_section(tiny, tmp_path):
    s = _spec(tiny, "in.jsonl", "out", "cache=auto", "calibration.candidates=[dual, prefix]",
              "calibration.min_agreement=0.9")
    assert s.calibration.candidates == [{"policy": "dual"}, {"policy": "prefix"}]
    with pytest.raises(SpecError, match=r"calibration\.\* is only used with cache.policy: auto"):
        _spec(tiny, "in.jsonl", "out", "calibration.min_agreement=0.9")
    with pytest.raises(SpecError, match=r"calibration.candidates\[0\].kp is not a parameter of policy 'dual'"):
        _spec(tiny, "in.jsonl", "out", "cache=auto", calibration={"candidates": [{"policy": "dual", "kp": 3}]})
    with pytest.raises(SpecError, match=r"calibration.candidates\[0\]: 'none' is not a candidate"):
        _spec(tiny, "in.jsonl", "out", "cache=auto", calibration={"candidates": ["none"]})
    with pytest.raises(SpecError, match=r"calibration.min_agreement"):
        _spec(tiny, "in.jsonl", "out", "cache=auto", "calibration.min_agreement=1.5")


# ----------------------------------------------------------------------------- whole jobs
def test_auto_job_chooses_records_applies_and_resumes(ray_local, tiny, tmp_path):
    inp = _jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "out"
    spec = _spec(tiny, inp, str(out), "cache=auto", "calibration.calibration_rows=4", "calibration.min_agreement=0.0",
                 "calibration.candidates=[dual, prefix]", "evaluation.answer_column=answer", "evaluation.scorer=contains")
    log = io.StringIO()
    res = run(spec, stream=log)
    assert res.status == "complete"
    assert_exactly_once(str(out), [r["id"] for r in QA])
    job = json.loads((out / "_job.json").read_text())
    cal = job["calibration"]
    assert [e["candidate"] for e in cal["table"]] == ["none", "dual", "prefix"] and cal["rows"] == 4
    # floor 0: the fastest of the candidates by the tokens/s measured in the same run
    fastest = max(cal["table"], key=lambda e: e["tokens_per_s"])
    assert cal["winner"] == fastest["candidate"] and cal["cache"] == {"policy": cal["winner"]}
    t = pq.read_table(out, columns=["id", "cache_policy", "audit_token_agreement", "score"])
    assert set(t.column("cache_policy").to_pylist()) == {cal["winner"]}
    audited = [a for a in t.column("audit_token_agreement").to_pylist() if a is not None]
    assert len(audited) == (4 if cal["winner"] != "none" else 0)  # the calibration rows carry the none run
    report = json.loads((out / "_report" / "report.json").read_text())
    assert report["calibration"]["winner"] == cal["winner"] and (out / "_report" / "plots" / "calibration.png").exists()
    assert "## Calibration (cache.policy auto)" in (out / "_report" / "report.md").read_text()
    assert "calibration: chose" in log.getvalue()

    # lose the non-calibration rows: the resumed job reuses the recorded choice without calibrating again
    calib_ids = set(t.filter(pa.compute.is_valid(t.column("audit_token_agreement"))).column("id").to_pylist()) \
        if audited else set()
    for part in out.glob("part-*.parquet"):
        ids = set(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        if not ids & calib_ids:
            part.unlink()
    (out / "_SUCCESS").unlink()
    log = io.StringIO()
    again = run(spec, stream=log)
    assert again.status == "complete" and again.rows_run > 0
    assert "using the recorded choice " + cal["winner"] in log.getvalue() and "calibration: chose" not in log.getvalue()
    assert_exactly_once(str(out), [r["id"] for r in QA])
    assert json.loads((out / "_job.json").read_text())["calibration"]["winner"] == cal["winner"]


def test_auto_chooses_none_unless_a_candidate_meets_the_floor(ray_local, tiny, tmp_path):
    rows = [{"id": f"s{i}", "prompt": "x " * (3 + i)} for i in range(6)]
    inp = _jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    spec = _spec(tiny, inp, str(out), "cache=auto", "calibration.calibration_rows=3",
                 "calibration.candidates=[dual]", "generation.gen_length=32", "generation.block_length=8")
    run(spec, stream=io.StringIO())
    cal = json.loads((out / "_job.json").read_text())["calibration"]
    dual = cal["table"][1]
    assert dual["token_agreement"] is not None
    meets = dual["token_agreement"] >= 0.98
    expected = "dual" if meets and dual["tokens_per_s"] > cal["table"][0]["tokens_per_s"] else "none"
    assert dual["meets_floors"] is meets
    assert cal["winner"] == expected
    assert set(pq.read_table(out, columns=["cache_policy"]).column("cache_policy").to_pylist()) == {expected}
    assert_exactly_once(str(out), [r["id"] for r in rows])
