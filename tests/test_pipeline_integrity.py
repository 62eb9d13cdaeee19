"""Output integrity: input never deleted, one writer per output folder, parts that never collide or get
overwritten, corrupt output files, unsatisfiable resources, dry-run refusals, no-op re-runs, Ctrl-C and
kills against the local Ray that run_job.py starts by default, Ray's start-up noise.

Most tests need no Ray (the checks run before any pipeline); the ones that run jobs keep them tiny.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import fs as fsx
from pipeline import manifest, output
from pipeline.lease import LEASE_FILE, Lease, LeaseHeld
from pipeline.runner import JobError, check_resources, output_state, remove_output, run
from pipeline.schema import conform, output_schema
from pipeline.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dllm_cache_core.models.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "llada", family="llada"))


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i:02d}", "prompt": f"prompt {i} " + "word " * (i % 5)} for i in range(n)]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data(tiny: str, inp: str, out: str, **over) -> dict:
    d = {"name": "integrity", "model": {"path": tiny}, "input": {"path": inp},
         "output": {"path": out, "min_rows_per_file": 2},
         "generation": {"gen_length": 16, "block_length": 8}, "cache": "dual",
         "compute": {"num_actors": 1, "batch_size": 2, "length_grouping": 1, "progress_interval_s": 1}}
    d.update(over)
    return d


def _spec(tiny, inp, out, *overrides, **over):
    return load_spec(data=_data(tiny, inp, out, **over), overrides=list(overrides))


def _out_table(ids, gen="g"):
    base = pa.table({"id": ids, "prompt": [f"p{i}" for i in ids]})
    t = base.append_column("error_type", pa.array([None] * len(ids), pa.string()))
    t = t.append_column("generation", pa.array([gen] * len(ids), pa.string()))
    return conform(t, output_schema(base.schema))


# ----------------------------------------------------------------------------- 1. never delete input
def _spark_folder(root: Path) -> Path:
    spark = root / "x" / "spark"
    spark.mkdir(parents=True)
    for k in range(2):
        pq.write_table(pa.table({"id": [f"s{k}{i}" for i in range(3)], "prompt": ["hi"] * 3}),
                       spark / f"part-0000{k}.parquet")
    (spark / "_SUCCESS").write_text("")
    return spark


@pytest.mark.parametrize("spelling", ["{x}/./spark", "{x}/spark/", "{x}/other/../spark", "file://{x}/spark",
                                      "{link}", "{x}/spark/out", "{x}"])
def test_output_equal_to_inside_or_containing_the_input_is_refused(tmp_path, spelling):
    spark = _spark_folder(tmp_path)
    (tmp_path / "x" / "other").mkdir()
    (tmp_path / "link").symlink_to(spark)
    out = spelling.format(x=tmp_path / "x", link=tmp_path / "link")
    with pytest.raises(SpecError, match=r"output.path must differ from input.path.*(is the input itself|lies inside|contains)"):
        load_spec(data=_data("builtin:tiny", str(spark), out, output={"path": out, "on_existing": "overwrite"}))
    load_spec(data=_data("builtin:tiny", str(spark), str(tmp_path / "x" / "spark-out")))  # a sibling is fine


def test_runner_rechecks_paths_and_overwrite_never_touches_the_input(tmp_path, tiny):
    """A symlink made after validation points the output at the input: the run refuses, input intact."""
    spark = _spark_folder(tmp_path)
    before = sorted(p.name for p in spark.iterdir())
    spec = _spec(tiny, str(spark), str(tmp_path / "later"), "output.on_existing=overwrite")
    (tmp_path / "later").symlink_to(spark)
    with pytest.raises(JobError, match="is the input itself"):
        run(spec, stream=io.StringIO())
    assert sorted(p.name for p in spark.iterdir()) == before


def test_overwrite_removes_only_what_the_previous_job_wrote(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    fs, dd = fsx.resolve(str(d))
    oid = manifest.new_output_id()
    listed = output.write_part(fs, dd, _out_table(["a", "b"]), "id", oid)
    crashed = output.write_part(fs, dd, _out_table(["c"]), "id", oid)  # written, then the run died: not listed
    (d / f".{output.part_name(['d'], oid)}.0123.tmp").write_bytes(b"half a part")
    manifest.write_job(str(d), {"name": "old", "output_id": oid, "files": [listed]})
    manifest.mark_success(str(d))
    (d / "_report" / "plots").mkdir(parents=True)
    (d / "_report" / "report.md").write_text("old report")
    (d / "_report" / "plots" / "flops_speedup_hist.png").write_bytes(b"png")
    (d / "_report" / "my_notes.md").write_text("the user's")
    (d / "README.txt").write_text("the user's")
    st = output_state(load_spec(data=_data("builtin:tiny", "in.jsonl", str(d))))
    assert st.ours == sorted([listed, crashed]) and st.foreign == []
    remove_output(str(d), st)
    left = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    assert left == ["README.txt", "_report", "_report/my_notes.md"]


def test_parts_no_job_wrote_are_neither_read_nor_deleted(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["z"], "prompt": ["hi"]}), out / "part-00000.parquet")  # someone else's
    inp = _jsonl(tmp_path / "in.jsonl", _rows(2))
    for mode in ("resume", "overwrite"):
        with pytest.raises(JobError, match=r"part files that this project did not write there \(part-00000.parquet\)"):
            run(_spec(tiny, inp, str(out), f"output.on_existing={mode}"), stream=io.StringIO())
    assert (out / "part-00000.parquet").exists() and not (out / LEASE_FILE).exists()


# ----------------------------------------------------------------------------- 3. part names
def test_part_names_hash_length_prefixed_ids():
    assert output.part_name(["a", "b"]) != output.part_name(["a\nb"])
    assert output.part_name(["ab", "c"]) != output.part_name(["a", "bc"])
    assert output.part_name(["b", "a"], "o1") == output.part_name(["a", "b"], "o1") != output.part_name(["a", "b"], "o2")


def test_a_finished_part_is_never_overwritten(tmp_path):
    fs, d = fsx.resolve(str(tmp_path))
    first = output.write_part(fs, d, _out_table(["a", "b"], "first"), "id", "oid")
    again = output.write_part(fs, d, _out_table(["b", "a"], "second"), "id", "oid")  # the same ids again
    assert again != first and again.endswith("-1.parquet")
    assert pq.read_table(tmp_path / first).column("generation").to_pylist() == ["first", "first"]
    assert not fsx.move_no_overwrite(fs, str(tmp_path / again), str(tmp_path / first))
    assert pq.read_table(tmp_path / first).column("generation").to_pylist() == ["first", "first"]
    assert output.deduplicate(fs, d, "id", output_id="oid").duplicates == 2  # the repair keeps one of each
    assert sorted(output.read_output(fs, d).column("id").to_pylist()) == ["a", "b"]


# ----------------------------------------------------------------------------- 2. the lease
def test_lease_refuses_a_second_writer_and_names_the_running_job(tmp_path):
    out = str(tmp_path / "out")
    with Lease(out, "first-job", heartbeat_s=0.2) as first:
        held = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
        assert held["job"] == "first-job" and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(LeaseHeld, match=r"being written by job 'first-job' \(pid \d+ on host"):
            Lease(out, "second-job").acquire()
        beat = held["heartbeat"]
        time.sleep(0.6)
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["heartbeat"] > beat  # the driver thread beats
        assert first.held
    assert not (tmp_path / "out" / LEASE_FILE).exists()  # released


def _write_lease(d: Path, **over) -> None:
    d.mkdir(parents=True, exist_ok=True)
    owner = {"token": "t0", "job": "dead-job", "host": socket.gethostname(), "pid": os.getpid(),
             "started_at": time.time(), "heartbeat": time.time(), "output": str(d)}
    owner.update(over)
    (d / LEASE_FILE).write_text(json.dumps(owner))


def test_a_dead_owners_lease_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lease(tmp_path / "a", pid=dead.pid)  # same host, process gone: at once
    warn = io.StringIO()
    with Lease(str(tmp_path / "a"), "new", warn=warn) as lease:
        assert lease.taken_over.job == "dead-job" and "taking over the lease of job 'dead-job'" in warn.getvalue()
        assert json.loads((tmp_path / "a" / LEASE_FILE).read_text())["job"] == "new"
    _write_lease(tmp_path / "b", host="elsewhere", heartbeat=time.time() - 3600)  # another host, no heartbeat
    with Lease(str(tmp_path / "b"), "new", warn=io.StringIO()) as lease:
        assert lease.taken_over is not None
    _write_lease(tmp_path / "c", host="elsewhere")  # another host, fresh heartbeat: alive
    with pytest.raises(LeaseHeld, match="dead-job"):
        Lease(str(tmp_path / "c"), "new").acquire()


def test_lease_on_an_object_store(tmp_path):
    pytest.importorskip("fsspec")
    uri = f"memory://lease-test-{os.getpid()}/out"
    with Lease(uri, "first", settle_s=0.0):
        with pytest.raises(LeaseHeld, match="first"):
            Lease(uri, "second", settle_s=0.0).acquire()
    with Lease(uri, "second", settle_s=0.0) as lease:  # released: free again
        assert lease.held


def test_a_second_run_into_a_folder_being_written_refuses(tmp_path, tiny):
    inp = _jsonl(tmp_path / "in.jsonl", _rows(2))
    out = tmp_path / "out"
    with Lease(str(out), "running-job"):
        for mode in ("resume", "overwrite"):
            with pytest.raises(JobError, match=r"being written by job 'running-job'"):
                run(_spec(tiny, inp, str(out), f"output.on_existing={mode}"), stream=io.StringIO())
        assert not list(out.glob("part-*")) and not (out / "_job.json").exists()


# ----------------------------------------------------------------------------- 7. corrupt outputs, resources
def test_corrupt_output_files_name_the_file_and_what_to_do(tmp_path, tiny):
    inp = _jsonl(tmp_path / "in.jsonl", _rows(2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text('{"name": "t", "output_')
    with pytest.raises(JobError, match=r"_job.json is not valid JSON .*delete that folder's output"):
        run(_spec(tiny, inp, str(out)), stream=io.StringIO())
    oid = manifest.new_output_id()
    manifest.write_job(str(out), {"name": "t", "output_id": oid, "files": []})
    fs, d = fsx.resolve(str(out))
    name = output.write_part(fs, d, _out_table(["a"]), "id", oid)
    (out / name).write_bytes((out / name).read_bytes()[:40])  # truncated
    from pipeline.runner import done_ids

    with pytest.raises(JobError, match=rf"output part .*{name} is not a readable Parquet file.*delete that file"):
        done_ids(_spec(tiny, inp, str(out)), False)


def test_gpus_the_cluster_cannot_get_fail_fast_naming_the_field(tiny, tmp_path):
    spec = _spec(tiny, "in.jsonl", str(tmp_path / "o"), "compute.gpus_per_actor=1")
    with pytest.raises(JobError, match=r"compute.gpus_per_actor=1 x compute.num_actors=1 needs 1 GPU.*no autoscaler"):
        check_resources(spec, {"CPU": 8, "GPU": 0}, 1, autoscaler=False, warn=io.StringIO())
    warn = io.StringIO()  # a cluster that may have an autoscaler: a warning, the job waits
    check_resources(spec, {"CPU": 8, "GPU": 0}, 1, autoscaler=None, warn=warn)
    assert "waits for an autoscaler" in warn.getvalue()
    with pytest.raises(JobError, match=r"compute.cpus_per_actor=4 x compute.num_actors=3 needs 12 CPUs"):
        check_resources(_spec(tiny, "in.jsonl", str(tmp_path / "o"), "compute.cpus_per_actor=4", "compute.num_actors=3"),
                        {"CPU": 8}, 1, autoscaler=False, warn=io.StringIO())


def test_gpu_job_on_the_local_ray_fails_fast(ray_local, tiny, tmp_path):
    """The shared test Ray was started by this process (ray.init(address='local')): no autoscaler."""
    inp = _jsonl(tmp_path / "in.jsonl", _rows(2))
    t0 = time.time()
    with pytest.raises(JobError, match="compute.gpus_per_actor=1 .*no autoscaler"):
        run(_spec(tiny, inp, str(tmp_path / "out"), "compute.gpus_per_actor=1"), stream=io.StringIO())
    assert time.time() - t0 < 60 and not (tmp_path / "out" / LEASE_FILE).exists()


# ----------------------------------------------------------------------------- 8. dry run
def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "run_job.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_dry_run_exits_non_zero_where_the_run_would_refuse(tmp_path, tiny):
    inp = _jsonl(tmp_path / "in.jsonl", _rows(3))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_data(tiny, inp, str(out))))
    ok = _cli(str(job), "--dry-run")
    assert ok.returncode == 0 and "checks:  passed" in ok.stdout, ok.stderr
    # an output written with other settings (cache dual): the real run refuses cache=prefix
    from pipeline.runner import preflight

    spec = _spec(tiny, inp, str(out))
    comps = manifest.fingerprint_components(spec, preflight(spec)["model_hash"])
    manifest.write_job(str(out), {"name": "integrity", "fingerprint": manifest.fingerprint(comps),
                                  "fingerprint_components": comps, "output_id": "abc", "files": []})
    assert _cli(str(job), "--dry-run").returncode == 0
    r = _cli(str(job), "cache=prefix", "--dry-run")
    assert r.returncode == 1 and "different fingerprint" in r.stderr and "cache.policy: 'dual' -> 'prefix'" in r.stderr
    r = _cli(str(job), f"model.path={tmp_path / 'missing'}", "--dry-run")
    assert r.returncode == 1 and "not a model folder" in r.stderr
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    r = _cli(str(job), f"model.path={bad}", "--dry-run")
    assert r.returncode == 1 and "failed to load, so the job did not start" in r.stderr
    r = _cli(str(job), "compute.gpus_per_actor=1", "--dry-run")
    assert r.returncode == 1 and "compute.gpus_per_actor=1" in r.stderr
    with Lease(str(out), "busy-job"):
        r = _cli(str(job), "--dry-run")
    assert r.returncode == 1 and "being written by job 'busy-job'" in r.stderr


# ----------------------------------------------------------------------------- 9. no-op re-run
def test_a_no_op_rerun_keeps_the_finished_runs_figures(ray_local, tiny, tmp_path):
    inp = _jsonl(tmp_path / "in.jsonl", _rows(4))
    out = tmp_path / "out"
    first = run(_spec(tiny, inp, str(out)), stream=io.StringIO())
    assert first.rows_run == 4 and first.wall_s > 0
    report = (out / "_report" / "report.json").read_text()
    md = (out / "_report" / "report.md").read_text()
    job = json.loads((out / "_job.json").read_text())
    again = run(_spec(tiny, inp, str(out)), stream=io.StringIO())
    assert again.noop and again.rows_run == 0 and again.rows_skipped == 4 and again.wall_s == first.wall_s
    assert (out / "_report" / "report.json").read_text() == report
    assert (out / "_report" / "report.md").read_text() == md
    job2 = json.loads((out / "_job.json").read_text())
    assert job2["run"] == job["run"] and job2["status"] == "complete" and job2["started_at"] == job["started_at"]
    assert [r["rows_run"] for r in job2["reruns"]] == [0] and (out / "_SUCCESS").exists()
    assert not (out / LEASE_FILE).exists()


# ----------------------------------------------------------------------------- kills on run_job.py's own local Ray
N_KILL = 16


def _kill_job(tmp_path: Path, tiny: str, gen_length: int = 128, rows: int = N_KILL) -> tuple[Path, Path]:
    inp = _jsonl(tmp_path / "prompts.jsonl", _rows(rows))
    out = tmp_path / "out"
    spec = _data(tiny, inp, str(out), generation={"gen_length": gen_length, "block_length": 32, "stop_at_eos": False},
                 compute={"num_actors": 1, "batch_size": 2, "length_grouping": 1, "progress_interval_s": 1,
                          "local_num_cpus": 2})
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p, out


def _local_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE",
                                                             "RAY_DATA_DISABLE_PROGRESS_BARS")}
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    env.update(extra)
    return env


def _start(spec: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_job.py", str(spec)], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
    return [int(p) for p, s in zip(out[::2], out[1::2]) if int(s) == sid and int(p) != os.getpid()]


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and the local Ray it started (its own session), by pid."""
    for pid in [proc.pid, *_session_pids(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while _session_pids(proc.pid) and time.time() < deadline:
        time.sleep(0.5)


def _parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


def _wait_parts(out: Path, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not _parts(out):
        assert proc.poll() is None, f"driver exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no part appeared:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _assert_exactly_once(out: Path, rows: int = N_KILL) -> None:
    ids = [i for p in out.glob("part-*.parquet") for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert sorted(ids) == [r["id"] for r in _rows(rows)]  # rows in = rows out
    assert (out / "_SUCCESS").exists() and not (out / LEASE_FILE).exists()


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tiny, tmp_path):
    """run_job.py with its default local Ray: SIGINT mid-run, then the same command again."""
    # slow enough for a second run to find it running and for the interrupt to land mid-run
    spec, out = _kill_job(tmp_path, tiny, gen_length=384, rows=32)
    log = tmp_path / "run1.log"
    proc = _start(spec, log, _local_env())
    _wait_parts(out, proc, log)
    second = _cli(str(spec), env=_local_env(), timeout=120)  # 2. a second run while the first writes
    assert second.returncode == 1 and "being written by job 'integrity'" in second.stderr, second.stderr[-2000:]
    assert "Started a local Ray" not in second.stderr  # refused before starting a cluster
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text and "interrupted; the rows written so far are kept" in text
    job = json.loads((out / "_job.json").read_text())
    assert job["status"] == "interrupted" and not (out / LEASE_FILE).exists() and not (out / "_SUCCESS").exists()
    kept = _parts(out)
    assert kept and set(job["files"]) == set(kept)
    log2 = tmp_path / "run2.log"
    rerun = _start(spec, log2, _local_env())
    assert rerun.wait(timeout=500) == 0, log2.read_text()[-3000:]
    _assert_exactly_once(out, rows=32)
    after = _parts(out)
    assert all(after.get(n) == b for n, b in kept.items()), "a part written before the interrupt changed"
    # 12. a full run on the local Ray shows none of Ray's start-up notices that mean nothing to a user
    text2 = log2.read_text()
    for noise in ("Token authentication is enabled", "Progress bars disabled",
                  "constructor arguments in the object store", "does not have any available CPUs"):
        assert noise not in text2, noise
    assert "already written)" in text2


def test_run_job_takes_interrupts_its_parent_blocked_or_ignored():
    """A parent that starts run_job.py with SIGINT blocked (the mask survives exec) or ignored must not
    make Ctrl-C a no-op: the driver unblocks it and restores Python's KeyboardInterrupt handler."""
    def parent_blocks_sigint() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    probe = ("import signal, run_job; blocked = lambda: signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []); "
             "print(blocked(), signal.getsignal(signal.SIGINT) is signal.SIG_IGN); run_job.accept_interrupts(); "
             "print(blocked(), signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_local_env(), preexec_fn=parent_blocks_sigint,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "False", "True"], out.stdout + out.stderr


def test_driver_and_its_local_ray_killed_mid_run_then_resume(tiny, tmp_path):
    """SIGKILL leaves the lease behind; the resume takes it over (same host, pid gone) and completes."""
    spec, out = _kill_job(tmp_path, tiny)
    log = tmp_path / "run1.log"
    proc = _start(spec, log, _local_env())
    _wait_parts(out, proc, log)
    _kill_session(proc)
    kept = _parts(out)
    assert 0 < sum(pq.read_metadata(out / n).num_rows for n in kept) < N_KILL, "the kill did not land mid-run"
    assert json.loads((out / LEASE_FILE).read_text())["pid"] == proc.pid  # left behind by the dead driver
    log2 = tmp_path / "run2.log"
    rerun = _start(spec, log2, _local_env())
    assert rerun.wait(timeout=500) == 0, log2.read_text()[-3000:]
    assert "taking over the lease of job 'integrity'" in log2.read_text()
    _assert_exactly_once(out)
    after = _parts(out)
    assert all(after.get(n) == b for n, b in kept.items())


def test_writer_killed_during_a_part_write(tiny, tmp_path):
    """The write task's process dies after its temporary file is complete, before the rename."""
    spec, out = _kill_job(tmp_path, tiny)
    marker = tmp_path / "fault-fired"
    log = tmp_path / "run1.log"
    proc = _start(spec, log, _local_env(**{fsx.FAULT_ENV: str(marker)}))
    rc = proc.wait(timeout=500)
    assert marker.exists(), "the fault did not fire"
    temps = sorted(p.name for p in out.glob(".part-*.tmp"))
    assert temps, "no temporary part left by the killed writer"
    if rc != 0:  # Ray may give up on the write task: then the same command finishes the job
        log2 = tmp_path / "run2.log"
        assert _start(spec, log2, _local_env()).wait(timeout=500) == 0, log2.read_text()[-3000:]
    _assert_exactly_once(out)
    # the killed writer's temporary file is ours: an overwrite removes it with the rest, nothing else
    oid = json.loads((out / "_job.json").read_text())["output_id"]
    assert all(output.is_ours(t, oid) for t in temps)
    (out / "keep.txt").write_text("the user's")
    st = output_state(load_spec(data=_data(tiny, "in.jsonl", str(out))))
    remove_output(str(out), st)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
