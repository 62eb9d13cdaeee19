"""Model folders: the LLaDA config.json of the tiny architecture, and export of trained weights.

The exported folder is a regular LLaDA checkpoint (config.json + model.safetensors in bf16 + the
tokenizer files), loadable by `load_model(path)` like any downloaded one; bf16 halves the size that
ships in the repository, and loading in fp32 upcasts exactly.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.tiny import llada_tiny_config, save_weights
from .tokenizer import TOKENIZER_FILES


@dataclass(frozen=True)
class ArchConfig:
    """Size of the embedded model: ~4.8M parameters, 9.6 MB in bf16 (the repository's budget is 10 MB)."""

    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    """head_dim 32: more heads help retrieval (one head can match keys while another copies values)."""
    mlp_hidden_size: int = 640
    max_sequence_length: int = 1024
    """Longest retrieval prompt (~500 tokens) plus the longest trained canvas (256) fits."""


def config_json(arch: ArchConfig, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """LLaDA's config.json fields for this architecture and tokenizer."""
    return llada_tiny_config(
        d_model=arch.d_model, n_layers=arch.n_layers, n_heads=arch.n_heads, n_kv_heads=arch.n_heads,
        mlp_hidden_size=arch.mlp_hidden_size, mlp_ratio=arch.mlp_hidden_size // arch.d_model,
        vocab_size=vocab_size, embedding_size=vocab_size, max_sequence_length=arch.max_sequence_length,
        eos_token_id=ids["eos"], pad_token_id=ids["eos"], mask_token_id=ids["mask"], bos_token_id=ids["bos"],
        torch_dtype="bfloat16")


def export_model(state: dict[str, torch.Tensor], cfg_json: dict[str, Any], tokenizer_dir: str | Path,
                 out: str | Path) -> str:
    """Write a loadable model folder; returns the sha256 of model.safetensors (to compare exports)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.detach().to("cpu", torch.bfloat16) for k, v in state.items()}, out)
    (out / "config.json").write_text(json.dumps(cfg_json, indent=1) + "\n")
    src = Path(tokenizer_dir)
    if src.resolve() != out.resolve():
        for f in TOKENIZER_FILES:
            shutil.copyfile(src / f, out / f)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
