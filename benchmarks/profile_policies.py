"""Where the adaptive policies' step time goes: torch.profiler per (policy, batch), kernels grouped
into matmul / attention / other, host syncs per step, and tok/s through the public API.

    python benchmarks/profile_policies.py --ckpt /tmp/ckpt/llada-8b --shape-name llada-8b --out-dir $OUT/prof
    python benchmarks/profile_policies.py --ckpt /tmp/ck/llada-tiny --shape-name llada-tiny --out-dir /tmp/p \\
        --batches 2 --prompt-len 32 --gen-len 64 --block 16      # CPU smoke run

Per (policy, batch), prompt --prompt-len + gen --gen-len, blocks of --block, 1 token per step:
- `bench_engine.Bench.measure`: the steady-state tok/s (and, when it fits --full-max-s, a full
  generate() wall clock with the FLOPs speedup) plus roofline_ratio, one JSONL record each in
  OUT/policies.jsonl;
- `bench_engine.Bench.capture_profile`: torch.profiler over --steps model calls from call --first
  (model call + sampler + the policy's end_step; the same calls run --warm times before, so CUDA
  graphs are captured and kernels compiled), written to OUT/profile_<shape>_<policy>_b<batch>.txt:
  the top kernels by self device time (CPU: aten ops by self CPU time) with their group, the
  per-group totals per step, and the host syncs per step with the ops that caused them.
OUT/summary.md: one row per (policy, batch): tok/s, wall speedup vs `none` at the same batch, FLOPs
speedup, their ratio, roofline_ratio, ms/step by group, syncs/step.

Host syncs: on CUDA the runtime calls that wait for the device (cudaStreamSynchronize,
cudaEventSynchronize, cudaMemcpy; cudaDeviceSynchronize is the profiler's own window edge and is not
counted); on CPU the ops that would sync on a GPU (aten::_local_scalar_dense = .item()/int()/bool(),
aten::nonzero and the data-dependent-shape ops, Tensor.tolist()).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine as BE  # noqa: E402
from common import env_vars  # noqa: E402

ATTENTION = ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn")
MATMUL = ("gemm", "cutlass", "nvjet", "xmma", "cublas", "splitk", "s16816", "s1688", "wgmma", "aten::mm",
          "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "matmul")
CPU_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
                "aten::unique_consecutive", "aten::unique_dim", "host_sync::tolist")
CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
"""cudaMemcpy is the blocking copy; cudaMemcpyAsync is not counted (its sync, if any, follows)."""
CPU_GROUP_SKIP = ("aten::linear", "aten::matmul", "aten::scaled_dot_product_attention")
"""CPU: composite ops whose self time is only dispatch; their children carry the work."""


def group_of(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ATTENTION):
        return "attention"
    if any(k in n for k in MATMUL):
        return "matmul"
    return "other"


@contextlib.contextmanager
def tolist_marked():
    """Tensor.tolist() dispatches no aten op on CPU: mark each call so the profile can count it."""
    orig = torch.Tensor.tolist

    def tolist(self, *a, **k):
        with torch.profiler.record_function("host_sync::tolist"):
            return orig(self, *a, **k)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = orig


def summarize(prof, n_steps: int) -> dict[str, Any]:
    """Per-step totals by group, host syncs, ops/kernels, and the rows of the top table."""
    cuda = BE.CUDA
    rows, by_group, syncs = [], Counter(), Counter()
    n_ops = n_kernels = 0
    for e in prof.key_averages():
        name, calls = e.key, e.count
        if name in CPU_SYNC_OPS:
            syncs[name] += calls
        if cuda and name in CUDA_SYNC_CALLS:
            syncs[name] += calls
        if name.startswith("aten::"):
            n_ops += calls
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            t = e.self_device_time_total
            n_kernels += calls
        else:
            if not name.startswith("aten::") or name in CPU_GROUP_SKIP:
                continue
            t = e.self_cpu_time_total
        g = group_of(name)
        by_group[g] += t
        rows.append((t, calls, g, name))
    rows.sort(reverse=True)
    sync_keys = CUDA_SYNC_CALLS if cuda else CPU_SYNC_OPS
    n_sync = sum(v for k, v in syncs.items() if k in sync_keys)
    return dict(rows=rows, ms_by_group={g: by_group[g] / 1e3 / n_steps for g in ("matmul", "attention", "other")},
                syncs_per_step=n_sync / n_steps, sync_ops={k: v / n_steps for k, v in sorted(syncs.items())},
                ops_per_step=n_ops / n_steps, kernels_per_step=(n_kernels / n_steps) if cuda else None)


def profile_text(title: str, s: dict[str, Any], steps_ms: float, n_steps: int, top: int) -> str:
    unit = "self CUDA time" if BE.CUDA else "self CPU time (aten ops)"
    tot = sum(s["ms_by_group"].values())
    lines = [f"# {title}",
             f"# unprofiled wall: {steps_ms:.2f} ms over {n_steps} steps ({steps_ms / n_steps:.3f} ms/step)",
             f"# {unit} per step: {tot:.3f} ms = " + ", ".join(
                 f"{g} {v:.3f} ms ({100 * v / tot if tot else 0:.0f}%)" for g, v in s["ms_by_group"].items()),
             f"# host syncs per step: {s['syncs_per_step']:.2f}  ("
             + ", ".join(f"{k} {v:.2f}" for k, v in s["sync_ops"].items()) + ")",
             f"# aten ops per step: {s['ops_per_step']:.1f}"
             + (f"; kernels per step: {s['kernels_per_step']:.1f}" if s["kernels_per_step"] is not None else ""),
             "", f"{'ms/step':>9} {'%':>5} {'calls/step':>10}  {'group':<9} name"]
    for t, calls, g, name in s["rows"][:top]:
        lines.append(f"{t / 1e3 / n_steps:9.3f} {100 * t / 1e3 / n_steps / tot if tot else 0:5.1f} "
                     f"{calls / n_steps:10.1f}  {g:<9} {name[:140]}")
    return "\n".join(lines) + "\n"


def bench_args(a) -> argparse.Namespace:
    """bench_engine's arguments for the same run (its defaults for everything not set here)."""
    b = ",".join(str(x) for x in a.batches)
    return BE.parse_args([
        "--ckpt", a.ckpt, "--shape-name", a.shape_name, "--out", str(Path(a.out_dir) / "policies.jsonl"),
        "--dtype", a.dtype, "--batches", b, "--full-batches", b, "--full-max-s", str(a.full_max_s),
        "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--block", str(a.block),
        "--window-s", str(a.window_s), "--deadline-s", str(a.deadline_s), "--profile-dir", a.out_dir,
    ] + (["--trace"] if a.trace else []))


def probs_kernel_check(device="cuda") -> dict:
    """d2cache's probability kernel (models/probs_kernel.py) against the generic path on random inputs
    (MHA and GQA, a padding mask): max abs error and ms per call of each."""
    from dllm_cache_core.models import probs_kernel
    from dllm_cache_core.models.layers import attention_probs_mean

    out: dict = {"triton": probs_kernel.triton is not None}
    if probs_kernel.triton is None or not torch.cuda.is_available():
        return out
    g = torch.Generator(device=device).manual_seed(0)
    for B, n, H, G, L in ((32, 128, 32, 32, 512), (8, 96, 28, 4, 300)):
        D = 128
        q = torch.randn(B, n, H * D, device=device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, L, G * D, device=device, dtype=torch.bfloat16, generator=g)
        mask = (torch.arange(L, device=device) >= torch.arange(B, device=device).unsqueeze(1) * 3)[:, None, None, :]
        res, ms = {}, {}
        for flag in ("0", "1"):
            with env_vars(DLLM_PROBS_KERNEL=flag):
                res[flag] = attention_probs_mean(q, k, D, mask)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    attention_probs_mean(q, k, D, mask)
                torch.cuda.synchronize()
                ms[flag] = (time.perf_counter() - t0) / 10 * 1e3
        out[f"B{B}_n{n}_H{H}_G{G}_L{L}"] = dict(max_abs_err=float((res["1"] - res["0"]).abs().max()),
                                                 ms_generic=round(ms["0"], 4), ms_kernel=round(ms["1"], 4))
    out["broken"] = probs_kernel._broken[:1]
    return out


def variants(a) -> list[tuple[str, str, dict[str, str]]]:
    """(label, policy, environment) per profiled variant: the policies, then --env-variants
    ('policy:VAR=value[,VAR=value]', e.g. d2cache:DLLM_PROBS_KERNEL=1)."""
    out = [(p, p, {}) for p in a.policies]
    for v in a.env_variants:
        pol, _, env = v.partition(":")
        kv = dict(e.split("=", 1) for e in env.split(",") if "=" in e)
        out.append((f"{pol}[{env}]", pol, kv))
    return out


def run(a) -> list[dict[str, Any]]:
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bench = BE.Bench(bench_args(a))
    results = []
    if BE.CUDA:
        check = probs_kernel_check()
        print("probs kernel self-check:", json.dumps(check), flush=True)
        (out / "probs_kernel_check.json").write_text(json.dumps(check, indent=1))
    for batch in a.batches:
        for label, policy, env in variants(a):
            with env_vars(**env):
                results.append(profile_one(a, bench, out, label, policy, batch))
    write_summary(out, results, a)
    return results


def profile_one(a, bench, out: Path, label: str, policy: str, batch: int) -> dict[str, Any]:
    """tok/s (bench_engine's measure) and the profile table of one (variant, batch)."""
    r: dict[str, Any] = dict(policy=label, batch=batch)
    if not a.no_measure:
        rec = bench.measure(policy, batch, None, a.prompt_len, a.gen_len, tag=label) or {}
        r.update({k: rec.get(k) for k in ("tokens_per_s", "timing", "roofline_ratio", "flops_speedup",
                                          "ms_per_call", "error")})
    if bench.left() < bench.a.min_left_s:
        print(f"skip profile {policy} b{batch} (deadline)", flush=True)
        return r
    try:
        with tolist_marked():
            prof, steps_ms = bench.capture_profile(policy, batch, a.prompt_len, a.gen_len, first=a.first,
                                                   n=a.steps, warm=a.warm)
        s = summarize(prof, a.steps)
        title = (f"{label} batch {batch}, model calls {a.first}..{a.first + a.steps - 1} (call + sampler + "
                 f"end_step), prompt {a.prompt_len} + gen {a.gen_len}, block {a.block}, shape "
                 f"{a.shape_name}, {'cuda' if BE.CUDA else 'cpu'}")
        (out / f"profile_{a.shape_name}_{fname(label)}_b{batch}.txt").write_text(
            profile_text(title, s, steps_ms, a.steps, a.top))
        if a.trace:
            prof.export_chrome_trace(str(out / f"trace_{a.shape_name}_{fname(label)}_b{batch}.json"))
        r.update(ms_per_step=steps_ms / a.steps, syncs_per_step=s["syncs_per_step"],
                 ops_per_step=s["ops_per_step"], kernels_per_step=s["kernels_per_step"],
                 **{f"{g}_ms": v for g, v in s["ms_by_group"].items()})
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        r["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(r), flush=True)
    return r




def fname(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label).strip("_")


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def write_summary(out: Path, results: list[dict[str, Any]], a) -> None:
    base = {r["batch"]: r.get("tokens_per_s") for r in results if r["policy"] == "none"}
    lines = [f"# profile_policies: {a.shape_name}, prompt {a.prompt_len} + gen {a.gen_len}, block {a.block}, "
             f"{'cuda' if BE.CUDA else 'cpu'}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", "",
             "| policy | batch | tok/s | wall x none | FLOPs x none | wall/FLOPs | roofline | ms/step | matmul ms | "
             "attention ms | other ms | syncs/step | ops/step |", "|" + "---|" * 13]
    for r in results:
        tps, b0 = r.get("tokens_per_s"), base.get(r["batch"])
        wall = tps / b0 if tps and b0 else None
        fl = r.get("flops_speedup")
        lines.append("| " + " | ".join([
            r["policy"], str(r["batch"]), _f(tps, "{:.1f}"), _f(wall), _f(fl), _f(wall / fl if wall and fl else None),
            _f(r.get("roofline_ratio"), "{:.3f}"), _f(r.get("ms_per_step"), "{:.3f}"), _f(r.get("matmul_ms"), "{:.3f}"),
            _f(r.get("attention_ms"), "{:.3f}"), _f(r.get("other_ms"), "{:.3f}"), _f(r.get("syncs_per_step")),
            _f(r.get("ops_per_step"), "{:.0f}")]) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--shape-name", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--policies", default="none,dual,dllm_cache,d2cache")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--first", type=int, default=8,
                    help="first profiled model call (0 = the block start; later calls replay captured graphs)")
    ap.add_argument("--steps", type=int, default=4, help="model calls profiled")
    ap.add_argument("--warm", type=int, default=2, help="unprofiled runs of the same calls first")
    ap.add_argument("--top", type=int, default=40, help="rows of the kernel table")
    ap.add_argument("--window-s", type=float, default=2.0, help="bench_engine's timed window")
    ap.add_argument("--full-max-s", type=float, default=30.0,
                    help="time a full generate() (tok/s and FLOPs speedup) when estimated below this")
    ap.add_argument("--deadline-s", type=float, default=1e9)
    ap.add_argument("--no-measure", action="store_true", help="profiles only, no tok/s")
    ap.add_argument("--trace", action="store_true", help="also export chrome traces")
    ap.add_argument("--env-variants", default="d2cache:DLLM_PROBS_KERNEL=0",
                    help="extra rows: 'policy:VAR=value[,VAR=value]' separated by ';' (empty: none)")
    a = ap.parse_args(argv)
    a.policies = [p for p in a.policies.split(",") if p]
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.env_variants = [v for v in a.env_variants.split(";") if v.strip()]
    return a


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
