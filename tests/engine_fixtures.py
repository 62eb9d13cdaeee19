"""Shared helpers and fixtures of the engine test suite (test_models/loading/decoding/cache/stats).

Tiny checkpoints are written once per test session into one temporary folder, in the real on-disk
layout (``write_tiny_checkpoint``), and loaded once: the builders below are memoised at module level,
so importing the fixtures into several test modules never rebuilds anything.

Usage in a test module::

    from engine_fixtures import ckpt, load, DECODE_MODELS, ...

(the tests folder is put on sys.path by the small block at the top of each module, so this works
whatever pytest import mode or package layout the suite ends up with).
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from dllm_cache_core import load_model
from dllm_cache_core.cache import policy_names
from dllm_cache_core.models.tiny import write_tiny_checkpoint

# ---------------------------------------------------------------------------------------------
# Checkpoint specs: name -> write_tiny_checkpoint kwargs. d_model 64, 2 layers everywhere.
# rope_theta 10000 for the LLaDA decoding models: with the real 500000 and head_dim 16 almost no
# dimension rotates, every masked position looks the same and a random model writes one token
# over and over, which makes invariance tests toothless.
# ---------------------------------------------------------------------------------------------
SPECS: dict[str, dict[str, Any]] = {
    "llada": dict(family="llada", seed=1, rope_theta=10000.0),                    # MHA, as LLaDA-8B
    "llada_gqa": dict(family="llada", seed=1, rope_theta=10000.0, n_kv_heads=2),  # GQA code path
    # decoding models: LM head scaled up so that confidences spread over (0, 1) (a random head
    # gives ~1/vocab everywhere, and threshold decoding would never commit more than one token)
    "llada_dec": dict(family="llada", seed=1, rope_theta=10000.0, n_kv_heads=2, head_scale=4.0),
    "llada_tied": dict(family="llada", seed=2, weight_tying=True),
    "llada_bias": dict(family="llada", seed=3, include_bias=True),
    "llada_qkv_bias": dict(family="llada", seed=4, include_qkv_bias=True, n_kv_heads=2),
    "llada_sharded": dict(family="llada", seed=5, shards=3),
    "llada_bf16": dict(family="llada", seed=6, dtype=torch.bfloat16),
    "dream": dict(family="dream", seed=1),                                        # GQA 4 q / 2 kv
    "dream_dec": dict(family="dream", seed=1, head_scale=4.0),
    "dream_mha": dict(family="dream", seed=2, num_key_value_heads=4),
    "dream_tied": dict(family="dream", seed=3, tie_word_embeddings=True),
    "dream_sharded": dict(family="dream", seed=5, shards=4),
}

# the checkpoint each family's decoding tests run on
DECODE_MODELS = {"llada": "llada_dec", "dream": "dream_dec"}
FAMILIES = ("llada", "dream")

# prompts of different lengths (byte-level ids, no special tokens)
PROMPTS = [
    [72, 101, 108, 108, 111, 44, 32, 119],
    [84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110],
    [49, 43, 50],
]

_root: Path | None = None


def session_dir() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="dllm_engine_tests_"))
        atexit.register(shutil.rmtree, str(_root), True)
    return _root


@functools.lru_cache(maxsize=None)
def ckpt(name: str) -> Path:
    """Folder of the named tiny checkpoint (written on first use)."""
    spec = dict(SPECS[name])
    head_scale = spec.pop("head_scale", None)
    path = write_tiny_checkpoint(session_dir() / name, **spec)
    if head_scale is not None:
        from safetensors.torch import load_file, save_file

        sd = load_file(str(path / "model.safetensors"))
        head = "model.transformer.ff_out.weight" if spec["family"] == "llada" else "lm_head.weight"
        sd[head] = sd[head] * head_scale
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@functools.lru_cache(maxsize=None)
def load(name: str, dtype: str = "float32"):
    """(model, tokenizer) of the named checkpoint, loaded once per session. Treat as read-only."""
    return load_model(ckpt(name), device="cpu", dtype=dtype)


def decode_model(family: str):
    return load(DECODE_MODELS[family])


def copy_ckpt(name: str, dest: Path) -> Path:
    """A private, writable copy of a checkpoint folder (for tests that corrupt it)."""
    dest = Path(dest)
    shutil.copytree(ckpt(name), dest)
    return dest


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


@functools.lru_cache(maxsize=None)
def forced_token_ckpt(family: str, token: str = "eos", strength: float = 30.0) -> Path:
    """A tiny checkpoint whose LM head strongly prefers one token everywhere.

    Hidden dim 0 is made a constant, positive feature: the embedding column 0 is set to a large
    constant and no layer writes into dim 0 (row 0 of every attention-output and MLP-down weight is
    zeroed), so after the final RMSNorm dim 0 is positive at every position. The LM-head row of the
    chosen token is then `strength` * e_0: its logit dominates every other one.
    token: 'eos' (the config's eos_token_id), 'eot' (the chat end-of-turn token) or 'mask' (the
    mask token itself, which the sampler must never commit).
    """
    from safetensors.torch import load_file, save_file

    base = DECODE_MODELS[family]
    path = session_dir() / f"forced_{family}_{token}_{strength:g}"
    shutil.copytree(ckpt(base), path)
    cfg = read_config(path)
    sd = load_file(str(path / "model.safetensors"))
    if family == "llada":
        emb, head = "model.transformer.wte.weight", "model.transformer.ff_out.weight"
        outs = [k for k in sd if k.endswith("attn_out.weight") or (".blocks." in k and k.endswith("ff_out.weight"))]
        tok_id = {"eos": cfg["eos_token_id"], "mask": cfg["mask_token_id"], "eot": 256 + 5}[token]  # <|eot_id|>
    else:
        emb, head = "model.embed_tokens.weight", "lm_head.weight"
        outs = [k for k in sd if k.endswith("o_proj.weight") or k.endswith("down_proj.weight")]
        tok_id = {"eos": cfg["eos_token_id"], "mask": cfg["mask_token_id"], "eot": 256 + 2}[token]  # <|im_end|>
    assert outs, "no layer output weights found"
    sd[emb][:, 0] = 8.0
    for k in outs:
        sd[k][0, :] = 0.0
    sd[head][tok_id] = 0.0
    sd[head][tok_id, 0] = strength
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@functools.lru_cache(maxsize=None)
def load_forced(family: str, token: str = "eos"):
    return load_model(forced_token_ckpt(family, token), device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------
REQUIRED_POLICIES = ("none", "prefix", "dual")
KNOWN_POLICIES = ("none", "prefix", "dual", "dllm_cache", "d2cache")


def require_policy(name: str) -> None:
    """Every policy of the tables must be registered: a missing one fails its tests."""
    if name not in policy_names():
        raise AssertionError(f"policy {name!r} is not registered: {policy_names()}")


class ForwardRecorder:
    """Counts model forwards and records each forward's input ids (forward pre-hook on the model)."""

    def __init__(self, model: torch.nn.Module, keep_inputs: bool = True):
        self.model, self.keep = model, keep_inputs
        self.inputs: list[torch.Tensor] = []
        self.calls = 0
        self._h = None

    def __enter__(self):
        def hook(mod, args, kwargs):
            self.calls += 1
            ids = args[0] if args else kwargs["input_ids"]
            if self.keep:
                self.inputs.append(ids.detach().clone())

        self._h = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._h.remove()
        return False


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the engine tests: the models are tiny (64-wide matmuls gain nothing from
    threads) and on a busy 2-core machine OpenMP threads contending with other processes make each op
    ~100x slower. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
