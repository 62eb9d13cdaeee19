"""Token-for-token equality with the public reference samplers and caches.

Each fixture in tests/golden/fixtures/ was recorded by tests/golden/record_golden.py from a public
reference implementation (ML-GSAI/LLaDA generate.py, Dream's diffusion_generate, Fast-dLLM's LLaDA
and Dream samplers with prefix / dual cache, dLLM-Cache's hooks) on a tiny random checkpoint written
by our own builder: greedy, batch 1, no padding, fp32, CPU. Here the checkpoint is rebuilt from the
same builder arguments, loaded with load_model and run through generate(); every one of the
gen_length tokens must match. tests/golden/README.md says how the fixtures were made.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model
from dllm_cache_core.models.tiny import write_tiny_checkpoint

FIXTURES = sorted((Path(__file__).resolve().parent / "golden" / "fixtures").glob("*.json"))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded
    yield
    torch.set_num_threads(n)


def test_fixtures_present():
    assert len(FIXTURES) >= 40


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_golden(path: Path, tmp_path: Path, one_thread) -> None:
    fx = json.loads(path.read_text())
    ck = fx["checkpoint"]
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", family=ck["family"], seed=ck["seed"], std=ck["std"],
                                 zero_mask_row=ck["zero_mask_row"], **ck["config_overrides"])
    model, _ = load_model(str(ckpt), device="cpu", dtype="float32")
    gen = GenerationConfig(**fx["generation"], stop_at_eos=False)
    cache = CacheConfig(**fx["cache"])
    got = generate(model, [fx["prompt_ids"]], gen, cache, seed=0)[0].token_ids
    want = fx["expected"]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        ref = fx["reference"]
        pytest.fail(
            f"{fx['name']} ({ref['repo']}@{ref['commit'][:8]} {ref['entry']}): first difference at generated "
            f"position {first} of {len(want)}: got {got[first:first + 8]}, reference {want[first:first + 8]} "
            f"(lengths {len(got)} vs {len(want)}; {sum(a != b for a, b in zip(got, want))} positions differ)")
