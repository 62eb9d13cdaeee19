"""Whole jobs on the shared local Ray (num_cpus=2) with tiny random checkpoints.

Invariant checked after every run: every selected input id appears exactly once in the output.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from pipeline import fs as fsx
from pipeline import output
from pipeline.runner import JobError, check_cluster, run
from pipeline.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FlakyEngine travels to the Ray actors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dllm_cache_core.models.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "llada", family="llada"))


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


QA = [{"id": f"q{i:02d}", "prompt": f"Question {i}: what is {i} plus {i}?", "answer": str(2 * i),
       "task": "even" if i % 2 == 0 else "odd"} for i in range(12)]


def _spec(tiny, inp, out, *over, **sections):
    data = {"name": "t", "model": {"path": tiny}, "input": {"path": inp}, "output": {"path": out, "min_rows_per_file": 4},
            "generation": {"gen_length": 16, "block_length": 8}, "cache": "dual",
            "compute": {"num_actors": 1, "batch_size": 4, "length_grouping": 1, "progress_interval_s": 1}}
    data.update(sections)
    return load_spec(data=data, overrides=list(over))


def _ids(out):
    fs, d = fsx.resolve(out)
    t = output.read_output(fs, d, columns=["id", "error_type"])
    return t.column("id").to_pylist(), t.column("error_type").to_pylist()


def assert_exactly_once(out, expected):
    ids, _ = _ids(out)
    assert len(ids) == len(set(ids)), "duplicate ids in the output"
    assert set(ids) == set(expected)


@pytest.fixture(scope="module")
def dual_run(ray_local, tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("dual")
    inp = _jsonl(d / "qa.jsonl", QA)
    spec = _spec(tiny, inp, str(d / "out"), "audit.fraction=0.4", "evaluation.answer_column=answer",
                 "evaluation.scorer=contains", "evaluation.group_by=[task]")
    return spec, run(spec, stream=io.StringIO()), inp


def test_job_end_to_end_with_audit_evaluation_and_report(dual_run):
    spec, res, _ = dual_run
    out = Path(spec.output.path)
    assert res.status == "complete" and res.rows_total == 12 and res.rows_run == 12 and res.errors == {}
    assert_exactly_once(spec.output.path, [r["id"] for r in QA])
    assert (out / "_SUCCESS").exists()
    job = json.loads((out / "_job.json").read_text())
    assert job["status"] == "complete" and job["fingerprint"] and job["fingerprint_components"]["cache"] == {"policy": "dual"}
    assert job["versions"]["ray"] == "2.60.0" and job["spec"]["name"] == "t" and job["finished_at"]
    t = output.read_output(*fsx.resolve(spec.output.path))
    rows = t.to_pylist()
    assert all(isinstance(r["generation"], str) and r["num_generated_tokens"] > 0 and r["flops_speedup"] >= 1.0
               for r in rows)
    assert all(r["score"] in (0.0, 1.0) and r["task"] in ("even", "odd") for r in rows)  # input columns pass through
    audited = [r for r in rows if r["audit_token_agreement"] is not None]
    assert 0 < len(audited) < 12 and all(0.0 <= r["audit_token_agreement"] <= 1.0 and r["audit_speedup"] > 0 for r in audited)
    sizes = sorted(pq.read_metadata(p.path).num_rows for p in output.list_parts(*fsx.resolve(spec.output.path)))
    assert sum(sizes) == 12 and len(sizes) > 1 and all(n >= 4 for n in sizes[1:])  # min_rows_per_file=4
    rep = json.loads((out / "_report" / "report.json").read_text())
    assert rep["rows"] == 12 and rep["audit"]["rows"] == len(audited)
    ev = rep["evaluation"]
    assert ev["scored"] == 12 and ev["accuracy"] == pytest.approx(sum(r["score"] for r in rows) / 12)
    assert set(ev["by"]["task"]) == {"even", "odd"} and ev["by"]["cache_policy"]["dual"]["n"] == 12
    assert rep["run"]["rows_per_s"] > 0 and 0.0 <= rep["run"]["overhead"] < 1.0
    for p in [out / "_report" / "report.md", *[out / "_report" / v for v in rep["plots"].values()]]:
        assert p.stat().st_size > 0, p
    assert (out / "_report" / "plots" / "flops_speedup_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in (out / "_report" / "report.md").read_text()
    # the output folder reads as one Parquet dataset: the report and markers are skipped by readers
    assert pq.read_table(str(out)).num_rows == 12



def test_job_timeline_separates_start_up_from_steady_state(dual_run):
    """Per-actor timing (the progress tracker): each actor's model load and engine calls, the pool's
    ready time inside the wall time, and the overhead after start-up that scaling runs report."""
    spec, res, _ = dual_run
    assert len(res.actors) == spec.compute.num_actors
    a = res.actors[0]
    audited = sum(r["audit_token_agreement"] is not None
                  for r in output.read_output(*fsx.resolve(spec.output.path)).to_pylist())
    assert a["rows"] == 12 + audited  # audited rows run twice (job policy, then `none`)
    assert a["calls"] >= 2 and a["load_end"] >= a["load_start"] > 0
    assert a["engine_s"] == pytest.approx(res.engine_s, rel=0.05)  # the per-actor and summed times agree
    assert len(a["spans"]) == a["calls"] and sum(r for _, _, r in a["spans"]) == a["rows"]
    assert res.preflight_s > 0 and res.started_at_unix > 0
    assert 0 < res.pool_ready_s < res.wall_s and res.steady_wall_s == pytest.approx(res.wall_s - res.pool_ready_s)
    assert res.steady_overhead is not None and res.steady_overhead < res.overhead  # start-up no longer counted
    rep = json.loads((Path(spec.output.path) / "_report" / "report.json").read_text())
    assert rep["run"]["steady_overhead"] == pytest.approx(res.steady_overhead)


def test_bad_rows_become_error_rows_and_the_job_completes(ray_local, tiny, tmp_path):
    rows = [{"id": "ok1", "prompt": "a fine prompt"}, {"id": "empty", "prompt": ""}, {"id": "none", "prompt": None},
            {"id": "int", "prompt": 42}, {"id": "long", "prompt": "y" * 3000},
            '{"id": "surrogate", "prompt": "bad \\udcff text"}', {"id": "ok2", "prompt": "another fine prompt"}]
    inp = _jsonl(tmp_path / "bad.jsonl", rows)
    res = run(_spec(tiny, inp, str(tmp_path / "out")), stream=io.StringIO())
    assert res.status == "complete"
    ids, errs = _ids(str(tmp_path / "out"))
    kinds = dict(zip(ids, errs))
    assert kinds == {"ok1": None, "empty": "empty_prompt", "none": "empty_prompt", "int": "bad_input",
                     "long": "too_long", "surrogate": "bad_input", "ok2": None}
    assert res.errors == {"bad_input": 2, "empty_prompt": 2, "too_long": 1}
    t = output.read_output(*fsx.resolve(str(tmp_path / "out")))
    for r in t.to_pylist():
        assert (r["finish_reason"] == "error") == (r["error_type"] is not None)
        assert (r["error"] is None) == (r["error_type"] is None)


def test_chat_messages_with_invalid_utf8_in_parquet(ray_local, tiny, tmp_path):
    msg_t = pa.list_(pa.struct([("role", pa.string()), ("content", pa.binary())]))
    t = pa.table({"id": ["m1", "m2", "m3"],
                  "messages": pa.array([[{"role": "user", "content": b"hello"}],
                                        [{"role": "user", "content": b"\xc3\x28 broken"}],
                                        [{"role": "system", "content": b"be brief"}, {"role": "user", "content": b"hi"}]],
                                       msg_t)})
    pq.write_table(t, tmp_path / "chat.parquet")
    spec = _spec(tiny, str(tmp_path / "chat.parquet"), str(tmp_path / "out"), "input.messages_column=messages")
    res = run(spec, stream=io.StringIO())
    out = {r["id"]: r for r in output.read_output(*fsx.resolve(spec.output.path)).to_pylist()}
    assert res.errors == {"bad_input": 1} and out["m2"]["error_type"] == "bad_input"
    assert "not valid UTF-8" in out["m2"]["error"]
    assert out["m1"]["generation"] is not None and out["m3"]["num_prompt_tokens"] > out["m1"]["num_prompt_tokens"]
    assert out["m1"]["messages"] == [{"role": "user", "content": b"hello"}]  # passes through unchanged


def test_resume_fingerprint_and_on_existing(ray_local, tiny, tmp_path):
    inp = _jsonl(tmp_path / "qa.jsonl", QA)
    out = str(tmp_path / "out")
    all_ids = [r["id"] for r in QA]
    first = run(_spec(tiny, inp, out, "input.limit=5"), stream=io.StringIO())
    assert first.rows_run == 5
    assert_exactly_once(out, all_ids[:5])
    second = run(_spec(tiny, inp, out), stream=io.StringIO())
    assert (second.rows_run, second.rows_skipped) == (7, 5)
    assert_exactly_once(out, all_ids)
    # a part lost (driver killed before it was written) and a duplicate part (crash during a rewrite)
    fs, d = fsx.resolve(out)
    parts = output.list_parts(fs, d)
    lost = pq.read_table(parts[0].path).num_rows
    Path(parts[0].path).unlink()
    dup = pq.read_table(parts[1].path)
    oid = json.loads((Path(d) / "_job.json").read_text())["output_id"]
    pq.write_table(dup, str(Path(d) / f"part-{oid}-duplicate.parquet"))
    (Path(d) / "_SUCCESS").unlink()
    third = run(_spec(tiny, inp, out), stream=io.StringIO())
    assert third.rows_run == lost
    assert_exactly_once(out, all_ids)
    assert (Path(out) / "_SUCCESS").exists()
    assert run(_spec(tiny, inp, out), stream=io.StringIO()).rows_run == 0  # complete: nothing to do
    with pytest.raises(JobError, match=r"different fingerprint.*cache.policy: 'dual' -> 'prefix'.*overwrite"):
        run(_spec(tiny, inp, out, "cache=prefix"), stream=io.StringIO())
    with pytest.raises(JobError, match="on_existing is 'error'"):
        run(_spec(tiny, inp, out, "output.on_existing=error"), stream=io.StringIO())
    again = run(_spec(tiny, inp, out, "cache=prefix", "output.on_existing=overwrite", "input.limit=3"), stream=io.StringIO())
    assert again.rows_run == 3
    assert_exactly_once(out, all_ids[:3])
    assert json.loads((Path(out) / "_job.json").read_text())["fingerprint_components"]["cache"]["policy"] == "prefix"


class FlakyEngine:
    """The real engine, but rows whose prompt contains '7' fail as if the generation had raised."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, row_ids=None, chat_template=False):
        from dllm_cache_core.engine import TextOutput

        outs = self.engine.generate(prompts, row_ids=row_ids, chat_template=chat_template)
        return [TextOutput(error="transient failure", error_type="generation") if "7" in p else o
                for p, o in zip(prompts, outs)]

    def model_fingerprint(self):
        return self.engine.model_fingerprint()


def flaky_factory(cfg):
    from pipeline.actor import build_engine

    return FlakyEngine(build_engine(cfg))


def test_retry_errors_reruns_error_rows_and_keeps_each_id_once(ray_local, tiny, tmp_path):
    inp = _jsonl(tmp_path / "qa.jsonl", QA)
    out = str(tmp_path / "out")
    first = run(_spec(tiny, inp, out), stream=io.StringIO(), engine_factory=flaky_factory)
    assert first.errors == {"generation": 1}  # "Question 7: what is 7 plus 7?"
    assert run(_spec(tiny, inp, out), stream=io.StringIO()).rows_run == 0  # error rows count as written
    retried = run(_spec(tiny, inp, out), retry_errors=True, stream=io.StringIO())
    assert retried.rows_run == 1 and retried.errors == {}
    assert_exactly_once(out, [r["id"] for r in QA])
    ids, errs = _ids(out)
    assert errs == [None] * 12


def test_model_that_fails_to_load_fails_the_job_once(ray_local, tmp_path):
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    inp = _jsonl(tmp_path / "qa.jsonl", QA[:2])
    with pytest.raises(JobError, match="failed to load, so the job did not start"):
        run(_spec(str(bad), inp, str(tmp_path / "out")), stream=io.StringIO())
    assert not output.list_parts(*fsx.resolve(str(tmp_path / "out")))


def test_compare_two_policies(dual_run, tiny, tmp_path):
    spec, _, inp = dual_run
    none_out = str(tmp_path / "none")
    run(_spec(tiny, inp, none_out, "cache=none", "evaluation.answer_column=answer", "evaluation.scorer=contains"),
        stream=io.StringIO())
    from pipeline.compare import compare

    res = compare(none_out, spec.output.path)
    assert res["common_ok_rows"] == 12 and 0.0 <= res["token_agreement"] <= 1.0
    assert res["a"]["cache_policy"] == "none" and res["b"]["cache_policy"] == "dual"
    assert res["a"]["flops_speedup"] == pytest.approx(1.0) and res["b"]["flops_speedup"] > 1.0
    assert res["a"]["accuracy"] is not None
    cli = subprocess.run([sys.executable, "-m", "pipeline.compare", none_out, spec.output.path], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "token agreement (B vs A)" in cli.stdout and "flops_speedup" in cli.stdout


def test_local_output_refused_on_a_multi_node_cluster(ray_local, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_local, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    spec = _spec(tiny, str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
    with pytest.raises(JobError, match="local path and the cluster has 2 nodes"):
        check_cluster(spec, io.StringIO())
    check_cluster(_spec(tiny, str(tmp_path / "in.jsonl"), str(tmp_path / "out"), "output.shared=true"), io.StringIO())
    check_cluster(_spec(tiny, str(tmp_path / "in.jsonl"), "s3://bucket/out"), io.StringIO())
