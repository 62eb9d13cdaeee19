"""GPU smoke check, run first on a new machine (correctness, not benchmark numbers):
- CUDA-graph steps (full forwards and cached block steps) give the same tokens as the same steps run
  eagerly, for every policy;
- the fused (torch.compile'd) elementwise kernels agree with the eager ones (token agreement; bf16
  rounding differs, so not asserted);
- rough per-mode timings, and one LLaDA-8B-shaped layer eager vs fused;
- the CUDA weight reader (pinned staging buffers) loads exactly the tensors safetensors' memory map
  gives, for single-file and sharded checkpoints, same dtype and converted.

    python benchmarks/smoke_gpu.py [--out smoke.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_vars  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model  # noqa: E402
from dllm_cache_core.models import fused  # noqa: E402
from dllm_cache_core.models.registry import model_config  # noqa: E402
from dllm_cache_core.models.llada import LLaDABlock  # noqa: E402
from dllm_cache_core.models.layers import rope_tables  # noqa: E402
from dllm_cache_core.models.tiny import write_tiny_checkpoint  # noqa: E402
from dllm_cache_core.stats import token_agreement  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODES = {"eager": ("0", "0"), "fused": ("0", "auto"), "fused+graphs": ("1", "auto")}


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def decode_checks(res: dict, d_model: int) -> None:
    d = tempfile.mkdtemp()
    write_tiny_checkpoint(d, "llada", d_model=d_model, n_layers=8, n_heads=8, n_kv_heads=8,
                          mlp_hidden_size=d_model * 11 // 4, max_sequence_length=4096)
    m, _ = load_model(d, device=DEV, dtype="bfloat16")
    for B in (1, 8):
        prompts = [list(range(10, 10 + 200 - 3 * i)) for i in range(B)]
        for thr in (None, 0.9):
            gen = GenerationConfig(gen_length=128, block_length=32, stop_at_eos=False, threshold=thr)
            for pol in ("none", "prefix", "dual", "dllm_cache", "d2cache"):
                toks = {}
                for mode, (graphs, comp) in MODES.items():
                    with env_vars(DLLM_CUDA_GRAPHS=graphs, DLLM_COMPILE=comp):
                        generate(m, prompts, gen, CacheConfig(policy=pol))  # warm-up, capture, compile
                        dt, out = timed(lambda: generate(m, prompts, gen, CacheConfig(policy=pol)))
                    toks[mode] = [o.token_ids for o in out]
                    res[f"B{B}-thr{thr}-{pol}-{mode}"] = {"tok_s": round(B * 128 / dt, 1),
                                                          "nfe": out[0].stats.nfe}
                res[f"B{B}-thr{thr}-{pol}-graph_equals_eager"] = toks["fused+graphs"] == toks["fused"]
                res[f"B{B}-thr{thr}-{pol}-fused_vs_eager_agreement"] = round(
                    sum(token_agreement(a, b) for a, b in zip(toks["fused"], toks["eager"])) / B, 4)
                print(pol, B, thr, {k: v for k, v in res.items() if k.startswith(f"B{B}-thr{thr}-{pol}")},
                      flush=True)


def layer_8b(res: dict) -> None:
    cfg = model_config({"model_type": "llada", "d_model": 4096, "n_layers": 1, "n_heads": 32, "n_kv_heads": 32,
                        "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464,
                        "max_sequence_length": 4096, "rope_theta": 500000.0, "mask_token_id": 126336,
                        "eos_token_id": 126081})
    layer = LLaDABlock(cfg).to("cuda", torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    from dllm_cache_core.models.layers import apply_rope, attend

    def full(h, cos, sin):
        q, k, v = layer.qkv(layer.attn_in(h))
        q, k = apply_rope(q, cos, sin, 128, True), apply_rope(k, cos, sin, 128, True)
        h = h + layer.attn_proj(attend(q, k, v, 128, None))
        return h + layer.ffn(h)

    for B in (1, 8, 32):
        h = torch.randn(B, 512, 4096, device="cuda", dtype=torch.bfloat16)
        cos, sin = rope_tables(torch.arange(512, device="cuda").expand(B, -1), 128, 500000.0)
        for comp in ("0", "auto"):
            with env_vars(DLLM_COMPILE=comp), torch.no_grad():
                for _ in range(3):
                    full(h, cos, sin)
                dt, _ = timed(lambda: [full(h, cos, sin) for _ in range(10)])
            res[f"layer8b-B{B}-compile_{comp}_ms"] = round(dt * 100, 3)
        print({k: v for k, v in res.items() if k.startswith(f"layer8b-B{B}")}, flush=True)


def loader_checks(res: dict) -> None:
    """load_model onto the GPU (read_to_cuda) == the CPU load (safetensors mmap), tensor for tensor."""
    with tempfile.TemporaryDirectory() as d:
        for fam, shards in (("llada", 1), ("dream", 3)):
            path = write_tiny_checkpoint(Path(d) / f"{fam}{shards}", family=fam, shards=shards, dtype=torch.bfloat16)
            for dtype in ("bfloat16", "float32"):
                gpu, _ = load_model(path, device="cuda", dtype=dtype, tokenizer=False)
                cpu, _ = load_model(path, device="cpu", dtype=dtype, tokenizer=False)
                g, c = gpu.state_dict(), cpu.state_dict()
                res[f"load-{fam}-shards{shards}-{dtype}-equal"] = set(g) == set(c) and all(
                    g[k].dtype == c[k].dtype and torch.equal(g[k].cpu(), c[k]) for k in c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--no-layer", action="store_true", help="skip the 8B-shaped layer timing")
    a = ap.parse_args()
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}
    try:
        if not a.no_layer:
            layer_8b(res)
        if DEV == "cuda":
            loader_checks(res)
        decode_checks(res, a.d_model)
    finally:
        res["fused_status"] = fused.status(torch.device(DEV))
        text = json.dumps(res, indent=1)
        print(text)
        if a.out:
            Path(a.out).write_text(text + "\n")
    bad = [k for k, v in res.items() if k.endswith(("graph_equals_eager", "-equal")) and v is not True]
    if bad:
        sys.exit(f"GPU path differs from its reference: {bad}")


if __name__ == "__main__":
    main()
