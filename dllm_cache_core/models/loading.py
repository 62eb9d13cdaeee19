"""Local folder -> (model, tokenizer). Safetensors only, straight onto the target device, no network."""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from .base import DiffusionLM
from .checkpoint import (DTYPE_BYTES, FLOAT_DTYPES, CheckpointInfo, Opener, TensorEntry, check_complete, check_entry,
                         expected_shapes, fingerprint, local_files, read_header, read_to_cuda, weight_names)
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
    idx = json.loads(index.read_text()) if index.exists() else None
    return [path / n for n in weight_names((f.name for f in path.iterdir() if f.is_file()), idx, str(path))]


def load_weights(model: DiffusionLM, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fill a meta-device model tensor by tensor on `device` (peak memory ~ the weights). On CUDA the
    files are read in parallel through pinned buffers; elsewhere through safetensors' memory map."""
    expected = expected_shapes(model)
    family = model.config.family
    files = weight_files(path)
    seen: dict[str, Any] = {}
    if device.type == "cuda":
        headers = []
        for f in files:
            with open(f, "rb") as fh:
                headers.append(read_header(fh, f.name))
            for key, e in headers[-1].items():
                check_entry(key, e.shape, expected, f.name, family)
        check_complete((k for h in headers for k in h), expected, str(path))
        dev = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
            for part in pool.map(lambda fh: read_to_cuda(fh[0], fh[1], dev), zip(files, headers)):
                for key, t in part.items():
                    seen[key] = t.to(dtype) if t.is_floating_point() else t
    else:
        dev = "cpu" if device.type == "cpu" else str(device)
        for f in files:
            with safe_open(str(f), framework="pt", device=dev) as sf:
                for key in sf.keys():
                    check_entry(key, tuple(sf.get_slice(key).get_shape()), expected, f.name, family)
                    t = sf.get_tensor(key)
                    seen[key] = t.to(dtype) if t.is_floating_point() else t
        check_complete(seen, expected, str(path))
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


def inspect_checkpoint(path: str | Path, family: str = "auto", dtype: str | torch.dtype = "float32",
                       tokenizer: bool = True, files: Optional[list[tuple[str, int]]] = None,
                       open_file: Optional[Opener] = None) -> CheckpointInfo:
    """Everything a load checks, without the weights. `path` holds config.json and the tokenizer; the
    weight files are read through `open_file(name)` when given (a remote folder), else from `path`."""
    p = resolve_path(path)
    files = files if files is not None else local_files(p)
    open_file = open_file or (lambda name: open(p / name, "rb"))
    cfg = read_config(p, family)
    dt = resolve_dtype(dtype)
    with torch.device("meta"):
        expected = expected_shapes(build_model(cfg))
    names = [n for n, _ in files]
    index = None
    if "model.safetensors.index.json" in names:
        with open_file("model.safetensors.index.json") as f:
            index = json.load(f)
    wnames = weight_names(names, index, str(p))
    sizes = dict(files)
    entries: dict[str, TensorEntry] = {}
    for w in wnames:
        if w not in sizes:
            raise ValueError(f"{p}: weight file {w!r} named in the index is missing")
        with open_file(w) as f:
            header = read_header(f, w)
        for key, e in header.items():
            check_entry(key, e.shape, expected, w, cfg.family)
            if e.end > sizes[w]:
                raise ValueError(f"{w}: truncated (tensor {key!r} ends at byte {e.end}, the file has {sizes[w]})")
            entries[key] = e
    check_complete(entries, expected, str(p))
    if tokenizer:
        load_tokenizer(p)
    elem = torch.empty((), dtype=dt).element_size()
    num_params = sum(math.prod(e.shape) for e in entries.values())
    weight_bytes = sum(math.prod(e.shape) * (elem if e.dtype in FLOAT_DTYPES else DTYPE_BYTES[e.dtype])
                       for e in entries.values())
    return CheckpointInfo(str(p), cfg, num_params, weight_bytes, sum(sizes[w] for w in wnames),
                          fingerprint(files, open_file), tuple(wnames))
