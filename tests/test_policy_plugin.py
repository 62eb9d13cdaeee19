"""A cache policy is one file: dropped into dllm_cache_core/cache/ (here: of a temporary copy of the
repository) or shipped by another package through the `dllm_cache.policies` entry-point group, it is
usable by name from generate(), CacheConfig, the job spec and run_job.py with no other edit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent

POLICY_MODULE = '''
"""`every_other`: a full forward every `period` steps of a block, cached block steps in between."""
from .base import StepInfo
from .params import Param, PolicyDecl
from .prefix import PrefixCache

POLICY = PolicyDecl(
    name="{name}",
    params=(Param("period", int, 2, "steps between full forwards inside a block", ge=1),),
    reuses="K/V of every position between full forwards",
    exact_when="period=1",
    exact=({{"period": 1}},),
)


class EveryOther(PrefixCache):
    """Each row refreshes on its own step inside its own block; between refreshes only the block runs."""

    decl = POLICY

    def refresh(self, step_in_block: int) -> bool:
        return step_in_block % self.params["period"] == 0

    def query_count(self, step: StepInfo, cached: list[bool]) -> int:
        return step.block_length
'''

# runs in a fresh interpreter: the new policy through the Python API and the job spec
CHECK = '''
import json, sys
from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model
from dllm_cache_core.cache import policy_names
from pipeline.spec import load_spec

name = sys.argv[1]
model, tok = load_model("builtin:tiny")
prompts = [tok("12+7=")["input_ids"], tok("Sort: 3 1 2")["input_ids"]]
gen = GenerationConfig(gen_length=16, block_length=8, steps=8, stop_at_eos=False)
ref = [o.token_ids for o in generate(model, prompts, gen, CacheConfig())]
exact = [o.token_ids for o in generate(model, prompts, gen, CacheConfig(policy=name, period=1))]
cached = generate(model, prompts, gen, CacheConfig(policy=name))
errors = []
for bad in ({"period": 0}, {"kp": 3}):
    try:
        CacheConfig(policy=name, **bad)
    except ValueError as e:
        errors.append(str(e))
spec = load_spec(data={"name": "x", "input": {"path": "in"}, "output": {"path": "out"},
                       "cache": {"policy": name, "period": 3}})
print(json.dumps({"names": policy_names(), "exact": exact == ref, "nfe": [o.stats.nfe for o in cached],
                  "ref_nfe": [o.stats.nfe for o in generate(model, prompts, gen, CacheConfig())],
                  "errors": errors, "spec": spec.cache.engine_kwargs()}))
'''


def _copy_repo(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("dllm_cache_core", "pipeline"):
        shutil.copytree(REPO / d, dst / d, ignore=ignore)
    shutil.copy(REPO / "run_job.py", dst / "run_job.py")
    return dst


def _env(pythonpath: list[Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env.pop("RAY_ADDRESS", None)
    return env


def _check(result: dict, name: str) -> None:
    assert name in result["names"]
    assert result["exact"], "period=1 must equal `none` token for token"
    assert result["nfe"] == result["ref_nfe"]  # same schedule, cheaper forwards
    assert "cache.period=0 is not allowed; allowed: an integer >= 1" in result["errors"][0]
    assert f"cache.kp is not a parameter of policy {name!r}; its parameters: period" in result["errors"][1]
    assert result["spec"] == {"policy": name, "period": 3}


def test_policy_file_dropped_into_the_package(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    (repo / "dllm_cache_core" / "cache" / "every_other.py").write_text(POLICY_MODULE.format(name="every_other"))
    r = subprocess.run([sys.executable, "-c", CHECK, "every_other"], cwd=repo, env=_env([repo]),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _check(json.loads(r.stdout.strip().splitlines()[-1]), "every_other")


def test_policy_file_dropped_into_the_package_runs_as_a_job(tmp_path):
    """The same file through run_job.py: a job spec names the new policy and its parameter."""
    repo = _copy_repo(tmp_path / "repo")
    (repo / "dllm_cache_core" / "cache" / "every_other.py").write_text(POLICY_MODULE.format(name="every_other"))
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(["12+7=", "Sort: 3 1 2", "Reverse: a b c"])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "plugin", "input": {"path": str(tmp_path / "in.jsonl")},
            "output": {"path": str(tmp_path / "out")}, "generation": {"gen_length": 16, "block_length": 8},
            "cache": {"policy": "every_other", "period": 3},
            "compute": {"num_actors": 1, "batch_size": 2, "local_num_cpus": 2}}
    (tmp_path / "job.json").write_text(json.dumps(spec))  # JSON is YAML
    r = subprocess.run([sys.executable, "run_job.py", str(tmp_path / "job.json")], cwd=repo, env=_env([repo]),
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    t = pq.read_table(tmp_path / "out")
    assert sorted(t.column("id").to_pylist()) == ["r0", "r1", "r2"]
    assert set(t.column("cache_policy").to_pylist()) == {"every_other"}
    assert t.column("error").null_count == 3
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job["fingerprint_components"]["cache"] == {"policy": "every_other", "period": 3}


def test_policy_from_an_entry_point(tmp_path):
    """A third-party package: its module is found through the entry-point group, not the package."""
    site = tmp_path / "site"
    site.mkdir()
    module = POLICY_MODULE.format(name="ext_every_other").replace("from .", "from dllm_cache_core.cache.")
    (site / "ext_policy.py").write_text(module)
    dist = site / "ext_policy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-policy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dllm_cache.policies]\nevery_other = ext_policy\n")
    r = subprocess.run([sys.executable, "-c", CHECK, "ext_every_other"], cwd=REPO, env=_env([site, REPO]),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _check(json.loads(r.stdout.strip().splitlines()[-1]), "ext_every_other")
    assert "ext_every_other" not in subprocess.run(
        [sys.executable, "-c", "from dllm_cache_core.cache import policy_names; print(policy_names())"],
        cwd=REPO, env=_env([REPO]), capture_output=True, text=True, timeout=120).stdout
