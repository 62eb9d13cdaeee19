"""The CachePolicy interface: the decoding loop asks a policy for the block's predictions each step;
the policy decides, per layer, which positions are recomputed and what stored state is reused.

A policy owns its preallocated buffers for one generate() call (one batch). The model stays clean:
policies drive it through ``model.forward(..., layer_fn=...)`` and the layer API.
"""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from ..models.base import DiffusionLM
from ..stats import RowCounters
from .params import Param, PolicyDecl


@dataclass
class DecodeContext:
    """What every policy may read about the batch; built once per generate() call."""

    model: DiffusionLM
    prompt_len: int
    """P: padded prompt length; the response occupies [P, P + gen_length)."""
    gen_length: int
    block_length: int
    positions: torch.Tensor
    """(B, L) absolute positions, counted from each row's first real token."""
    key_mask: torch.Tensor
    """(B, L) bool, False on left padding."""
    attn_mask: Optional[torch.Tensor]
    """(B, 1, 1, L) bool for SDPA, or None when no row is padded."""
    real_len: torch.Tensor
    """(B,) real tokens per row (prompt without padding + gen_length)."""
    counters: RowCounters
    mask_id: int

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def seq_len(self) -> int:
        return self.positions.shape[1]

    @property
    def shift(self) -> int:
        return 1 if self.model.config.profile.logit_shift else 0


@dataclass
class StepInfo:
    block: int
    start: int
    """Absolute index of the block's first position."""
    end: int
    step: int
    """Step index inside the block; 0 = the block's first forward."""
    nfe: int
    """Forwards made so far in this generate() call (all blocks)."""


class CachePolicy:
    decl: ClassVar[PolicyDecl] = PolicyDecl(name="")
    """The policy's declaration (its module's POLICY): name, parameters, exactness."""
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    """Parameter name -> default (from decl). A class may instead set name and defaults only; its
    parameters then take any value."""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "decl" not in cls.__dict__ and cls.__dict__.get("name"):
            cls.decl = PolicyDecl(name=cls.name, params=tuple(
                Param(k, None, v, "") for k, v in cls.__dict__.get("defaults", {}).items()))
        cls.name, cls.defaults = cls.decl.name, cls.decl.defaults

    def __init__(self, ctx: DecodeContext, **params: Any):
        self.ctx = ctx
        self.model = ctx.model
        self.params = params

    # -- the interface the decoding loop uses --------------------------------------------------
    def begin_block(self, step: StepInfo) -> None:
        """Called before the block's first forward."""

    def forward(self, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """Logits (B, block_length, V) predicting each position of the current block."""
        raise NotImplementedError

    def end_step(self, x: torch.Tensor, committed: torch.Tensor, confidence: torch.Tensor,
                 step: StepInfo) -> None:
        """After the sampler committed tokens: committed (B, block_length) bool, the new canvas x,
        and the confidences it ranked with (B, block_length). Policies that select by them use it."""

    # -- helpers -------------------------------------------------------------------------------
    def out_index(self, step: StepInfo, q_start: int) -> torch.Tensor:
        """Rows of a contiguous query range [q_start, ...) that predict the block's positions
        (Dream: the output one to the left; the first query predicts itself, as Fast-dLLM does)."""
        B = self.ctx.batch
        pos = torch.arange(step.start, step.end, device=self.ctx.positions.device) - self.ctx.shift
        return (pos.clamp(min=q_start) - q_start).expand(B, -1)

    def full_forward(self, x: torch.Tensor, step: StepInfo, store: Optional[list] = None) -> torch.Tensor:
        """Uncached forward over the whole canvas; with `store`, writes each layer's K/V into
        store[layer] = (K, V) buffers of shape (B, L, kv_dim). A static step per store (a CUDA graph on
        GPUs: at small batch an eager full forward is bound by kernel launches)."""
        ctx = self.ctx
        run = self.canvas_step(("full", id(store)), lambda ids, oidx: self._full(ids, oidx, store))
        logits = run(x, self.out_index(step, 0))
        ctx.counters.forward(ctx.real_len, ctx.real_len, head_rows=step.end - step.start)
        return logits

    def _full(self, ids: torch.Tensor, out_index: torch.Tensor, store: Optional[list]) -> torch.Tensor:
        ctx, m = self.ctx, self.model

        def layer_fn(i, layer, h, cos, sin):
            h, k, v = m.layer_full(layer, h, cos, sin, ctx.attn_mask)
            if store is not None:
                store[i][0].copy_(k)
                store[i][1].copy_(v)
            return h

        return m(ids, ctx.positions, ctx.attn_mask, layer_fn=layer_fn, out_index=out_index)

    def static_step(self, key, build: Callable[[], "StaticStep"]) -> "StaticStep":
        """The static step `key` of this generate() call, built on first use: the same computation
        every time it is called (only its input buffers change), so it can be captured once and replayed."""
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = build()
        return step

    def canvas_step(self, key, body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "CanvasStep":
        """static_step for body(ids, out_index) over the whole batch's canvas."""
        return self.static_step(key, lambda: CanvasStep(self, body))

    def release(self) -> None:
        """Drop this call's static steps (CUDA graphs and their pool) now, at a safe point: they
        reference the policy, so without this only the cyclic garbage collector would free them."""
        self.__dict__.pop("_static_steps", {}).clear()

    @property
    def _steps(self) -> dict:
        """The static steps of this generate() call (one per shape and buffer set), sharing a graph pool."""
        return self.__dict__.setdefault("_static_steps", {})

    def kv_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Preallocated per-layer (K, V) of shape (B, L, kv_dim), post-RoPE (rotation is per position,
        so storing rotated keys is bit-identical to the references' re-rotation of pre-RoPE keys)."""
        cfg, ctx = self.model.config, self.ctx
        shape = (ctx.batch, ctx.seq_len, cfg.kv_dim)
        dt, dev = self.model.dtype, ctx.positions.device
        return [(torch.empty(shape, dtype=dt, device=dev), torch.empty(shape, dtype=dt, device=dev))
                for _ in range(cfg.n_layers)]

    def cached_range_forward(self, x: torch.Tensor, step: StepInfo, q_start: int, q_end: int,
                             kv: list) -> torch.Tensor:
        """Recompute queries [q_start, q_end) in every layer, write their K/V into the cache in place
        and attend over the whole cached sequence (Fast-dLLM's sliced call with a KV cache).
        One static-shape step per query count serves every block; on GPUs it is a CUDA graph."""
        ctx = self.ctx
        n = q_end - q_start
        logits = self.static_step((n, id(kv)), lambda: RangeStep(self, n, kv)).run(x, q_start,
                                                                                   self.out_index(step, q_start))
        ctx.counters.forward(q_end - q_start, ctx.real_len, head_rows=step.end - step.start)
        return logits


def use_cuda_graphs(x: torch.Tensor) -> bool:
    """Block steps and full forwards are replayed as CUDA graphs on GPUs (launch overhead dominates at
    small batch); DLLM_CUDA_GRAPHS=0 runs the same steps eagerly."""
    return x.is_cuda and os.environ.get("DLLM_CUDA_GRAPHS", "1") != "0"


def _first_pool(graphs: dict):
    for g in graphs.values():
        if g.captured:
            return g.graph.pool()
    return None


class StaticStep:
    """A forward whose inputs live in static buffers: run eagerly, or captured once as a CUDA graph and
    replayed (the buffers are refilled before each call, so every block reuses one capture)."""

    def __init__(self, policy: CachePolicy):
        self.ctx, self.model = policy.ctx, policy.model
        self.graph = torch.cuda.CUDAGraph() if self.ctx.positions.is_cuda else None
        self.peers = policy._steps
        self.warm = False
        self.captured = False
        self.eager_only = False
        self.logits: Optional[torch.Tensor] = None

    def _body(self) -> torch.Tensor:
        raise NotImplementedError

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if not use_cuda_graphs(x) or self.eager_only:
            return self._body()
        if not self.warm:
            # The first call runs eagerly and is the real step; it also warms up (compiles the fused
            # kernels, initialises cuBLAS). Capturing executes nothing, so no step ever runs twice on
            # the same state (dllm_cache's selection reads the V it then overwrites).
            self.warm = True
            return self._body()
        if not self.captured and not self._capture():
            return self._body()
        self.graph.replay()
        return self.logits

    def _capture(self) -> bool:
        """Capture the step; on failure (e.g. out of memory for the graph's pool) warn and run this
        step eagerly from then on. The garbage collector is off meanwhile: a collected graph of an
        earlier call would be destroyed mid-capture, which CUDA forbids."""
        gc_on = gc.isenabled()
        gc.disable()
        try:
            # graphs of one generate() call replay one after another and each output is consumed
            # before the next replay, so they share one memory pool
            with torch.cuda.graph(self.graph, pool=_first_pool(self.peers)):
                self.logits = self._body()
            self.captured = True
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"CUDA-graph capture of {type(self).__name__} failed, running it eagerly: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", RuntimeWarning, stacklevel=3)
            self.eager_only, self.graph, self.logits = True, None, None
            torch.cuda.empty_cache()
        finally:
            if gc_on:
                gc.enable()
        return self.captured


class CanvasStep(StaticStep):
    """body(ids, out_index) over the whole canvas, with both inputs in static buffers."""

    def __init__(self, policy: CachePolicy, body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__(policy)
        ctx = self.ctx
        self.body = body
        self.ids = torch.zeros(ctx.batch, ctx.seq_len, dtype=torch.long, device=ctx.positions.device)
        self.oidx = torch.zeros(ctx.batch, ctx.block_length, dtype=torch.long, device=ctx.positions.device)

    def _body(self) -> torch.Tensor:
        return self.body(self.ids, self.oidx)

    def __call__(self, x: torch.Tensor, out_index: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(x)
        self.oidx.copy_(out_index)
        return self._call(x)


class RangeStep(StaticStep):
    """`cached_range_forward` for a fixed query count n: the query range moves through static index
    buffers (index_copy_ into the K/V cache), so every block reuses it and it can be a CUDA graph."""

    def __init__(self, policy: CachePolicy, n: int, kv: list):
        super().__init__(policy)
        ctx = self.ctx
        B, dev = ctx.batch, ctx.positions.device
        self.kv = kv
        self.ar = torch.arange(n, device=dev)
        self.idx = torch.zeros(n, dtype=torch.long, device=dev)
        self.ids = torch.zeros(B, n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, n, dtype=torch.long, device=dev)
        self.oidx = torch.zeros(B, ctx.block_length, dtype=torch.long, device=dev)

    def _body(self) -> torch.Tensor:
        ctx, m, kv, idx = self.ctx, self.model, self.kv, self.idx

        def layer_fn(i, layer, h, cos, sin):
            q, k, v = layer.qkv(layer.attn_in(h))
            K, V = kv[i]
            K.index_copy_(1, idx, m.apply_rope(k, cos, sin))
            V.index_copy_(1, idx, v)
            h = h + layer.attn_proj(m.attend(m.apply_rope(q, cos, sin), K, V, ctx.attn_mask))
            return h + layer.ffn(h)

        return m(self.ids, self.pos, ctx.attn_mask, layer_fn=layer_fn, out_index=self.oidx)

    def run(self, x: torch.Tensor, q_start: int, out_index: torch.Tensor) -> torch.Tensor:
        n = self.ar.shape[0]
        self.idx.copy_(self.ar + q_start)
        self.ids.copy_(x[:, q_start:q_start + n])
        self.pos.copy_(self.ctx.positions[:, q_start:q_start + n])
        self.oidx.copy_(out_index)
        return self._call(x)
