"""Runs one validated JobSpec: plan, checks, Ray Data pipeline, exactly-once finalisation, report.

Order (every check before any generation): input and output are different places (real paths), the
output folder's lease (one writer per folder), the output folder's state (on_existing; part files no
job of this folder wrote are refused, never read or deleted), the input scan (ids, columns), the
cluster's resources, the model checked in the driver without its weights (config, tokenizer,
safetensors headers, size against the GPUs: a model that would fail to load fails the job once, with
the loader's message), the fingerprint against `_job.json`,
resume (ids already written are not read again), then read -> GenerationActor pool -> atomic parts,
then duplicates repaired, every input id checked present exactly once, `_SUCCESS` and the report.
`dry_run` makes the same checks without Ray's pipeline or a model load.

Overwrite removes only what this project wrote into the folder: the parts named under the output
id recorded in `_job.json` (or listed in its `files`), their temporary files, `_job.json`, `_SUCCESS`
and the report's own files. Ctrl-C (or SIGTERM) stops the job with `_job.json` at `interrupted`; the
rows written so far are kept and the same command resumes.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from . import fs as fsx
from . import manifest, output
from .lease import Lease, LeaseHeld
from .actor import ActorConfig
from .io import InputError, InputScan, ReadPlan, list_input, plan_reads, read_dataset, scan_input
from .resume import OutputPartError, plan_resume
from .schema import output_schema
from .spec import JobSpec


class JobError(RuntimeError):
    """The job cannot run or did not complete; the message says why and what to do."""


class JobInterrupted(JobError):
    """Ctrl-C or SIGTERM: the job stopped; rows written so far are kept and a re-run resumes."""


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
    noop: bool = False
    """The output was already complete: nothing ran, and the figures above are the finished run's."""

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
                          spec.input.messages_column or spec.input.prompt_column, required_columns(spec),
                          messages=spec.input.messages_column is not None)
    except InputError as e:
        raise JobError(str(e)) from None


LEGACY_PART = re.compile(r"^part-[0-9a-f]{20}\.parquet$")
"""Parts of outputs written before parts carried an output id (their `_job.json` has none)."""


@dataclass
class OutputState:
    """What the output folder holds, split into this folder's own parts and parts nobody recorded."""

    job: Optional[dict]
    output_id: str
    ours: list[str]
    foreign: list[str]

    @property
    def parts(self) -> int:
        return len(self.ours)


def output_state(spec: JobSpec) -> OutputState:
    """Read `_job.json` and list the parts; JobError naming the file when `_job.json` is unreadable."""
    fs, d = fsx.resolve(spec.output.path)
    try:
        job = manifest.read_job(spec.output.path)
    except manifest.ManifestError as e:
        raise JobError(str(e)) from None
    names = [p.base_name for p in output.list_parts(fs, d)]
    output_id = (job or {}).get("output_id", "")
    listed = set((job or {}).get("files", []))
    ours, foreign = [], []
    for n in names:
        legacy = job is not None and not output_id and LEGACY_PART.match(n)
        (ours if output.is_ours(n, output_id) or n in listed or legacy else foreign).append(n)
    return OutputState(job, output_id, ours, foreign)


def done_ids(spec: JobSpec, retry_errors: bool) -> pa.Array:
    fs, d = fsx.resolve(spec.output.path)
    try:
        return output.done_ids(fs, d, spec.input.id_column, retry_errors)
    except output.OutputError as e:
        raise JobError(str(e)) from None


def check_paths(spec: JobSpec) -> None:
    """Input and output must be different places, compared by real path (the spec checks this too;
    checked again here because a symlink may have changed since)."""
    why = fsx.overlap(spec.input.path, spec.output.path)
    if why:
        raise JobError(f"output.path={spec.output.path!r} {why}: a job never writes (or overwrites) inside its "
                       "input. Allowed: a folder outside input.path")


def make_plan(spec: JobSpec, input_scan: InputScan, done: Optional[pa.Array]) -> ReadPlan:
    try:
        return plan_reads(input_scan, spec.input.limit, done)
    except InputError as e:
        raise JobError(str(e)) from None


def resume_plan(spec: JobSpec, input_scan: InputScan, retry_errors: bool, stream: TextIO, apply: bool = True,
                schema: Optional[pa.Schema] = None, output_id: str = "") -> ReadPlan:
    """The plan over an existing output: rows not written yet, and rows whose input changed since they
    were written (their stale rows removed when `apply`): pipeline/resume.py."""
    try:
        return plan_resume(input_scan, spec.output.path, spec.input.limit, retry_errors, apply=apply,
                           schema=schema, stream=stream, output_id=output_id).plan
    except (InputError, OutputPartError) as e:
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


def local_resources(spec: JobSpec) -> dict[str, float]:
    """The resources of the local Ray that run_job.py would start (no RAY_ADDRESS)."""
    gpus = 0
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        gpus = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    except Exception:  # noqa: BLE001  (no detection: assume none, as Ray would)
        pass
    return {"CPU": float(spec.compute.local_num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def dry_run(spec: JobSpec, stream: TextIO = sys.stdout) -> ReadPlan:
    """Print the resolved spec and the plan after the checks the real run makes before any work (paths,
    lease, on_existing, input, resources, model config, fingerprint); JobError where the run would refuse.
    Reads the model's config and file hashes, loads no weights, starts no pipeline."""
    precheck(spec)
    st = output_state(spec)
    input_scan = scan(spec)
    if os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(log_to_driver=False)
        check_cluster(spec, sys.stderr)
    else:
        check_resources(spec, local_resources(spec), nodes=1, autoscaler=False, warn=sys.stderr)
    model_hash = preflight(spec)["model_hash"]
    if spec.output.on_existing != "overwrite" and st.job is not None:
        components = manifest.fingerprint_components(spec, model_hash)
        _check_fingerprint(spec, st.job, manifest.fingerprint(components), components)
    resume = st.parts and spec.output.on_existing == "resume"
    plan = resume_plan(spec, input_scan, False, stream, apply=False) if resume else make_plan(spec, input_scan, None)
    print("# resolved job spec", file=stream)
    print(spec.to_yaml(), file=stream)
    print("# plan", file=stream)
    print(describe_plan(spec, plan, st.job, st.parts), file=stream)
    print("checks:  passed", file=stream)
    return plan


# ----------------------------------------------------------------------------- running (Ray)
def actor_config(spec: JobSpec, schema: pa.Schema, progress: Any = None, engine_factory=None,
                 cache: Optional[dict] = None, fallback: Optional[tuple] = None, level: int = 0) -> ActorConfig:
    """cache: the engine's cache settings (under `cache.policy: auto` the calibration's choice, or the
    fallback chain's active entry `level` of `fallback`)."""
    return ActorConfig(
        model_path=spec.model.path, family=spec.model.family, dtype=spec.dtype, device=spec.compute.device,
        seed=spec.seed, generation=spec.generation.engine_kwargs(), cache=cache or spec.cache.engine_kwargs(),
        prompt_column=spec.input.prompt_column, messages_column=spec.input.messages_column,
        chat_template=spec.input.chat_template, id_column=spec.input.id_column, batch_size=spec.compute.batch_size,
        audit_fraction=spec.audit.fraction,
        evaluation=spec.evaluation.model_dump() if spec.evaluation else None,
        schema=schema, model_label=spec.model.path, progress=progress, engine_factory=engine_factory,
        fallback=fallback, level=level)


def preflight(spec: JobSpec) -> dict[str, Any]:
    """The model checked in the driver without loading its weights (pipeline.preflight); JobError says why."""
    from .preflight import PreflightError, preflight as check

    c = spec.compute
    try:
        pre = check(spec.model.path, spec.model.family, spec.dtype, c.device, c.gpus_per_actor)
    except PreflightError as e:
        raise JobError(str(e)) from None
    return {"model_hash": pre.model_hash, "weight_bytes": pre.weight_bytes, "gpu_memory_bytes": pre.gpu_memory_bytes}


def started_here() -> bool:
    """This driver started its Ray itself (a local cluster): no autoscaler can add nodes to it."""
    import ray._private.worker as worker

    node = getattr(worker, "_global_node", None)
    return node is not None and node.is_head()


def check_resources(spec: JobSpec, res: dict[str, float], nodes: int, autoscaler: Optional[bool],
                    warn: TextIO, node_gpus: Optional[list[float]] = None) -> None:
    """Refuse what the cluster cannot run when no autoscaler can add nodes (Ray would wait forever);
    warn where it may (`autoscaler` None: unknown, a cluster joined through RAY_ADDRESS)."""
    if nodes > 1 and fsx.is_local(spec.output.path) and not spec.output.shared:
        raise JobError(f"output.path={spec.output.path!r} is a local path and the cluster has {nodes} nodes: "
                       "each worker would write to its own disk. Allowed: an s3:// or gs:// URI, or a shared "
                       "filesystem mounted on every node with output.shared: true")
    c = spec.compute
    need_cpu, need_gpu = c.num_actors * c.cpus_per_actor, c.num_actors * c.gpus_per_actor
    have_gpu, have_cpu = res.get("GPU", 0.0), res.get("CPU", 0.0)
    biggest = max(node_gpus) if node_gpus else have_gpu
    if c.gpus_per_actor and (need_gpu > have_gpu or c.gpus_per_actor > biggest):
        what = (f"compute.gpus_per_actor={c.gpus_per_actor:g} x compute.num_actors={c.num_actors} needs "
                f"{need_gpu:g} GPU(s)" + (f" ({c.gpus_per_actor:g} on one node)" if c.gpus_per_actor > biggest else "")
                + f"; the cluster has {have_gpu:g}")
        if autoscaler is False:
            raise JobError(f"{what} and no autoscaler can add more (a local Ray started by this run has none), "
                           "so the job would wait forever. Allowed: compute.gpus_per_actor: 0 (CPU), fewer "
                           "actors, or a cluster with GPUs through RAY_ADDRESS")
        print(f"WARNING: {what} now (the job waits for an autoscaler to add them)", file=warn)
    if need_cpu > have_cpu and autoscaler is False:
        raise JobError(f"compute.cpus_per_actor={c.cpus_per_actor:g} x compute.num_actors={c.num_actors} needs "
                       f"{need_cpu:g} CPUs; the cluster has {have_cpu:g} and no autoscaler can add more, so the "
                       "job would wait forever. Allowed: fewer actors or CPUs per actor, or a larger "
                       "compute.local_num_cpus")
    if need_cpu >= have_cpu:
        print(f"WARNING: {c.num_actors} actors reserve {need_cpu:g} of the cluster's {have_cpu:g} CPUs; "
              "reading and writing need CPUs too", file=warn)


def check_cluster(spec: JobSpec, warn: TextIO, autoscaler: Optional[bool] = None) -> None:
    """The connected cluster against the spec; `autoscaler` None = False for a Ray this driver started,
    else unknown."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if autoscaler is None and started_here():
        autoscaler = False
    node_gpus = [float(n.get("Resources", {}).get("GPU", 0.0)) for n in nodes]
    check_resources(spec, ray.cluster_resources(), len(nodes), autoscaler, warn, node_gpus or None)


def _refuse_existing(spec: JobSpec, st: OutputState) -> None:
    mode = spec.output.on_existing
    if st.foreign:
        shown = ", ".join(st.foreign[:3]) + (f" and {len(st.foreign) - 3} more" if len(st.foreign) > 3 else "")
        whose = ("its _job.json does not list them" if st.job is not None
                 else "there is no _job.json, so no job of this project wrote them")
        raise JobError(f"output.path={spec.output.path!r} holds part files that this project did not write there "
                       f"({shown}): {whose}. They are neither read nor deleted (not even with "
                       "output.on_existing: overwrite). Allowed: move them away, or a new output.path")
    if mode == "error" and (st.job or st.parts):
        raise JobError(f"output.path={spec.output.path!r} already holds a job's output and output.on_existing is "
                       "'error'; allowed: resume, overwrite, or a new output.path")


def remove_output(out_uri: str, st: OutputState) -> list[str]:
    """Delete what a job of this folder wrote, nothing else: its parts (by output id or listed in
    `_job.json`), their temporary files, the markers and the report's own files. `_job.json` goes last,
    so an overwrite that crashes midway still knows its output id next time. Returns the names deleted."""
    from .report import REPORT_DIR, report_files

    fs, d = fsx.resolve(out_uri)
    if not fsx.exists(fs, d):
        return []
    import pyarrow.fs as pafs

    removed = []

    def delete(path: str) -> None:
        fs.delete_file(path)
        removed.append(path[len(d) + 1:])

    markers = (manifest.JOB_FILE, manifest.SUCCESS_FILE)
    for info in fs.get_file_info(pafs.FileSelector(d, recursive=False)):
        if info.type != pafs.FileType.File:
            continue
        name = info.base_name
        temp = name.startswith(".") and name.endswith(".tmp")
        if name in st.ours or (st.output_id and output.is_ours(name, st.output_id) and (temp or name.endswith(
                output.PART_SUFFIX))) or (temp and name[1:].startswith(tuple(m + "." for m in markers))):
            delete(info.path)
    rd = fsx.join(d, REPORT_DIR)
    if st.job is not None and fsx.exists(fs, rd):
        own = set(report_files())
        for info in fs.get_file_info(pafs.FileSelector(rd, recursive=True)):
            rel = info.path[len(rd) + 1:]
            folder, _, base = rel.rpartition("/")
            if info.type == pafs.FileType.File and (rel in own or (base.startswith(".") and base.endswith(".tmp") and any(
                    fsx.join(folder, base[1:]).lstrip("/").startswith(o + ".") for o in own))):
                delete(info.path)
        for sub in (fsx.join(rd, "plots"), rd):
            if fsx.exists(fs, sub) and not fs.get_file_info(pafs.FileSelector(sub, recursive=True)):
                fs.delete_dir(sub)
    if st.job is not None and fsx.exists(fs, fsx.join(d, manifest.SUCCESS_FILE)):
        delete(fsx.join(d, manifest.SUCCESS_FILE))
    if st.job is not None and fsx.exists(fs, fsx.join(d, manifest.JOB_FILE)):
        delete(fsx.join(d, manifest.JOB_FILE))
    return removed


def _check_fingerprint(spec: JobSpec, job: Optional[dict], fp: str, components: dict) -> None:
    if job is None or job.get("fingerprint") == fp:
        return
    diffs = manifest.diff_components(job.get("fingerprint_components", {}), components)
    raise JobError(f"output.path={spec.output.path!r} was written by a job with a different fingerprint "
                   f"({job.get('fingerprint')} vs {fp}): " + "; ".join(diffs or ["unknown difference"])
                   + ". Allowed: the same settings, a new output.path, or output.on_existing: overwrite")


def _execute(spec: JobSpec, plan: ReadPlan, cfg_args: dict, stream: TextIO, output_id: str, watch: Any = None,
             on_snapshot=None) -> tuple[float, dict]:
    """watch: a calibrate.DriftWatch kept by the progress tracker (`calibration.on_drift`); on_snapshot:
    called with every progress snapshot."""
    import ray
    from ray.data import DataContext

    from .processor import generation_stage
    from .progress import ProgressMonitor, ProgressTracker, pool_ready_s
    from .quiet import filtered_stderr, quiet_ray

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below says more (tokens/s, errors, ETA)
    ctx.wait_for_min_actors_s = 600
    quiet_ray()
    tracker = ray.remote(num_cpus=0)(ProgressTracker).remote(watch)
    cfg = actor_config(spec, progress=tracker, **cfg_args)
    c = spec.compute
    out_schema = cfg.schema
    ds = generation_stage(read_dataset(plan), cfg, c)  # the same actor pool as build_processor's
    sink = output.make_datasink(spec.output.path, out_schema, spec.input.id_column, spec.output.min_rows_per_file,
                                output_id)
    t0 = time.time()
    monitor = ProgressMonitor(lambda: ray.get(tracker.snapshot.remote(), timeout=10), plan.todo_rows,
                              interval_s=c.progress_interval_s, stream=stream,
                              final_fetch=lambda: ray.get(tracker.snapshot.remote(actors=True), timeout=10),
                              on_snapshot=on_snapshot)
    try:
        with monitor, filtered_stderr():
            ds.write_datasink(sink)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"the Ray Data pipeline failed: {type(e).__name__}: {e}. Rows written so far are kept; "
                       "run the same command again to resume") from e
    finally:
        wall = time.time() - t0
        snap = monitor.stop()
        ray.kill(tracker)
    return wall, {**asdict(snap), "pool_ready_s": pool_ready_s(snap.actors, t0, c.num_actors)}


def _calibrated(spec: JobSpec, plan: ReadPlan, input_scan: InputScan, schema: pa.Schema, record: dict,
                job: Optional[dict], retry_errors: bool, engine_factory, stream: TextIO,
                output_id: str) -> tuple[ReadPlan, dict]:
    """`cache.policy: auto`: the choice recorded by an earlier run of this job, else a calibration now
    (its rows are written, so the plan is made again without them). Returns (plan, the calibration record:
    its `chain` and `active` entry say which cache settings the rows to run start with)."""
    from .calibrate import calibrate, recorded_chain

    cal = (job or {}).get("calibration") if job and job.get("fingerprint") == record["fingerprint"] else None
    if cal is not None:
        cal = {**cal, "chain": recorded_chain(cal), "active": cal.get("active", 0),
               "drift_events": list(cal.get("drift_events", [])), "on_drift": spec.calibration.on_drift}
        print(f"calibration: using the recorded choice {cal['winner']}", file=stream)
        if cal["active"]:
            print(f"calibration: continuing with the fallback {cal['chain'][cal['active']]['candidate']} (the "
                  "audit's agreement drifted in an earlier run; rows already written keep theirs)", file=stream)
    else:
        if not plan.todo_rows:
            none = {"policy": "none"}
            return plan, {"winner": "none", "cache": none, "chain": [{"candidate": "none", "cache": none}],
                          "active": 0, "drift_events": []}
        cfg = actor_config(spec, schema, engine_factory=engine_factory)
        try:
            cal = calibrate(spec, plan, cfg, schema, stream, output_id)
        except Exception as e:  # noqa: BLE001
            raise JobError(f"the calibration of cache.policy auto failed: {type(e).__name__}: {e}. "
                           "Nothing of it was recorded; run the same command again") from e
        plan = resume_plan(spec, input_scan, retry_errors, stream, schema=schema, output_id=output_id)
    record["calibration"] = cal
    manifest.write_job(spec.output.path, record)
    return plan, cal


def _policy_rows(out: str) -> Optional[pa.Table]:
    """`cache_config` and `audit_token_agreement` of the rows written (null where a part predates the column)."""
    from .resume import _read_part

    fs, d = fsx.resolve(out)
    cols = ["cache_config", "audit_token_agreement"]
    tables = []
    for info in output.list_parts(fs, d):
        t = _read_part(fs, info.path, cols)
        tables.append(pa.table({c: t.column(c) if c in t.column_names else pa.nulls(t.num_rows, pa.string()
                                if c == "cache_config" else pa.float64()) for c in cols}))
    return pa.concat_tables(tables) if tables else None


def _drift_setup(spec: JobSpec, cal: dict, record: dict, stream: TextIO) -> tuple[dict, Any, Any]:
    """The actor settings, the DriftWatch and the snapshot callback of an auto job: the rows run under the
    chain's active entry; the watch starts from the agreements of the rows already written under it (the
    calibration rows at first), and each drift event is written to `_job.json` as it happens."""
    from .calibrate import DriftWatch

    chain, active = cal["chain"], cal["active"]
    args = {"cache": chain[active]["cache"]}
    if len(chain) < 2:
        return args, None, None
    t = _policy_rows(spec.output.path)
    seed = [] if t is None else [a for c, a in zip(t.column("cache_config").to_pylist(),
                                                   t.column("audit_token_agreement").to_pylist())
                                 if c == chain[active]["candidate"] and a is not None]
    watch = DriftWatch(chain, active, cal.get("min_agreement", spec.calibration.min_agreement),
                       spec.calibration.on_drift, seed)
    args.update(fallback=tuple(e["cache"] for e in chain), level=active)
    before = list(cal.get("drift_events", []))

    def on_snapshot(snap: Any) -> None:
        p = snap.policy
        if not p or len(before) + len(p["events"]) == len(record["calibration"]["drift_events"]):
            return
        new = p["events"][len(record["calibration"]["drift_events"]) - len(before):]
        record["calibration"] = {**record["calibration"], "active": p["active"], "drift_events": before + p["events"]}
        manifest.write_job(spec.output.path, record)
        for e in new:
            print(f"drift: the audit's token agreement under {e['from']} is {e['agreement']:.3f} over "
                  f"{e['audited_rows']} row(s) (standard error {e['standard_error'] or 0:.3f}), below the floor "
                  f"{e['floor']:g} by more than two standard errors; "
                  + (f"on_drift fallback: rows started from now on run under {e['to']}" if e["action"] == "fallback"
                     else "on_drift flag: the job keeps it, the report flags it"), file=stream, flush=True)

    return args, watch, on_snapshot


def _snapshot_of(snap: dict) -> Any:
    from .progress import Snapshot

    return Snapshot(**{k: v for k, v in snap.items() if k in Snapshot.__dataclass_fields__})


def precheck(spec: JobSpec) -> None:
    """The checks that need neither Ray nor the model (paths, the lease, the output folder's state), so
    that a run that must refuse does so before starting a cluster. `run` makes them again."""
    check_paths(spec)
    lease = Lease(spec.output.path, spec.name)
    owner = lease.check() if fsx.exists(lease.fs, lease.dir) else None
    if owner is not None:
        raise JobError(str(LeaseHeld(spec.output.path, owner, lease.stale_s)))
    _refuse_existing(spec, output_state(spec))


def run(spec: JobSpec, retry_errors: bool = False, stream: TextIO = sys.stderr, engine_factory=None,
        autoscaler: Optional[bool] = None) -> RunResult:
    """Run the job on the connected Ray cluster, holding the output folder's lease throughout.
    Raises JobError when it cannot run or complete, JobInterrupted on Ctrl-C / SIGTERM."""
    check_paths(spec)
    try:
        lease = Lease(spec.output.path, spec.name, warn=stream).acquire()
    except LeaseHeld as e:
        raise JobError(str(e)) from None
    try:
        return _run_leased(spec, retry_errors, stream, engine_factory, autoscaler, lease)
    finally:
        lease.release()


def _run_leased(spec: JobSpec, retry_errors: bool, stream: TextIO, engine_factory, autoscaler: Optional[bool],
                lease: Lease) -> RunResult:
    out = spec.output.path
    timing = {"started_at_unix": time.time()}
    st = output_state(spec)
    _refuse_existing(spec, st)  # refusals only; nothing is deleted before every check passed
    overwrite = spec.output.on_existing == "overwrite"
    input_scan = scan(spec)
    check_cluster(spec, stream, autoscaler)
    schema = output_schema(input_scan.schema)
    t_pre = time.time()
    pre = preflight(spec)
    timing["preflight_s"] = time.time() - t_pre
    components = manifest.fingerprint_components(spec, pre["model_hash"])
    fp = manifest.fingerprint(components)
    if overwrite:
        removed = remove_output(out, st)
        if removed:
            print(f"overwrite: removed {len(removed)} file(s) the previous job wrote", file=stream)
        st = OutputState(None, "", [], [])
    job = st.job
    _check_fingerprint(spec, job, fp, components)
    output_id = st.output_id or manifest.new_output_id()
    plan = (resume_plan(spec, input_scan, retry_errors, stream, schema=schema, output_id=output_id) if st.parts
            else make_plan(spec, input_scan, None))
    if job is not None and plan.todo_rows == 0 and job.get("status") == "complete" and manifest.is_complete(out):
        noop = _noop_rerun(spec, plan, job, schema, retry_errors, stream, timing)
        if noop is not None:
            return noop
    print(describe_plan(spec, plan, job, st.parts), file=stream, flush=True)
    started = manifest.now()
    record = {"name": spec.name, "status": "running", "fingerprint": fp, "fingerprint_components": components,
              "spec": spec.to_dict(), "versions": manifest.versions(), "started_at": started,
              "first_started_at": (job or {}).get("first_started_at", started),
              "input": {"rows": plan.total_rows, "files": len(plan.files), "derived_ids": plan.derived_ids},
              "output_id": output_id, "files": sorted(st.ours),
              "writer": {"host": lease.owner.host, "pid": lease.owner.pid}}
    if job and job.get("reruns"):
        record["reruns"] = job["reruns"]
    manifest.write_job(out, record)
    manifest.clear_success(out)
    wall, snap = 0.0, {"rows": 0, "tokens": 0, "errors": {}, "engine_s": 0.0}
    try:
        args: dict = {"schema": schema, "engine_factory": engine_factory}
        watch = on_snapshot = None
        if spec.cache.policy == "auto":
            plan, cal = _calibrated(spec, plan, input_scan, schema, record, job, retry_errors, engine_factory,
                                    stream, output_id)
            cache_args, watch, on_snapshot = _drift_setup(spec, cal, record, stream)
            args.update(cache_args)
        if plan.todo_rows:
            wall, snap = _execute(spec, plan, args, stream, output_id, watch, on_snapshot)
            if on_snapshot is not None:
                on_snapshot(_snapshot_of(snap))  # the last events, should the monitor have missed them
        return finalize(spec, plan, schema, record, wall, snap, stream, timing, lease)
    except KeyboardInterrupt:
        _record_end(out, record, "interrupted", "stopped by Ctrl-C or SIGTERM")
        raise JobInterrupted("interrupted; the rows written so far are kept, run the same command again to "
                             "resume") from None
    except JobError as e:
        if record.get("status") == "running":
            _record_end(out, record, "failed", str(e))
        raise
    except output.OutputError as e:
        _record_end(out, record, "failed", str(e))
        raise JobError(str(e)) from None
    except Exception as e:
        _record_end(out, record, "failed", f"{type(e).__name__}: {e}")
        raise


def _record_end(out: str, record: dict, status: str, error: str) -> None:
    """`_job.json` says how the run ended, with the parts now in the folder."""
    fs, d = fsx.resolve(out)
    parts = [p.base_name for p in output.list_parts(fs, d)]
    record.update(status=status, finished_at=manifest.now(), error=error,
                  files=sorted(n for n in parts if n in record["files"] or output.is_ours(n, record["output_id"])))
    manifest.write_job(out, record)


def _noop_rerun(spec: JobSpec, plan: ReadPlan, job: dict, schema: pa.Schema, retry_errors: bool, stream: TextIO,
                timing: dict) -> Optional[RunResult]:
    """A re-run of a finished job with nothing to do: keep the finished run's figures (report,
    `_job.json`'s run), record the re-run in `_job.json`'s `reruns`. None when the output needs repair."""
    from .report import REPORT_DIR, write_report

    out = spec.output.path
    fs, d = fsx.resolve(out)
    t = output.read_output(fs, d, columns=[spec.input.id_column, "error_type"])
    if t is None:
        return None
    ids = pc.cast(t.column(spec.input.id_column), pa.string()).combine_chunks()
    if len(pc.unique(ids)) != t.num_rows or not pc.all(pc.is_in(plan.selected_ids, value_set=ids)).as_py():
        return None  # duplicates or missing ids: the normal path repairs and checks
    prev = dict(job.get("run") or {})
    keep = {k: prev[k] for k in RunResult.__dataclass_fields__ if k in prev and k not in ("noop",)}
    keep.update(output=out, status="complete", rows_total=plan.total_rows, rows_run=0, rows_skipped=plan.total_rows,
                noop=True)
    sel = t.filter(pc.is_in(ids, value_set=plan.selected_ids))
    keep["errors"] = dict(sorted((vc["values"], vc["counts"])
                                 for vc in pc.value_counts(sel.column("error_type").drop_null()).to_pylist()))
    result = RunResult(**keep)
    md = fsx.join(d, REPORT_DIR, "report.md")
    result.report = ({"json": fsx.join(out, REPORT_DIR, "report.json"), "md": fsx.join(out, REPORT_DIR, "report.md")}
                     if fsx.exists(fs, md) else write_report(out, run=job.get("run"), evaluation=spec.evaluation))
    job.setdefault("reruns", []).append({"at": manifest.now(), "rows_run": 0, "rows_total": plan.total_rows,
                                         "retry_errors": retry_errors, "result": "nothing to do: output complete"})
    manifest.write_job(out, job)
    print(f"nothing to do: {out} already holds all {plan.total_rows} row(s) of this job; the report keeps the "
          "figures of the run that wrote them", file=stream, flush=True)
    return result


def finalize(spec: JobSpec, plan: ReadPlan, schema: pa.Schema, record: dict, wall: float, snap: dict,
             stream: TextIO, timing: Optional[dict] = None, lease: Optional[Lease] = None) -> RunResult:
    """Repair duplicates, check every selected id is there exactly once, write _SUCCESS and the report."""
    from .report import write_report

    out = spec.output.path
    fs, d = fsx.resolve(out)
    if lease is not None and lease.lost is not None:
        raise JobError(f"this run lost the output folder's lease to {lease.lost.describe()} (it stalled for more "
                       f"than {lease.stale_s:.0f} s); its rows are kept, that run finishes the folder")
    output_id = record.get("output_id", "")
    dd = output.deduplicate(fs, d, spec.input.id_column, schema, output_id)
    if dd.duplicates:
        print(f"repaired {dd.duplicates} duplicate row(s) in {dd.parts_rewritten} part(s)", file=stream)
    t = output.read_output(fs, d, columns=[spec.input.id_column, "error_type"])
    record["files"] = [p.base_name for p in output.list_parts(fs, d)]
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
    if record.get("calibration") is not None:
        rows = _policy_rows(out)
        by = pc.value_counts(rows.column("cache_config").drop_null()).to_pylist() if rows is not None else []
        record["calibration"] = {**record["calibration"],
                                 "rows_by_config": dict(sorted((v["values"], v["counts"]) for v in by))}
        manifest.write_job(out, record)  # the report reads it
    result.report = write_report(out, run=result.to_dict(), evaluation=spec.evaluation)
    record.update(status="complete", finished_at=manifest.now(), run=result.to_dict())
    manifest.write_job(out, record)
    manifest.mark_success(out)
    return result
