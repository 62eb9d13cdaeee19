"""The compiled elementwise chains (models/fused.py) against the eager functions they replace, and
the fallback when compiling fails. DLLM_COMPILE=all compiles on CPU too (GPUs do it by default)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from dllm_cache_core.models import fused  # noqa: E402
from dllm_cache_core.models.layers import apply_rope, rms_norm, rope_tables, silu_mul  # noqa: E402
from engine_fixtures import load  # noqa: E402


@pytest.fixture
def compile_all(monkeypatch):
    monkeypatch.setenv("DLLM_COMPILE", "all")
    monkeypatch.setattr(fused, "_broken", [])
    yield


def test_auto_mode_leaves_cpu_eager(monkeypatch):
    monkeypatch.delenv("DLLM_COMPILE", raising=False)
    assert not fused.wants_compile(torch.zeros(1))
    assert fused.status(torch.device("cpu")) == "eager"
    monkeypatch.setenv("DLLM_COMPILE", "all")
    assert fused.wants_compile(torch.zeros(1))
    monkeypatch.setenv("DLLM_COMPILE", "0")
    assert not fused.wants_compile(torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chains_match_eager(compile_all, dtype):
    g = torch.Generator().manual_seed(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for B, n in ((2, 7), (3, 13)):  # two shapes: dynamic shapes, no recompile per shape
        x = torch.randn(B, n, 64, generator=g).to(dtype)
        w = torch.randn(64, generator=g)
        assert fused.status(torch.device("cpu")) == "compiled"
        torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm.eager(x, w, 1e-5), **tol)
        cos, sin = rope_tables(torch.arange(n).expand(B, n) + 3, 16, 10000.0)
        for fp32 in (True, False):
            torch.testing.assert_close(apply_rope(x, cos, sin, 16, fp32), apply_rope.eager(x, cos, sin, 16, fp32),
                                       **tol)
        y = torch.randn(B, n, 64, generator=g).to(dtype)
        torch.testing.assert_close(silu_mul(x, y), silu_mul.eager(x, y), **tol)
    assert not fused._broken


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_compiled_model_forward_matches_eager(compile_all, monkeypatch, name):
    m = load(name)[0]
    ids = torch.randint(3, 200, (2, 9))
    got = m(ids)
    monkeypatch.setenv("DLLM_COMPILE", "0")
    want = m(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not fused._broken


def test_compile_failure_falls_back_to_eager_once(compile_all, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)

    @fused.fused
    def double(x):
        return 2 * x

    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = double(x)
    assert torch.equal(out, 2 * x)
    assert "no compiler here" in fused.status(torch.device("cpu"))
    assert not fused.wants_compile(x)  # the rest of the process runs eagerly
