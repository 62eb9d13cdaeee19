"""FLOPs speedup and token agreement with `none` for every policy at default parameters (the README's table).

CPU, tiny random LLaDA/Dream checkpoints: agreement on random weights measures how far each
approximation drifts, not quality (benchmarks/quality_tiny.py measures accuracy on a trained model).
Usage: python benchmarks/policy_table.py [--out benchmarks/results/policy_table.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile

import torch

from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model, token_agreement
from dllm_cache_core.cache import policy_names
from dllm_cache_core.models.tiny import write_tiny_checkpoint



def run(family: str, batch: int, prompt_len: int, seed: int) -> list[dict]:
    d = tempfile.mkdtemp()
    write_tiny_checkpoint(d, family, seed=seed, n_layers=4) if family == "llada" else \
        write_tiny_checkpoint(d, family, seed=seed, num_hidden_layers=4)
    model, _ = load_model(d)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 250, (prompt_len - 3 * i,), generator=g).tolist() for i in range(batch)]
    semi_ar = GenerationConfig(gen_length=256, block_length=32, stop_at_eos=False)
    # d2cache "defaults" = the paper's generation settings: one block, certainty prior sigma 10
    paper = GenerationConfig(gen_length=256, certainty_prior_sigma=10.0, stop_at_eos=False)
    runs = [(p, semi_ar, CacheConfig(policy=p)) for p in policy_names() if p != "d2cache"]
    runs += [("d2cache", paper, CacheConfig(policy="d2cache")),
             ("d2cache", semi_ar, CacheConfig(policy="d2cache", inflate_w=4))]
    refs: dict = {}
    rows = []
    for policy, gen, cache in runs:
        if gen not in refs:
            refs[gen] = generate(model, prompts, gen, CacheConfig())
        ref = refs[gen]
        outs = generate(model, prompts, gen, cache)
        rows.append({
            "family": family, "policy": policy, "gen_length": 256, "block_length": gen.block_len,
            "certainty_prior_sigma": gen.certainty_prior_sigma, "cache": cache.to_dict(), "batch": batch,
            "flops_speedup": sum(o.stats.flops_speedup for o in outs) / batch,
            "agreement": sum(token_agreement(o.token_ids, r.token_ids) for o, r in zip(outs, ref)) / batch,
            "nfe": outs[0].stats.nfe, "device": platform.processor() or platform.machine(),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/policy_table.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = run("llada", a.batch, a.prompt_len, 0) + run("dream", a.batch, a.prompt_len, 0)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("| family | policy | block | prior | flops_speedup | agreement with none |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['policy']} | {r['block_length']} | {r['certainty_prior_sigma'] or '-'} "
              f"| {r['flops_speedup']:.2f} | {r['agreement']:.3f} |")


if __name__ == "__main__":
    main()
