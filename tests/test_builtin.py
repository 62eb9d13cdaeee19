"""builtin:tiny: ships within budget, loads fast on CPU, and answers fixed held-out instances correctly
with vanilla decoding (policy none, greedy, one token per step).

The instances are fixed (index into the deterministic held-out sets) and are ones the shipped model
solves; they pin the model + tokenizer + decoder behaviour, so a broken export, template or decoding
path fails here. They are not an accuracy estimate: accuracy is measured on random held-out samples
by benchmarks/quality_tiny.py and in builtin/tiny/TRAINING.md.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model
from dllm_cache_core.eval import encode_prompts
from dllm_cache_core.tasks import TASKS, eval_set

FOLDER = Path(__file__).resolve().parent.parent / "dllm_cache_core" / "builtin" / "tiny"
# task -> (eval_set size, seed, indices): instances the shipped model answers exactly
# (answers of the gen-64 group fit the first block of 32, so CPU decoding stops after 32 steps)
FIXED = {
    "addition": (12, 1, [1, 5, 9]),
    "multiplication": (12, 1, [1, 4, 8]),
    "sort": (12, 1, [2, 7, 10]),
    "reverse": (12, 1, [0, 5, 11]),
    "json": (12, 1, [2, 6, 10]),
    "kv_retrieval": (60, 1, [5, 23]),
}


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def instances(task):
    size, seed, idx = FIXED[task]
    exs = eval_set(task, size, seed)
    return [exs[i] for i in idx]


def test_files_and_size():
    assert (FOLDER / "model.safetensors").stat().st_size <= 10_000_000
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "TRAINING.md", "train_log.jsonl"):
        assert (FOLDER / f).exists(), f
    # the shipped weights are the last logged run's export
    last = json.loads((FOLDER / "train_log.jsonl").read_text().splitlines()[-1])
    run = json.loads((FOLDER / "train_summary.json").read_text())["runs"][-1]
    assert last["step"] == run["step"] and last.get("run", 4) == run["run"]
    assert hashlib.sha256((FOLDER / "model.safetensors").read_bytes()).hexdigest() == run["export_sha256"]


def test_loads_on_cpu_in_seconds(tiny):
    # The module fixture loaded once: torch's first meta-device construction and the transformers
    # tokenizer imports are per-process costs (seconds on a slow CPU), not the checkpoint's.
    t0 = time.perf_counter()
    model, tok = load_model("builtin:tiny", device="cpu")
    assert time.perf_counter() - t0 < 3.0
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.mask_id == tok.mask_token_id and model.config.eos_id == tok.eos_token_id


@pytest.mark.parametrize("group", [("addition", "sort", "reverse", "json"), ("multiplication",), ("kv_retrieval",)])
def test_solves_fixed_instances_with_vanilla_decoding(tiny, group):
    model, tok = tiny
    exs = [e for task in group for e in instances(task)]
    gen = GenerationConfig(gen_length=TASKS[group[0]].gen_length, block_length=32, temperature=0.0)
    outs = generate(model, encode_prompts(tok, exs), gen, CacheConfig(policy="none"))
    for e, o in zip(exs, outs):
        text = tok.decode(o.token_ids, skip_special_tokens=True)
        assert o.stats.finish_reason == "stop"
        assert TASKS[e.task].check(text, e), (e.prompt, e.answer, text)
        assert text == e.answer  # the exact worked answer, not just the final number


def test_engine_chat_messages(tiny):
    from dllm_cache_core import Engine

    model, tok = tiny
    e = instances("reverse")[0]
    eng = Engine(model, tok, GenerationConfig(gen_length=64, block_length=32), CacheConfig())
    out = eng.generate([[{"role": "user", "content": e.prompt}]])[0]
    assert out.error is None and out.text == e.answer
