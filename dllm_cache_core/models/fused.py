"""Elementwise chains (RMSNorm, RoPE, SiLU-gate) fused into single kernels by torch.compile on GPUs.

Why: in eager mode each of them is 5-8 kernels with fp32 intermediates; on an 8B model at batch 32
they were ~40% of a full forward's time (benchmarks/results/profiles). Only these small pure
functions are compiled (dynamic shapes, no graph breaks), so compile time is seconds, the model code
stays plain PyTorch, and CUDA-graph capture of a step replays the fused kernels.

DLLM_COMPILE: "auto" (default: compile on CUDA tensors), "0" (never), "all" (any device; tests use
it to check the compiled functions against the eager ones on CPU). If compiling fails, the eager
function runs from then on, with one warning: a missing compiler must not stop generation.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])

_broken: list[str] = []
"""Why compiling failed (first error), once it has; then everything runs eagerly."""


def mode() -> str:
    return os.environ.get("DLLM_COMPILE", "auto").lower()


def wants_compile(x: torch.Tensor) -> bool:
    m = mode()
    if _broken or m in ("0", "false", "off", "no"):
        return False
    return m == "all" or x.is_cuda


def status(device: torch.device) -> str:
    """For logs and benchmark records: whether the fused kernels ran compiled on `device`."""
    if _broken:
        return f"eager (compile failed: {_broken[0][:200]})"
    return "compiled" if wants_compile(torch.empty(0, device=device)) else "eager"


def disable(what: str, e: BaseException) -> None:
    """`what` failed to compile: run every fused function eagerly from now on, with one warning."""
    if not _broken:
        _broken.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"{what} failed, running eagerly from now on: {_broken[0]}", RuntimeWarning, stacklevel=3)


def mark_rows_dynamic(args) -> None:
    """Every dim but the last of each tensor argument is dynamic (batch, positions, heads: one kernel
    for every step's shape); the last (feature) dim stays static. Fully dynamic shapes made the
    kernels index with runtime divisions: RoPE at batch 32 ran 3x slower than with static features."""
    for a in args:
        if isinstance(a, torch.Tensor):
            for d in range(a.dim() - 1):
                if a.shape[d] > 1:
                    torch._dynamo.maybe_mark_dynamic(a, d)


def fused(fn: F) -> F:
    """Run `fn` through torch.compile when wants_compile(first tensor argument), else eagerly."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not wants_compile(args[0]) or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, fullgraph=True))
        mark_rows_dynamic(args)
        try:
            return compiled[0](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            disable(f"torch.compile of {fn.__name__}", e)
            return fn(*args, **kwargs)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
