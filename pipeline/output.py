"""The output folder: atomic Parquet parts named by their ids, reading them back, and the exactly-once repair.

Layout: `part-<output id>-<hash of the ids>.parquet` parts, `_job.json`, `_SUCCESS`, `_lease.json`
while a job runs, the report. The output id is minted when a job first writes the folder (kept in
`_job.json`, the same across resumes, new after an overwrite), so a part names the job that wrote it
even when that job crashed before recording it. The hash is a sha256 over the sorted ids, each
prefixed by its length, so two different id sets never share a name (`a`,`b` vs `a\nb`).

A part is written under a hidden temporary name and renamed without replacing anything: a name that
is taken (the same ids written again: a retried write task, `--retry-errors`) gets a `-<n>` suffix,
so a finished part is never overwritten. Rows are never deleted before their replacement is on
disk, so a crash can leave a duplicate id but never lose one; `deduplicate` (run at the end of every
job) removes such duplicates: per id it keeps a row without error if there is one, else the row of
the newest part.
"""
from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import fs as fsx
from .schema import conform

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


class OutputError(RuntimeError):
    """An output file cannot be read; the message names the file and what to do."""


def ids_hash(ids: Iterable[str]) -> str:
    """sha256 over the sorted ids, each as `<byte length>:<utf-8 bytes>`: no separator to collide on."""
    h = hashlib.sha256()
    for i in sorted(ids):
        b = i.encode("utf-8", "surrogatepass")
        h.update(b"%d:" % len(b))
        h.update(b)
    return h.hexdigest()[:20]


def part_name(ids: Iterable[str], output_id: str = "", suffix: int = 0) -> str:
    stem = f"{PART_PREFIX}{output_id + '-' if output_id else ''}{ids_hash(ids)}"
    return f"{stem}-{suffix}{PART_SUFFIX}" if suffix else f"{stem}{PART_SUFFIX}"


def is_ours(name: str, output_id: str) -> bool:
    """A part (or its temporary file) written under this output id."""
    return bool(output_id) and name.lstrip(".").startswith(f"{PART_PREFIX}{output_id}-")


def write_part(fs: pafs.FileSystem, out_dir: str, table: pa.Table, id_column: str, output_id: str = "") -> str:
    """Write `table` atomically as one new part (never replacing one); returns the part's file name."""
    ids = pc.cast(table.column(id_column), pa.string()).to_pylist()
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    names = (fsx.join(out_dir, part_name(ids, output_id, n)) for n in itertools.count(1))
    path = fsx.write_bytes_new(fs, fsx.join(out_dir, part_name(ids, output_id)), buf.getvalue(), names)
    return path.rsplit("/", 1)[1]


def list_parts(fs: pafs.FileSystem, out_dir: str) -> list[pafs.FileInfo]:
    if not fsx.exists(fs, out_dir):
        return []
    infos = fs.get_file_info(pafs.FileSelector(out_dir, recursive=False))
    parts = [i for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(PART_PREFIX)
             and i.base_name.endswith(PART_SUFFIX)]
    return sorted(parts, key=lambda i: i.base_name)


def read_part(fs: pafs.FileSystem, path: str, columns: Optional[list[str]] = None) -> pa.Table:
    """One part; OutputError naming the file when it is not readable Parquet (truncated, foreign)."""
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise OutputError(f"output part {path} is not a readable Parquet file ({str(e).splitlines()[0]}); "
                          "delete that file and run the same command again: its rows are generated again") from None


def read_output(fs: pafs.FileSystem, out_dir: str, columns: Optional[list[str]] = None,
                with_part: bool = False) -> Optional[pa.Table]:
    """All parts as one table (None when there are none); `with_part` adds `__part` and `__mtime`."""
    tables = []
    for info in list_parts(fs, out_dir):
        t = read_part(fs, info.path, columns)
        if with_part:
            t = t.append_column("__part", pa.array([info.base_name] * t.num_rows, pa.string()))
            mtime = info.mtime.timestamp() if info.mtime else 0.0
            t = t.append_column("__mtime", pa.array([mtime] * t.num_rows, pa.float64()))
        tables.append(t)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def done_ids(fs: pafs.FileSystem, out_dir: str, id_column: str, retry_errors: bool) -> pa.Array:
    """Ids already in the output (as strings); with `retry_errors`, only those without an error."""
    t = read_output(fs, out_dir, columns=[id_column, "error_type"])
    if t is None:
        return pa.array([], pa.string())
    if retry_errors:
        t = t.filter(pc.is_null(t.column("error_type")))
    return pc.unique(pc.cast(t.column(id_column), pa.string()).combine_chunks())


@dataclass
class DedupeResult:
    duplicates: int
    parts_rewritten: int


def deduplicate(fs: pafs.FileSystem, out_dir: str, id_column: str, schema: Optional[pa.Schema] = None,
                output_id: str = "") -> DedupeResult:
    """Make every id appear once: rewrite (new part first, then delete the old one) the parts that
    hold losing copies. Idempotent; a crash midway leaves duplicates that the next call removes."""
    t = read_output(fs, out_dir, columns=[id_column, "error_type"], with_part=True)
    if t is None or len(pc.unique(t.column(id_column))) == t.num_rows:
        return DedupeResult(0, 0)
    ids = pc.cast(t.column(id_column), pa.string()).to_pylist()
    ok = pc.is_null(t.column("error_type")).to_pylist()
    parts = t.column("__part").to_pylist()
    mtimes = t.column("__mtime").to_pylist()
    best: dict[str, int] = {}
    for i, key in enumerate(ids):
        j = best.get(key)
        if j is None or (ok[i], mtimes[i], parts[i]) > (ok[j], mtimes[j], parts[j]):
            best[key] = i
    drop: dict[str, set[str]] = {}
    for i, key in enumerate(ids):
        if best[key] != i:
            drop.setdefault(parts[i], set()).add(key)
    for part, drop_ids in drop.items():
        path = fsx.join(out_dir, part)
        old = read_part(fs, path)
        keep = pc.invert(pc.is_in(pc.cast(old.column(id_column), pa.string()), value_set=pa.array(sorted(drop_ids))))
        new = old.filter(keep)
        if schema is not None:
            new = conform(new, schema)
        if new.num_rows:
            write_part(fs, out_dir, new, id_column, output_id)
        fs.delete_file(path)
    return DedupeResult(sum(len(v) for v in drop.values()), len(drop))


def make_datasink(out_uri: str, schema: pa.Schema, id_column: str, min_rows: int, output_id: str = ""):
    """A Ray Data Datasink writing each write task's rows as one atomic part (>= min_rows rows,
    except the last ones), named under `output_id`."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class PartDatasink(Datasink):
        def __init__(self):
            self.out_uri = out_uri
            self.schema = schema
            self.id_column = id_column
            self.min_rows = min_rows
            self.output_id = output_id

        @property
        def min_rows_per_write(self) -> Optional[int]:
            return self.min_rows

        def get_name(self) -> str:
            return "WriteParts"

        def write(self, blocks, ctx) -> list[str]:
            fs, out_dir = fsx.resolve(self.out_uri)
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [conform(t, self.schema) for t in tables if t.num_rows]
            if not tables:
                return []
            table = pa.concat_tables(tables)
            return [write_part(fs, out_dir, table, self.id_column, self.output_id)]

    return PartDatasink()
