"""A separately started local cluster (`ray start --head`): driver killed mid-job, actor killed
mid-job, and `ray job submit` of the demo job. Plus the cluster/ files parse and name what they must.

Kill tests use a job big enough to be caught mid-way (parts of 2 rows appear as it runs) and assert
that the kill really happened mid-job before checking that the re-run completes exactly once.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
N_ROWS = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dllm_cache_core.models.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "llada", family="llada"))


def _job(tmp_path: Path, tiny: str, rows: int = N_ROWS) -> tuple[Path, Path]:
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"id": f"k{i:03d}", "prompt": f"prompt {i} " + "word " * (i % 7)}) + "\n"
                           for i in range(rows)))
    out = tmp_path / "out"
    spec = {"name": "kill", "model": {"path": tiny}, "input": {"path": str(inp)},
            "output": {"path": str(out), "min_rows_per_file": 2},
            # full 256-token canvases (no early stop): ~0.3-2 s per engine call, so a kill lands mid-job
            "generation": {"gen_length": 256, "block_length": 32, "stop_at_eos": False}, "cache": "dual",
            "compute": {"num_actors": 1, "batch_size": 2, "length_grouping": 1, "progress_interval_s": 1}}
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p, out


def _driver(head, spec: Path, log: Path, *args) -> subprocess.Popen:
    env = dict(head.env, RAY_ADDRESS=head.address)
    return subprocess.Popen([sys.executable, "run_job.py", str(spec), *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet")) if out.exists() else []


def _wait_parts(out: Path, n: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(_parts(out)) < n:
        assert proc.poll() is None, f"driver exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no progress:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


def _wait_progress(log: Path, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Rows generated so far, from the driver's progress lines, once at least one batch is done."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"driver exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no progress:\n{log.read_text()[-3000:]}"
        done = [int(m) for m in re.findall(r"\[progress\] (\d+)/", log.read_text())]
        if done and done[-1] > 0:
            return done[-1]
        time.sleep(0.2)


def _ids(out: Path) -> list[str]:
    return [i for p in _parts(out) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def _assert_exactly_once(out: Path) -> None:
    ids = _ids(out)
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert set(ids) == {f"k{i:03d}" for i in range(N_ROWS)}
    assert (out / "_SUCCESS").exists()


def test_driver_killed_mid_job_then_rerun_completes_exactly_once(ray_head, tiny, tmp_path):
    spec, out = _job(tmp_path, tiny)
    log = tmp_path / "driver1.log"
    proc = _driver(ray_head, spec, log)
    _wait_parts(out, 2, proc, log)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver (its own process group: nothing else)
    proc.wait(timeout=30)
    written = _ids(out)
    assert 0 < len(written) < N_ROWS and not (out / "_SUCCESS").exists(), "the kill did not land mid-job"
    log2 = tmp_path / "driver2.log"
    rerun = _driver(ray_head, spec, log2)
    assert rerun.wait(timeout=300) == 0, log2.read_text()[-3000:]
    _assert_exactly_once(out)
    text = log2.read_text()
    assert f"({len(set(written))} already written)" in text and "parquet:" in text


def _generation_actor_pids(head) -> list[int]:
    """Processes of this test cluster (its session) titled as a GenerationActor worker (StreamingGenerationActor
    with batches in flight, the default)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in ps.splitlines():
        pid, sid, args = line.split(None, 2)
        if int(sid) == head.pid and re.match(r"ray::MapWorker\(MapBatches\((Streaming)?GenerationActor\)\)", args):
            found.append(int(pid))
    return found


def test_actor_killed_mid_job_is_restarted_and_job_completes(ray_head, tiny, tmp_path):
    spec, out = _job(tmp_path, tiny)
    log = tmp_path / "driver.log"
    proc = _driver(ray_head, spec, log)
    generated = _wait_progress(log, proc)
    pids = _generation_actor_pids(ray_head)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    assert generated < N_ROWS, "the kill did not land mid-job"
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    _assert_exactly_once(out)
    workers = json.loads((out / "_report" / "report.json").read_text())["run"]["workers"]
    assert len(workers) >= 2, f"expected a restarted actor process, got {workers}"


def test_ray_job_submit_runs_the_demo(ray_head, tiny, tmp_path):
    from dllm_cache_core.models.loading import BUILTIN_DIR

    out = tmp_path / "demo_out"
    extra = [] if (BUILTIN_DIR / "tiny" / "config.json").exists() else [f"model.path={tiny}"]  # until builtin:tiny ships
    cmd = ["ray", "job", "submit", "--address", ray_head.dashboard, "--runtime-env", "cluster/runtime_env.yaml",
           "--", "python", "run_job.py", "jobs/demo.yaml", f"output.path={out}", *extra]
    r = subprocess.run(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in r.stdout and f"parquet:    {out}" in r.stdout and "report:" in r.stdout
    ids = [i for p in out.glob("part-*.parquet") for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert sorted(ids) == [f"demo-{i:03d}" for i in range(20)]
    assert (out / "_SUCCESS").exists() and (out / "_report" / "report.md").stat().st_size > 0


def test_run_job_exit_codes(ray_head, tiny, tmp_path):
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "prompt": "fine"}, {"id": "b", "prompt": ""},
                                                         {"id": "c", "prompt": "also fine"}]))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "codes", "model": {"path": tiny}, "input": {"path": str(inp)},
                                    "output": {"path": str(tmp_path / "out")}, "generation": {"gen_length": 16}}))
    env = dict(ray_head.env, RAY_ADDRESS=ray_head.address)
    cli = [sys.executable, "run_job.py", str(spec)]
    r = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING: 1 of 3 rows have errors (empty_prompt 1)" in r.stderr
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    r = subprocess.run(cli + [f"model.path={bad}", f"output.path={tmp_path / 'out2'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "failed to load, so the job did not start" in r.stderr, r.stderr[-3000:]


# ----------------------------------------------------------------------------- cluster/ files
def test_cluster_launcher_yaml():
    c = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in c, key
    assert c["available_node_types"][c["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for n, t in c["available_node_types"].items() if n != c["head_node_type"]]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    assert any("pip install" in s and "-e ." in s for s in c["setup_commands"])  # installs the project
    assert any("ray start --head" in s for s in c["head_start_ray_commands"])


def test_kuberay_rayjob_manifest():
    m = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    s = m["spec"]
    assert "run_job.py" in s["entrypoint"] and s["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(s["runtimeEnvYAML"]), dict)
    rc = s["rayClusterSpec"]
    assert rc["rayVersion"] == "2.60.0" and rc["headGroupSpec"]["template"]["spec"]["containers"]
    workers = rc["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    job_spec = s["entrypoint"].split()[-1].replace("/app/", "")
    assert (REPO / job_spec).exists(), job_spec


def test_runtime_env_yaml_and_readme_commands():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and "out/" in env["excludes"] and "pip" not in env  # no network installs
    readme = (REPO / "cluster" / "README.md").read_text()
    for cmd in ("python run_job.py jobs/demo.yaml", "ray up cluster/ray-cluster.yaml", "ray job submit",
                "kubectl apply -f cluster/rayjob.yaml", "python -m pipeline.compare"):
        assert cmd in readme, cmd
