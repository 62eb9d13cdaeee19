"""Runs one validated JobSpec: plan, checks, Ray Data pipeline, exactly-once finalisation, report.

Order (every check before any generation): the output folder's state (on_existing), the input scan
(ids, columns), the model checked in the driver without its weights (config, tokenizer, safetensors
headers, size against the GPUs: a model that would fail to load fails the job once, with the loader's
message), the fingerprint against `_job.json`,
resume (ids already written are not read again), then read -> GenerationActor pool -> atomic parts,
then duplicates repaired, every input id checked present exactly once, `_SUCCESS` and the report.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from . import fs as fsx
from . import manifest, output
from .actor import ActorConfig
from .io import InputError, InputScan, ReadPlan, list_input, plan_reads, read_dataset, scan_input
from .schema import output_schema
from .spec import JobSpec


class JobError(RuntimeError):
    """The job cannot run or did not complete; the message says why and what to do."""


@dataclass
class RunResult:
    output: str
    status: str
    rows_total: int
    rows_run: int
    rows_skipped: int
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    engine_s: float = 0.0
    num_actors: int = 0
    generated_tokens: int = 0
    workers: list[str] = field(default_factory=list)
    """host:pid of every actor process that finished a batch (a restarted actor adds one)."""
    report: dict[str, str] = field(default_factory=dict)
    started_at_unix: float = 0.0
    """time.time() when run() began (after Ray was up): a caller's own clock gives the cluster start."""
    preflight_s: float = 0.0
    """The model check in the driver (no weights loaded), before the pipeline starts."""
    pool_ready_s: float = 0.0
    """Part of wall_s from the pipeline's start until the pool's last actor had its model loaded: Ray Data
    (wait_for_min_actors_s) hands out no batch before that, so it is start-up, not pipeline overhead."""
    actors: list[dict] = field(default_factory=list)
    """Per actor process (ProgressTracker): model-load interval, rows, engine calls and seconds, first/last call, spans."""

    @property
    def steady_wall_s(self) -> float:
        """Wall time after start-up (every actor loaded) until the last part was written."""
        return max(0.0, self.wall_s - self.pool_ready_s)

    @property
    def steady_overhead(self) -> Optional[float]:
        """1 - summed engine time / (wall time after start-up x actors): overhead without the model loads."""
        if not self.steady_wall_s or not self.num_actors:
            return None
        return 1.0 - self.engine_s / (self.steady_wall_s * self.num_actors)

    @property
    def rows_per_s(self) -> float:
        return self.rows_run / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def overhead(self) -> Optional[float]:
        """1 - summed engine time / (wall time x actors): the share of actor time not spent in the engine."""
        if not self.wall_s or not self.num_actors:
            return None
        return 1.0 - self.engine_s / (self.wall_s * self.num_actors)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(rows_per_s=self.rows_per_s, tokens_per_s=self.tokens_per_s, overhead=self.overhead,
                 steady_wall_s=self.steady_wall_s, steady_overhead=self.steady_overhead)
        return d


# ----------------------------------------------------------------------------- planning (no Ray)
def required_columns(spec: JobSpec) -> tuple[str, ...]:
    cols = [spec.input.messages_column or spec.input.prompt_column]
    if spec.evaluation:
        cols += [spec.evaluation.answer_column, *spec.evaluation.group_by]
    return tuple(cols)


def scan(spec: JobSpec) -> InputScan:
    try:
        source = list_input(spec.input.path, spec.input.format)
        return scan_input(source, spec.input.id_column, "id_column" in spec.input.model_fields_set,
                          spec.input.messages_column or spec.input.prompt_column, required_columns(spec))
    except InputError as e:
        raise JobError(str(e)) from None


def existing_output(spec: JobSpec) -> tuple[Optional[dict], int]:
    fs, d = fsx.resolve(spec.output.path)
    return manifest.read_job(spec.output.path), len(output.list_parts(fs, d))


def done_ids(spec: JobSpec, retry_errors: bool) -> pa.Array:
    fs, d = fsx.resolve(spec.output.path)
    return output.done_ids(fs, d, spec.input.id_column, retry_errors)


def make_plan(spec: JobSpec, input_scan: InputScan, done: Optional[pa.Array]) -> ReadPlan:
    try:
        return plan_reads(input_scan, spec.input.limit, done)
    except InputError as e:
        raise JobError(str(e)) from None


def describe_plan(spec: JobSpec, plan: ReadPlan, job: Optional[dict], parts: int) -> str:
    c = spec.compute
    lines = [
        f"input:   {spec.input.path} ({plan.format}, {len(plan.files)} file(s), {plan.total_rows} row(s)"
        + (f", limit {spec.input.limit}" if spec.input.limit else "") + ")",
        f"ids:     " + (f"derived into {plan.id_column!r} (<file>#<row>)" if plan.derived_ids else f"column {plan.id_column!r}"),
        f"output:  {spec.output.path} ({parts} existing part(s)" + (", has _job.json" if job else "") + f"; on_existing={spec.output.on_existing})",
        f"to run:  {plan.todo_rows} row(s) in {len(plan.todo_files)} file(s) ({plan.total_rows - plan.todo_rows} already written)",
        f"actors:  {c.num_actors} x ({c.cpus_per_actor:g} CPU, {c.gpus_per_actor:g} GPU) on {c.device}, dtype {spec.dtype}",
        f"batch:   {c.batch_size} rows per engine call, {c.batch_size * c.length_grouping} rows per actor call",
        f"model:   {spec.model.path} (family {spec.model.family})",
        f"cache:   {spec.cache.engine_kwargs()}",
    ]
    if spec.audit.fraction:
        lines.append(f"audit:   {spec.audit.fraction:g} of rows also with policy none")
    if spec.evaluation:
        lines.append(f"eval:    {spec.evaluation.scorer} against column {spec.evaluation.answer_column!r}")
    return "\n".join(lines)


def dry_run(spec: JobSpec, stream: TextIO = sys.stdout) -> ReadPlan:
    """Print the resolved spec and the plan; touches neither Ray nor the model."""
    input_scan = scan(spec)
    job, parts = existing_output(spec)
    done = done_ids(spec, False) if parts and spec.output.on_existing == "resume" else None
    plan = make_plan(spec, input_scan, done)
    print("# resolved job spec", file=stream)
    print(spec.to_yaml(), file=stream)
    print("# plan", file=stream)
    print(describe_plan(spec, plan, job, parts), file=stream)
    return plan


# ----------------------------------------------------------------------------- running (Ray)
def actor_config(spec: JobSpec, schema: pa.Schema, progress: Any = None, engine_factory=None) -> ActorConfig:
    return ActorConfig(
        model_path=spec.model.path, family=spec.model.family, dtype=spec.dtype, device=spec.compute.device,
        seed=spec.seed, generation=spec.generation.engine_kwargs(), cache=spec.cache.engine_kwargs(),
        prompt_column=spec.input.prompt_column, messages_column=spec.input.messages_column,
        chat_template=spec.input.chat_template, id_column=spec.input.id_column, batch_size=spec.compute.batch_size,
        audit_fraction=spec.audit.fraction,
        evaluation=spec.evaluation.model_dump() if spec.evaluation else None,
        schema=schema, model_label=spec.model.path, progress=progress, engine_factory=engine_factory)


def preflight(spec: JobSpec) -> dict[str, Any]:
    """The model checked in the driver without loading its weights (pipeline.preflight); JobError says why."""
    from .preflight import PreflightError, preflight as check

    c = spec.compute
    try:
        pre = check(spec.model.path, spec.model.family, spec.dtype, c.device, c.gpus_per_actor)
    except PreflightError as e:
        raise JobError(str(e)) from None
    return {"model_hash": pre.model_hash, "weight_bytes": pre.weight_bytes, "gpu_memory_bytes": pre.gpu_memory_bytes}


def check_cluster(spec: JobSpec, warn: TextIO) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and fsx.is_local(spec.output.path) and not spec.output.shared:
        raise JobError(f"output.path={spec.output.path!r} is a local path and the cluster has {len(nodes)} nodes: "
                       "each worker would write to its own disk. Allowed: an s3:// or gs:// URI, or a shared "
                       "filesystem mounted on every node with output.shared: true")
    res = ray.cluster_resources()
    c = spec.compute
    need_cpu, need_gpu = c.num_actors * c.cpus_per_actor, c.num_actors * c.gpus_per_actor
    if need_gpu > res.get("GPU", 0):
        print(f"WARNING: {c.num_actors} actors need {need_gpu:g} GPUs; the cluster has {res.get('GPU', 0):g} now "
              "(the job waits for an autoscaler to add them)", file=warn)
    if need_cpu >= res.get("CPU", 0):
        print(f"WARNING: {c.num_actors} actors reserve {need_cpu:g} of the cluster's {res.get('CPU', 0):g} CPUs; "
              "reading and writing need CPUs too", file=warn)


def _refuse_existing(spec: JobSpec, job: Optional[dict], parts: int) -> None:
    mode = spec.output.on_existing
    if mode == "error" and (job or parts):
        raise JobError(f"output.path={spec.output.path!r} already holds a job's output and output.on_existing is "
                       "'error'; allowed: resume, overwrite, or a new output.path")
    if parts and job is None and mode != "overwrite":
        raise JobError(f"output.path={spec.output.path!r} holds parts but no _job.json, so it cannot be checked "
                       "against this spec; allowed: output.on_existing: overwrite, or a new output.path")


def remove_output(out_uri: str) -> None:
    """Delete what a job writes (parts, markers, report), nothing else."""
    from .report import REPORT_DIR

    fs, d = fsx.resolve(out_uri)
    if not fsx.exists(fs, d):
        return
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(d, recursive=False)):
        name = info.base_name
        ours = (name.startswith(output.PART_PREFIX) and name.endswith(output.PART_SUFFIX)) or name in (
            manifest.JOB_FILE, manifest.SUCCESS_FILE) or (name.startswith(".") and name.endswith(".tmp"))
        if ours and info.type == pafs.FileType.File:
            fs.delete_file(info.path)
        elif name == REPORT_DIR and info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)


def _check_fingerprint(spec: JobSpec, job: Optional[dict], fp: str, components: dict) -> None:
    if job is None or job.get("fingerprint") == fp:
        return
    diffs = manifest.diff_components(job.get("fingerprint_components", {}), components)
    raise JobError(f"output.path={spec.output.path!r} was written by a job with a different fingerprint "
                   f"({job.get('fingerprint')} vs {fp}): " + "; ".join(diffs or ["unknown difference"])
                   + ". Allowed: the same settings, a new output.path, or output.on_existing: overwrite")


def _execute(spec: JobSpec, plan: ReadPlan, cfg_args: dict, stream: TextIO) -> tuple[float, dict]:
    import ray
    from ray.data import DataContext

    from .processor import generation_stage
    from .progress import ProgressMonitor, ProgressTracker, pool_ready_s

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below says more (tokens/s, errors, ETA)
    ctx.wait_for_min_actors_s = 600
    tracker = ray.remote(num_cpus=0)(ProgressTracker).remote()
    cfg = actor_config(spec, progress=tracker, **cfg_args)
    c = spec.compute
    out_schema = cfg.schema
    ds = generation_stage(read_dataset(plan), cfg, c)  # the same actor pool as build_processor's
    sink = output.make_datasink(spec.output.path, out_schema, spec.input.id_column, spec.output.min_rows_per_file)
    t0 = time.time()
    monitor = ProgressMonitor(lambda: ray.get(tracker.snapshot.remote(), timeout=10), plan.todo_rows,
                              interval_s=c.progress_interval_s, stream=stream,
                              final_fetch=lambda: ray.get(tracker.snapshot.remote(actors=True), timeout=10))
    try:
        with monitor:
            ds.write_datasink(sink)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"the Ray Data pipeline failed: {type(e).__name__}: {e}. Rows written so far are kept; "
                       "run the same command again to resume") from e
    finally:
        wall = time.time() - t0
        snap = monitor.stop()
        ray.kill(tracker)
    return wall, {**asdict(snap), "pool_ready_s": pool_ready_s(snap.actors, t0, c.num_actors)}


def run(spec: JobSpec, retry_errors: bool = False, stream: TextIO = sys.stderr, engine_factory=None) -> RunResult:
    """Run the job on the connected Ray cluster. Raises JobError when it cannot run or complete."""
    out = spec.output.path
    timing = {"started_at_unix": time.time()}
    job, parts = existing_output(spec)
    _refuse_existing(spec, job, parts)  # refusals only; nothing is deleted before every check passed
    overwrite = spec.output.on_existing == "overwrite"
    input_scan = scan(spec)
    check_cluster(spec, stream)
    schema = output_schema(input_scan.schema)
    t_pre = time.time()
    pre = preflight(spec)
    timing["preflight_s"] = time.time() - t_pre
    components = manifest.fingerprint_components(spec, pre["model_hash"])
    fp = manifest.fingerprint(components)
    if overwrite:
        remove_output(out)
        job, parts = None, 0
    _check_fingerprint(spec, job, fp, components)
    done = done_ids(spec, retry_errors) if parts else None
    plan = make_plan(spec, input_scan, done)
    print(describe_plan(spec, plan, job, parts), file=stream, flush=True)
    started = manifest.now()
    record = {"name": spec.name, "status": "running", "fingerprint": fp, "fingerprint_components": components,
              "spec": spec.to_dict(), "versions": manifest.versions(), "started_at": started,
              "first_started_at": (job or {}).get("first_started_at", started),
              "input": {"rows": plan.total_rows, "files": len(plan.files), "derived_ids": plan.derived_ids}}
    manifest.write_job(out, record)
    manifest.clear_success(out)
    wall, snap = 0.0, {"rows": 0, "tokens": 0, "errors": {}, "engine_s": 0.0}
    if plan.todo_rows:
        try:
            wall, snap = _execute(spec, plan, {"schema": schema, "engine_factory": engine_factory}, stream)
        except JobError as e:
            record.update(status="failed", finished_at=manifest.now(), error=str(e))
            manifest.write_job(out, record)
            raise
    return finalize(spec, plan, schema, record, wall, snap, stream, timing)


def finalize(spec: JobSpec, plan: ReadPlan, schema: pa.Schema, record: dict, wall: float, snap: dict,
             stream: TextIO, timing: Optional[dict] = None) -> RunResult:
    """Repair duplicates, check every selected id is there exactly once, write _SUCCESS and the report."""
    from .report import write_report

    out = spec.output.path
    fs, d = fsx.resolve(out)
    dd = output.deduplicate(fs, d, spec.input.id_column, schema)
    if dd.duplicates:
        print(f"repaired {dd.duplicates} duplicate row(s) in {dd.parts_rewritten} part(s)", file=stream)
    t = output.read_output(fs, d, columns=[spec.input.id_column, "error_type"])
    have = pc.cast(t.column(spec.input.id_column), pa.string()).combine_chunks() if t is not None else pa.array([], pa.string())
    missing = int(pc.sum(pc.invert(pc.is_in(plan.selected_ids, value_set=have))).as_py() or 0)
    result = RunResult(out, "complete", plan.total_rows, plan.todo_rows, plan.total_rows - plan.todo_rows,
                       wall_s=wall, engine_s=snap.get("engine_s", 0.0), num_actors=spec.compute.num_actors,
                       generated_tokens=snap.get("tokens", 0), workers=list(snap.get("workers", [])),
                       pool_ready_s=snap.get("pool_ready_s", 0.0), actors=list(snap.get("actors", [])),
                       **(timing or {}))
    if t is not None:
        sel = t.filter(pc.is_in(have, value_set=plan.selected_ids))
        for vc in pc.value_counts(sel.column("error_type").drop_null()).to_pylist():
            result.errors[vc["values"]] = vc["counts"]
        result.errors = dict(sorted(result.errors.items()))
    if missing:
        result.status = "failed"
        record.update(status="failed", finished_at=manifest.now(), run=result.to_dict())
        manifest.write_job(out, record)
        raise JobError(f"{missing} input id(s) are missing from the output after the run; "
                       "run the same command again to resume")
    result.report = write_report(out, run=result.to_dict(), evaluation=spec.evaluation)
    record.update(status="complete", finished_at=manifest.now(), run=result.to_dict())
    manifest.write_job(out, record)
    manifest.mark_success(out)
    return result
