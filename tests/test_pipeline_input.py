"""The input side of the output contract: ids keep their type, chat messages in either JSONL shape,
malformed lines and damaged files named, input changes seen on resume, CPU OOM split like GPU OOM,
and the output columns documented from their one declaration."""
from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from pipeline import fs as fsx
from pipeline import output
from pipeline.actor import GenerationActor, is_oom
from pipeline.io import InputError, changed_ids, list_input, parse_jsonl, plan_reads, read_dataset, scan_input
from pipeline.prompts import input_hash
from pipeline.resume import done_rows, drop_rows, plan_resume
from pipeline.schema import INPUT_ERROR, OUTPUT, STATS_COLUMNS, columns_markdown, conform, output_schema

REPO = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _scan(uri, text="prompt", messages=False, id_set=True):
    return scan_input(list_input(uri), "id", id_set, text, messages=messages)


# ----------------------------------------------------------------------------- ids
def test_ids_keep_their_type_and_a_mix_is_refused_naming_file_and_lines(ray_local, tmp_path):
    ints = _jsonl(tmp_path / "ints.jsonl", [{"id": 7, "prompt": "a"}, {"id": 3, "prompt": "b"}])
    plan = plan_reads(_scan(ints))
    assert plan.schema.field("id").type == pa.int64()
    assert sorted(r["id"] for r in read_dataset(plan).take_all()) == [3, 7]  # integers, not '"7"' or "7"
    strs = _jsonl(tmp_path / "strs.jsonl", [{"id": "abc", "prompt": "a"}, {"id": "7", "prompt": "b"}])
    assert sorted(r["id"] for r in read_dataset(plan_reads(_scan(strs))).take_all()) == ["7", "abc"]

    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"id": 1, "prompt": "a"}, "", {"id": "abc", "prompt": "b"}])
    with pytest.raises(InputError, match=r"mixed\.jsonl' mixes integer and string ids \(line 1: 1, line 3: 'abc'\)"):
        _scan(mixed)
    floats = _jsonl(tmp_path / "f.jsonl", [{"id": 1.5, "prompt": "a"}])
    with pytest.raises(InputError, match=r"f\.jsonl' line 1 holds 1.5 \(float\); allowed: string or integer ids"):
        _scan(floats)
    # across files: 1 and "1" would be one id once compared as text
    (tmp_path / "two").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"]}), tmp_path / "two" / "a.parquet")
    pq.write_table(pa.table({"id": ["1", "x"], "prompt": ["c", "d"]}), tmp_path / "two" / "b.parquet")
    with pytest.raises(InputError, match=r"integer ids in 'a.parquet' but string ids in 'b.parquet'"):
        _scan(str(tmp_path / "two"))


def test_malformed_jsonl_line_is_refused_with_its_1_based_line(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "x"}, "", {"id": "b", "prompt": "y"},
                                        {"id": "c", "prompt": "z"}, {"id": "d", "prompt": "w"}, '{"id": "e", "prompt": '])
    with pytest.raises(InputError, match=r"bad\.jsonl' line 6: not valid JSON \(.*\); with input.id_column='id' "
                                         r"every line needs an id.*fix or remove that line"):
        _scan(p)
    nul = _jsonl(tmp_path / "nul.jsonl", [{"id": "a", "prompt": "x"}, "", {"id": None, "prompt": "y"}])
    with pytest.raises(InputError, match=r"null id in '.*nul\.jsonl' line 3"):
        _scan(nul)
    # without an id column the line becomes an error row (its id derived from file and row)
    noid = _jsonl(tmp_path / "noid.jsonl", [{"prompt": "x"}, "{oops"])
    plan = plan_reads(scan_input(list_input(noid), "id", False, "prompt"))
    assert plan.total_rows == 2


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_damaged_input_file_is_one_line_naming_it(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    t = pa.table({"id": ["a", "b"], "prompt": ["x", "y"]})
    if kind == "parquet":
        pq.write_table(t, d / "good.parquet")
        (d / "broken.parquet").write_bytes((d / "good.parquet").read_bytes()[:-30])  # truncated footer
    else:
        feather.write_feather(t, str(d / "good.arrow"))
        (d / "broken.arrow").write_bytes(b"ARROW1\x00\x00garbage")
    with pytest.raises(InputError) as e:
        _scan(str(d))
    msg = str(e.value)
    assert "\n" not in msg and f"broken.{kind}' cannot be read as {kind}" in msg and "replace it" in msg


# ----------------------------------------------------------------------------- chat messages
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def test_jsonl_messages_as_lists_and_as_json_text(ray_local, tmp_path):
    p = _jsonl(tmp_path / "chat.jsonl", [
        {"id": "list", "messages": CHAT},
        {"id": "text", "messages": json.dumps(CHAT)},
        {"id": "extra", "messages": [dict(CHAT[1], name="bob")]},
        {"id": "dict", "messages": {"role": "user"}},
    ])
    plan = plan_reads(_scan(p, text="messages", messages=True))
    rows = {r["id"]: r for r in read_dataset(plan).take_all()}
    assert json.loads(rows["list"]["messages"]) == CHAT and json.loads(rows["text"]["messages"]) == CHAT
    assert json.loads(rows["extra"]["messages"]) == [dict(CHAT[1], name="bob")]  # nothing dropped
    assert [rows[k][INPUT_ERROR] for k in ("list", "text", "extra")] == [None] * 3
    assert "line 4: messages is a JSON dict" in rows["dict"][INPUT_ERROR]
    # the same conversation hashes the same whatever its shape (extra keys are not model input)
    h = input_hash(CHAT, True)
    assert input_hash(rows["list"]["messages"], True) == input_hash(rows["text"]["messages"], True) == h
    assert input_hash([dict(m, name=None) for m in CHAT], True) == h  # a Parquet struct's null field
    assert input_hash("hi there", False) != input_hash([CHAT[1]], True) != input_hash([CHAT[0]], True)


# ----------------------------------------------------------------------------- resume sees input changes
def _written(fs, d, rows, hashes, id_type=pa.string()):
    base = pa.table({"id": pa.array([r["id"] for r in rows], id_type), "prompt": [r["prompt"] for r in rows]})
    t = base.append_column("input_hash", pa.array(hashes, pa.string()))
    t = t.append_column("generation", pa.array(["g"] * len(rows), pa.string()))
    output.write_part(fs, d, conform(t, output_schema(base.schema)), "id")


def test_changed_inputs_are_found_in_read_tasks_and_their_rows_replaced(ray_local, tmp_path):
    rows = [{"id": i, "prompt": f"prompt {i}"} for i in range(6)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "in" / "b.parquet")
    fs, d = fsx.resolve(str(tmp_path / "out"))
    fs.create_dir(d)
    _written(fs, d, rows[:4], [input_hash(r["prompt"], False) for r in rows[:4]], pa.int64())
    scan = _scan(str(tmp_path / "in"))
    assert plan_reads(scan, None, *done_rows(fs, d, "id", False)).todo_rows == 2

    edited = [dict(r, prompt="edited") if r["id"] in (1, 3) else r for r in rows]
    pq.write_table(pa.Table.from_pylist(edited[:3]), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(edited[3:]), tmp_path / "in" / "b.parquet")
    scan = _scan(str(tmp_path / "in"))
    plan = plan_reads(scan, None, *done_rows(fs, d, "id", False))
    assert sorted(changed_ids(plan, use_ray=True).to_pylist()) == ["1", "3"]
    assert sorted(changed_ids(plan, use_ray=False).to_pylist()) == ["1", "3"]

    log = io.StringIO()
    dry = plan_resume(scan, str(tmp_path / "out"), None, False, apply=False, stream=log)
    assert dry.changed == 2 and dry.removed == 0 and dry.plan.todo_rows == 4
    assert output.read_output(fs, d).num_rows == 4  # a dry run removes nothing
    res = plan_resume(scan, str(tmp_path / "out"), None, False, stream=log)
    assert res.changed == 2 and res.removed == 2 and "2 row(s) already written were generated from a different" in log.getvalue()
    assert sorted(r["id"] for r in read_dataset(res.plan).take_all()) == [1, 3, 4, 5]
    left = output.read_output(fs, d)
    assert sorted(left.column("id").to_pylist()) == [0, 2] and left.schema.field("id").type == pa.int64()


def test_rows_written_without_input_hash_are_kept_and_counted(tmp_path):
    p = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    fs, d = fsx.resolve(str(tmp_path / "out"))
    fs.create_dir(d)
    old = pa.table({"id": ["a"], "prompt": ["something else"], "generation": ["g"], "error_type": pa.nulls(1, pa.string())})
    pq.write_table(old, f"{d}/part-old.parquet")  # an older version's part: no input_hash column
    log = io.StringIO()
    res = plan_resume(_scan(p), str(tmp_path / "out"), None, False, use_ray=False, stream=log)
    assert res.changed == 0 and res.plan.todo_rows == 1 and res.plan.unchecked_rows == 1
    assert "1 row(s) already written carry no input_hash" in log.getvalue()


def test_drop_rows_rewrites_only_parts_that_hold_them(tmp_path):
    fs, d = fsx.resolve(str(tmp_path))
    _written(fs, d, [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}], ["h1", "h2"])
    _written(fs, d, [{"id": "c", "prompt": "r"}], ["h3"])
    before = {i.base_name for i in output.list_parts(fs, d)}
    assert drop_rows(fs, d, "id", pa.array(["b"])) == 1
    after = {i.base_name for i in output.list_parts(fs, d)}
    assert len(before & after) == 1 and len(after) == 2
    assert sorted(output.read_output(fs, d).column("id").to_pylist()) == ["a", "c"]
    assert drop_rows(fs, d, "id", pa.array(["c"])) == 1 and len(output.list_parts(fs, d)) == 1


# ----------------------------------------------------------------------------- CPU out of memory
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)")


def test_cpu_oom_is_recognised_and_splits_the_batch():
    assert is_oom(RuntimeError(CPU_OOM)) and is_oom(MemoryError()) and is_oom(RuntimeError("CUDA out of memory."))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    from test_pipeline_actor import FakeEngine, _batch, _config

    class CpuOomEngine(FakeEngine):
        def generate(self, prompts, row_ids=None, chat_template=False):
            self.calls.append(list(prompts))
            if len(prompts) > 1:
                raise RuntimeError(CPU_OOM)
            return super().generate(prompts, row_ids, chat_template)

    b = _batch(["aaaa", "bbbb", "cccc", "dddd"])
    actor = GenerationActor(_config(output_schema(b.schema), lambda cfg: CpuOomEngine(), batch_size=4))
    out = actor(b)
    assert out.column("error_type").to_pylist() == [None] * 4
    assert [len(c) for c in actor.engine.calls][:3] == [4, 2, 1]
    assert out.column("input_hash").to_pylist() == [input_hash(p, False) for p in ["aaaa", "bbbb", "cccc", "dddd"]]


# ----------------------------------------------------------------------------- documentation
def test_output_columns_are_documented_from_their_declaration():
    from dllm_cache_core.stats import SampleStats

    assert STATS_COLUMNS == [f.name for f in dataclasses.fields(SampleStats)]  # stats and schema agree
    assert all(c.doc.strip() for c in OUTPUT)
    doc = (REPO / "docs" / "output.md").read_text()
    m = re.search(r"<!-- columns:begin.*?-->\n(.*?)\n<!-- columns:end -->", doc, re.S)
    assert m, "docs/output.md lost its generated columns block"
    assert m.group(1) == columns_markdown(), "docs/output.md is stale: python -m pipeline.schema > the block"


# ----------------------------------------------------------------------------- whole jobs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dllm_cache_core.models.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "llada", family="llada"))


def _job(tiny, inp, out, **input_over):
    from pipeline.spec import load_spec

    return load_spec(data={
        "name": "t", "model": {"path": tiny}, "input": {"path": inp, **input_over}, "output": {"path": out},
        "generation": {"gen_length": 8, "block_length": 8}, "cache": "dual",
        "compute": {"num_actors": 1, "batch_size": 4, "length_grouping": 1, "progress_interval_s": 1}})


def _rows(out):
    fs, d = fsx.resolve(out)
    return output.read_output(fs, d)


def test_job_keeps_integer_ids_and_regenerates_edited_prompts(ray_local, tiny, tmp_path):
    from pipeline.runner import run

    ids = [5, 6, 7]
    rows = [{"id": i, "prompt": f"tell me about number {n}"} for n, i in enumerate(ids)]
    inp, out = _jsonl(tmp_path / "in.jsonl", rows), str(tmp_path / "out")
    first = run(_job(tiny, inp, out, id_column="id"), stream=io.StringIO())
    assert first.status == "complete" and first.rows_run == 3
    t = _rows(out)
    assert t.schema.field("id").type == pa.int64() and sorted(t.column("id").to_pylist()) == ids
    again = run(_job(tiny, inp, out, id_column="id"), stream=io.StringIO())
    assert again.rows_run == 0 and again.rows_skipped == 3  # the resume converges

    rows[1]["prompt"] = "an edited prompt"
    _jsonl(tmp_path / "in.jsonl", rows)
    log = io.StringIO()
    edited = run(_job(tiny, inp, out, id_column="id"), stream=log)
    assert edited.status == "complete" and edited.rows_run == 1, log.getvalue()
    assert "input changed: 1 row(s)" in log.getvalue()
    t = _rows(out).to_pylist()
    assert sorted(r["id"] for r in t) == ids  # exactly once
    by_id = {r["id"]: r for r in t}
    assert by_id[ids[1]]["prompt"] == "an edited prompt"
    assert all(r["input_hash"] == input_hash(r["prompt"], False) for r in t)


def test_job_reads_jsonl_chat_messages_as_lists_and_json_text(ray_local, tiny, tmp_path):
    from pipeline.runner import run

    rows = [{"id": "l", "messages": CHAT}, {"id": "t\nu", "messages": json.dumps(CHAT)},
            {"id": "abc", "messages": [{"role": "user", "content": "what is two plus two?"}]}]
    inp, out = _jsonl(tmp_path / "chat.jsonl", rows), str(tmp_path / "out")
    spec = _job(tiny, inp, out, messages_column="messages", id_column="id")
    res = run(spec, stream=io.StringIO())
    assert res.status == "complete" and res.errors == {}
    t = {r["id"]: r for r in _rows(out).to_pylist()}
    assert sorted(t) == ["abc", "l", "t\nu"]  # string ids as they were, not '"abc"'
    assert t["l"]["generation_token_ids"] == t["t\nu"]["generation_token_ids"]  # one conversation, two shapes
    assert t["l"]["input_hash"] == t["t\nu"]["input_hash"] == input_hash(CHAT, True)
    assert json.loads(t["l"]["messages"]) == CHAT
    assert run(spec, stream=io.StringIO()).rows_run == 0


def test_file_damaged_after_the_scan_and_damaged_output_part_are_named(tmp_path):
    from pipeline.io import read_file_task
    from pipeline.resume import OutputPartError

    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "a.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"]}), f)
    plan = plan_reads(_scan(str(tmp_path / "in")))
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(InputError, match=r"a\.parquet' cannot be read as parquet .*replace it"):
        list(read_file_task(plan, plan.files[0]))
    fs, d = fsx.resolve(str(tmp_path / "out"))
    fs.create_dir(d)
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(OutputPartError, match=r"part-0\.parquet' cannot be read .*delete it and run again"):
        done_rows(fs, d, "id", False)


def test_resume_masks_with_a_limit_that_ends_before_the_last_files(tmp_path):
    (tmp_path / "in").mkdir()
    for k in range(3):
        pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(3)], "prompt": ["p"] * 3}), tmp_path / "in" / f"{k}.parquet")
    scan = _scan(str(tmp_path / "in"))
    plan = plan_reads(scan, 4, pa.array(["0-0", "1-0", "2-0"]), pa.array(["h", "h", "h"]))
    assert [f.n_keep for f in plan.files] == [2, 0, 0] and [f.n_check for f in plan.files] == [1, 1, 0]
    assert plan.todo_rows == 2 and plan.unchecked_rows == 0
    assert [f.check_hashes.to_pylist() for f in plan.check_files] == [["h"], ["h"]]


def test_run_figures_are_documented():
    from pipeline.runner import RunResult

    doc = (REPO / "docs" / "output.md").read_text()
    block = re.search(r"<!-- run:begin -->\n(.*?)\n<!-- run:end -->", doc, re.S).group(1)
    documented = re.findall(r"^\| `(\w+)` \|", block, re.M)
    assert documented == list(RunResult("o", "complete", 0, 0, 0).to_dict()), "docs/output.md: run figures drifted"


def test_oom_halves_run_after_the_failed_call_is_released():
    """The failed call's frames (holding its tensors in a real engine) are freed before the halves run."""
    import gc
    import weakref

    from test_pipeline_actor import FakeEngine, _batch, _config

    class Held:
        pass

    class Engine(FakeEngine):
        def __init__(self):
            super().__init__()
            self.alive_at_retry: list[bool] = []
            self.ref = None

        def generate(self, prompts, row_ids=None, chat_template=False):
            if len(prompts) > 1:
                buffers = Held()  # what a real call holds while it runs
                self.ref = weakref.ref(buffers)
                raise MemoryError()
            gc.collect()
            self.alive_at_retry.append(self.ref() is not None)
            return super().generate(prompts, row_ids, chat_template)

    b = _batch(["aa", "bb"])
    actor = GenerationActor(_config(output_schema(b.schema), lambda cfg: Engine(), batch_size=2))
    assert actor(b).column("error_type").to_pylist() == [None, None]
    assert actor.engine.alive_at_retry == [False, False]
