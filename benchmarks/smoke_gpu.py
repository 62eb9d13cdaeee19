"""GPU smoke check: CUDA-graph cached steps give the same tokens as eager; rough step timings."""
import os, tempfile, time, json
import torch
from dllm_cache_core.models.tiny import write_tiny_checkpoint
from dllm_cache_core import load_model, generate, GenerationConfig, CacheConfig

d = tempfile.mkdtemp()
write_tiny_checkpoint(d, "llada", d_model=1024, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=2816,
                      max_sequence_length=4096)
m, _ = load_model(d, device="cuda", dtype="bfloat16")
res = {}
for B in (1, 8):
    prompts = [list(range(10, 10 + 200 - i)) for i in range(B)]
    gen = GenerationConfig(gen_length=256, block_length=32, stop_at_eos=False)
    for pol in ("none", "prefix", "dual", "dllm_cache"):
        for flag in ("0", "1"):
            if pol in ("none", "dllm_cache") and flag == "1":
                continue
            os.environ["DLLM_CUDA_GRAPHS"] = flag
            generate(m, prompts, gen, CacheConfig(policy=pol))  # warm-up
            torch.cuda.synchronize(); t = time.perf_counter()
            out = generate(m, prompts, gen, CacheConfig(policy=pol))
            torch.cuda.synchronize(); dt = time.perf_counter() - t
            res[f"B{B}-{pol}-graphs{flag}"] = {"tok_s": round(B * 256 / dt, 1), "ms_per_call": round(1000 * dt / out[0].stats.nfe, 2),
                                              "tokens": out[0].token_ids[:12]}
    for pol in ("prefix", "dual"):
        same = res[f"B{B}-{pol}-graphs0"]["tokens"] == res[f"B{B}-{pol}-graphs1"]["tokens"]
        res[f"B{B}-{pol}-same"] = same
print(json.dumps(res, indent=1))
