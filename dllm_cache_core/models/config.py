"""One family-agnostic model config, read from each family's own config.json field names."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("llada", "dream")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    """`llada` or `dream`: picks the module tree (parameter names) and the numerics."""
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
    logit_shift: bool
    """Dream reads the prediction for position j from the output at j-1 (AR heritage)."""
    rope_fp32: bool
    """LLaDA rotates q/k in fp32; Dream casts cos/sin to the activation dtype first."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def detect_family(cfg: dict[str, Any]) -> str:
    mt = str(cfg.get("model_type", "")).lower()
    archs = [str(a).lower() for a in cfg.get("architectures", []) or []]
    if mt == "llada" or any("llada" in a for a in archs):
        return "llada"
    if mt == "dream" or any("dream" in a for a in archs):
        return "dream"
    raise ValueError(
        f"config.json: model_type={cfg.get('model_type')!r} architectures={cfg.get('architectures')!r} "
        f"is not a supported family; allowed: {', '.join(FAMILIES)}"
    )


def _need(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    return cfg[key]


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def llada_config(cfg: dict[str, Any]) -> ModelConfig:
    act = cfg.get("activation_type", "silu")
    if act != "silu":
        raise ValueError(f"config.json: activation_type={act!r} is not supported; allowed: silu")
    d = int(_need(cfg, "d_model"))
    n_heads = int(_need(cfg, "n_heads"))
    n_kv = int(cfg.get("n_kv_heads") or n_heads)
    hidden = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d
    vocab = int(cfg.get("embedding_size") or _need(cfg, "vocab_size"))
    include_bias = bool(cfg.get("include_bias", False))
    return ModelConfig(
        family="llada", vocab_size=vocab, d_model=d, n_layers=int(_need(cfg, "n_layers")),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=d // n_heads, mlp_hidden=int(hidden),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=include_bias or bool(cfg.get("include_qkv_bias", False)), out_bias=include_bias,
        tie_embeddings=bool(cfg.get("weight_tying", False)),
        mask_id=int(_need(cfg, "mask_token_id")), eos_id=int(_need(cfg, "eos_token_id")),
        pad_id=_first_id(cfg.get("pad_token_id")), max_len=int(cfg.get("max_sequence_length", 4096)),
        logit_shift=False, rope_fp32=True, raw=cfg,
    )


def dream_config(cfg: dict[str, Any]) -> ModelConfig:
    d = int(_need(cfg, "hidden_size"))
    n_heads = int(_need(cfg, "num_attention_heads"))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    return ModelConfig(
        family="dream", vocab_size=int(_need(cfg, "vocab_size")), d_model=d,
        n_layers=int(_need(cfg, "num_hidden_layers")), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=int(cfg.get("head_dim") or d // n_heads), mlp_hidden=int(_need(cfg, "intermediate_size")),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=True, out_bias=False, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mask_id=int(_need(cfg, "mask_token_id")), eos_id=int(_first_id(_need(cfg, "eos_token_id"))),
        pad_id=_first_id(cfg.get("pad_token_id")),
        max_len=int(cfg.get("max_position_embeddings", 32768)),
        logit_shift=True, rope_fp32=False, raw=cfg,
    )


def model_config(cfg: dict[str, Any], family: str = "auto") -> ModelConfig:
    fam = detect_family(cfg) if family == "auto" else family
    if fam not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not allowed; allowed: auto, {', '.join(FAMILIES)}")
    return llada_config(cfg) if fam == "llada" else dream_config(cfg)
