"""pipeline.build_processor: config validation (the job spec's sections and messages), prompt-hash row
ids, laziness, composition with user stages, error rows, and the runnable example.

Ray tests run the embedded model on CPU with tiny canvases; each consumes its Dataset once (every
execution starts an actor pool, which dominates the time on a 2-CPU machine).
"""
from __future__ import annotations

import importlib.util
import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import ProcessorConfig, ProcessorConfigError, build_processor
from pipeline.processor import ROW_ID, add_row_ids, row_id
from pipeline.schema import OUTPUT_COLUMNS, STATS_COLUMNS
from pipeline.spec import CacheSpec, ComputeSpec, GenerationSpec, InputSpec, JobSpec, ModelSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "jobs" / "data" / "demo_prompts.jsonl"
NOISY = {"gen_length": 16, "steps": 16, "temperature": 3.0, "remasking": "random"}
"""Sampling hot enough that the embedded model's outputs depend on the row's seed (greedy ones do not)."""
TINY = {"generation": {"gen_length": 8, "steps": 8}, "cache": "dual", "compute": {"batch_size": 4}}


# ----------------------------------------------------------------------------- config (no Ray)
def test_sections_are_the_job_specs_classes():
    fields = ProcessorConfig.model_fields
    assert fields["model"].annotation is ModelSpec and fields["generation"].annotation is GenerationSpec
    assert fields["cache"].annotation is CacheSpec and fields["compute"].annotation is ComputeSpec
    # the column settings and the seed are the job spec's own field definitions (doc included)
    assert fields["prompt_column"].description == InputSpec.model_fields["prompt_column"].description
    assert fields["prompt_column"].description  # attribute docstrings are field descriptions
    assert fields["seed"].metadata == JobSpec.model_fields["seed"].metadata


@pytest.mark.parametrize("section, value", [
    ("generation", {"steps": 0}),
    ("generation", {"gen_length": 10, "block_length": 4}),
    ("generation", {"remasking": "sideways"}),
    ("cache", {"policy": "dual", "kp": 3}),
    ("cache", {"policy": "lru"}),
    ("compute", {"num_actorz": 2}),
    ("compute", {"gpus_per_actor": -1}),
    ("model", {"dtype": "int8"}),
])
def test_config_errors_are_the_job_specs(section, value):
    with pytest.raises(ProcessorConfigError) as got:
        ProcessorConfig(**{section: value})
    job = {"name": "j", "input": {"path": "in.jsonl"}, "output": {"path": "out"}, section: value}
    with pytest.raises(SpecError) as want:
        load_spec(data=job)
    assert got.value.problems == want.value.problems
    assert all(p.startswith(f"{section}.") for p in got.value.problems), got.value.problems
    assert str(got.value).startswith("invalid processor config:")


def test_config_errors_name_processor_fields():
    with pytest.raises(ProcessorConfigError) as e:
        ProcessorConfig(prompt_colum="text")
    assert e.value.problems == ["prompt_colum: unknown key; allowed keys: " + ", ".join(ProcessorConfig.model_fields)]
    with pytest.raises(ProcessorConfigError) as e:
        ProcessorConfig(prompt_column=5, seed=-1)
    assert e.value.problems == ["seed: -1 is not allowed; allowed: >= 0",
                                "prompt_column: 5 is not allowed: Input should be a valid string"]
    with pytest.raises(ProcessorConfigError, match=r"generation.remasking='entropy' is not allowed for "
                                                   r"model.family='llada'"):
        ProcessorConfig(model={"family": "llada"}, generation={"remasking": "entropy"})
    with pytest.raises(ProcessorConfigError, match=r"compute.batches_in_flight=2 needs generation.scheduling: "
                                                   r"continuous, not 'static'"):
        ProcessorConfig(generation={"scheduling": "static"}, compute={"batches_in_flight": 2})


def test_config_forms_and_defaults():
    c = ProcessorConfig(cache="dllm_cache", generation=GenerationSpec(gen_length=16), compute={"gpus_per_actor": 1})
    assert c.cache == CacheSpec(policy="dllm_cache") and c.generation.gen_length == 16
    assert c.dtype == "bfloat16" and ProcessorConfig().dtype == "float32"
    assert ProcessorConfig().text_column == "prompt" and ProcessorConfig(messages_column="m").text_column == "m"
    assert build_processor({"cache": "prefix"}).config.cache.policy == "prefix"
    with pytest.raises(ProcessorConfigError, match="cache.policy"):
        build_processor({"cache": "nope"})


# ----------------------------------------------------------------------------- row ids (no Ray)
def test_row_ids_hash_the_prompt_or_take_the_id_column():
    msgs = [{"role": "user", "content": "hi"}]
    assert row_id("hi") == row_id("hi") != row_id("hi ") and row_id("hi") != row_id(msgs)
    assert len(row_id(msgs)) == 16 and row_id(msgs) == row_id([{"content": "hi", "role": "user"}])
    t = pa.table({"prompt": ["a", "b", "a", None], "k": [1, 2, None, 4]})
    hashed = add_row_ids(t, None, "prompt")
    assert hashed.column_names == ["prompt", "k", ROW_ID]
    assert hashed.column(ROW_ID).to_pylist() == [row_id("a"), row_id("b"), row_id("a"), row_id(None)]
    given = add_row_ids(t, "k", "prompt")  # integer ids as text; a null id falls back to the hash
    assert given.column(ROW_ID).to_pylist() == ["1", "2", row_id("a"), "4"]
    assert add_row_ids(given, "k", "prompt").column_names == ["prompt", "k", ROW_ID]  # replaced, not doubled
    with pytest.raises(ValueError, match=r"id_column='id' is not a column of the data; allowed: one of prompt, k"):
        add_row_ids(t, "id", "prompt")


# ----------------------------------------------------------------------------- on Ray
def _cpus_in_use(ray) -> float:
    return ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)


def test_building_runs_nothing_and_the_model_loads_on_consumption(ray_local, tmp_path):
    ray = ray_local
    seen = tmp_path / "seen"
    seen.mkdir()
    before = _cpus_in_use(ray)

    def marker(row: dict) -> dict:  # a preprocess leaving a file per row it sees (a closure: pickled by value)
        Path(seen, f"{row['k']}.seen").touch()
        return row

    cfg = ProcessorConfig(model={"path": str(tmp_path / "no-such-model")}, compute={"max_actor_restarts": 0}, **{
        k: v for k, v in TINY.items() if k != "compute"})
    ds = build_processor(cfg, preprocess=marker)(ray.data.from_items([{"k": i, "prompt": "hi"}
                                                                                for i in range(3)]))
    out = ds.filter(lambda r: True)  # more lazy stages on top
    time.sleep(1.0)
    assert list(seen.iterdir()) == [] and _cpus_in_use(ray) <= before  # no task, no actor
    with pytest.raises(Exception, match="failed to load"):  # the actor is built (and fails) only now
        out.take_all()


@pytest.fixture(scope="module")
def mixed_rows():
    """Good prompts (one twice), and bad ones: empty, whitespace, null, wrong type."""
    good = [json.loads(line) for line in DEMO.read_text().splitlines()][13:16]  # three short additions
    rows = [{"k": i, "prompt": r["prompt"], "ref": r["answer"]} for i, r in enumerate(good)]
    rows.append({"k": 3, "prompt": good[0]["prompt"], "ref": good[0]["answer"]})
    rows += [{"k": 4, "prompt": "", "ref": None}, {"k": 5, "prompt": "   ", "ref": None},
             {"k": 6, "prompt": None, "ref": None}, {"k": 7, "prompt": 42, "ref": None},
             {"k": 8, "prompt": "drop me", "ref": None}]
    return rows


def test_processor_composes_with_user_stages_and_keeps_bad_rows(ray_local, mixed_rows):
    ray = ray_local
    cfg = ProcessorConfig(generation=NOISY, cache="dual",
                          compute={"batch_size": 2, "length_grouping": 2}, chat_template=True, seed=7)
    ds = ray.data.from_items(mixed_rows, override_num_blocks=1)  # one block: mixed types become Python objects
    ds = ds.filter(lambda r: r["prompt"] != "drop me")  # a user stage before
    proc = build_processor(cfg, preprocess=lambda r: {**r, "pre": f"k{r['k']}"},
                           postprocess=lambda r: {**r, "answer": (r["generation"] or "").strip() or None})
    ds = proc(ds).map(lambda r: {**r, "after": r["k"] * 10})  # a user stage after
    rows = sorted(ds.take_all(), key=lambda r: r["k"])  # executes once
    assert [r["k"] for r in rows] == list(range(8))  # the filtered row is gone, every other row is there
    user = {"k", "prompt", "ref", "pre", "answer", "after"}
    engine = set(OUTPUT_COLUMNS) - {"score", "extracted_answer", "audit_speedup", "audit_token_agreement"}
    assert all(set(r) == user | engine for r in rows), set(rows[0])  # no internal id column either
    assert [r["pre"] for r in rows] == [f"k{i}" for i in range(8)] and [r["after"] for r in rows] == [
        i * 10 for i in range(8)]
    for r in rows:
        r["generation_token_ids"] = None if r["generation_token_ids"] is None else list(r["generation_token_ids"])
    for r in rows[:4]:
        assert r["error_type"] is None and r["error"] is None and r["generation"] is not None, r
        assert r["answer"] == (r["generation"].strip() or None) and r["finish_reason"] in ("stop", "length")
        assert r["num_generated_tokens"] == len(r["generation_token_ids"]) and r["cache_policy"] == "dual"
        assert r["model"] == "builtin:tiny"
    errs = {r["k"]: r["error_type"] for r in rows[4:]}
    assert errs == {4: "empty_prompt", 5: "empty_prompt", 6: "empty_prompt", 7: "bad_input"}, errs
    for r in rows[4:]:
        assert r["error"] and r["finish_reason"] == "error" and r["generation"] is None and r["answer"] is None
        assert all(r[s] is None for s in STATS_COLUMNS if s != "finish_reason")
    # no id column: the id is the prompt's hash, so the same prompt samples the same tokens
    assert rows[3]["generation_token_ids"] == rows[0]["generation_token_ids"]


def test_id_column_seeds_rows_and_iter_batches(ray_local, mixed_rows):
    ray = ray_local
    cfg = ProcessorConfig(generation=NOISY, cache="dual",
                          compute={"batch_size": 4}, chat_template=True, seed=7, id_column="k")
    rows = [r for r in mixed_rows if r["k"] in (0, 3)]  # the same prompt under two ids
    out = build_processor(cfg)(ray.data.from_items(rows))
    got = {}
    for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
        assert pa.types.is_list(b.schema.field("generation_token_ids").type)  # the actor's own types
        assert b.schema.field("generation_token_ids").type.value_type == pa.int32()
        for r in b.to_pylist():
            got[r["k"]] = r["generation_token_ids"]
    assert set(got) == {0, 3} and all(got.values())
    assert got[0] != got[3]  # different ids, different seeds


def _example():
    spec = importlib.util.spec_from_file_location("ray_data_stage", REPO / "examples" / "ray_data_stage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_runs_and_writes_answers(ray_local, tmp_path, capsys):
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    good = [demo[2], demo[13], demo[14]]  # "Write backwards: 75, 29", two additions
    bad = [{"id": "bad-empty", "prompt": "", "answer": "x", "task": "t"},
           {"id": "bad-null", "prompt": None, "answer": "x", "task": "t"},
           {"id": "bad-missing", "answer": "x", "task": "t"}]
    inp = tmp_path / "slice.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    out = tmp_path / "answers"
    assert _example().main([str(out), "--input", str(inp), "--gen-length", "32", "--block-length", "32"]) == 0
    t = pq.read_table(out)
    assert t.num_rows == 6 and sorted(t.column("id").to_pylist()) == sorted(r["id"] for r in good + bad)
    assert t.column_names == _example().ANSWERS.names
    by_id = {r["id"]: r for r in t.to_pylist()}
    for r in good:
        got = by_id[r["id"]]
        assert got["error_type"] is None and got["predicted"] == r["answer"] and got["correct"] is True, got
    assert {i: by_id[i]["error_type"] for i in ("bad-empty", "bad-null", "bad-missing")} == {
        "bad-empty": "empty_prompt", "bad-null": "bad_input", "bad-missing": "bad_input"}
    assert all(by_id[i]["predicted"] is None and by_id[i]["correct"] is None and by_id[i]["error"]
               for i in ("bad-empty", "bad-null", "bad-missing"))
    assert "6 rows" in capsys.readouterr().out and int(pc.sum(t.column("correct")).as_py()) == 3


def test_job_and_processor_give_the_same_rows(ray_local, tmp_path, mixed_rows):
    """run_job's stage and build_processor's are one: same sections and ids -> the same tokens and errors."""
    from pipeline import fs as fsx
    from pipeline import output
    from pipeline.runner import run

    inp = tmp_path / "in.jsonl"
    rows = [{"id": f"r{r['k']}", "prompt": r["prompt"]} for r in mixed_rows[:3]] + [{"id": "r-empty", "prompt": ""}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sections = {"seed": 3, "generation": NOISY, "cache": "dual", "compute": {"batch_size": 2, "length_grouping": 1}}
    spec = load_spec(data={"name": "same", "input": {"path": str(inp), "chat_template": True},
                           "output": {"path": str(tmp_path / "job")}, **sections})
    run(spec, stream=io.StringIO())
    fs, d = fsx.resolve(spec.output.path)
    job = output.read_output(fs, d, columns=["id", "generation_token_ids", "error_type"]).to_pylist()
    config = ProcessorConfig(chat_template=True, id_column="id", **sections)
    got = build_processor(config)(ray_local.data.read_json(str(inp))).take_all()

    def key(r: dict) -> tuple:
        ids = r["generation_token_ids"]
        return r["error_type"], None if ids is None else [int(t) for t in ids]

    assert {r["id"]: key(r) for r in got} == {r["id"]: key(r) for r in job}
    assert len(job) == 4 and sum(r["error_type"] == "empty_prompt" for r in job) == 1


def test_batches_in_flight_on_one_actor_equal_one_batch_at_a_time(ray_local, tmp_path):
    """Three batches in flight on one actor (a StreamingGenerationActor: one engine stream) give every
    row the tokens of the one-batch-at-a-time pool, each row once, in each batch's order; a log kept by
    the engine shows batches submitting while another batch's rows were still in the stream."""
    ray = ray_local
    log = tmp_path / "submits.log"

    def factory(cfg):  # a closure: pickled by value into the actors
        from pipeline.actor import build_engine

        engine = build_engine(cfg)
        engine.block_budget = lambda rid: 1 + int(rid) % 4  # rows of 1..4 blocks: random weights never stop
        opener = engine.open_stream

        def open_stream(**kw):
            import threading

            stream = opener(**kw)
            submit, text = stream.submit, engine._text
            second = threading.Event()

            def logged(rows, budgets=None):
                with open(log, "a") as f:  # rows of other batches not yet finished
                    f.write(f"{len(stream._inbox) + len(stream._pending) + len(stream._running)}\n")
                    f.flush()
                if sum(1 for _ in open(log)) >= 2:
                    second.set()
                return submit(rows, budgets)

            def held_text(out):  # no row finishes before a second batch came (or 20 s passed: then it fails)
                second.wait(20)
                return text(out)

            stream.submit, engine._text = logged, held_text
            return stream

        engine.open_stream = open_stream
        return engine

    rows = [{"k": i, "prompt": p} for i, p in enumerate(
        ["hello there", "the quick brown fox", "1+2=", "why", "abcdefghijk", "Math: ", "zz top", "a longer prompt",
         "x", "sum of 3 and 4", "tell me", "ok then"])]
    out = {}
    for flight in (1, 3):
        cfg = ProcessorConfig(generation={"gen_length": 32, "block_length": 8, "steps": 16, "stop_at_eos": False,
                                          "slots": 2},
                              cache="dual", id_column="k",
                              compute={"batch_size": 2, "length_grouping": 2, "batches_in_flight": flight})
        ds = build_processor(cfg, engine_factory=factory)(ray.data.from_items(rows, override_num_blocks=3))
        out[flight] = ds.take_all()
    assert sorted(r["k"] for r in out[3]) == list(range(12))  # rows in = rows out, none twice
    tokens = {f: {r["k"]: (list(r["generation_token_ids"]), r["num_generated_tokens"], r["error_type"]) for r in out[f]}
              for f in out}
    assert tokens[3] == tokens[1]
    assert {n for _, n, _ in tokens[1].values()} == {8, 16, 24, 32}
    seen = [int(x) for x in log.read_text().split()]
    assert len(seen) == 3 and max(seen) > 0, seen  # a batch joined while another's rows were decoding
