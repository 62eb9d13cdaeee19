"""One family-agnostic model config, read from each architecture's own config.json field names.

Sizes are checked here, before anything is allocated: a zero, negative or absurd size in config.json
is an error naming the field, not an out-of-memory crash or a silent empty tensor later.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .profile import DecodingProfile

MAX_SIZES: dict[str, int] = {
    "vocab": 1 << 22, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024, "head_dim": 1024,
    "mlp_hidden": 1 << 20, "mlp_ratio": 64, "max_len": 1 << 24,
}
"""Sane maxima (several times the largest released models'); a config beyond them is refused."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    """The architecture's registry name (`llada`, `dream`): picks the module tree (parameter names)."""
    vocab_size: int
    """Rows of the embedding and LM head (LLaDA: embedding_size, padded)."""
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool
    """Bias on q/k/v projections (Dream: always; LLaDA: include_bias or include_qkv_bias)."""
    out_bias: bool
    """Bias on the attention output and MLP projections (LLaDA include_bias)."""
    tie_embeddings: bool
    mask_id: int
    eos_id: int
    pad_id: int | None
    max_len: int
    rope_fp32: bool
    """LLaDA rotates q/k in fp32; Dream casts cos/sin to the activation dtype first."""
    profile: DecodingProfile
    """How this model decodes (sampler, remasking, schedule, logit shift, mask/stop/eot ids)."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def with_stop_ids(self, stop_ids: tuple[int, ...]) -> "ModelConfig":
        return replace(self, profile=self.profile.with_stop_ids(stop_ids))


def need(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    return cfg[key]


def size(cfg: dict[str, Any], key: str, limit: str, default: Any = None) -> int:
    """A positive integer field of config.json, at most MAX_SIZES[limit]; `default` when absent."""
    v = need(cfg, key) if default is None else cfg.get(key)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ValueError(f"config.json: {key}={v!r} is not allowed; allowed: a positive integer")
    v = int(v)
    if v <= 0:
        raise ValueError(f"config.json: {key}={v} is not allowed; allowed: a positive integer")
    if v > MAX_SIZES[limit]:
        raise ValueError(f"config.json: {key}={v} is not allowed; allowed: at most {MAX_SIZES[limit]}")
    return v


def first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def token_id(cfg: dict[str, Any], key: str, vocab: int, required: bool = True) -> int | None:
    """A token id field (an int or a list, the first counts), inside the vocabulary."""
    v = first_id(need(cfg, key) if required else cfg.get(key))
    if v is not None and not 0 <= v < vocab:
        raise ValueError(f"config.json: {key}={v} is not allowed; allowed: 0 <= id < {vocab} (the vocabulary)")
    return v


def check_heads(d_model: int, n_heads: int, n_kv: int, head_dim: int | None, keys: tuple[str, str, str]) -> int:
    """The head dim (d_model // n_heads unless given); n_kv must divide n_heads."""
    if head_dim is None and d_model % n_heads:
        raise ValueError(f"config.json: {keys[0]}={d_model} must be divisible by {keys[1]}={n_heads}")
    if n_heads % n_kv:
        raise ValueError(f"config.json: {keys[1]}={n_heads} must be a multiple of {keys[2]}={n_kv}")
    return head_dim or d_model // n_heads


def positive(cfg: dict[str, Any], key: str, default: float) -> float:
    v = float(cfg.get(key, default))
    if not v > 0:
        raise ValueError(f"config.json: {key}={v} is not allowed; allowed: a positive number")
    return v


def with_profile(cfg: ModelConfig) -> ModelConfig:
    """The config with its profile's ids filled in from the config (stop ids: EOS until a tokenizer)."""
    return replace(cfg, profile=cfg.profile.with_ids(cfg.mask_id, cfg.eos_id))
