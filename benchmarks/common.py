"""Shared bits of the GPU benchmarks: model-shape presets, environment facts, small JSON helpers.

The presets are config.json overrides on top of the tiny-checkpoint configs of
dllm_cache_core.models.tiny, so every shape is written in the real on-disk layout.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # LLaDA-8B-Instruct's config.json shape
    "llada-8b": ("llada", dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                               mlp_ratio=4, vocab_size=126464, embedding_size=126464, max_sequence_length=4096,
                               mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
                               bos_token_id=126080, rope_theta=500000.0)),
    # Dream-v0-Instruct-7B's config.json shape (Qwen2.5-7B: GQA 28 query / 4 KV heads)
    "dream-7b": ("dream", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                               max_position_embeddings=131072, mask_token_id=151666, eos_token_id=151643,
                               pad_token_id=151643, bos_token_id=151643, rope_theta=1000000.0)),
    # CPU smoke-test shapes (the same code paths, seconds on a laptop)
    "llada-tiny": ("llada", dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128,
                                 max_sequence_length=4096)),
    "dream-tiny": ("dream", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)),
}


def shape_config(shape: str, **over: Any) -> tuple[str, dict[str, Any]]:
    """(family, config.json dict) for a preset name."""
    from dllm_cache_core.models.tiny import dream_tiny_config, llada_tiny_config

    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape!r}: unknown; known: {', '.join(SHAPES)}")
    family, o = SHAPES[shape]
    base = llada_tiny_config if family == "llada" else dream_tiny_config
    return family, base(**{**o, **over})


def gpu_name() -> str:
    """Short lower-case card name for file names: h100, h200, a100, ... or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.get_device_name().lower()
    for k in ("h200", "h100", "h20", "a100", "a10g", "l40s", "l4", "b200", "gb200"):
        if k in n:
            return k
    return n.replace("nvidia", "").strip().split()[0]


def engine_src_sha() -> str:
    """Hash of the engine's source files (the device copy has no .git to name a commit)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "dllm_cache_core").rglob("*.py")):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def env_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "gpu": gpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "engine_src_sha": engine_src_sha(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_full=torch.cuda.get_device_name(), gpu_mem_gb=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


@contextlib.contextmanager
def env_vars(**values: str):
    """Set environment variables for a block (the engine reads its switches per call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def append_jsonl(path: str | os.PathLike, rec: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def random_prompts(batch: int, length: int, vocab: int, avoid: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    """Random token ids below every special id in `avoid` (mask, EOS), so no prompt holds one."""
    hi = min([vocab] + [a for a in avoid if a is not None])
    lo = min(1000, hi // 8)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (batch, length), generator=g).tolist()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_markdown(path: str | os.PathLike, text: str) -> None:
    """Write a generated results table, keeping the hand-written `## Notes` section of the file it
    replaces (the analysis of a run outlives a re-render of its table)."""
    p = Path(path)
    old = p.read_text() if p.exists() else ""
    notes = old[old.index("\n## Notes") + 1:] if "\n## Notes" in old else ""
    p.write_text(text.rstrip("\n") + "\n\n" + notes if notes else text)


def block_budget(key: Any, num_blocks: int) -> int:
    """A row's block budget for random-weight models, which never stop on their own (Row.max_blocks):
    uniform in {ceil(num_blocks / 8), ..., num_blocks}, seeded by the row's key (its index or id), so
    output lengths spread from about gen_length / 8 to gen_length."""
    return random.Random(f"budget:{key}").randint(math.ceil(num_blocks / 8), num_blocks)
