"""Native LLaDA (model_type `llada`, LLaDAModelLM): module names match the HF checkpoint keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import Any

from .base import Architecture, DiffusionLM
from .config import MAX_SIZES, ModelConfig, check_heads, positive, size, token_id, with_profile
from .layers import DecoderLayer, RMSNorm, check_config, gated_mlp, linear
from .profile import LLADA

MAX_HIDDEN = MAX_SIZES["mlp_hidden"]


class LLaDABlock(DecoderLayer):
    """`model.transformer.blocks.N`: ff_proj is the GATE (through SiLU), up_proj linear, ff_out down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.q_proj = linear(cfg.d_model, cfg.q_dim, cfg.qkv_bias)
        self.k_proj = linear(cfg.d_model, cfg.kv_dim, cfg.qkv_bias)
        self.v_proj = linear(cfg.d_model, cfg.kv_dim, cfg.qkv_bias)
        self.attn_out = linear(cfg.q_dim, cfg.d_model, cfg.out_bias)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.ff_proj = linear(cfg.d_model, cfg.mlp_hidden, cfg.out_bias)
        self.up_proj = linear(cfg.d_model, cfg.mlp_hidden, cfg.out_bias)
        self.ff_out = linear(cfg.mlp_hidden, cfg.d_model, cfg.out_bias)

    def attn_in(self, h):
        return self.attn_norm(h)

    def attn_proj(self, o):
        return self.attn_out(o)

    def qkv(self, hn):
        return self.q_proj(hn), self.k_proj(hn), self.v_proj(hn)

    def v_only(self, hn):
        return self.v_proj(hn)

    def ffn(self, h):
        return gated_mlp(self.ff_norm(h), self.ff_proj, self.up_proj, self.ff_out)


class _Core(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = nn.ModuleDict({
            "wte": nn.Embedding(cfg.vocab_size, cfg.d_model),
            "blocks": nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
            "ln_f": RMSNorm(cfg.d_model, cfg.rms_eps),
        })
        if not cfg.tie_embeddings:
            t["ff_out"] = linear(cfg.d_model, cfg.vocab_size, cfg.out_bias)
        self.transformer = t


class LLaDAModelLM(DiffusionLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.model = _Core(cfg)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](ids)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        h = t["ln_f"](h)
        if self.config.tie_embeddings:
            return F.linear(h, t["wte"].weight)
        return t["ff_out"](h)


def llada_config(cfg: dict[str, Any]) -> ModelConfig:
    act = cfg.get("activation_type", "silu")
    if act != "silu":
        raise ValueError(f"config.json: activation_type={act!r} is not supported; allowed: silu")
    d = size(cfg, "d_model", "d_model")
    n_heads = size(cfg, "n_heads", "n_heads")
    n_kv = size(cfg, "n_kv_heads", "n_heads", default=n_heads)
    head_dim = check_heads(d, n_heads, n_kv, None, ("d_model", "n_heads", "n_kv_heads"))
    if cfg.get("mlp_hidden_size") is not None:
        hidden = size(cfg, "mlp_hidden_size", "mlp_hidden")
    else:
        hidden = size(cfg, "mlp_ratio", "mlp_ratio", default=4) * d
        if hidden > MAX_HIDDEN:
            raise ValueError(f"config.json: mlp_ratio x d_model = {hidden} is not allowed; allowed: at most {MAX_HIDDEN}")
    key = "embedding_size" if cfg.get("embedding_size") is not None else "vocab_size"
    vocab = size(cfg, key, "vocab")
    include_bias = bool(cfg.get("include_bias", False))
    return with_profile(ModelConfig(
        family="llada", vocab_size=vocab, d_model=d, n_layers=size(cfg, "n_layers", "n_layers"),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, mlp_hidden=hidden,
        rope_theta=positive(cfg, "rope_theta", 10000.0), rms_eps=positive(cfg, "rms_norm_eps", 1e-5),
        qkv_bias=include_bias or bool(cfg.get("include_qkv_bias", False)), out_bias=include_bias,
        tie_embeddings=bool(cfg.get("weight_tying", False)),
        mask_id=token_id(cfg, "mask_token_id", vocab), eos_id=token_id(cfg, "eos_token_id", vocab),
        pad_id=token_id(cfg, "pad_token_id", vocab, required=False),
        max_len=size(cfg, "max_sequence_length", "max_len", default=4096),
        rope_fp32=True, profile=LLADA, raw=cfg,
    ))


ARCHITECTURE = Architecture(name="llada", model_types=("llada",), architectures=("LLaDAModelLM",),
                            read_config=llada_config, model_class=LLaDAModelLM, profile=LLADA)
