"""Native LLaDA (model_type `llada`, LLaDAModelLM): module names match the HF checkpoint keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiffusionLM
from .config import ModelConfig
from .layers import DecoderLayer, RMSNorm, check_config, gated_mlp, linear


class LLaDABlock(DecoderLayer):
    """`model.transformer.blocks.N`: ff_proj is the GATE (through SiLU), up_proj linear, ff_out down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
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
