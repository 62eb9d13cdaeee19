"""Resume planning: which input rows still need a generation, and which written rows went stale.

A row counts as done when its id is in the output (error rows too, unless `--retry-errors`) *and*
its input is the one it was generated from. Each output row carries `input_hash` (the hash of its
prompt or messages, pipeline/prompts.py); on resume the input rows of the done ids are read and
hashed where they lie (Ray Data read tasks, only their prompt and id columns), and only the ids whose
hash differs come back to the driver. Those rows are stale: `_SUCCESS` is removed, then the rows
(each affected part is rewritten without them, the new part written before the old one is deleted,
so a crash leaves a duplicate for the end-of-job repair, never a loss), and they run again, so the
finished output still holds every id exactly once, each generated from the current input.

Rows written by a version without `input_hash` (null) cannot be compared: they are kept as done and
counted in the plan (`ReadPlan.unchecked_rows`); `output.on_existing: overwrite` regenerates them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Optional, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import fs as fsx
from . import manifest, output
from .io import InputScan, ReadPlan, changed_ids, plan_reads
from .schema import conform

HASH_COLUMN = "input_hash"


@dataclass
class ResumePlan:
    plan: ReadPlan
    changed: int
    """Rows already written whose input changed since: they run again."""
    removed: int
    """Of those, stale rows removed from the output (0 in a dry run)."""


class OutputPartError(ValueError):
    """An output part cannot be read; the message names it and what to do."""


def _read_part(fs: pafs.FileSystem, path: str, columns: Optional[list[str]] = None) -> pa.Table:
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names] if columns else None)
    except (pa.ArrowException, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OutputPartError(f"output part {path!r} cannot be read ({reason}); it is damaged: delete it and run "
                              "again (its rows are generated again)") from None


def done_rows(fs: pafs.FileSystem, out_dir: str, id_column: str, retry_errors: bool) -> tuple[pa.Array, pa.Array]:
    """(ids as strings, their `input_hash` or null) of the rows already in the output; with
    `retry_errors`, only rows without an error. Parts written before `input_hash` existed give nulls."""
    ids, hashes = [], []
    for info in output.list_parts(fs, out_dir):
        t = _read_part(fs, info.path, [id_column, "error_type", HASH_COLUMN])
        names = t.column_names
        if retry_errors and "error_type" in names:
            t = t.filter(pc.is_null(t.column("error_type")))
        ids.append(pc.cast(t.column(id_column), pa.string()).combine_chunks())
        hashes.append(t.column(HASH_COLUMN).combine_chunks().cast(pa.string()) if HASH_COLUMN in names
                      else pa.nulls(t.num_rows, pa.string()))
    if not ids:
        return pa.array([], pa.string()), pa.array([], pa.string())
    return pa.concat_arrays(ids), pa.concat_arrays(hashes)


def drop_rows(fs: pafs.FileSystem, out_dir: str, id_column: str, ids: pa.Array,
              schema: Optional[pa.Schema] = None, output_id: str = "") -> int:
    """Remove every row whose id is in `ids` from the output: each part holding one is rewritten
    without it (new part first, then the old one deleted). Returns the rows removed."""
    removed = 0
    for info in output.list_parts(fs, out_dir):
        t = _read_part(fs, info.path)
        drop = pc.is_in(pc.cast(t.column(id_column), pa.string()), value_set=ids)
        n = int(pc.sum(drop).as_py() or 0)
        if not n:
            continue
        keep = t.filter(pc.invert(drop))
        if schema is not None:
            keep = conform(keep, schema)
        if keep.num_rows and output.write_part(fs, out_dir, keep, id_column, output_id) == info.base_name:
            continue  # cannot happen (other ids, other name); never delete what was just written
        fs.delete_file(info.path)
        removed += n
    return removed


def plan_resume(scan: InputScan, out_uri: str, limit: Optional[int], retry_errors: bool, *,
                apply: bool = True, use_ray: Optional[bool] = None, schema: Optional[pa.Schema] = None,
                output_id: str = "",
                stream: TextIO = sys.stderr) -> ResumePlan:
    """The read plan of a resumed job: rows not yet written, plus rows whose input changed (their stale
    rows removed from the output when `apply`; a dry run only counts them). `use_ray`: compare in Ray
    Data read tasks (default: when Ray is up), else in this process."""
    fs, d = fsx.resolve(out_uri)
    ids, hashes = done_rows(fs, d, scan.id_column, retry_errors)
    plan = plan_reads(scan, limit, ids, hashes)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    changed = changed_ids(plan, use_ray=use_ray) if plan.check_files else pa.array([], pa.string())
    removed = 0
    if len(changed):
        if apply:
            manifest.clear_success(out_uri)  # the folder stops claiming completeness before a row leaves it
            removed = drop_rows(fs, d, scan.id_column, changed, schema, output_id)
        keep = pc.invert(pc.is_in(ids, value_set=changed))
        unchecked = plan.unchecked_rows
        plan = replace(plan_reads(scan, limit, ids.filter(keep)), unchecked_rows=unchecked)
        print(f"input changed: {len(changed)} row(s) already written were generated from a different prompt or "
              "messages than the input now holds; " + ("their stale rows were removed and they run again"
                                                      if apply else "the run will remove their stale rows and run "
                                                      "them again"), file=stream)
    if plan.unchecked_rows:
        print(f"note: {plan.unchecked_rows} row(s) already written carry no input_hash (written by an older "
              "version), so a change to their input cannot be seen; output.on_existing: overwrite regenerates "
              "them", file=stream)
    return ResumePlan(plan, len(changed), removed)
