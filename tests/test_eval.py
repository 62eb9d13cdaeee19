"""The eval harness: override parsing, datasets, and the CLI end to end on a small sample."""
from __future__ import annotations

import json

import pytest

from dllm_cache_core.eval import load_dataset, main, parse_overrides


def test_overrides_reference_cli_shape():
    o = parse_overrides(["dataset.name=kv_retrieval", "cache=dual", "generation.block_length=32",
                         "generation.threshold=0.9", "model=builtin:tiny", "dataset.size=7",
                         "cache.refresh_interval=2"])
    assert o["dataset"] == {"name": "kv_retrieval", "size": 7}
    assert o["cache"] == {"policy": "dual", "refresh_interval": 2}
    assert o["generation"] == {"block_length": 32, "threshold": 0.9}
    assert o["run"] == {"model": "builtin:tiny"}
    assert parse_overrides(["cache.policy=none", "generation.stop_token_ids=[0, 5]", "output=null"]) == {
        "run": {"output": None}, "dataset": {}, "generation": {"stop_token_ids": [0, 5]}, "cache": {"policy": "none"}}


@pytest.mark.parametrize("arg, needle", [("generation.blocklength=32", "allowed"), ("datasets.name=x", "allowed"),
                                         ("cache", "key=value"), ("cache.bogus=1", "allowed")])
def test_overrides_reject_unknown_keys(arg, needle):
    with pytest.raises(ValueError, match=needle):
        parse_overrides([arg])


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: addition"):
        load_dataset({"name": "nope"})


def test_gsm8k_jsonl(tmp_path):
    p = tmp_path / "gsm.jsonl"
    p.write_text('{"question": "What is 2 + 3?", "answer": "2 plus 3\\n#### 5"}\n\n'
                 '{"question": "Q2", "answer": "#### 1,000"}\n{"question": "Q3", "answer": "#### 7"}\n')
    ds = load_dataset({"path": str(p), "size": 2})
    assert [e.prompt for e in ds.examples] == ["What is 2 + 3?", "Q2"]
    assert ds.check("so the answer is\n#### 5", ds.examples[0])
    assert ds.check("1000", ds.examples[1]) and not ds.check("#### 100", ds.examples[1])


def test_cli_runs_policy_against_none(tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["dataset.name=reverse", "dataset.size=3", "cache=dual", "generation.block_length=32",
          "generation.threshold=0.9", "model=builtin:tiny", f"output={out}"])
    printed = json.loads(capsys.readouterr().out)
    rep = json.loads(out.read_text())
    assert printed["accuracy"] == rep["accuracy"]
    for k in ("accuracy", "nfe", "tokens_per_s", "flops_speedup", "flops_speedup_total", "agreement",
              "measured_speedup", "baseline_accuracy"):
        assert isinstance(rep[k], float), k
    assert rep["n"] == 3 and len(rep["samples"]) == 3
    assert rep["cache"] == {"policy": "dual"} and rep["generation"]["threshold"] == 0.9
    assert rep["generation"]["gen_length"] == 64  # the task's default canvas
    assert 0.0 <= rep["agreement"] <= 1.0 and rep["nfe"] >= 1
    assert rep["accuracy"] == sum(s["correct"] for s in rep["samples"]) / 3


def test_cli_jsonl_with_policy_none(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "What is 2 + 3?", "answer": "#### 5"}\n')
    out = tmp_path / "r.json"
    main([f"dataset.path={p}", "generation.gen_length=64", "generation.block_length=32",
          "generation.threshold=0.9", f"output={out}"])
    rep = json.loads(out.read_text())
    assert rep["dataset"] == "d" and rep["n"] == 1 and rep["agreement"] == 1.0
    assert rep["samples"][0]["answer"] == "#### 5"


def test_cli_bad_value_exits_with_the_field(capsys):
    with pytest.raises(SystemExit, match="threshold"):
        main(["dataset.name=reverse", "dataset.size=1", "generation.threshold=2"])
