"""Run a batch generation job: `python run_job.py JOB.yaml [key=value ...] [--dry-run] [--retry-errors]`.

Joins the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local Ray.
Exit codes: 0 done (a WARNING line when some rows have errors); 1 the job failed, every row
errored, or (--dry-run) the run would refuse; 2 the spec or the command line is invalid;
130 interrupted (Ctrl-C or SIGTERM: rows written so far are kept, the same command resumes).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent


def init_ray(local_num_cpus: int | None) -> bool | None:
    """Join RAY_ADDRESS when set; otherwise start a local instance whose workers can import this repo.
    Returns whether an autoscaler may add nodes: False for the local instance, None (unknown) otherwise."""
    import ray

    from pipeline.quiet import quiet_ray

    quiet_ray()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return None
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(address="local", num_cpus=local_num_cpus, include_dashboard=False)
    return False


def accept_interrupts() -> None:
    """Let Ctrl-C and SIGTERM reach the job even when its parent started it with them blocked or ignored:
    a signal mask and ignored dispositions survive exec, and a launcher (or a library in the parent
    process) that leaves SIGINT blocked would otherwise make Ctrl-C do nothing at all."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _sigterm(signum, frame) -> None:
    """SIGTERM (`ray job stop`, a scheduler) stops the job like Ctrl-C."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, engine_factory=None) -> int:
    """engine_factory (benchmarks, tests): builds each actor's engine instead of loading the model (run())."""
    from pipeline.spec import cache_help

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=cache_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="job spec YAML")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cache.policy=dllm_cache cache.kp=25 or cache=dual")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved spec and the plan, then exit")
    ap.add_argument("--retry-errors", action="store_true", help="re-run rows whose output has an error")
    args = ap.parse_args(argv)

    from pipeline.runner import JobError, JobInterrupted, dry_run, precheck, run
    from pipeline.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    accept_interrupts()
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        if args.dry_run:
            try:
                dry_run(spec)
            except JobError as e:
                print(f"ERROR: job {spec.name!r} would not run: {e}", file=sys.stderr)
                return 1
            return 0
        precheck(spec)  # refusals that need no cluster come before starting one
        autoscaler = init_ray(spec.compute.local_num_cpus)
        result = run(spec, retry_errors=args.retry_errors, autoscaler=autoscaler, engine_factory=engine_factory)
    except JobInterrupted as e:
        print(f"\njob {spec.name!r} {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\njob {spec.name!r} interrupted before it started writing; nothing was written", file=sys.stderr)
        return 130
    except JobError as e:
        print(f"ERROR: job {spec.name!r} failed: {e}", file=sys.stderr)
        return 1
    r = result
    print(f"\njob {spec.name!r} complete: {r.rows_total} rows ({r.rows_run} run now, {r.rows_skipped} already written)")
    if r.rows_run:
        ov = f"{r.overhead:.1%}" if r.overhead is not None else "-"
        print(f"throughput: {r.rows_per_s:.2f} rows/s, {r.tokens_per_s:.1f} generated tokens/s over {r.wall_s:.1f} s "
              f"on {r.num_actors} actor(s); pipeline overhead {ov}")
    print(f"parquet:    {spec.output.path}")
    print(f"report:     {r.report.get('md')} (+ report.json, plots/ beside it)")
    n_err = sum(r.errors.values())
    if n_err and n_err >= r.rows_total:
        print(f"ERROR: every row errored: {r.errors}", file=sys.stderr)
        return 1
    if n_err:
        print(f"WARNING: {n_err} of {r.rows_total} rows have errors ({', '.join(f'{k} {v}' for k, v in r.errors.items())}); "
              f"rerun with --retry-errors to retry them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
