"""Job spec validation, dotted overrides and --dry-run (no Ray, no model)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dllm_cache_core.overrides import apply_overrides, parse_override
from pipeline.spec import POLICY_PARAMS, JobSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent
BASE = {"name": "t", "input": {"path": "in.jsonl"}, "output": {"path": "out"}}

# (overrides, expected message fragments): each line of a SpecError names the path and what is allowed
BAD_SPECS = [
    (["foo=1"], ["foo: unknown key", "allowed keys: name, seed, model, input"]),
    (["input.foo=1"], ["input.foo: unknown key", "allowed keys: path, format, prompt_column"]),
    (["evaluation.answer_column=a", "evaluation.scorer=exact", "evaluation.bogus=1"], ["evaluation.bogus: unknown key", "pattern"]),
    (["name=a b"], ["name: 'a b' is not allowed", "letters, digits"]),
    (["seed=-1"], ["seed: -1 is not allowed; allowed: >= 0"]),
    (["model.family=gpt"], ["model.family: 'gpt' is not allowed", "'auto', 'llada' or 'dream'"]),
    (["model.dtype=int8"], ["model.dtype: 'int8' is not allowed", "'bfloat16'"]),
    (["input.format=csv"], ["input.format: 'csv' is not allowed", "'parquet', 'arrow', 'jsonl' or 'hf_disk'"]),
    (["input.limit=0"], ["input.limit: 0 is not allowed; allowed: >= 1"]),
    (["output.on_existing=append"], ["output.on_existing: 'append' is not allowed", "'resume', 'overwrite' or 'error'"]),
    (["output.min_rows_per_file=0"], ["output.min_rows_per_file: 0 is not allowed; allowed: >= 1"]),
    (["output.path=in.jsonl"], ["output.path must differ from input.path"]),
    (["generation.gen_length=100", "generation.block_length=32"],
     ["generation.gen_length=100 must be a multiple of generation.block_length=32"]),
    (["generation.gen_length=64", "generation.block_length=16", "generation.steps=6"],
     ["generation.steps=6 must divide by the number of blocks (4", "allowed: a multiple of 4"]),
    (["generation.threshold=1.5"], ["generation.threshold: 1.5 is not allowed; allowed: <= 1.0"]),
    (["generation.remasking=greedy"], ["generation.remasking: 'greedy' is not allowed", "'low_confidence'"]),
    (["model.family=dream", "generation.remasking=low_confidence"],
     ["generation.remasking='low_confidence' is not allowed for model.family='dream'", "entropy"]),
    (["generation.temperature=hot"], ["generation.temperature: 'hot' is not allowed"]),
    (["cache.policy=lru"], ["cache.policy: 'lru' is not allowed", "'none', 'prefix', 'dual', 'dllm_cache', 'd2cache' or 'auto'"]),
    (["cache=dual", "cache.kp=25"], ["cache.kp is not a parameter of policy 'dual'; its parameters: refresh_interval"]),
    (["cache.policy=none", "cache.refresh_interval=2"], ["cache.refresh_interval is not a parameter of policy 'none'; its parameters: none"]),
    (["cache=dllm_cache", "cache.rou=2"], ["cache.rou: 2 is not allowed; allowed: <= 1.0"]),
    (["cache=d2cache", "cache.current_k=0"], ["cache.current_k: 0 is not allowed; allowed: >= 1"]),
    (["compute.batch_size=0"], ["compute.batch_size: 0 is not allowed; allowed: >= 1"]),
    (["compute.gpus_per_actor=-1"], ["compute.gpus_per_actor: -1 is not allowed; allowed: >= 0"]),
    (["audit.fraction=1.5"], ["audit.fraction: 1.5 is not allowed; allowed: <= 1.0"]),
    (["evaluation.answer_column=a", "evaluation.scorer=bleu"], ["evaluation.scorer: 'bleu' is not allowed", "'gsm8k'"]),
    (["evaluation.answer_column=a", "evaluation.scorer=regex"], ["evaluation.pattern is required when scorer is 'regex'"]),
    (["evaluation.answer_column=a", "evaluation.scorer=regex", "evaluation.pattern=(x"], ["evaluation.pattern='(x' is not a valid regular expression"]),
    (["evaluation.answer_column=a", "evaluation.scorer=exact", "evaluation.pattern=x"], ["evaluation.pattern is only used by scorer 'regex'"]),
    (["evaluation.scorer=exact"], ["evaluation.answer_column: required field is missing"]),
    (["input=null"], ["input: None is not allowed"]),
    (["cache"], ["override 'cache' must look like key=value"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD_SPECS, ids=[" ".join(o) for o, _ in BAD_SPECS])
def test_bad_specs_name_path_and_allowed_values(overrides, fragments):
    with pytest.raises(SpecError) as ei:
        load_spec(data=copy.deepcopy(BASE), overrides=overrides)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in:\n{msg}"


def test_missing_sections_and_non_mapping():
    with pytest.raises(SpecError) as ei:
        load_spec(data={"name": "x"})
    assert "input: required field is missing" in str(ei.value)
    assert "output: required field is missing" in str(ei.value)
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(data=[1, 2])  # type: ignore[arg-type]


def test_good_spec_defaults_and_engine_kwargs():
    s = load_spec(data=copy.deepcopy(BASE), overrides=["cache=dllm_cache", "cache.kp=25", "generation.gen_length=64",
                                                       "generation.block_length=32", "generation.stop_token_ids=[1, 2]"])
    assert s.cache.engine_kwargs() == {"policy": "dllm_cache", "kp": 25}
    assert s.generation.engine_kwargs()["stop_token_ids"] == (1, 2)
    assert s.seed == 0 and s.input.limit is None and s.audit.fraction == 0.0 and s.evaluation is None
    assert s.dtype == "float32" and s.compute.device == "cpu"
    assert load_spec(data=copy.deepcopy(BASE), overrides=["compute.gpus_per_actor=1"]).dtype == "bfloat16"
    # the engine accepts exactly what the spec produces
    from dllm_cache_core import CacheConfig, GenerationConfig

    GenerationConfig(**s.generation.engine_kwargs())
    CacheConfig(**s.cache.engine_kwargs())


def test_scheduling_option_reaches_the_engine_but_not_the_fingerprint():
    from dllm_cache_core import GenerationConfig
    from pipeline.manifest import fingerprint_components

    cont = load_spec(data=copy.deepcopy(BASE))
    stat = load_spec(data=copy.deepcopy(BASE), overrides=["generation.scheduling=static", "generation.slots=4"])
    assert cont.generation.scheduling == "continuous"
    g = GenerationConfig(**stat.generation.engine_kwargs())
    assert (g.scheduling, g.slots) == ("static", 4)
    assert fingerprint_components(cont, "m") == fingerprint_components(stat, "m")
    with pytest.raises(SpecError, match="generation.scheduling"):
        load_spec(data=copy.deepcopy(BASE), overrides=["generation.scheduling=eager"])


def test_batches_in_flight_defaults_by_scheduling_and_is_validated():
    from pipeline.manifest import fingerprint_components

    cont = load_spec(data=copy.deepcopy(BASE))
    stat = load_spec(data=copy.deepcopy(BASE), overrides=["generation.scheduling=static"])
    assert cont.compute.batches_in_flight is None and cont.compute.in_flight("continuous") == 2
    assert stat.compute.in_flight(stat.generation.scheduling) == 1
    three = load_spec(data=copy.deepcopy(BASE), overrides=["compute.batches_in_flight=3"])
    assert three.compute.in_flight("continuous") == 3
    assert fingerprint_components(three, "m") == fingerprint_components(cont, "m")  # same rows either way
    load_spec(data=copy.deepcopy(BASE), overrides=["generation.scheduling=static", "compute.batches_in_flight=1"])
    with pytest.raises(SpecError, match=r"compute.batches_in_flight=2 needs generation.scheduling: continuous"):
        load_spec(data=copy.deepcopy(BASE), overrides=["generation.scheduling=static", "compute.batches_in_flight=2"])
    with pytest.raises(SpecError, match=r"compute.batches_in_flight: 0 is not allowed; allowed: >= 1"):
        load_spec(data=copy.deepcopy(BASE), overrides=["compute.batches_in_flight=0"])


def test_yaml_short_form_and_override_order(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(dict(BASE, cache="dual")))
    assert load_spec(p).cache.policy == "dual"
    # `cache=X` replaces the section (parameters of the old policy do not leak); dotted keys then refine it
    s = load_spec(p, ["cache.policy=dllm_cache", "cache.kp=25"])
    assert s.cache.engine_kwargs() == {"policy": "dllm_cache", "kp": 25}
    s = load_spec(p, ["cache.policy=dllm_cache", "cache.kp=25", "cache=prefix", "cache.refresh_interval=4"])
    assert s.cache.engine_kwargs() == {"policy": "prefix", "refresh_interval": 4}


def test_apply_overrides_is_pure_and_parses_yaml_values():
    base = {"a": {"b": 1}, "cache": "dual"}
    out = apply_overrides(base, ["a.c=true", "a.d=null", "a.e=[1, 2]", "x.y.z=3.5", "s=hello world", "cache.kp=2"])
    assert base == {"a": {"b": 1}, "cache": "dual"}  # input untouched
    assert out == {"a": {"b": 1, "c": True, "d": None, "e": [1, 2]}, "x": {"y": {"z": 3.5}}, "s": "hello world",
                   "cache": {"policy": "dual", "kp": 2}}
    assert parse_override("name=a=b") == (["name"], "a=b")
    assert parse_override("output.on_existing=on")[1] == "on"  # not YAML's boolean
    assert parse_override("x=1e-3")[1] == 0.001 and parse_override("x=[a, 'b c']")[1] == ["a", "b c"]
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ValueError, match="empty key segment"):
        apply_overrides({}, ["a..b=1"])
    with pytest.raises(ValueError, match="a.b is 1, not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])


def test_spec_policy_table_matches_engine_registry():
    """The spec's allowed policies/parameters must not drift from the engine's registry."""
    from dllm_cache_core.cache.registry import policy_class, policy_names

    engine_policies = set(policy_names())
    assert engine_policies <= set(POLICY_PARAMS), f"engine policies the spec rejects: {engine_policies - set(POLICY_PARAMS)}"
    for name in engine_policies:
        assert set(policy_class(name).defaults) == set(POLICY_PARAMS[name]), name


def test_every_shipped_job_spec_is_valid():
    specs = sorted((REPO / "jobs").glob("*.yaml"))
    assert {p.name for p in specs} >= {"demo.yaml", "corpus_llada_dual.yaml", "synthetic_dream_chat.yaml", "eval_d2cache_audit.yaml"}
    for p in specs:
        s = load_spec(p)
        assert isinstance(s, JobSpec), p


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "run_job.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_resolved_spec_and_plan(tmp_path):
    r = _cli("jobs/demo.yaml", "cache=prefix", f"output.path={tmp_path}/o", "input.limit=5", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "policy: prefix" in r.stdout and "# plan" in r.stdout
    assert "jsonl, 1 file(s), 5 row(s), limit 5" in r.stdout
    assert "to run:  5 row(s)" in r.stdout and "actors:  1 x (1 CPU, 0 GPU) on cpu" in r.stdout
    assert "batch:   4 rows per engine call" in r.stdout
    assert not (tmp_path / "o").exists()  # nothing written


def test_invalid_spec_exits_2_with_message():
    r = _cli("jobs/demo.yaml", "cache.policy=dual", "cache.kp=3", "--dry-run")
    assert r.returncode == 2
    assert "cache.kp is not a parameter of policy 'dual'" in r.stderr
