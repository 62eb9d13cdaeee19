"""Write an LLaDA-8B-shaped random bf16 checkpoint (real sharded layout) to local
disk, load it with load_model onto the GPU, record load time and peak GPU memory against the
weights' size, and generate batch 8, prompt 256, gen 256 (block 32, policy dual, steps 256).

    python benchmarks/bench_load_8b.py --ckpt /tmp/ckpt/llada-8b --out benchmarks/results/load_8b.json

The checkpoint is written only when the folder has no config.json. The load is timed with the
files in the page cache (just written): it measures the loader, not the disk.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import env_info, random_prompts, sync  # noqa: E402
from make_random_checkpoint import write_checkpoint  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/tmp/ckpt/llada-8b")
    ap.add_argument("--shape", default="llada-8b")
    ap.add_argument("--out", default="benchmarks/results/load_8b.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--policy", default="dual")
    ap.add_argument("--repeats", type=int, default=2, help="timed generations after one warm-up")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    rec: dict = {"what": "load_model + generate on an LLaDA-8B-shaped random bf16 checkpoint", **env_info()}

    ck = Path(a.ckpt)
    if not (ck / "config.json").exists():
        rec["write"] = write_checkpoint(ck, a.shape, device=a.device)
        print("wrote", json.dumps(rec["write"]), flush=True)
    files = sorted(p.name for p in ck.iterdir())
    weights = sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    rec.update(checkpoint=str(ck), files=files, weights_file_gb=round(weights / 1e9, 3))

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync()
    t0 = time.perf_counter()
    model, tok = load_model(str(ck), device=a.device, dtype="bfloat16")
    sync()
    load_s = time.perf_counter() - t0
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rec.update(load_s=round(load_s, 2), params=sum(p.numel() for p in model.parameters()),
               weights_gb=round(pbytes / 1e9, 3), load_gb_per_s=round(pbytes / 1e9 / load_s, 2))
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        rec.update(peak_gpu_mem_load_gb=round(peak / 1e9, 3),
                   peak_over_weights=round(peak / pbytes, 4),
                   max_memory_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 3))
    print("loaded", json.dumps({k: rec[k] for k in ("load_s", "weights_gb", "peak_gpu_mem_load_gb")
                                 if k in rec}), flush=True)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")  # the load facts, even if generation fails
    cfg = model.config
    prompts = random_prompts(a.batch, a.prompt_len, cfg.vocab_size, (cfg.mask_id, cfg.eos_id))
    gen = GenerationConfig(gen_length=a.gen_len, steps=a.gen_len, block_length=a.block, stop_at_eos=False)
    cache = CacheConfig(policy=a.policy)
    generate(model, prompts, gen, cache)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    walls = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        outs = generate(model, prompts, gen, cache)
        sync()
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    n_tok = sum(len(o.token_ids) for o in outs)
    rec["generate"] = {
        "policy": a.policy, "batch": a.batch, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
        "block_length": a.block, "steps": a.gen_len, "threshold": None, "stop_at_eos": False,
        "wall_s": [round(w, 3) for w in walls], "tokens_per_s": round(a.batch * a.gen_len / wall, 1),
        "generated_tokens": n_tok, "nfe": max(o.stats.nfe for o in outs),
        "flops_speedup": round(outs[0].stats.flops_speedup, 2),
        "mask_left": int(sum(t == cfg.mask_id for o in outs for t in o.token_ids)),
    }
    if cuda:
        rec["generate"]["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    print(json.dumps(rec, indent=1), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
