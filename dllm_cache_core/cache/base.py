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


def device_tensor(values, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
    """A small host list as a tensor on `device`, without a host sync: torch.tensor(..., device=cuda)
    copies from pageable memory and then waits for everything queued on the stream, so a step that
    builds an index after launching its forward would idle the GPU until the forward finished. From
    pinned memory the copy is asynchronous (the caching host allocator keeps the buffer until it is done)."""
    t = torch.tensor(values, dtype=dtype)
    if device is None or torch.device(device).type != "cuda":
        return t if device is None else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_rows_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.index_copy_(0, index, src), moving each slice as 8-byte words when its bytes allow: the
    CUDA index_copy_ computes an offset per element, and per bf16 element it ran 2.6x slower on an
    H200 than per 8-byte word (as fast as a plain copy). Bytewise, so the result is identical."""
    src = src.contiguous()
    w = dst.shape[-1] * dst.element_size() if dst.dim() else 0
    if (dst.dim() >= 2 and dst.dtype == src.dtype and dst.element_size() < 8 and w % 8 == 0
            and dst.stride(-1) == 1 and (dst.storage_offset() * dst.element_size()) % 8 == 0
            and all(st * dst.element_size() % 8 == 0 for st in dst.stride()[:-1])):
        dst.view(torch.int64).index_copy_(0, index, src.view(torch.int64))
        return dst
    return dst.index_copy_(0, index, src)


@dataclass
class StepInfo:
    """One forward's rows and where each of them is: rows need not share a block or a step (continuous
    batching), so every per-row quantity is a per-row list / tensor. With CFG the policy batch holds
    the conditional rows then their unconditional twins, and `rows` lists both halves."""

    rows: torch.Tensor
    """(n,) policy-batch rows computed in this forward, ascending within each CFG half."""
    row_list: list[int]
    starts: torch.Tensor
    """(n,) absolute index of each row's block start."""
    start_list: list[int]
    steps: list[int]
    """Each row's step inside its block; 0 = the block's first forward."""
    charge: torch.Tensor
    """(n,) bool: the row decodes in this step. False for a row that only rides along (static
    scheduling computes its whole batch every step); such a row's results are discarded."""
    charge_list: list[bool]
    block_length: int
    batch: int
    """Rows of the policy batch (slots x CFG passes); `rows` covers all of them when n == batch."""

    @property
    def n(self) -> int:
        return len(self.row_list)

    @property
    def full(self) -> bool:
        return self.n == self.batch

    @classmethod
    def of(cls, rows: list[int], starts: list[int], steps: list[int], charge: list[bool], block_length: int,
           batch: int, device) -> "StepInfo":
        return cls(device_tensor(rows, torch.long, device), list(rows),
                   device_tensor(starts, torch.long, device), list(starts), list(steps),
                   device_tensor(charge, torch.bool, device), list(charge), block_length, batch)

    def subset(self, keep: list[bool]) -> "StepInfo":
        """The rows where keep is True (same order)."""
        pick = [i for i, k in enumerate(keep) if k]
        idx = device_tensor(pick, torch.long, self.rows.device)
        return StepInfo(self.rows[idx], [self.row_list[i] for i in pick], self.starts[idx],
                        [self.start_list[i] for i in pick], [self.steps[i] for i in pick], self.charge[idx],
                        [self.charge_list[i] for i in pick], self.block_length, self.batch)

    def out_index(self, shift: int, q_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n, block_length): the query (counted from q_start, default the canvas start) whose output
        predicts each block position (Dream: the one to the left; the first query predicts itself,
        as Fast-dLLM does)."""
        ar = torch.arange(self.block_length, device=self.starts.device)
        pos = self.starts.unsqueeze(1) + ar - shift
        qs = torch.zeros_like(self.starts) if q_start is None else q_start
        return torch.maximum(pos, qs.unsqueeze(1)) - qs.unsqueeze(1)


class KVStore:
    """Per-layer K/V (B, L, kv_dim), post-RoPE, as views of flat (B*L + 1, kv_dim) buffers whose last
    row is a trash row: a query slot that is padding (static shapes) writes there and nowhere else."""

    def __init__(self, batch: int, seq_len: int, kv_dim: int, n_layers: int, dtype, device):
        self.batch, self.seq_len = batch, seq_len
        self.trash = batch * seq_len
        self.flat = [tuple(torch.zeros(batch * seq_len + 1, kv_dim, dtype=dtype, device=device) for _ in range(2))
                     for _ in range(n_layers)]
        self.views = [(k[:self.trash].view(batch, seq_len, -1), v[:self.trash].view(batch, seq_len, -1))
                      for k, v in self.flat]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views[i]

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self):
        return iter(self.views)


class CachePolicy:
    decl: ClassVar[PolicyDecl] = PolicyDecl(name="")
    """The policy's declaration (its module's POLICY): name, parameters, exactness."""
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    """Parameter name -> default (from decl). A class may instead set name and defaults only; its
    parameters then take any value."""
    computes_idle_rows: ClassVar[bool] = True
    """Static scheduling computes every row of its batch each step (today's cost of a static batch);
    a policy whose per-row state would change by computing an idle row sets this False, and then only
    the decoding rows are computed."""

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
    def admit(self, rows: list[int]) -> None:
        """New rows took these policy-batch rows: forget whatever per-row state their slots held."""

    def begin_block(self, step: StepInfo) -> None:
        """Called before the first forward of a block, with the rows starting one."""

    def forward(self, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """Logits (n, block_length, V) predicting each position of each row's current block."""
        raise NotImplementedError

    def end_step(self, x: torch.Tensor, committed: torch.Tensor, confidence: torch.Tensor,
                 step: StepInfo) -> None:
        """After the sampler committed tokens. x is the (slots, L) canvas; committed / confidence are
        (n_dec, block_length) for the decoding rows step.rows[:n_dec] (every charged row; with CFG
        the first half of step.rows)."""

    # -- helpers -------------------------------------------------------------------------------
    def full_forward(self, x: torch.Tensor, step: StepInfo, store: Optional[KVStore] = None) -> torch.Tensor:
        """Uncached forward over the whole canvas of step's rows; with `store`, writes each layer's K/V
        into the rows' store entries. A static step per (store, row count) (a CUDA graph on GPUs when
        it covers the whole batch: at small batch an eager full forward is bound by kernel launches)."""
        ctx = self.ctx
        n = step.n
        run = self.canvas_step(("full", id(store), n), n, step.full,
                               lambda ids, rows, oidx: self._full(ids, rows, oidx, store, n == ctx.batch))
        logits = run(x, step.rows, step.out_index(ctx.shift))
        real = ctx.real_len.index_select(0, step.rows)
        ctx.counters.forward(step.rows, step.charge, real, real, head_rows=step.block_length)
        return logits

    def _full(self, ids: torch.Tensor, rows: torch.Tensor, out_index: torch.Tensor, store: Optional[KVStore],
              whole: bool) -> torch.Tensor:
        ctx, m = self.ctx, self.model
        pos = ctx.positions if whole else ctx.positions.index_select(0, rows)
        mask = ctx.attn_mask if (whole or ctx.attn_mask is None) else ctx.attn_mask.index_select(0, rows)

        def layer_fn(i, layer, h, cos, sin):
            if store is None:
                return m.layer(layer, h, cos, sin, mask).h

            def kv(k, v):
                K, V = store[i]
                if whole:
                    K.copy_(k)
                    V.copy_(v)
                else:
                    copy_rows_(K, rows, k)
                    copy_rows_(V, rows, v)
                return k, v

            return m.layer(layer, h, cos, sin, mask, kv).h

        return m(ids, pos, mask, layer_fn=layer_fn, out_index=out_index)

    def static_step(self, key, build: Callable[[], "StaticStep"]) -> "StaticStep":
        """The static step `key` of this policy, built on first use: the same computation every time it
        is called (only its input buffers change), so it can be captured once and replayed."""
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = build()
        return step

    def canvas_step(self, key, n: int, graphable: bool,
                    body: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> "CanvasStep":
        """static_step for body(ids, rows, out_index) over the canvas of n rows."""
        return self.static_step(key, lambda: CanvasStep(self, n, graphable, body))

    def release(self) -> None:
        """Drop this policy's static steps (CUDA graphs and their pool) now, at a safe point: they
        reference the policy, so without this only the cyclic garbage collector would free them."""
        self.__dict__.pop("_static_steps", {}).clear()

    @property
    def _steps(self) -> dict:
        """The static steps of this policy (one per shape and buffer set), sharing a graph pool."""
        return self.__dict__.setdefault("_static_steps", {})

    def kv_buffers(self) -> KVStore:
        """Preallocated per-layer (K, V) of shape (B, L, kv_dim), post-RoPE (rotation is per position,
        so storing rotated keys is bit-identical to the references' re-rotation of pre-RoPE keys)."""
        cfg, ctx = self.model.config, self.ctx
        return KVStore(ctx.batch, ctx.seq_len, cfg.kv_dim, cfg.n_layers, self.model.dtype, ctx.positions.device)

    def cached_range_forward(self, x: torch.Tensor, step: StepInfo, n_q: int, kv: KVStore) -> torch.Tensor:
        """Recompute queries [start, start + n_q) of each row's block start in every layer, write their
        K/V into the cache in place and attend over the row's whole cached sequence (Fast-dLLM's sliced
        call with a KV cache). Slots past the canvas end write the trash row and produce no logits that
        are read. One static step per (row count, query count); on GPUs a CUDA graph."""
        ctx = self.ctx
        n = step.n
        run = self.static_step(("range", n, n_q, id(kv)), lambda: RangeStep(self, n, n_q, kv, step.full))
        logits = run.run(x, step)
        real = ctx.real_len.index_select(0, step.rows)
        q = torch.clamp(ctx.seq_len - step.starts, max=n_q)
        ctx.counters.forward(step.rows, step.charge, q, real, head_rows=step.block_length)
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
    replayed (the buffers are refilled before each call, so every block reuses one capture). A step
    over part of the batch (continuous batching's varying sub-batches) runs eagerly: one graph per
    row count would multiply captures."""

    eager_calls: int = 1
    """Calls run eagerly before the capture (the first is also the warm-up). A step whose key recurs
    rarely (d2cache's varying sizes) waits longer: a capture costs an eager step's host time and
    saves little when the step is GPU-bound."""

    def __init__(self, policy: CachePolicy, graphable: bool = True):
        self.ctx, self.model = policy.ctx, policy.model
        self.graph = torch.cuda.CUDAGraph() if (self.ctx.positions.is_cuda and graphable) else None
        self.peers = policy._steps
        self.warm = False
        self.calls = 0
        self.captured = False
        self.eager_only = not graphable
        self.logits: Optional[torch.Tensor] = None

    def _body(self) -> torch.Tensor:
        raise NotImplementedError

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if not use_cuda_graphs(x) or self.eager_only:
            return self._body()
        if self.calls < self.eager_calls:
            # The first call runs eagerly and is the real step; it also warms up (compiles the fused
            # kernels, initialises cuBLAS). Capturing executes nothing, so no step ever runs twice on
            # the same state (dllm_cache's selection reads the V it then overwrites).
            self.calls += 1
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
            # graphs of one policy replay one after another and each output is consumed before the
            # next replay, so they share one memory pool
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
    """body(ids, rows, out_index) over the whole canvas of n rows, every input in a static buffer."""

    def __init__(self, policy: CachePolicy, n: int, graphable: bool,
                 body: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__(policy, graphable)
        ctx = self.ctx
        dev = ctx.positions.device
        self.body = body
        self.ids = torch.zeros(n, ctx.seq_len, dtype=torch.long, device=dev)
        self.rows = torch.zeros(n, dtype=torch.long, device=dev)
        self.oidx = torch.zeros(n, ctx.block_length, dtype=torch.long, device=dev)

    def _body(self) -> torch.Tensor:
        return self.body(self.ids, self.rows, self.oidx)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, out_index: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(x if x.shape[0] == self.ids.shape[0] else x.index_select(0, rows))
        self.rows.copy_(rows)
        self.oidx.copy_(out_index)
        return self._call(x)


class RangeStep(StaticStep):
    """`cached_range_forward` for n rows and n_q queries per row: each row's query range moves through
    static index buffers (index_copy_ into the flat K/V cache), so every block reuses it."""

    def __init__(self, policy: CachePolicy, n: int, n_q: int, kv: KVStore, whole: bool):
        super().__init__(policy, whole)
        ctx = self.ctx
        dev = ctx.positions.device
        self.kv, self.whole = kv, whole
        self.ar = torch.arange(n_q, device=dev)
        self.rows = torch.zeros(n, dtype=torch.long, device=dev)
        self.dst = torch.zeros(n * n_q, dtype=torch.long, device=dev)
        self.ids = torch.zeros(n, n_q, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, n_q, dtype=torch.long, device=dev)
        self.oidx = torch.zeros(n, ctx.block_length, dtype=torch.long, device=dev)

    def _body(self) -> torch.Tensor:
        ctx, m, kv, dst, rows = self.ctx, self.model, self.kv, self.dst, self.rows
        mask = ctx.attn_mask if (self.whole or ctx.attn_mask is None) else ctx.attn_mask.index_select(0, rows)

        def layer_fn(i, layer, h, cos, sin):
            def write(k, v):
                kf, vf = kv.flat[i]
                copy_rows_(kf, dst, k.reshape(dst.shape[0], -1))
                copy_rows_(vf, dst, v.reshape(dst.shape[0], -1))
                K, V = kv[i]
                return (K, V) if self.whole else (K.index_select(0, rows), V.index_select(0, rows))

            return m.layer(layer, h, cos, sin, mask, write).h

        return m(self.ids, self.pos, mask, layer_fn=layer_fn, out_index=self.oidx)

    def run(self, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        ctx = self.ctx
        L = ctx.seq_len
        slots = step.starts.unsqueeze(1) + self.ar
        valid = slots < L
        slots = slots.clamp(max=L - 1)
        self.rows.copy_(step.rows)
        self.dst.copy_(torch.where(valid, step.rows.unsqueeze(1) * L + slots, self.kv.trash).reshape(-1))
        xs = x if step.full else x.index_select(0, step.rows)
        ps = ctx.positions if step.full else ctx.positions.index_select(0, step.rows)
        self.ids.copy_(xs.gather(1, slots))
        self.pos.copy_(ps.gather(1, slots))
        self.oidx.copy_(step.out_index(ctx.shift, step.starts))
        return self._call(x)
