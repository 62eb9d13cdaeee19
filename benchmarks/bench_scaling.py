"""Multi-GPU scaling of the Ray pipeline, measured through `python run_job.py` itself.

    python benchmarks/bench_scaling.py --gpus 1,2                      # GPUs, LLaDA-8B-shaped bf16 checkpoint
    python benchmarks/bench_scaling.py --cpu --gpus 1,2 --rows 256 --gen-length 128 \\
        --out benchmarks/results/scaling_cpu.json                       # CPU actors, tiny fp32 checkpoint

Per actor count n in --gpus (in order; repeats allowed): a job spec (dual cache + threshold, n actors, one GPU each; with --cpu
n CPU actors) runs `run_job.py` in a subprocess (its own local Ray) on the same seeded Parquet
prompts of mixed lengths. From the job's `_report/report.json` (RunResult: preflight, actor pool
start-up and the per-actor timeline) and the Parquet output it records:

- startup_s = cluster_s (process start to run(): imports + ray.init) + preflight_s (the runner's model
  load check) + pool_ready_s (actor processes + their model loads; Ray Data hands out no batch before);
- startup.first_batch_s (reported, inside wall_time_s): actors ready -> first engine call (Ray Data
  schedules its first read task only after the pool is up);
- wall_time_s = the pipeline's wall time after start-up; engine_time_s = engine seconds summed over
  actors; overhead = 1 - engine_time_s / (wall_time_s x actors);
- rows_per_s and tokens_per_s over wall_time_s (the _e2e variants over the whole process);
- GPU utilisation sampled by `nvidia-smi -l 1` over the same after-start-up window (null without it);
- checks: rows in = rows out, no duplicate or missing ids, outputs equal to the first run's;
- per-actor rows, engine seconds and idle tail (balance), scaling_ratio = rows_per_s / the 1-actor run's.

Records are appended to --out (a JSON list); the markdown table beside it (same name, .md) is rebuilt
from every record in that file. A 1-actor record from an earlier call with the same settings serves
as the baseline, so `--gpus 1` and `--gpus 2` may run as two device calls (README: Scaling).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from this be are or an it his not but which "
         "have had one were all their they been has more when there who other some what into time only "
         "number could about first then these would way made many each people over water new").split()


# ----------------------------------------------------------------------------- inputs
def prompt_text(n_chars: int, rng) -> str:
    """Words up to exactly n_chars characters: the checkpoints' byte-level tokenizer makes one token each."""
    words, size = [], 0
    while size < n_chars:
        w = WORDS[int(rng.integers(len(WORDS)))]
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:n_chars].rstrip() or "x"


def write_prompts(path: Path, rows: int, lo: int, hi: int, seed: int, files: int) -> dict[str, Any]:
    """Seeded prompts with lengths uniform in [lo, hi] tokens, in `files` Parquet files (ids unique)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=rows)
    texts = [prompt_text(int(n), rng) for n in lengths]
    ids = [f"p{i:06d}" for i in range(rows)]
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    bounds = [round(k * rows / files) for k in range(files + 1)]
    for k in range(files):
        a, b = bounds[k], bounds[k + 1]
        pq.write_table(pa.table({"id": ids[a:b], "prompt": texts[a:b]}), path / f"prompts-{k:04d}.parquet")
    chars = [len(t) for t in texts]
    return {"rows": rows, "files": files, "prompt_chars": {"min": min(chars), "mean": sum(chars) / rows, "max": max(chars)}}


def ensure_checkpoint(path: Path, shape: str, dtype: str, device: str) -> dict[str, Any]:
    """Write the random checkpoint unless the folder already holds one (the 8B write takes ~30 s). In a
    subprocess, so this process keeps no CUDA context on a GPU that an actor will use."""
    if (path / "config.json").exists():
        return {"path": str(path), "reused": True}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "make_random_checkpoint.py"), "--shape", shape, "--out", str(path),
           "--dtype", dtype, "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def environment() -> dict[str, Any]:
    """common.env_info() from a subprocess (it initialises CUDA to name the card)."""
    code = "import json, sys; sys.path.insert(0, 'benchmarks'); from common import env_info; print(json.dumps(env_info()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    env = json.loads(out.strip().splitlines()[-1])
    h = hashlib.sha256()
    for f in [ROOT / "run_job.py", *sorted((ROOT / "pipeline").glob("*.py"))]:
        h.update(f.name.encode() + f.read_bytes())
    env.update(ray=metadata.version("ray"), pyarrow=pa.__version__, pipeline_src_sha=h.hexdigest()[:12],
               cpu_count=os.cpu_count())
    return env


PROBE = ("import time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); t = time.perf_counter()\n"
         "for _ in range(200): a @ a\nprint(time.perf_counter() - t)")


def cpu_capacity(n: int) -> dict[str, float]:
    """A single-threaded matmul loop alone, then in n processes at once (loop time only, not the imports):
    how many cores' worth this machine really gives n CPU actors. vCPUs that share a core or a quota give
    less than n, and the CPU scaling ratio can be no better."""
    def loop_s(k: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return [float(q.communicate()[0].strip()) for q in procs]
    one, many = loop_s(1)[0], statistics.fmean(loop_s(n))
    return {"processes": n, "one_s": round(one, 3), "n_at_once_s": round(many, 3), "capacity": round(n * one / many, 2)}


def job_spec(a: argparse.Namespace, n: int, ckpt: Path, data: Path, out: Path) -> dict[str, Any]:
    """The run_job.py spec for n actors (pipeline/spec.py's schema)."""
    cpus = a.cpus_per_actor
    return {
        "name": f"scaling-{n}",
        "seed": 0,
        "model": {"path": str(ckpt), "family": "llada", "dtype": a.dtype},
        "input": {"path": str(data), "format": "parquet", "prompt_column": "prompt", "id_column": "id"},
        "output": {"path": str(out), "on_existing": "overwrite"},
        "generation": {"gen_length": a.gen_length, "steps": a.gen_length, "block_length": a.block_length,
                       "threshold": a.threshold, "stop_at_eos": a.stop_at_eos},
        "cache": {"policy": "dual"},
        "compute": {"num_actors": n, "gpus_per_actor": 0 if a.cpu else 1, "cpus_per_actor": cpus,
                    "batch_size": a.batch_size, "length_grouping": a.length_grouping,
                    "local_num_cpus": a.local_num_cpus or int(n * cpus + 2), "progress_interval_s": 10},
        "audit": {"fraction": 0.0},
    }


# ----------------------------------------------------------------------------- GPU utilisation
class GpuSampler:
    """`nvidia-smi -l 1` in the background; samples are (time, gpu index, utilisation %)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, float]] = []
        self.proc: Optional[subprocess.Popen] = None
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-l", "1"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                idx, util = (x.strip() for x in line.split(","))
                self.samples.append((time.time(), int(idx), float(util)))
            except ValueError:
                continue

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def summary(self, start: float, end: float, n_used: int) -> Optional[dict[str, Any]]:
        """Mean utilisation per GPU over [start, end]; `mean_used` averages the n_used busiest GPUs."""
        if self.proc is None:
            return None
        per: dict[int, list[float]] = {}
        for t, i, u in self.samples:
            if start <= t <= end:
                per.setdefault(i, []).append(u)
        means = {i: statistics.fmean(v) for i, v in sorted(per.items())}
        busiest = sorted(means.values(), reverse=True)[:n_used]
        return {"per_gpu_mean": means, "mean_used": statistics.fmean(busiest) if busiest else None,
                "samples": sum(len(v) for v in per.values())}


# ----------------------------------------------------------------------------- one configuration
def run_job(spec_path: Path, log_path: Path, timeout_s: Optional[float],
            runner: Optional[list[str]] = None) -> tuple[int, float, float]:
    """run_job.py (or `runner`, a command that takes the spec path last) in a subprocess; returns (exit
    code, launch time, seconds). Output goes to the log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    t0 = time.time()
    cmd = [*(runner or [sys.executable, str(ROOT / "run_job.py")]), str(spec_path)]
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, t0, time.time() - t0


def read_output(out: Path) -> pa.Table:
    """The job's Parquet parts (pyarrow skips `_report/` and `_job.json`)."""
    return pq.read_table(out, columns=["id", "generation_token_ids", "num_prompt_tokens", "num_generated_tokens",
                                       "error_type"])


def check_rows(table: pa.Table, ids_in: pa.Array) -> dict[str, Any]:
    """rows in = rows out, every id once, nothing missing, error rows."""
    ids = pc.cast(table.column("id"), pa.string())
    unique = len(pc.unique(ids))
    missing = int(pc.sum(pc.invert(pc.is_in(ids_in, value_set=ids))).as_py() or 0)
    errors = table.num_rows - int(pc.sum(pc.is_null(table.column("error_type"))).as_py() or 0)
    return {"rows_in": len(ids_in), "rows_out": table.num_rows, "duplicate_ids": table.num_rows - unique,
            "missing_ids": missing, "error_rows": errors,
            "ok": table.num_rows == len(ids_in) and unique == table.num_rows and not missing and not errors}


def token_ids_by_id(table: pa.Table) -> dict[str, list[int]]:
    return dict(zip(table.column("id").to_pylist(), table.column("generation_token_ids").to_pylist()))


def same_outputs(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Fraction of ids whose generated tokens are identical (greedy outputs must not depend on batching)."""
    return sum(a.get(k) == v for k, v in b.items()) / len(b) if b else 1.0


def actor_balance(actors: list[dict], ready: float, end: float) -> list[dict[str, Any]]:
    """Per actor: rows, calls, engine seconds, model load, and where its other time after start-up went:
    start_delay_s (ready -> first engine call), gaps_s (between engine calls, summed over the kept spans),
    idle_tail_s (last call -> pipeline end). engine + those three = the wall time after start-up."""
    out = []
    for x in actors:
        spans, first, last = x.get("spans") or [], x.get("first_call_start"), x.get("last_call_end")
        gaps = sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
        calls = [b - a for a, b, _ in spans]
        out.append({"worker": x["worker"], "rows": x["rows"], "calls": x["calls"], "engine_s": round(x["engine_s"], 3),
                    "load_s": round(x["load_end"] - x["load_start"], 3) if x.get("load_end") else None,
                    "imported_to_load_s": round(x["load_start"] - x["imported"], 3) if x.get("imported") else None,
                    "start_delay_s": round(first - ready, 3) if first else None, "gaps_s": round(gaps, 3),
                    "idle_tail_s": round(end - last, 3) if last else None,
                    "first_call_s": round(calls[0], 3) if calls else None,
                    "median_call_s": round(statistics.median(calls), 3) if calls else None,
                    "spans": [[round(a - ready, 3), round(b - ready, 3), r] for a, b, r in spans]})
    return out


def measure(a: argparse.Namespace, n: int, ckpt: Path, data: Path, ids_in: pa.Array, work: Path,
            tag: Optional[str] = None, edit: Optional[Any] = None,
            runner: Optional[list[str]] = None) -> tuple[dict, pa.Table]:
    """One configuration: spec, subprocess, report and output -> one record. tag names its files (default
    n); edit(spec) may change the job spec first; runner replaces run_job.py (see run_job)."""
    tag = tag or str(n)
    out = work / f"out_{tag}"
    spec_path = work / f"scaling_{tag}.yaml"
    spec = job_spec(a, n, ckpt, data, out)
    if edit is not None:
        edit(spec)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log_path = work / f"run_{tag}.log"
    with GpuSampler() as gpu:
        rc, launched, process_s = run_job(spec_path, log_path, a.timeout_s, runner)
    rec: dict[str, Any] = {"gpus": n, "device": "cpu" if a.cpu else "cuda", "exit_code": rc,
                           "process_s": round(process_s, 2), "log": str(log_path)}
    if rc != 0:
        rec["log_tail"] = log_path.read_text()[-3000:]
        return rec, None
    run = json.loads((out / "_report" / "report.json").read_text())["run"]
    table = read_output(out)
    loads = sorted(x["load_end"] for x in run["actors"] if x.get("load_end"))
    ready_at = loads[min(n, len(loads)) - 1] if loads else launched
    last_call = max((x["last_call_end"] for x in run["actors"] if x.get("last_call_end")), default=ready_at)
    end = ready_at + run["steady_wall_s"]
    balance = actor_balance(run["actors"], ready_at, end)
    rows, wall, tokens = table.num_rows, run["steady_wall_s"], int(pc.sum(table.column("num_generated_tokens")).as_py() or 0)
    cluster_s = run["started_at_unix"] - launched
    rec.update(
        rows=rows, rows_per_s=rows / wall, tokens_per_s=tokens / wall, generated_tokens=tokens,
        startup_s=cluster_s + run["preflight_s"] + run["pool_ready_s"],
        startup={"cluster_s": round(cluster_s, 3), "preflight_s": round(run["preflight_s"], 3),
                 "pool_ready_s": round(run["pool_ready_s"], 3),
                 "first_batch_s": round(min((b["start_delay_s"] for b in balance if b["start_delay_s"] is not None),
                                            default=0.0), 3),
                 "actor_load_s_max": max((b["load_s"] or 0.0 for b in balance), default=None)},
        engine_time_s=run["engine_s"], wall_time_s=wall, overhead=1.0 - run["engine_s"] / (wall * n),
        pipeline_wall_s=run["wall_s"], overhead_incl_pool_start=run["overhead"],
        rows_per_s_e2e=rows / process_s, tokens_per_s_e2e=tokens / process_s,
        drain_s=round(end - last_call, 3), actors=balance,
        actor_start=[{k: round(x[k] - launched, 3) if x.get(k) else None for k in ("imported", "load_start", "load_end")}
                     for x in run["actors"]],
        gpu_util=gpu.summary(ready_at, end, n), checks=check_rows(table, ids_in),
        prompt_tokens={"min": pc.min(table.column("num_prompt_tokens")).as_py(),
                       "mean": pc.mean(table.column("num_prompt_tokens")).as_py(),
                       "max": pc.max(table.column("num_prompt_tokens")).as_py()})
    return rec, table


# ----------------------------------------------------------------------------- results
def settings(a: argparse.Namespace, data_facts: dict) -> dict[str, Any]:
    """What must match for two records to be compared (scaling baseline)."""
    return {"shape": a.shape, "dtype": a.dtype, "rows": a.rows, "prompt_tokens": [a.prompt_min, a.prompt_max],
            "input_files": data_facts["files"], "gen_length": a.gen_length, "block_length": a.block_length,
            "threshold": a.threshold, "stop_at_eos": a.stop_at_eos, "policy": "dual", "batch_size": a.batch_size,
            "length_grouping": a.length_grouping, "cpus_per_actor": a.cpus_per_actor, "seed": a.seed}


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def baseline(records: list[dict], new: list[dict], sett: dict, gpu: str) -> Optional[dict]:
    """The latest 1-actor record of this call, else the latest earlier one with the same settings and card."""
    for r in new[::-1] + records[::-1]:
        if r.get("gpus") == 1 and r.get("settings") == sett and r.get("gpu") == gpu and r.get("rows_per_s"):
            return r
    return None


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def markdown(records: list[dict], title: str) -> str:
    """The table of every record, then per-actor balance, the commands and the environment."""
    lines = [f"# {title}", "", "Written by `benchmarks/bench_scaling.py` from the records in the JSON file beside it "
             "(method: the script's docstring). Rates are over the wall time after start-up.", "",
             "| gpu | actors | rows | rows/s | tok/s | scaling | startup s (cluster + preflight + pool) | "
             "first batch s | wall s | engine s (sum) | overhead | GPU util % | rows in = out, ids once | outputs = 1-actor run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if not r.get("rows_per_s"):
            lines.append(f"| {r.get('gpu')} | {r['gpus']} | failed (exit {r.get('exit_code')}) | | | | | | | | | | | |")
            continue
        s, c, g = r["startup"], r["checks"], r.get("gpu_util") or {}
        lines.append(
            f"| {r['gpu']} | {r['gpus']} | {r['rows']} | {fmt(r['rows_per_s'])} | {fmt(r['tokens_per_s'])} | "
            f"{fmt(r.get('scaling_ratio'))} | {fmt(r['startup_s'])} ({fmt(s['cluster_s'])} + {fmt(s['preflight_s'])} + "
            f"{fmt(s['pool_ready_s'])}) | {fmt(s.get('first_batch_s'))} | {fmt(r['wall_time_s'])} | {fmt(r['engine_time_s'])} | {r['overhead']:.1%} | "
            f"{fmt(g.get('mean_used'))} | {'yes' if c['ok'] else 'NO ' + json.dumps(c)} | {fmt(r.get('outputs_equal_first'))} |")
    lines += ["", "## Per-actor balance (seconds after start-up: engine + start delay + gaps + idle tail = wall)", "",
              "| gpu | actors | worker | rows | engine calls | engine s | first / median call s | model load s | "
              "start delay s | gaps s | idle tail s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for x in r.get("actors") or []:
            lines.append(f"| {r['gpu']} | {r['gpus']} | {x['worker']} | {x['rows']} | {x['calls']} | {fmt(x['engine_s'])} | "
                         f"{fmt(x['first_call_s'])} / {fmt(x['median_call_s'])} | {fmt(x['load_s'])} | {fmt(x['start_delay_s'])} | {fmt(x['gaps_s'])} | {fmt(x['idle_tail_s'])} |")
    caps = [(r["gpus"], r["cpu_capacity"]) for r in records if r.get("cpu_capacity")]
    if caps:
        lines += ["", "## CPU capacity probe", "", "Just before each run: a single-threaded matmul loop alone and in 2 "
                  "processes at once; capacity = 2 x alone / together = the cores' worth this machine gave at that "
                  "moment, a ceiling for the CPU scaling ratio.", "", "| actors (run) | loop alone s | together s | capacity |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {c['one_s']} | {c['n_at_once_s']} | {c['capacity']} |" for n, c in caps]
    lines += ["", "## Commands and settings", ""]
    for cmd, sett, env in dict.fromkeys((r["command"], json.dumps(r["settings"]), json.dumps(r["env"], sort_keys=True))
                                        for r in records):
        lines += ["```bash", cmd, "```", "", f"settings: `{sett}`", "", f"environment: `{env}`", ""]

    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2", help="actor counts to run, comma-separated (one GPU each; CPU actors with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="CPU actors (gpus_per_actor 0), tiny checkpoint, float32")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--prompt-min", type=int, default=64, help="shortest prompt, tokens")
    ap.add_argument("--prompt-max", type=int, default=512, help="longest prompt, tokens")
    ap.add_argument("--input-files", type=int, default=8, help="Parquet files the prompts are split into")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--stop-at-eos", action="store_true", help="default off: every row generates gen_length tokens")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per engine call")
    ap.add_argument("--length-grouping", type=int, default=4, help="engine calls per actor call (rows sorted by length)")
    ap.add_argument("--cpus-per-actor", type=float, default=None, help="default 2 (GPU) or 1 (CPU)")
    ap.add_argument("--local-num-cpus", type=int, default=None, help="local Ray's CPUs; default actors x cpus + 2")
    ap.add_argument("--shape", default=None, help="checkpoint preset (default llada-8b; llada-tiny with --cpu)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (GPU) or float32 (CPU)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder; written when it has no config.json")
    ap.add_argument("--workdir", default="/tmp/bench_scaling", help="prompts, specs, job outputs, logs")
    ap.add_argument("--timeout-s", type=float, default=None, help="kill a job after this long (recorded as exit 124)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/scaling.json", help="JSON list the records are appended to")
    a = ap.parse_args(argv)
    a.shape = a.shape or ("llada-tiny" if a.cpu else "llada-8b")
    a.dtype = a.dtype or ("float32" if a.cpu else "bfloat16")
    a.cpus_per_actor = a.cpus_per_actor or (1.0 if a.cpu else 2.0)
    a.checkpoint = a.checkpoint or f"/tmp/ckpt/{a.shape}-{a.dtype}"
    a.actor_counts = [int(x) for x in a.gpus.split(",") if x.strip()]
    return a


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    if a.cpu:
        env["gpu"] = "cpu"
    ckpt = Path(a.checkpoint)
    ck_facts = ensure_checkpoint(ckpt, a.shape, a.dtype, "cpu" if a.cpu else "cuda")
    data = work / "prompts"
    data_facts = write_prompts(data, a.rows, a.prompt_min, a.prompt_max, a.seed, a.input_files)
    ids_in = pa.array([f"p{i:06d}" for i in range(a.rows)], pa.string())
    sett = settings(a, data_facts)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    out_path = Path(a.out)
    records = load_records(out_path)
    new: list[dict] = []
    first: Optional[dict[str, list[int]]] = None
    for n in a.actor_counts:
        print(f"[scaling] {n} actor(s): running run_job.py ...", flush=True)
        cap = cpu_capacity(2) if a.cpu else None  # just before the run: shared vCPUs vary from minute to minute
        rec, table = measure(a, n, ckpt, data, ids_in, work)
        rec["cpu_capacity"] = cap
        rec.update(gpu=env["gpu"], settings=sett, command=command, env=env, checkpoint=ck_facts, data=data_facts)
        if table is not None:
            got = token_ids_by_id(table)
            first = first or got
            rec["outputs_equal_first"] = same_outputs(first, got)
            base = rec if n == 1 else baseline(records, new, sett, env["gpu"])
            rec["scaling_ratio"] = rec["rows_per_s"] / base["rows_per_s"] if base else None
        new.append(rec)
        print(f"[scaling] {json.dumps({k: rec.get(k) for k in ('gpus', 'rows', 'rows_per_s', 'tokens_per_s', 'startup_s', 'wall_time_s', 'engine_time_s', 'overhead', 'scaling_ratio', 'exit_code')})}", flush=True)
    records += new
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1, default=str))
    title = ("Pipeline scaling on CPU actors, tiny random model (a correctness and balance check, NOT the "
             "GPU measurement)" if a.cpu else "Pipeline scaling: LLaDA-8B-shaped random bf16 checkpoint")
    out_path.with_suffix(".md").write_text(markdown(records, title))
    print(f"[scaling] records -> {out_path}, table -> {out_path.with_suffix('.md')}")
    return 0 if all(r.get("exit_code") == 0 and (r.get("checks") or {}).get("ok") for r in new) else 1


if __name__ == "__main__":
    raise SystemExit(main())
