"""Engine throughput table: policy x batch x (fixed schedule, threshold),
steady-state timing, ms per model call, nfe, peak memory and roofline_ratio.

    python benchmarks/bench_engine.py --ckpt /tmp/ckpt/llada-8b --shape-name llada-8b \
        --out $OUT/engine_raw.jsonl --phases A,P,C,D,E,T,F --deadline-s 240 --profile-dir $OUT

Method (one record per configuration, each self-contained):
- probe: the first 4 model calls, twice (warm-up; the second gives the block-start and the cached
  step cost, which choose the timing window);
- window: whole blocks from the start of the generation (3 or 2 when they fit in --window-s, else 1),
  or, when one block does not fit, the first n calls of block 0 (block-start forward + n-1 steps);
- record pass over the same window, eager (DLLM_CUDA_GRAPHS=0), under a TorchDispatchMode that logs
  the shape of every matmul (mm/addmm/bmm/baddbmm) and attention (SDPA) call; it doubles as warm-up;
- timed pass over the same window as the engine runs by default (CUDA graphs on): CUDA events at
  every block start and around every model call (policy.forward);
- steady state: a block = median block-start call + (calls per block - 1) x median later call
  (call = start to next start: model call + sampler; medians drop one-time costs inside the window,
  e.g. the CUDA-graph capture at each generate()'s first cached step), scaled to all blocks;
- full generation (wall clock) at batch 1 and 8 when its estimate is under --full-max-s; then
  tokens_per_s is the measured one, else the steady-state estimate (`timing` says which);
- roofline: every logged (op, shapes, strides) is re-run bare (torch.mm/addmm/bmm,
  F.scaled_dot_product_attention on fresh random tensors of the same shapes and strides, inputs
  rotated past L2), summed with its count; roofline_ratio = that time / our steady-state time of
  the same window.
The window stops the generation by raising out of the instrumentation (the engine is not changed):
the policy class that the decoding loop looks up (`policy_class`) is wrapped to see block starts
and model calls, so CUDA-graph replays are timed like eager calls.
Caveat: `prefix` call windows come from block 0, whose cached steps recompute the most positions
(block + whole suffix), so its steady-state estimate is pessimistic.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, env_info, env_vars, random_prompts, read_jsonl, sync  # noqa: E402

import dllm_cache_core.decoding.runner as G  # noqa: E402  (the module that looks up the policy class)
from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model  # noqa: E402
from dllm_cache_core.cache.registry import policy_names  # noqa: E402
from dllm_cache_core.models import fused  # noqa: E402

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------
# stamps: CUDA events on the GPU, host clock on the CPU
def stamp():
    if CUDA:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def ms(a, b) -> float:
    if CUDA:
        return a.elapsed_time(b)
    return (b - a) * 1e3


class Abort(Exception):
    """Raised from a hook to end a generation at the window's end."""


class Instrument:
    """Sees every model call and block start of the decoding loop: the policy class it looks up is
    wrapped (begin_block, forward), so CUDA-graph replays count like eager calls. Without that
    lookup it falls back to forward hooks on the model (eager calls only)."""

    def __init__(self, model):
        self.model = model
        self.armed = False
        self.hooked_blocks = False
        self._wrapped: dict[type, type] = {}
        if hasattr(G, "policy_class"):
            orig = G.policy_class
            inst = self

            def policy_class(name):
                cls = orig(name)
                if cls not in inst._wrapped:
                    def begin_block(self_, step, _cls=cls):
                        inst._block()
                        return _cls.begin_block(self_, step)

                    def forward(self_, x, step, _cls=cls):
                        inst._pre()
                        out = _cls.forward(self_, x, step)
                        inst._post()
                        return out
                    inst._wrapped[cls] = type(cls.__name__, (cls,), {"begin_block": begin_block, "forward": forward})
                return inst._wrapped[cls]

            G.policy_class = policy_class
            self.hooked_blocks = True
        else:
            print("WARNING: decoding loop has no policy_class; using model hooks, block starts unseen", flush=True)
            model.register_forward_pre_hook(lambda m, a: self._pre())
            model.register_forward_hook(lambda m, a, o: self._post())

    def arm(self, max_blocks: Optional[int] = None, max_calls: Optional[int] = None, on_call=None):
        self.max_blocks, self.max_calls, self.on_call = max_blocks, max_calls, on_call
        self.calls, self.blocks = 0, 0
        self.call_start: list = []
        self.call_end: list = []
        self.block_start: list = []
        self.block_first_call: list = []
        self.end = None
        self.stop_reason = "complete"
        self.armed = True

    def disarm(self):
        if self.armed and self.end is None:
            self.end = stamp()
        self.armed = False

    def _abort_at(self, limit: Optional[int], count: int, reason: str) -> None:
        """End the timed window (Abort unwinds generate()) once `count` reached `limit`."""
        if limit is not None and count >= limit:
            self.end = stamp()
            self.stop_reason = reason
            self.armed = False
            raise Abort()

    def _block(self):
        if not self.armed:
            return
        self._abort_at(self.max_blocks, self.blocks, "blocks")
        self.block_start.append(stamp())
        self.block_first_call.append(self.calls)
        self.blocks += 1

    def _pre(self):
        if not self.armed:
            return
        self._abort_at(self.max_calls, self.calls, "calls")
        if self.on_call is not None:
            self.on_call(self.calls)
        self.call_start.append(stamp())
        self.calls += 1

    def _post(self):
        if self.armed:
            self.call_end.append(stamp())

    def call_walls(self) -> list[float]:
        """ms from each call's start to the next call's start (or the window end): call + sampler."""
        cs = self.call_start + [self.end]
        return [ms(a, b) for a, b in zip(cs[:-1], cs[1:])]

    def first_calls(self) -> set:
        """Indices of block-start calls (call 0 when block starts are unseen)."""
        return set(self.block_first_call) or {0}


def median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


# ------------------------------------------------------------------------------------------------
# roofline: log matmul / attention call shapes, re-run them bare
MM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def _meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), str(t.dtype).replace("torch.", ""))


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in MM_OPS:
            ts = tuple(_meta(a) for a in args if isinstance(a, torch.Tensor))
            sc = tuple((k, float(v)) for k, v in sorted(kwargs.items()) if isinstance(v, (int, float)))
            self.ops[(name, ts, sc)] += 1
        elif "scaled_dot_product" in name:
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            m = kwargs.get("attn_mask", kwargs.get("attn_bias"))
            if m is None and len(ts) > 3:
                m = ts[3]
            metas = tuple(_meta(a) for a in ts[:3]) + ((_meta(m),) if isinstance(m, torch.Tensor) else ())
            self.ops[("sdpa", metas, ())] += 1
        return func(*args, **kwargs)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "bool": torch.bool,
          "int64": torch.int64, "float64": torch.float64}


def _make(meta, device) -> torch.Tensor:
    shape, stride, dt = meta
    dtype = DTYPES[dt]
    need = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(s > 0 for s in shape) else 1
    if dtype == torch.bool:
        base = torch.ones(need, dtype=dtype, device=device)
    elif dtype.is_floating_point:
        base = torch.randn(need, dtype=dtype, device=device)
    else:
        base = torch.zeros(need, dtype=dtype, device=device)
    return base.as_strided(shape, stride)


def _nbytes(meta) -> int:
    shape, stride, dt = meta
    need = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(s > 0 for s in shape) else 1
    return need * (1 if dt == "bool" else torch.finfo(DTYPES[dt]).bits // 8 if DTYPES[dt].is_floating_point else 8)


class Roofline:
    """Bare time of a logged op, cached across configurations."""

    def __init__(self, device):
        self.device = device
        self.cache: dict = {}

    def op_ms(self, key) -> float:
        if key in self.cache:
            return self.cache[key]
        name, metas, scal = key
        set_bytes = sum(_nbytes(m) for m in metas)
        n_sets = max(1, min(6, math.ceil((96 << 20) / max(set_bytes, 1))))
        sets = [[_make(m, self.device) for m in metas] for _ in range(n_sets)]
        kw = dict(scal)
        if name == "mm":
            fn = lambda t: torch.mm(t[0], t[1])  # noqa: E731
        elif name == "addmm":
            fn = lambda t: torch.addmm(t[0], t[1], t[2], **kw)  # noqa: E731
        elif name == "bmm":
            fn = lambda t: torch.bmm(t[0], t[1])  # noqa: E731
        elif name == "baddbmm":
            fn = lambda t: torch.baddbmm(t[0], t[1], t[2], **kw)  # noqa: E731
        else:  # sdpa
            def fn(t):
                q, k, v = t[0], t[1], t[2]
                return F.scaled_dot_product_attention(q, k, v, attn_mask=t[3] if len(t) > 3 else None,
                                                      enable_gqa=q.shape[1] != k.shape[1])
        for s in sets[:2]:
            fn(s)
        sync()
        a = stamp()
        fn(sets[0])
        b = stamp()
        sync()
        one = max(ms(a, b), 1e-3)
        reps = int(min(50, max(3, 25.0 / one)))
        a = stamp()
        for i in range(reps):
            fn(sets[i % n_sets])
        b = stamp()
        sync()
        t = ms(a, b) / reps
        del sets
        self.cache[key] = t
        return t

    def total_ms(self, ops: Counter) -> tuple[float, dict]:
        tot, by = 0.0, Counter()
        for key, n in ops.items():
            t = self.op_ms(key) * n
            tot += t
            by[key[0]] += t
        return tot, {k: round(v, 3) for k, v in by.items()}


# ------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, a):
        self.a = a
        self.t_start = time.perf_counter()
        self.env = env_info()
        self.device = "cuda" if CUDA else "cpu"
        t0 = time.perf_counter()
        self.model, _ = load_model(a.ckpt, device=self.device, dtype=a.dtype)
        self.load_s = time.perf_counter() - t0
        self.cfg = self.model.config
        self.weights_gb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1e9
        self.instr = Instrument(self.model)
        self.roof = Roofline(self.device)
        self.done = {self.key_of(r) for f in ([a.out] + a.skip_from) for r in read_jsonl(f)
                     if "error" not in r} if a.skip_existing else set()
        self.nfe_seen: dict = {}
        print(f"loaded {a.ckpt} in {self.load_s:.1f}s, weights {self.weights_gb:.2f} GB; policies "
              f"{policy_names()}; block hook {self.instr.hooked_blocks}", flush=True)

    def left(self) -> float:
        return self.a.deadline_s - (time.perf_counter() - self.t_start)

    @staticmethod
    def key_of(r) -> tuple:
        return (r.get("model_shape"), r.get("policy"), r.get("threshold"), r.get("batch"), r.get("prompt_len"),
                r.get("gen_len"), r.get("steps"))

    # -- one pass -------------------------------------------------------------------------------
    def run(self, prompts, gen, cache, max_blocks=None, max_calls=None, record=False, on_call=None):
        ins = self.instr
        rec = ShapeRecorder() if record else None
        ins.arm(max_blocks=max_blocks, max_calls=max_calls, on_call=on_call)
        outs = None
        try:
            with (rec if rec is not None else nullcontext()):
                outs = generate(self.model, prompts, gen, cache, seed=0)
        except Abort:
            pass
        finally:
            ins.disarm()
        sync()
        return outs, rec

    # -- one configuration ----------------------------------------------------------------------
    def measure(self, policy: str, batch: int, threshold: Optional[float], prompt_len: int, gen_len: int,
                steps: Optional[int] = None, tps: Optional[int] = None, tag: str = "") -> Optional[dict]:
        a, cfg = self.a, self.cfg
        BL = a.block
        steps = steps or gen_len
        rec: dict[str, Any] = dict(
            model_shape=a.shape_name, policy=policy, threshold=threshold, batch=batch, prompt_len=prompt_len,
            gen_len=gen_len, steps=steps, block_length=BL, forced_tokens_per_step=tps, case=tag)
        if self.key_of(rec) in self.done:
            print(f"skip (exists) {rec}", flush=True)
            return None
        if self.left() < a.min_left_s:
            print(f"skip (deadline) {policy} b{batch} thr={threshold} P{prompt_len}+G{gen_len} steps{steps}",
                  flush=True)
            return None
        t_cfg = time.perf_counter()
        try:
            gen = GenerationConfig(gen_length=gen_len, steps=steps, block_length=BL, threshold=threshold,
                                   stop_at_eos=False)
            cache = CacheConfig(policy=policy)
            prompts = random_prompts(batch, prompt_len, cfg.vocab_size, (cfg.mask_id, cfg.eos_id), seed=batch)
            nb = gen.num_blocks
            spb = gen.steps_per_block
            cpb = spb if threshold is None else BL
            ins = self.instr
            # probe: the first 4 calls, twice (the first pass carries one-time costs)
            for _ in range(2):
                self.run(prompts, gen, cache, max_calls=4)
            if len(ins.call_start) < 4:
                raise RuntimeError(f"instrumentation saw {len(ins.call_start)} model calls in the probe (expected 4)")
            w = ins.call_walls()
            t_first, t_step = w[0], median(w[1:4])
            est_block = t_first + (cpb - 1) * t_step
            W = a.window_s * 1e3
            if 3 * est_block <= W and nb >= 3:
                win = dict(max_blocks=3)
            elif 2 * est_block <= W and nb >= 2:
                win = dict(max_blocks=2)
            elif est_block <= W or cpb <= 4:
                win = dict(max_blocks=1)
            else:
                n = int(max(4, min(cpb, 1 + (W - t_first) / max(t_step, 1e-3))))
                win = dict(max_blocks=1, max_calls=n)
            # record pass, eager (DLLM_CUDA_GRAPHS=0: graph replays dispatch nothing), then the timed pass
            # (and DLLM_COMPILE=0: compiled kernels bypass the dispatcher; the roofline counts only
            # matmuls and SDPA, which compiling does not change; DLLM_PROBS_KERNEL=0: d2cache's
            # attention-probability Triton kernel is invisible to the dispatcher, its generic path
            # logs the same q k^T as a bmm)
            with env_vars(DLLM_CUDA_GRAPHS="0", DLLM_COMPILE="0", DLLM_PROBS_KERNEL="0"):
                _, shapes = self.run(prompts, gen, cache, record=True, **win)
            n_rec_calls = ins.calls
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            outs, _ = self.run(prompts, gen, cache, **win)
            if ins.calls != n_rec_calls:
                print(f"WARNING: record pass made {n_rec_calls} calls, timed pass {ins.calls}", flush=True)
            peak = torch.cuda.max_memory_allocated() / 1e9 if CUDA else None
            calls = ins.calls
            starts = ins.block_start
            window_ms = ms(starts[0] if starts else ins.call_start[0], ins.end)
            walls = ins.call_walls()
            gpu = [ms(s_, e_) for s_, e_ in zip(ins.call_start, ins.call_end)]
            firsts = ins.first_calls()
            fw = [walls[i] for i in range(calls) if i in firsts]
            lw = [walls[i] for i in range(calls) if i not in firsts]
            fg = [gpu[i] for i in range(len(gpu)) if i in firsts]
            lg = [gpu[i] for i in range(len(gpu)) if i not in firsts]
            stop = ins.stop_reason
            blocks_timed = nb if stop == "complete" else len(starts)
            if stop == "calls":  # part of block 0
                cpb_eff = cpb
                if threshold is not None and (policy, prompt_len, gen_len) in self.nfe_seen:
                    cpb_eff = self.nfe_seen[(policy, prompt_len, gen_len)] / nb
                timing = f"steady_state_calls({calls} of block 0)"
            else:
                cpb_eff = calls / max(blocks_timed, 1)
                timing = f"steady_state_blocks({blocks_timed})"
            # steady state: median block-start call + (calls per block - 1) x median later call; the
            # medians drop one-time costs inside the window (CUDA-graph capture at the first cached step)
            t_f, t_l = median(fw), (median(lw) if lw else 0.0)
            est_block = t_f + (cpb_eff - 1) * t_l
            est_total_ms = est_block * nb
            nfe_est = round(cpb_eff * nb)
            g_f, g_l = (median(fg) if fg else None), (median(lg) if lg else None)
            steady_window = len(fw) * t_f + len(lw) * t_l
            roof_ms, roof_by = self.roof.total_ms(shapes.ops) if shapes is not None else (float("nan"), {})
            tps_steady = batch * gen_len / (est_total_ms / 1e3)
            gpu_block = (g_f or 0.0) + (cpb_eff - 1) * (g_l or 0.0)
            rec.update(
                timing=timing, window_ms=round(window_ms, 2), window_calls=calls, window_blocks=blocks_timed,
                block_ms=[round(ms(x, y), 2) for x, y in zip(starts, starts[1:] + [ins.end])],
                ms_per_call=round(gpu_block / cpb_eff, 3) if gpu else None,
                ms_first_call=round(g_f, 3) if g_f is not None else None,
                ms_later_calls=round(g_l, 3) if g_l is not None else None,
                host_gap_ms_per_call=round((est_block - gpu_block) / cpb_eff, 3) if gpu else None,
                est_block_ms=round(est_block, 2), est_generation_s=round(est_total_ms / 1e3, 3),
                tokens_per_s_steady=round(tps_steady, 2), nfe=nfe_est, nfe_estimated=True,
                roofline_ms_window=round(roof_ms, 2), steady_window_ms=round(steady_window, 2),
                roofline_ms_by_op=roof_by,
                roofline_ratio=round(roof_ms / steady_window, 4) if steady_window > 0 else None,
                peak_mem_gb=round(peak, 3) if peak is not None else None, weights_gb=round(self.weights_gb, 3),
                tokens_per_s=round(tps_steady, 2))
            # full generation
            est_s = est_total_ms / 1e3
            if batch in a.full_batches and est_s <= a.full_max_s and est_s * 1.5 < self.left() - 5:
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                outs, _ = self.run(prompts, gen, cache)
                wall = time.perf_counter() - t0
                nfe = max(o.stats.nfe for o in outs)
                left_masks = sum(t == cfg.mask_id for o in outs for t in o.token_ids)
                rec.update(timing="full_generation", full_wall_s=round(wall, 3),
                           tokens_per_s=round(batch * gen_len / wall, 2), nfe=nfe, nfe_estimated=False,
                           steps_taken=max(o.stats.steps for o in outs),
                           flops_speedup=round(sum(o.stats.flops_speedup for o in outs) / len(outs), 3),
                           flops_speedup_total=round(sum(o.stats.flops_speedup_total for o in outs) / len(outs), 3),
                           mask_tokens_left=int(left_masks))
                if CUDA:
                    rec["peak_mem_gb"] = round(max(peak or 0, torch.cuda.max_memory_allocated() / 1e9), 3)
                if threshold is not None:
                    self.nfe_seen[(policy, prompt_len, gen_len)] = nfe
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
            rec.update(error="oom", error_msg=str(e).splitlines()[0][:300])
        except Exception as e:  # noqa: BLE001
            rec.update(error=type(e).__name__, error_msg=str(e)[:500])
            traceback.print_exc()
        rec.update(reference_tokens_per_s=None, bench_s=round(time.perf_counter() - t_cfg, 2), **self.env,
                   fused_compile=fused.status(self.device),
                   cuda_graphs=os.environ.get("DLLM_CUDA_GRAPHS", "1") != "0")
        gc.collect()
        if "error" in rec and CUDA:
            torch.cuda.empty_cache()
        append_jsonl(a.out, rec)
        print(json.dumps({k: rec.get(k) for k in (
            "policy", "batch", "threshold", "prompt_len", "gen_len", "steps", "timing", "tokens_per_s",
            "tokens_per_s_steady", "ms_per_call", "ms_first_call", "ms_later_calls", "host_gap_ms_per_call", "nfe",
            "peak_mem_gb", "roofline_ratio", "bench_s", "error")}), flush=True)
        return rec

    # -- profile --------------------------------------------------------------------------------
    def capture_profile(self, policy: str, batch: int, prompt_len: int, gen_len: int, first: int = 2, n: int = 2,
                        warm: int = 2, params: Optional[dict] = None):
        """torch.profiler over model calls [first, first + n) of a generation (model call + sampler +
        the policy's end_step; the first `warm` runs of the same calls warm up, and call 1, the first
        cached step, captures the CUDA graph). Returns (profiler, unprofiled wall ms of those calls)."""
        from torch.profiler import ProfilerActivity, profile

        cfg = self.cfg
        gen = GenerationConfig(gen_length=gen_len, steps=gen_len, block_length=self.a.block, stop_at_eos=False)
        cache = CacheConfig(policy=policy, **(params or {}))
        prompts = random_prompts(batch, prompt_len, cfg.vocab_size, (cfg.mask_id, cfg.eos_id), seed=batch)
        last = first + n
        for _ in range(warm):
            self.run(prompts, gen, cache, max_calls=last + 1)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        prof = profile(activities=acts, record_shapes=True)

        def on_call(i):
            if i == first:
                sync()
                prof.start()
            elif i == last:
                sync()
                prof.stop()

        self.run(prompts, gen, cache, max_calls=last + 1, on_call=on_call)
        # unprofiled wall of the same calls
        self.run(prompts, gen, cache, max_calls=last + 1)
        cs = self.instr.call_start + [self.instr.end]
        return prof, ms(cs[first], cs[last])

    def profile(self, policy: str, batch: int, prompt_len: int, gen_len: int) -> None:
        a = self.a
        if self.left() < a.min_left_s:
            print(f"skip profile b{batch} (deadline)", flush=True)
            return
        try:
            prof, steps_ms = self.capture_profile(policy, batch, prompt_len, gen_len)
            sort_dev = "device_time_total" if CUDA else "cpu_time_total"
            ka = prof.key_averages()
            busy_us, n_kern = kernel_busy(prof)
            lines = [
                f"# torch.profiler: model calls 2 and 3 of a {policy} generation (model call + sampler; "
                f"dual: cached steps, none: full forwards), batch {batch}, "
                f"prompt {prompt_len} + gen {gen_len}, block {a.block}, shape {a.shape_name}",
                f"# {json.dumps(self.env)}",
                f"# unprofiled wall of the 2 steps (CUDA events): {steps_ms:.2f} ms ({steps_ms / 2:.2f} ms/step)",
                f"# GPU kernel busy time in the profiled window: {busy_us / 1e3 if busy_us else float('nan'):.2f} ms"
                f" over {n_kern} kernels -> {busy_us / 1e3 / steps_ms * 100 if busy_us else float('nan'):.0f}% of"
                " the unprofiled wall", "",
                f"## top ops by {sort_dev}",
                ka.table(sort_by=sort_dev, row_limit=30, max_name_column_width=70), "",
                "## top ops by self cpu time",
                ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70), "",
                "## top ops by input shape (device time)",
                prof.key_averages(group_by_input_shape=True).table(sort_by=sort_dev, row_limit=20,
                                                                    max_name_column_width=50),
            ]
            d = Path(a.profile_dir)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"profile_{a.shape_name}_{policy}_b{batch}.txt").write_text("\n".join(lines))
            if a.trace:
                prof.export_chrome_trace(str(d / f"trace_{a.shape_name}_{policy}_b{batch}.json"))
            print("\n".join(lines[:5]), flush=True)
        except Exception:  # noqa: BLE001
            traceback.print_exc()


def kernel_busy(prof) -> tuple[Optional[float], Optional[int]]:
    """(summed GPU kernel time in us, kernel count) of a profile; (None, None) without CUDA events."""
    try:
        from torch.autograd import DeviceType
        kern = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        return sum(e.time_range.elapsed_us() for e in kern), len(kern)
    except Exception:  # noqa: BLE001
        return None, None


def build_plan(a, policies: list[str]) -> list[tuple]:
    B = a.batches
    P, Gn = a.prompt_len, a.gen_len
    thr = a.threshold
    core = [p for p in ("dual", "none") if p in policies]
    others = [p for p in ("prefix", "dllm_cache", "d2cache") if p in policies]
    out: list[tuple] = []
    for ph in a.phases:
        if ph == "A":
            out += [("m", p, b, None, P, Gn, None, None, "main") for p in core for b in B]
        elif ph == "P":
            out += [("p", "dual", b, None, P, Gn, None, None, "profile") for b in a.profile_batches]
        elif ph == "Q":
            out += [("p", "none", b, None, P, Gn, None, None, "profile") for b in a.none_profile_batches]
        elif ph == "C":
            out += [("m", p, b, thr, P, Gn, None, None, "main") for p in core for b in B]
        elif ph == "D":
            out += [("m", p, b, None, P, Gn, None, None, "main") for p in others for b in B]
        elif ph == "T":
            out += [("m", p, b, thr, P, Gn, None, None, "main") for p in others for b in B]
        elif ph == "E":
            out += [("m", p, b, None, P, Gn, Gn // k, k, "tokens_per_step") for k in (2, 4) for p in core
                    for b in a.tps_batches]
        elif ph == "F":
            out += [("m", p, b, None, a.long_prompt, a.long_gen, None, None, "long") for p in core
                    for b in a.long_batches]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--shape-name", required=True, help="model_shape in the records, e.g. llada-8b")
    ap.add_argument("--out", required=True, help="JSONL file the records are appended to")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--phases", default="A,P,C,D,E,T,F",
                    help="A: dual/none fixed; P: profile dual; Q: profile none; C: dual/none threshold; D: other policies fixed; "
                         "E: forced tokens per step 2, 4 (dual/none); T: other policies threshold; F: long case")
    ap.add_argument("--policies", default=None, help="restrict to these policies (comma list)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--tps-batches", default="1,8,32")
    ap.add_argument("--long-batches", default="1,8")
    ap.add_argument("--profile-batches", default="1,32")
    ap.add_argument("--none-profile-batches", default="8", help="phase Q: profile 2 full forwards of `none`")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--long-prompt", type=int, default=1024)
    ap.add_argument("--long-gen", type=int, default=1024)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--window-s", type=float, default=2.0, help="target length of the timed window")
    ap.add_argument("--full-max-s", type=float, default=6.0, help="full generation only when estimated below")
    ap.add_argument("--full-batches", default="1,8")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="stop starting configurations after this")
    ap.add_argument("--min-left-s", type=float, default=6.0)
    ap.add_argument("--skip-existing", action="store_true", help="skip configurations already in --out")
    ap.add_argument("--skip-from", nargs="*", default=[], help="with --skip-existing: more JSONL files of earlier runs")
    ap.add_argument("--profile-dir", default="benchmarks/results")
    ap.add_argument("--trace", action="store_true", help="also export chrome traces of the profiles")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    a.batches, a.tps_batches, a.long_batches = ints(a.batches), ints(a.tps_batches), ints(a.long_batches)
    a.profile_batches, a.full_batches = ints(a.profile_batches), ints(a.full_batches)
    a.none_profile_batches = ints(a.none_profile_batches)
    a.phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    bench = Bench(a)
    pols = policy_names()
    if a.policies:
        pols = [p for p in pols if p in a.policies.split(",")]
    plan = build_plan(a, pols)
    print(f"plan: {len(plan)} items, deadline {a.deadline_s}s", flush=True)
    for item in plan:
        kind, p, b, t, P, Gn, steps, tps, tag = item
        if kind == "p":
            bench.profile(p, b, P, Gn)
        else:
            bench.measure(p, b, t, P, Gn, steps=steps, tps=tps, tag=tag)
    print(f"done in {time.perf_counter() - bench.t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
