"""Input formats through the Ray Data datasource, ids, resume masks, atomic parts, exactly-once repair."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from pipeline import fs as fsx
from pipeline import output
from pipeline.io import InputError, list_input, parse_jsonl, plan_reads, read_dataset, scan_input
from pipeline.schema import INPUT_ERROR, OUTPUT_FIELDS, conform, output_schema

ROWS = [{"id": f"r{i}", "prompt": f"prompt number {i}", "task": "a" if i % 2 else "b", "n": i} for i in range(7)]


def _write(fmt: str, root, rows=ROWS, name="data"):
    """The rows in `fmt` under `root`; returns the path to give input.path."""
    t = pa.Table.from_pylist(rows)
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":  # a folder of two files
        pq.write_table(t.slice(0, 4), root / f"{name}-0.parquet")
        pq.write_table(t.slice(4), root / f"{name}-1.parquet")
        return str(root)
    if fmt == "arrow":
        feather.write_feather(t, str(root / f"{name}.arrow"))
        return str(root / f"{name}.arrow")
    if fmt == "jsonl":
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)
    if fmt == "hf_disk":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(root / name))
        return str(root / name)
    raise AssertionError(fmt)


def _plan(uri, fmt="auto", id_column="id", id_set=False, limit=None, done=None, text="prompt"):
    scan = scan_input(list_input(uri, fmt), id_column, id_set, text)
    return plan_reads(scan, limit, pa.array(done, pa.string()) if done else None)


@pytest.mark.parametrize("uri_kind", ["plain", "file_uri"])
@pytest.mark.parametrize("fmt", ["parquet", "arrow", "jsonl", "hf_disk"])
def test_every_format_reads_through_ray_data(ray_local, tmp_path, fmt, uri_kind):
    path = _write(fmt, tmp_path / fmt)
    uri = path if uri_kind == "plain" else "file://" + path
    plan = _plan(uri, fmt if fmt == "hf_disk" else "auto")
    assert plan.format == fmt and plan.total_rows == 7 and plan.todo_rows == 7
    got = sorted(read_dataset(plan).take_all(), key=lambda r: r["n"])
    assert [r["id"] for r in got] == [r["id"] for r in ROWS]
    assert [r["prompt"] for r in got] == [r["prompt"] for r in ROWS]
    assert [r["task"] for r in got] == [r["task"] for r in ROWS]  # input columns pass through
    assert all(r[INPUT_ERROR] is None for r in got)


def test_parquet_glob_and_limit_and_resume_masks(ray_local, tmp_path):
    _write("parquet", tmp_path / "pq")
    (tmp_path / "pq" / "_ignored.parquet").write_bytes(b"not parquet")  # hidden/underscore files are skipped
    plan = _plan(str(tmp_path / "pq" / "data-*.parquet"), limit=6, done=["r0", "r3", "r5"])
    assert plan.total_rows == 6 and plan.todo_rows == 3
    ids = sorted(r["id"] for r in read_dataset(plan).take_all())
    assert ids == ["r1", "r2", "r4"]  # r6 is past the limit, r0/r3/r5 are done
    done_all = _plan(str(tmp_path / "pq"), done=[r["id"] for r in ROWS])
    assert done_all.todo_rows == 0 and done_all.todo_files == []


def test_derived_ids_are_stable_and_documented(ray_local, tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(5)]
    d = _write("parquet", tmp_path / "noid", rows)
    a = _plan(d)
    b = _plan("file://" + d)
    c = _plan(d + "/*.parquet")
    assert a.derived_ids and a.selected_ids.to_pylist() == b.selected_ids.to_pylist() == c.selected_ids.to_pylist()
    assert a.selected_ids.to_pylist() == ["data-0.parquet#0", "data-0.parquet#1", "data-0.parquet#2",
                                          "data-0.parquet#3", "data-1.parquet#0"]
    got = {r["id"]: r["prompt"] for r in read_dataset(_plan(d, done=["data-0.parquet#1"])).take_all()}
    assert got == {"data-0.parquet#0": "p0", "data-0.parquet#2": "p2", "data-0.parquet#3": "p3", "data-1.parquet#0": "p4"}


def test_input_validation_errors(tmp_path):
    dup = _write("jsonl", tmp_path / "dup", ROWS + [dict(ROWS[2], prompt="again")])
    with pytest.raises(InputError, match=r"1 duplicate id\(s\).*'r2'"):
        _plan(dup)
    nul = _write("jsonl", tmp_path / "nul", [{"id": None, "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(InputError, match="null id"):
        _plan(nul)
    noid = _write("jsonl", tmp_path / "noid", [{"prompt": "x"}])
    with pytest.raises(InputError, match="input.id_column='key' is not a column of the input; allowed: prompt"):
        _plan(noid, id_column="key", id_set=True)
    clash = _write("jsonl", tmp_path / "clash", [{"id": "a", "prompt": "x", "generation": "old"}])
    with pytest.raises(InputError, match="'generation' collide with output columns"):
        _plan(clash)
    with pytest.raises(InputError, match="does not exist"):
        _plan(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no jsonl files found"):
        (tmp_path / "empty").mkdir()
        _plan(str(tmp_path / "empty"), "jsonl")
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": [3]}), typed)
    with pytest.raises(InputError, match="column 'prompt' has type int64; allowed: string"):
        _plan(str(typed))
    with pytest.raises(InputError, match=r"column 'answer' \(from the job spec\) is not in the input"):
        scan_input(list_input(dup), "id", False, "prompt", ("prompt", "answer"))


def test_hf_datasetdict_points_at_a_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="is a DatasetDict; point it at one split folder"):
        list_input(str(tmp_path / "dd"))


def test_jsonl_bad_lines_become_row_errors():
    data = (b'{"id": "a", "prompt": "ok"}\n'
            b'{"id": "b", "prompt": 5}\n'
            b'{"id": "c", "prompt": "x\\udcff"}\n'
            b'not json\n'
            b'\xff\xfe{"id": "e"}\n'
            b'\n'
            b'[1, 2]\n')
    t = parse_jsonl(data, "prompt")
    assert t.num_rows == 6
    errs = t.column(INPUT_ERROR).to_pylist()
    assert errs[0] is None
    assert errs[1] == "prompt is int, expected a string"
    assert "invalid UTF-8" in errs[2] and t.column("prompt")[2].as_py() is None
    assert "not valid JSON" in errs[3] and "line 4" in errs[3]
    assert "not valid UTF-8" in errs[4]
    assert "expected an object" in errs[5] and "line 7" in errs[5]
    mixed = parse_jsonl(b'{"x": 1}\n{"x": "s"}\n')
    assert mixed.column("x").to_pylist() == ["1", '"s"']  # mixed types kept as JSON text


def _out_table(ids, error_type=None):
    n = len(ids)
    base = pa.table({"id": ids, "prompt": [f"p{i}" for i in ids]})
    t = base.append_column("error_type", pa.array([error_type] * n, pa.string()))
    t = t.append_column("generation", pa.array([None if error_type else "g"] * n, pa.string()))
    return conform(t, output_schema(base.schema))


def test_parts_are_atomic_named_by_ids_and_error_only_parts_read_together(tmp_path):
    fs, d = fsx.resolve(str(tmp_path))
    ok = _out_table(["a", "b"])
    bad = _out_table(["c"], "too_long")  # generation columns all null
    n1 = output.write_part(fs, d, ok, "id")
    output.write_part(fs, d, bad, "id")
    (tmp_path / ".part-x.parquet.123.tmp").write_bytes(b"partial")  # a crashed write is never listed
    assert len(output.list_parts(fs, d)) == 2
    t = output.read_output(fs, d)
    assert t.num_rows == 3 and t.schema.field("generation_token_ids").type == pa.list_(pa.int32())
    assert pq.read_schema(str(tmp_path / n1)).names[-len(OUTPUT_FIELDS):] == [f.name for f in OUTPUT_FIELDS]
    assert sorted(output.done_ids(fs, d, "id", retry_errors=False).to_pylist()) == ["a", "b", "c"]
    assert sorted(output.done_ids(fs, d, "id", retry_errors=True).to_pylist()) == ["a", "b"]


def test_deduplicate_keeps_ok_rows_and_is_idempotent(tmp_path):
    fs, d = fsx.resolve(str(tmp_path))
    output.write_part(fs, d, _out_table(["a", "b", "c"], "generation"), "id")  # first attempt: errors
    output.write_part(fs, d, _out_table(["b"]), "id")  # retry of b succeeded
    output.write_part(fs, d, _out_table(["c", "d"]), "id")
    res = output.deduplicate(fs, d, "id")
    assert res.duplicates == 2
    t = output.read_output(fs, d)
    rows = {i: e for i, e in zip(t.column("id").to_pylist(), t.column("error_type").to_pylist())}
    assert t.num_rows == 4 and rows == {"a": "generation", "b": None, "c": None, "d": None}
    assert output.deduplicate(fs, d, "id").duplicates == 0


def test_localize_model_copies_object_store_folder_once(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    mem.pipe("/models/m1/config.json", b'{"a": 1}')
    mem.pipe("/models/m1/model.safetensors", b"weights")
    local = fsx.localize_model("memory://models/m1", cache_dir=str(tmp_path))
    assert open(f"{local}/config.json").read() == '{"a": 1}'
    mem.pipe("/models/m1/config.json", b'{"a": 2}')
    assert fsx.localize_model("memory://models/m1", cache_dir=str(tmp_path)) == local
    assert open(f"{local}/config.json").read() == '{"a": 1}'  # not copied again
    assert fsx.localize_model("/some/local/dir") == "/some/local/dir"
    assert fsx.localize_model("builtin:tiny") == "builtin:tiny"
    assert not fsx.is_local("s3://b/x") and fsx.is_local("file:///x") and fsx.is_local("rel/x")
    with pytest.raises(ValueError, match="absolute path"):
        fsx.resolve("file://relative/x")
