"""Write a random checkpoint of a real model's shape in the real sharded HF layout.

    python benchmarks/make_random_checkpoint.py --shape llada-8b --out /tmp/ckpt/llada-8b
    python benchmarks/make_random_checkpoint.py --shape dream-7b --out /tmp/ckpt/dream-7b

Layout: model-0000N-of-0000M.safetensors (<= --max-shard-gb each, keys in module order, as
save_pretrained shards them) + model.safetensors.index.json + config.json + the tiny byte-level
tokenizer files of dllm_cache_core.models.tiny (LLaDA: tokenizer.json; Dream: vocab.json +
merges.txt + a tokenizer_config.json naming the remote-code class). Tensors are drawn on the GPU
in bf16 (one shard at a time, so GPU memory stays at one shard), then written from host memory.

Weights: linear layers N(0, 1/fan_in), embeddings N(0, 1), norms 1 + 0.1 N(0, 1), biases 0.1 N(0, 1);
the LM-head row of the mask token is zero (a random model would otherwise predict [MASK] itself).
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

from common import shape_config  # noqa: E402
from dllm_cache_core.models.registry import build_model, model_config  # noqa: E402
from dllm_cache_core.models.tiny import write_dream_tokenizer, write_llada_tokenizer  # noqa: E402

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expected_shapes(cfg_json: dict) -> dict[str, tuple[int, ...]]:
    cfg = model_config(cfg_json)
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def draw(key: str, shape: tuple[int, ...], g: torch.Generator, device: str, dtype: torch.dtype) -> torch.Tensor:
    t = torch.randn(shape, generator=g, device=device, dtype=dtype)
    if key.endswith("norm.weight") or key.endswith("ln_f.weight") or "layernorm" in key:
        return t.mul_(0.1).add_(1.0)
    if key.endswith("bias"):
        return t.mul_(0.1)
    if "wte" in key or "embed_tokens" in key:
        return t
    return t.mul_(shape[-1] ** -0.5)


def shard_plan(shapes: dict[str, tuple[int, ...]], bytes_per: int, max_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for k, s in shapes.items():
        n = bytes_per
        for d in s:
            n *= d
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        shards.append(cur)
    return shards


def write_checkpoint(out: str | Path, shape: str = "llada-8b", device: str | None = None, dtype: str = "bfloat16",
                     max_shard_gb: float = 5.0, seed: int = 0, **over) -> dict:
    """Write the folder; returns timing facts (seconds, bytes, shard count)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = DT[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family, cfg_json = shape_config(shape, **over)
    cfg_json = dict(cfg_json, torch_dtype=dtype)
    cfg = model_config(cfg_json)
    shapes = expected_shapes(cfg_json)
    head = "model.transformer.ff_out.weight" if family == "llada" else "lm_head.weight"
    plan = shard_plan(shapes, torch.finfo(dt).bits // 8, int(max_shard_gb * 2**30))
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map, total, t_draw, t_write = {}, 0, 0.0, 0.0
    for i, keys in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        ta = time.perf_counter()
        part = {}
        for k in keys:
            t = draw(k, shapes[k], g, device, dt)
            if k == head:
                t[cfg.mask_id].zero_()
            part[k] = t
        part = {k: v.to("cpu") for k, v in part.items()}  # one shard on the GPU at a time
        tb = time.perf_counter()
        save_file(part, str(out / name), metadata={"format": "pt"})
        t_draw += tb - ta
        t_write += time.perf_counter() - tb
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del part
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg_json, indent=1))
    (write_llada_tokenizer if family == "llada" else write_dream_tokenizer)(out)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"path": str(out), "shape": shape, "family": family, "dtype": dtype, "shards": len(plan),
            "weights_bytes": total, "params": sum(int(torch.tensor(s).prod()) for s in shapes.values()),
            "draw_and_copy_s": round(t_draw, 2), "write_s": round(t_write, 2),
            "total_s": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llada-8b", help="preset: llada-8b, dream-7b, llada-tiny, dream-tiny")
    ap.add_argument("--out", required=True, help="output folder (local disk)")
    ap.add_argument("--device", default=None, help="where tensors are drawn (default cuda if present)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DT))
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                    help="config.json overrides, e.g. n_layers=4 (values parsed as JSON)")
    ap.add_argument("--report", default=None, help="also write the timing facts to this JSON file")
    a = ap.parse_args(argv)
    over = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    facts = write_checkpoint(a.out, a.shape, a.device, a.dtype, a.max_shard_gb, a.seed, **over)
    print(json.dumps(facts))
    if a.report:
        Path(a.report).write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
