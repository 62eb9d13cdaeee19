"""Native Dream (model_type `Dream`): the Qwen2 layout with bidirectional attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiffusionLM
from .config import ModelConfig
from .layers import DecoderLayer, RMSNorm, check_config, gated_mlp, linear


class _Attn(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.q_proj = linear(cfg.d_model, cfg.q_dim, True)
        self.k_proj = linear(cfg.d_model, cfg.kv_dim, True)
        self.v_proj = linear(cfg.d_model, cfg.kv_dim, True)
        self.o_proj = linear(cfg.q_dim, cfg.d_model, False)


class _MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = linear(cfg.d_model, cfg.mlp_hidden, False)
        self.up_proj = linear(cfg.d_model, cfg.mlp_hidden, False)
        self.down_proj = linear(cfg.mlp_hidden, cfg.d_model, False)


class DreamLayer(DecoderLayer):
    """`model.layers.N`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.self_attn = _Attn(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)

    def attn_in(self, h):
        return self.input_layernorm(h)

    def qkv(self, hn):
        a = self.self_attn
        return a.q_proj(hn), a.k_proj(hn), a.v_proj(hn)

    def v_only(self, hn):
        return self.self_attn.v_proj(hn)

    def attn_proj(self, o):
        return self.self_attn.o_proj(o)

    def ffn(self, h):
        m = self.mlp
        return gated_mlp(self.post_attention_layernorm(h), m.gate_proj, m.up_proj, m.down_proj)


class _Core(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DreamLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)


class DreamModel(DiffusionLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.model = _Core(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = linear(cfg.d_model, cfg.vocab_size, False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        if self.config.tie_embeddings:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)
