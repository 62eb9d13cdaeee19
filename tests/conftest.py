"""Ray fixtures for the pipeline tests (nothing else lives here).

- `ray_local`: one local Ray (num_cpus=2) shared by the whole session, started on first use.
- `ray_head`: a separately started `ray start --head` cluster on free ports (kill tests, `ray job
  submit`). It runs with `--block`, and is stopped by signalling that one process, which stops
  exactly its own cluster: `ray stop` would also kill the shared local instance.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _pythonpath() -> str:
    parts = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ["PYTHONPATH"] = _pythonpath()  # Ray workers inherit it and import this repo
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # tokens live in one per-user file that concurrent clusters overwrite
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class RayHead:
    address: str
    """GCS address for RAY_ADDRESS / ray.init."""
    dashboard: str
    """http://... address for `ray job submit` and the state API."""
    env: dict
    pid: int
    """`ray start --block`: its session id marks every process of this cluster."""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs, dash, client, agent, metrics, rtenv, nm, om = _free_ports(8)
    base = 20000 + (os.getpid() % 200) * 100
    env = dict(os.environ, PYTHONPATH=_pythonpath(), RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray_head") / "ray_start.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs}",
         "--num-cpus=2", "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rtenv}", f"--node-manager-port={nm}",
         f"--object-manager-port={om}", f"--min-worker-port={base}", f"--max-worker-port={base + 99}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env, proc.pid)
    deadline = time.time() + 180
    import urllib.error
    import urllib.request

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {proc.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 with token auth): it is up
            break
        except OSError:
            if time.time() > deadline:
                proc.send_signal(signal.SIGTERM)
                raise RuntimeError(f"the head's dashboard did not come up; see {log.name}")
            time.sleep(1)
    yield head
    # SIGTERM to the group `ray start` leads (its own session: only this cluster's processes), without the
    # 30 s drain a lone SIGTERM to `ray start` does; then SIGKILL, by pid, whatever of this session is left
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 15
    while time.time() < deadline and set(_session_pids(proc.pid)) - {proc.pid}:
        time.sleep(0.5)
    proc.kill()  # its own graceful drain would wait 30 s for a GCS that is already gone
    proc.wait(timeout=30)
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log.close()


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
    return [int(p) for p, s in zip(out[::2], out[1::2]) if int(s) == sid and int(p) != os.getpid()]
