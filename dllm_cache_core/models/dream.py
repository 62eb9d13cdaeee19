"""Native Dream (model_type `Dream`): the Qwen2 layout with bidirectional attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import Any

from .base import Architecture, DiffusionLM
from .config import ModelConfig, check_heads, positive, size, token_id, with_profile
from .layers import DecoderLayer, RMSNorm, check_config, gated_mlp, linear
from .profile import DREAM


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


def dream_config(cfg: dict[str, Any]) -> ModelConfig:
    d = size(cfg, "hidden_size", "d_model")
    n_heads = size(cfg, "num_attention_heads", "n_heads")
    n_kv = size(cfg, "num_key_value_heads", "n_heads", default=n_heads)
    head_dim = size(cfg, "head_dim", "head_dim") if cfg.get("head_dim") is not None else None
    head_dim = check_heads(d, n_heads, n_kv, head_dim, ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    vocab = size(cfg, "vocab_size", "vocab")
    return with_profile(ModelConfig(
        family="dream", vocab_size=vocab, d_model=d,
        n_layers=size(cfg, "num_hidden_layers", "n_layers"), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, mlp_hidden=size(cfg, "intermediate_size", "mlp_hidden"),
        rope_theta=positive(cfg, "rope_theta", 10000.0), rms_eps=positive(cfg, "rms_norm_eps", 1e-6),
        qkv_bias=True, out_bias=False, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mask_id=token_id(cfg, "mask_token_id", vocab), eos_id=token_id(cfg, "eos_token_id", vocab),
        pad_id=token_id(cfg, "pad_token_id", vocab, required=False),
        max_len=size(cfg, "max_position_embeddings", "max_len", default=32768),
        rope_fp32=False, profile=DREAM, raw=cfg,
    ))


ARCHITECTURE = Architecture(name="dream", model_types=("Dream",), architectures=("DreamModel",),
                            read_config=dream_config, model_class=DreamModel, profile=DREAM)
