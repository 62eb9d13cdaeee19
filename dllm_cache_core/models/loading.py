"""Local folder -> (model, tokenizer). Safetensors only, straight onto the target device, no network."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .base import DiffusionLM
from .config import ModelConfig
from .registry import build_model, model_config

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_path(path: str | os.PathLike) -> Path:
    """`builtin:NAME` -> the checkpoint shipped in the package; anything else is a local folder."""
    s = str(path)
    if s.startswith("builtin:"):
        name = s.split(":", 1)[1]
        p = BUILTIN_DIR / name
        if not (p / "config.json").exists():
            have = sorted(d.name for d in BUILTIN_DIR.iterdir() if (d / "config.json").exists()) if BUILTIN_DIR.exists() else []
            raise ValueError(f"model.path={s!r}: no builtin model {name!r}; allowed: {', '.join('builtin:' + h for h in have)}")
        return p
    if s.startswith("file://"):
        s = s[len("file://"):]
    p = Path(s)
    if not (p / "config.json").exists():
        raise ValueError(f"model.path={s!r}: not a model folder (no config.json)")
    return p


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(path: Path, family: str = "auto") -> ModelConfig:
    with open(path / "config.json") as f:
        return model_config(json.load(f), family)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ValueError(f"{path}: only pickle weights (.bin/.pt) found; they can run arbitrary code and are "
                         "refused. Convert them to safetensors (e.g. save_pretrained(safe_serialization=True)).")
    raise ValueError(f"{path}: no safetensors weights found")


def load_weights(model: DiffusionLM, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fill a meta-device model tensor by tensor on `device` (peak memory ~ the weights)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    seen: dict[str, Any] = {}
    dev = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}" if device.type == "cuda" else str(device)
    for f in weight_files(path):
        with safe_open(str(f), framework="pt", device=dev) as sf:
            for key in sf.keys():
                if key not in expected:
                    raise ValueError(f"{f.name}: unexpected key {key!r} for a {model.config.family} model")
                shape = tuple(sf.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise ValueError(f"{f.name}: shape mismatch for {key!r}: checkpoint {shape}, model {expected[key]}")
                t = sf.get_tensor(key)
                seen[key] = t.to(dtype) if t.is_floating_point() else t
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(seen, strict=True, assign=True)


def load_tokenizer(path: Path):
    """AutoTokenizer without remote code; Dream's custom class falls back to the stock Qwen2 classes."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns about the unknown model type
    try:
        return _load_tokenizer(path, AutoTokenizer, PreTrainedTokenizerFast)
    finally:
        hf_logging.set_verbosity(level)


def _load_tokenizer(path: Path, AutoTokenizer, PreTrainedTokenizerFast):

    tc: dict[str, Any] = {}
    if (path / "tokenizer_config.json").exists():
        with open(path / "tokenizer_config.json") as f:
            tc = json.load(f)
    if "auto_map" not in tc:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        try:
            from transformers import Qwen2TokenizerFast as Qwen2Tok
        except ImportError:  # transformers >= 5 has one class
            from transformers import Qwen2Tokenizer as Qwen2Tok
        return Qwen2Tok.from_pretrained(str(path), local_files_only=True)
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    raise ValueError(f"{path}: the tokenizer needs remote code ({tc.get('tokenizer_class')}) and no "
                     "tokenizer.json or vocab.json+merges.txt is there to load it without")


def stop_ids_from_tokenizer(tok, eos_id: int, eot_tokens: tuple[str, ...] = ("<|eot_id|>", "<|im_end|>")
                            ) -> tuple[int, ...]:
    """EOS plus the end-of-turn tokens (the decoding profile's) that the tokenizer has."""
    ids = {eos_id}
    vocab = tok.get_vocab() if tok is not None else {}
    for t in eot_tokens:
        if t in vocab:
            ids.add(vocab[t])
    return tuple(sorted(ids))


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA was requested but torch.cuda.is_available() is False "
                         "(no GPU, or a CPU-only torch build); allowed here: cpu")
    return dev


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               family: str = "auto", tokenizer: bool = True):
    """(model, tokenizer) from a local checkpoint folder or `builtin:NAME`; never touches the network.
    The tokenizer's end-of-turn token joins the model's stop ids (its config's decoding profile)."""
    p = resolve_path(path)
    cfg = read_config(p, family)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    with torch.device("meta"):
        model = build_model(cfg)
    load_weights(model, p, dev, dt)
    model.eval().requires_grad_(False)
    tok = load_tokenizer(p) if tokenizer else None
    if tok is not None:
        model.config = cfg.with_stop_ids(stop_ids_from_tokenizer(tok, cfg.eos_id, cfg.profile.eot_tokens))
    return model, tok
