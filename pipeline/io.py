"""Input: list files, scan ids before any work, and read rows through a Ray Data datasource.

Formats: Parquet, Arrow IPC/Feather, a Hugging Face `datasets` folder written by `save_to_disk`
(one split: its Arrow stream files), and JSONL. A path may be a file, a folder (searched recursively
for files of the format, hidden and `_`-prefixed names skipped) or a glob, local or on an object store.

Ids. The `input.id_column` column when the data has it, kept with its type and value (integer or
string; one type per job: a mix is refused, naming the file and lines or files); otherwise a stable
id is derived into that column: `<path of the file relative to the input root>#<0-based row index in
the file>` (e.g. `shard-00001.parquet#42`). The root is the folder given, the folder part of a glob
before its first wildcard, or the folder of a single file; so ids survive moving the data set as a
whole but change when files are renamed or rows reordered. Duplicate ids are a validation error.

JSONL. Each line is parsed on its own: a line that is not valid UTF-8, JSON or an object becomes an
error row naming its 1-based line, or, when ids come from a column, refuses the job with the file,
line and reason (the line has no id to write). A chat messages column may hold lists of {role,
content} or their JSON text, and is read as JSON text. Other columns whose values mix types are kept
as each value's JSON text. A Parquet or Arrow file that cannot be read refuses the job in one line
naming the file and what to do.

The driver scans ids once (`scan_input`): duplicate check, `input.limit`, and resume (ids already in
the output). The result is a `ReadPlan` holding, per file, a bit mask of the rows still to run; the
Ray Data read tasks (`InputDatasource`) read only those files and keep only those rows. On resume a
second mask marks the rows already written; `changed_ids` reads those in read tasks of their own,
hashes their input, and returns the ids whose recorded `input_hash` differs (pipeline/resume.py).
"""
from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import fs as fsx
from .schema import INPUT_ERROR, colliding_columns

EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "arrow": (".arrow", ".feather", ".ipc", ".arrows"),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "hf_disk": (".arrow",),
}
CHUNK_ROWS = 65536


class InputError(ValueError):
    """The input data breaks a rule that is checked before any work starts."""


@dataclass(frozen=True)
class InputFile:
    path: str
    """Path inside the filesystem."""
    rel: str
    """Path relative to the input root (used in derived ids)."""
    size: int


@dataclass
class InputSource:
    uri: str
    fs: pafs.FileSystem
    format: str
    files: list[InputFile]


# ----------------------------------------------------------------------------- listing
def _is_glob(p: str) -> bool:
    return any(c in p for c in "*?[")


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _detect_format(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> str:
    if info.type == pafs.FileType.Directory:
        if fsx.exists(fs, fsx.join(path, "state.json")) or fsx.exists(fs, fsx.join(path, "dataset_dict.json")):
            return "hf_disk"
        names = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if i.type == pafs.FileType.File]
    else:
        names = [path]
    for fmt in ("parquet", "jsonl", "arrow"):
        if any(n.lower().endswith(EXTENSIONS[fmt]) for n in names):
            return fmt
    raise InputError(f"input.path={path!r}: cannot tell the format from the file names; "
                     f"set input.format (allowed: parquet, arrow, jsonl, hf_disk)")


def _hf_disk_files(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    if fsx.exists(fs, fsx.join(path, "dataset_dict.json")):
        with fs.open_input_stream(fsx.join(path, "dataset_dict.json")) as f:
            splits = json.loads(f.read()).get("splits", [])
        raise InputError(f"input.path={uri!r} is a DatasetDict; point it at one split folder "
                         f"(allowed: {', '.join(fsx.join(uri, s) for s in splits)})")
    state = fsx.join(path, "state.json")
    if not fsx.exists(fs, state):
        raise InputError(f"input.path={uri!r}: no state.json; not a folder written by datasets' save_to_disk")
    try:
        with fs.open_input_stream(state) as f:
            data_files = json.loads(f.read()).get("_data_files", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InputError(f"input.path={uri!r}: state.json is not the JSON that datasets' save_to_disk writes "
                         f"({type(e).__name__}); save the split again") from None
    return [fsx.join(path, d["filename"]) for d in data_files]


def list_input(uri: str, fmt: str = "auto") -> InputSource:
    """Resolve `uri` to the sorted list of files to read; InputError when there are none."""
    fs, path = fsx.resolve(uri)
    if _is_glob(path):
        base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0] or "/"
        infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        root = base
        if fmt == "auto":
            fmt = _detect_format(fs, infos[0].path, infos[0]) if infos else "parquet"
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input.path={uri!r} does not exist")
        if fmt == "auto":
            fmt = _detect_format(fs, path, info)
        if fmt == "hf_disk":
            if info.type != pafs.FileType.Directory:
                raise InputError(f"input.path={uri!r}: format hf_disk needs the folder written by save_to_disk")
            infos = fs.get_file_info(_hf_disk_files(fs, path, uri))
            root = path
        elif info.type == pafs.FileType.Directory:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if i.type == pafs.FileType.File]
            root = path
        else:
            infos, root = [info], posixpath.dirname(path)
    files = []
    for i in infos:
        rel = posixpath.relpath(i.path, root) if root not in ("", "/") else i.path.lstrip("/")
        if fmt != "hf_disk" and (_hidden(rel) or not i.path.lower().endswith(EXTENSIONS[fmt])):
            continue
        files.append(InputFile(i.path, rel, int(i.size or 0)))
    files.sort(key=lambda f: f.rel)
    if not files:
        raise InputError(f"input.path={uri!r}: no {fmt} files found (extensions {', '.join(EXTENSIONS[fmt])})")
    return InputSource(uri, fs, fmt, files)


# ----------------------------------------------------------------------------- reading one file
def _encodable(v: Any) -> bool:
    """False when a parsed JSON value holds a string that is not valid Unicode (lone surrogates)."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, list):
        return all(_encodable(x) for x in v)
    if isinstance(v, dict):
        return all(_encodable(k) and _encodable(x) for k, x in v.items())
    return True


def _jsonl_ids(name: str, values: list[Any], lines: list[int], where: str) -> pa.Array:
    """The id column: every id an integer, or every id a string, kept as it is (a mix is refused: no
    single type holds both without changing a value, and `1` and `"1"` would become one id)."""
    first: dict[str, tuple[int, Any]] = {}
    for i, v in enumerate(values):
        if v is None:  # scan_input refuses it, naming the line
            continue
        kind = "string" if isinstance(v, str) else "integer" if isinstance(v, int) and not isinstance(v, bool) else None
        if kind is None:
            raise InputError(f"input.id_column={name!r}: {where} line {lines[i]} holds {json.dumps(v)} "
                             f"({type(v).__name__}); allowed: string or integer ids")
        first.setdefault(kind, (lines[i], v))
        if len(first) > 1:
            (la, va), (lb, vb) = first["integer"], first["string"]
            raise InputError(f"input.id_column={name!r}: {where} mixes integer and string ids (line {la}: {va!r}, "
                             f"line {lb}: {vb!r}); allowed: one type per column, e.g. quote the integers")
    if "integer" in first:
        try:
            return pa.array(values, pa.int64())
        except (pa.ArrowInvalid, OverflowError):
            raise InputError(f"input.id_column={name!r}: {where} holds an integer id outside the 64-bit range; "
                             "allowed: quote the ids (string ids)") from None
    return pa.array(values, pa.string())


def _jsonl_messages(name: str, values: list[Any], lines: list[int], errors: list[Optional[str]]) -> pa.Array:
    """Chat messages as JSON text: a list of {role, content} is encoded, a string (JSON text already) is
    kept, so both shapes (and extra keys such as `name`) read into one lossless string column."""
    out: list[Optional[str]] = []
    for i, v in enumerate(values):
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.append(json.dumps(v, ensure_ascii=False))
        else:
            out.append(None)
            errors[i] = errors[i] or (f"line {lines[i]}: {name} is a JSON {type(v).__name__}, expected a list of "
                                      "{role, content} (or its JSON text)")
    return pa.array(out, pa.string())


def _jsonl_column(name: str, values: list[Any], errors: list[Optional[str]], text_column: Optional[str]) -> pa.Array:
    if name == text_column:  # the prompt must be text: other values become a per-row error
        out = []
        for i, v in enumerate(values):
            if v is None or isinstance(v, str):
                out.append(v)
            else:
                out.append(None)
                errors[i] = errors[i] or f"{name} is {type(v).__name__}, expected a string"
        return pa.array(out, pa.string())
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # mixed types across rows: keep every value as its JSON text
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())


def parse_jsonl(data: bytes, text_column: Optional[str] = None, *, messages: bool = False,
                id_column: Optional[str] = None, where: str = "the JSONL input") -> pa.Table:
    """JSONL bytes -> table (+ `__input_error`). A line that is not valid UTF-8, not JSON or not an
    object still yields a row (its columns null) whose `__input_error` names the 1-based line and says
    why; blank lines are skipped. `text_column` holds chat messages when `messages` (lists or JSON text,
    read as JSON text). `id_column`, when the file has it: integer or string ids, not a mix
    (InputError naming `where` and the lines)."""
    rows: list[dict] = []
    errors: list[Optional[str]] = []
    lines: list[int] = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        err = None
        try:
            obj = json.loads(line.decode("utf-8"))
            if not isinstance(obj, dict):
                obj, err = {}, f"line {n}: a JSON {type(obj).__name__}, expected an object"
        except UnicodeDecodeError:
            obj, err = {}, f"line {n}: not valid UTF-8"
        except json.JSONDecodeError as e:
            obj, err = {}, f"line {n}: not valid JSON ({e.msg})"
        for k, v in list(obj.items()):
            if not _encodable(v):
                obj[k] = None
                err = err or f"line {n}: column {k!r} holds invalid UTF-8 (a lone surrogate)"
        rows.append(obj)
        errors.append(err)
        lines.append(n)
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    cols = {}
    for k in names:
        values = [r.get(k) for r in rows]
        if k == id_column:
            cols[k] = _jsonl_ids(k, values, lines, where)
        elif k == text_column and messages:
            cols[k] = _jsonl_messages(k, values, lines, errors)
        else:
            cols[k] = _jsonl_column(k, values, errors, text_column)
    cols[INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(cols)


def _read_arrow(fs: pafs.FileSystem, path: str) -> Iterator[pa.RecordBatch]:
    with fs.open_input_file(path) as f:
        magic = f.read(6)
        f.seek(0)
        if magic == b"ARROW1":
            reader = ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from ipc.open_stream(f)


def iter_file(fs: pafs.FileSystem, path: str, fmt: str, text_column: Optional[str] = None,
              columns: Optional[list[str]] = None, *, messages: bool = False,
              id_column: Optional[str] = None) -> Iterator[pa.Table]:
    """One file as consecutive tables (in row order), each with an `__input_error` column.
    InputError (naming the file and what to do) when the file cannot be read as `fmt`."""
    def with_err(t: pa.Table) -> pa.Table:
        if INPUT_ERROR in t.column_names:
            return t
        return t.append_column(INPUT_ERROR, pa.nulls(t.num_rows, pa.string()))

    if fmt not in ("parquet", "arrow", "hf_disk", "jsonl"):
        raise InputError(f"input.format={fmt!r} is not allowed; allowed: parquet, arrow, jsonl, hf_disk")
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path, filesystem=fs)
            if columns:
                columns = [c for c in columns if c in pf.schema_arrow.names]  # columns other files add are filled later
            for b in pf.iter_batches(batch_size=CHUNK_ROWS, columns=columns):
                yield with_err(pa.Table.from_batches([b]))
        elif fmt in ("arrow", "hf_disk"):
            for b in _read_arrow(fs, path):
                t = pa.Table.from_batches([b])
                yield with_err(t.select([c for c in columns if c in t.column_names]) if columns else t)
        else:
            with fs.open_input_stream(path) as f:
                data = f.read()
            t = parse_jsonl(data, text_column, messages=messages, id_column=id_column, where=repr(path))
            if columns:
                t = t.select([c for c in columns + [INPUT_ERROR] if c in t.column_names])
            yield t
    except (pa.ArrowException, OSError) as e:
        raise unreadable(path, fmt, e) from None


def unreadable(path: str, fmt: str, e: BaseException) -> InputError:
    """One line naming the file, the reader's own reason and what to do."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return InputError(f"input file {path!r} cannot be read as {fmt} ({reason}); it is damaged or not {fmt}: "
                      "replace it, or move it out of input.path (names starting with '_' or '.' are skipped)")


# ----------------------------------------------------------------------------- scan + plan
@dataclass
class FileTask:
    file: InputFile
    rows: int
    keep: Optional[bytes]
    """np.packbits of the rows-to-run mask; None = every row of the file."""
    n_keep: int
    check: Optional[bytes] = None
    """np.packbits of the rows already written whose recorded `input_hash` resume compares; None = none."""
    check_hashes: Optional[pa.Array] = field(default=None, repr=False)
    """Those rows' recorded hashes, in row order."""
    n_check: int = 0


@dataclass
class ReadPlan:
    """What the Ray Data read does: which files, which rows, with what schema. Picklable."""

    fs: pafs.FileSystem
    format: str
    files: list[FileTask]
    schema: pa.Schema
    """Unified input schema incl. the id column and `__input_error`."""
    id_column: str
    derived_ids: bool
    text_column: Optional[str]
    selected_ids: pa.Array = field(repr=False)
    """Every id the job covers (after input.limit), as strings."""
    messages: bool = False
    """`text_column` holds chat messages."""
    unchecked_rows: int = 0
    """Rows already written without an `input_hash` (by an older version): their input is not compared."""

    @property
    def total_rows(self) -> int:
        return len(self.selected_ids)

    @property
    def check_files(self) -> list[FileTask]:
        """Files holding rows already written whose input resume compares (`changed_ids`)."""
        return [f for f in self.files if f.n_check]

    @property
    def todo_rows(self) -> int:
        return sum(f.n_keep for f in self.files)

    @property
    def todo_files(self) -> list[FileTask]:
        return [f for f in self.files if f.n_keep]


def derived_ids(rel: str, start: int, n: int) -> pa.Array:
    return pa.array([f"{rel}#{i}" for i in range(start, start + n)], pa.string())


def id_kind(typ: pa.DataType) -> Optional[str]:
    """'string' or 'integer' for an allowed id column type, else None."""
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "string"
    return "integer" if pa.types.is_integer(typ) else None


def ids_as_strings(col: pa.ChunkedArray | pa.Array, where: str) -> pa.Array:
    """Ids as strings, for planning only (the output keeps the input's type). Integer ids print as
    decimals, so one job must not mix the two kinds (scan_input refuses that)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if id_kind(col.type) is None:
        raise InputError(f"input.id_column: {where} has type {col.type}; allowed: string or integer ids")
    return pc.cast(col, pa.string())


@dataclass
class InputScan:
    """Ids (as strings) and row counts of every input file, and the unified input schema."""

    source: InputSource
    counts: list[int]
    ids: list[pa.Array] = field(repr=False)
    schema: pa.Schema
    id_column: str
    derived_ids: bool
    text_column: Optional[str]
    messages: bool = False
    """`text_column` holds chat messages (resume hashes them as messages)."""

    @property
    def num_rows(self) -> int:
        return sum(self.counts)


def _jsonl_line(fs: pafs.FileSystem, path: str, row: int) -> int:
    """The 1-based line of a JSONL file's 0-based row (blank lines hold no row); error path only."""
    with fs.open_input_stream(path) as f:
        lines = f.read().split(b"\n")
    return [n for n, line in enumerate(lines, start=1) if line.strip()][row]


def _null_id(source: InputSource, f: InputFile, id_column: str, col: pa.ChunkedArray, t: pa.Table) -> InputError:
    row = pc.index(pc.is_null(col), True).as_py()
    err = t.column(INPUT_ERROR)[row].as_py() if INPUT_ERROR in t.column_names else None
    if err:  # JSONL: the line's own problem (not valid JSON, ...) is why it has no id
        return InputError(f"input file {f.path!r} {err}; with input.id_column={id_column!r} every line needs an "
                          "id, so it cannot become an error row: fix or remove that line")
    where = f"line {_jsonl_line(source.fs, f.path, row)}" if source.format == "jsonl" else f"row {row} (0-based)"
    return InputError(f"input.id_column={id_column!r}: null id in {f.path!r} {where}; allowed: an id on every row")


def _scan_file(source: InputSource, f: InputFile, id_column: str, text_column: Optional[str],
               messages: bool) -> tuple[pa.Schema, Optional[pa.Table], int]:
    """(schema, table holding the id column or None when the file has none, rows)."""
    if source.format == "parquet":
        try:
            pf = pq.ParquetFile(f.path, filesystem=source.fs)
            sch = pf.schema_arrow
            t = pf.read(columns=[id_column]) if id_column in sch.names else None
        except (pa.ArrowException, OSError) as e:
            raise unreadable(f.path, source.format, e) from None
        return sch, t, pf.metadata.num_rows
    t = pa.concat_tables(list(iter_file(source.fs, f.path, source.format, text_column, messages=messages,
                                        id_column=id_column)))
    return t.schema, (t if id_column in t.column_names else None), t.num_rows


def scan_input(source: InputSource, id_column: str, id_column_set: bool, text_column: Optional[str],
               required_columns: tuple[str, ...] = (), *, messages: bool = False) -> InputScan:
    """Read ids (or row counts) of every file and check ids and columns, before any work starts.

    Raises InputError for: null ids (for JSONL: the line, and why it has none, e.g. not valid JSON),
    ids that are neither all strings nor all integers (within a file or across files), an id column
    that was asked for but is missing (or present in only some files), input columns that collide
    with output columns, a prompt column that is not text, missing required columns, schemas that do
    not unify across files, and files that cannot be read (named, with what to do).
    `messages`: `text_column` holds chat messages (lists of {role, content} or their JSON text).
    """
    schemas, per_file_ids, counts = [], [], []
    derived: Optional[bool] = None
    kinds: dict[str, str] = {}
    for f in source.files:
        sch, t, n = _scan_file(source, f, id_column, text_column, messages)
        has_id = t is not None
        if derived is None:
            derived = not has_id
        if derived == has_id:
            raise InputError(f"input.id_column={id_column!r}: present in some files but not in {f.rel!r}; "
                             "allowed: in every file or in none (then ids are derived)")
        if has_id:
            col = t.column(id_column)
            if col.null_count:
                raise _null_id(source, f, id_column, col, t)
            kind = id_kind(col.type)
            if kind is not None:
                kinds.setdefault(kind, f.rel)
            if len(kinds) > 1:
                raise InputError(f"input.id_column={id_column!r}: integer ids in {kinds['integer']!r} but string ids "
                                 f"in {kinds['string']!r}; allowed: one type in every file, e.g. quote the integers")
            per_file_ids.append(ids_as_strings(col, f.rel))
        else:
            per_file_ids.append(derived_ids(f.rel, 0, n))
        schemas.append(sch)
        counts.append(n)
    if derived and id_column_set:
        raise InputError(f"input.id_column={id_column!r} is not a column of the input; allowed: "
                         f"{', '.join(n for n in schemas[0].names if n != INPUT_ERROR)}")
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"input.path={source.uri!r}: the files' columns have incompatible types ({e})") from None
    if derived:
        schema = pa.schema([pa.field(id_column, pa.string())] + list(schema))
    if INPUT_ERROR not in schema.names:
        schema = schema.append(pa.field(INPUT_ERROR, pa.string()))
    names = [n for n in schema.names if n != INPUT_ERROR]
    bad = colliding_columns(names)
    if bad:
        raise InputError(f"input columns {', '.join(map(repr, bad))} collide with output columns; "
                         "allowed: rename them (output columns and names starting with '__' are reserved)")
    missing = [c for c in required_columns if c not in schema.names]
    if missing:
        raise InputError(f"column {missing[0]!r} (from the job spec) is not in the input; allowed: {', '.join(names)}")
    if text_column in schema.names:
        typ = schema.field(text_column).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)
                or pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_binary(typ)):
            raise InputError(f"column {text_column!r} has type {typ}; allowed: string (or chat messages)")
    return InputScan(source, counts, per_file_ids, schema, id_column, bool(derived), text_column, messages)


def plan_reads(scan: InputScan, limit: Optional[int] = None, done_ids: Optional[pa.Array] = None,
               done_hashes: Optional[pa.Array] = None) -> ReadPlan:
    """Per-file masks of the rows still to run: the first `limit` rows, minus the ids already done.
    `done_hashes` (aligned with `done_ids`, null where unknown) adds per-file masks of the done rows
    whose input `changed_ids` compares. Raises InputError on duplicate ids among the selected rows."""
    all_ids = (pa.chunked_array(scan.ids, pa.string()).combine_chunks() if scan.ids else pa.array([], pa.string()))
    if limit is not None:
        all_ids = all_ids.slice(0, limit)
    _check_unique(all_ids, scan.id_column)
    todo = np.ones(len(all_ids), dtype=bool)
    check = np.zeros(len(all_ids), dtype=bool)
    old = None
    if done_ids is not None and len(done_ids):
        idx = pc.index_in(all_ids, value_set=done_ids)
        todo = pc.is_null(idx).to_numpy(zero_copy_only=False)
        if done_hashes is not None:
            old = done_hashes.take(idx)
            check = pc.is_valid(old).to_numpy(zero_copy_only=False)
    tasks, start = [], 0
    for f, n in zip(scan.source.files, scan.counts):
        m, c = _file_mask(todo, start, n), _file_mask(check, start, n)
        k, kc = int(m.sum()), int(c.sum())
        hashes = None
        if kc:
            o = old.slice(start, n)
            hashes = o.filter(pa.array(c[:len(o)]))
        tasks.append(FileTask(f, n, None if k == n else np.packbits(m).tobytes(), k,
                              np.packbits(c).tobytes() if kc else None, hashes, kc))
        start += n
    done = len(all_ids) - int(todo.sum())
    return ReadPlan(scan.source.fs, scan.source.format, tasks, scan.schema, scan.id_column, scan.derived_ids,
                    scan.text_column, all_ids, scan.messages, done - int(check.sum()) if done_hashes is not None else 0)


def _file_mask(mask: np.ndarray, start: int, n: int) -> np.ndarray:
    """One file's n rows of a mask over the selected rows; rows past input.limit are False."""
    m = mask[start:start + n]
    return np.concatenate([m, np.zeros(n - len(m), dtype=bool)])


def _check_unique(ids: pa.Array, id_column: str) -> None:
    if len(pc.unique(ids)) == len(ids):
        return
    vc = pc.value_counts(ids)
    dup = vc.filter(pc.greater(vc.field("counts"), 1))
    examples = ", ".join(repr(d["values"].as_py()) for d in dup[:5])
    raise InputError(f"input.id_column={id_column!r}: {len(dup)} duplicate id(s) in the input, e.g. {examples}; "
                     "allowed: unique ids")


# ----------------------------------------------------------------------------- Ray Data datasource
def _file_tables(plan: ReadPlan, task: FileTask, columns: Optional[list[str]] = None) -> Iterator[tuple[int, pa.Table]]:
    """(offset of the first row, table with the id column) for each chunk of one file."""
    offset = 0
    id_col = None if plan.derived_ids else plan.id_column
    for t in iter_file(plan.fs, task.file.path, plan.format, plan.text_column, columns,
                       messages=plan.messages, id_column=id_col):
        n = t.num_rows
        if plan.derived_ids:
            t = t.append_column(plan.id_column, derived_ids(task.file.rel, offset, n))
        yield offset, t
        offset += n


def _unpack(bits: Optional[bytes], rows: int) -> Optional[np.ndarray]:
    return None if bits is None else np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=rows).astype(bool)


def read_file_task(plan: ReadPlan, task: FileTask) -> Iterator[pa.Table]:
    """The rows still to run of one file, conformed to the plan's schema."""
    from .schema import conform

    mask = _unpack(task.keep, task.rows)
    for offset, t in _file_tables(plan, task):
        if mask is not None:
            t = t.filter(pa.array(mask[offset:offset + t.num_rows]))
        if t.num_rows:
            yield conform(t, plan.schema)


def check_file_task(plan: ReadPlan, task: FileTask) -> pa.Array:
    """Ids (as strings) of the rows of one file whose input no longer matches their recorded `input_hash`."""
    from .prompts import input_hash

    mask = _unpack(task.check, task.rows)
    text = plan.text_column if plan.text_column in plan.schema.names else None
    cols = [c for c in (None if plan.derived_ids else plan.id_column, text) if c] or None
    changed, seen = [], 0
    for offset, t in _file_tables(plan, task, cols):
        t = t.filter(pa.array(mask[offset:offset + t.num_rows]))
        if not t.num_rows:
            continue
        if text in t.column_names:
            col = t.column(text)
            values = (col if col.type == plan.schema.field(text).type else col.cast(plan.schema.field(text).type)).to_pylist()
        else:
            values = [None] * t.num_rows
        new = pa.array([input_hash(v, plan.messages) for v in values], pa.string())
        old = task.check_hashes.slice(seen, t.num_rows)
        seen += t.num_rows
        differs = pc.not_equal(new, old)
        changed.append(ids_as_strings(t.column(plan.id_column).filter(differs), task.file.rel))
    return pa.concat_arrays(changed) if changed else pa.array([], pa.string())


def _read_fn(plan: ReadPlan, tasks: list[FileTask], check: bool = False):
    # each read task carries only its own files' masks, not every id of the job
    plan = replace(plan, files=[], selected_ids=pa.array([], pa.string()))

    def read() -> Iterator[pa.Table]:
        for t in tasks:
            try:
                if check:
                    yield pa.table({"id": check_file_task(plan, t)})
                else:
                    yield from read_file_task(plan, t)
            except (pa.ArrowException, OSError) as e:  # e.g. a file damaged after the scan
                raise unreadable(t.file.path, plan.format, e) from None
    return read


CHECK_SCHEMA = pa.schema([pa.field("id", pa.string())])


def _make_datasource(plan: ReadPlan, check: bool = False):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class InputDatasource(Datasource):
        """Reads the plan's files (rows still to run only); one read task per group of files. With
        `check`, reads the rows already written instead and yields the ids whose input changed."""

        def __init__(self, plan: ReadPlan):
            super().__init__()
            self.plan = plan

        def _files(self) -> list[FileTask]:
            return self.plan.check_files if check else self.plan.todo_files

        def estimate_inmemory_data_size(self) -> Optional[int]:
            return sum(t.file.size for t in self._files()) or None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            todo = self._files()
            groups: list[list[FileTask]] = [[] for _ in range(max(1, min(parallelism, len(todo))))]
            loads = [0] * len(groups)
            weight = (lambda t: t.n_check) if check else (lambda t: t.n_keep)
            for t in sorted(todo, key=lambda t: -weight(t)):  # greedy balance by rows
                i = loads.index(min(loads))
                groups[i].append(t)
                loads[i] += weight(t)
            out = []
            for g, rows in zip(groups, loads):
                if not g:
                    continue
                g.sort(key=lambda t: t.file.rel)
                size = sum(t.file.size for t in g)
                meta = BlockMetadata(num_rows=None if check else rows, size_bytes=int(size), exec_stats=None,
                                     input_files=[t.file.path for t in g])
                out.append(ReadTask(_read_fn(self.plan, g, check), meta,
                                    schema=CHECK_SCHEMA if check else self.plan.schema))
            return out

    return InputDatasource(plan)


def changed_ids(plan: ReadPlan, use_ray: bool = True) -> pa.Array:
    """Ids of rows already written whose input (prompt or messages) changed since: each file's rows are
    read and hashed where they are (Ray Data read tasks with `use_ray`, else in this process) and only
    the ids that differ come back."""
    if not plan.check_files:
        return pa.array([], pa.string())
    if not use_ray:
        local = replace(plan, files=[], selected_ids=pa.array([], pa.string()))
        return pa.concat_arrays([check_file_task(local, t) for t in plan.check_files])
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # a short pass; the job prints its own
    try:
        ds = ray.data.read_datasource(_make_datasource(plan, check=True))
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    finally:
        ctx.enable_progress_bars = bars
    return pa.concat_tables(tables).column("id").combine_chunks() if tables else pa.array([], pa.string())


def read_dataset(plan: ReadPlan):
    """The Ray Data dataset of the rows still to run."""
    import ray.data

    return ray.data.read_datasource(_make_datasource(plan))
