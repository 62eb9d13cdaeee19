"""The model contract every family implements: embed -> layers -> head, with a pluggable layer loop.

Cache policies never subclass models: they pass ``layer_fn`` to ``forward`` and use the layer API
(``attn_in``, ``qkv``, ``attn_proj``, ``ffn``) plus ``rope`` / ``apply_rope`` / ``attend``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from .config import ModelConfig
from .profile import DecodingProfile
from .layers import DecoderLayer, apply_rope, attend, rope_tables

# layer_fn(layer_index, layer, h, cos, sin) -> h
LayerFn = Callable[[int, DecoderLayer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# kv(k, v) -> (K, V): what the layer's queries attend to
KVHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# attend(q, K, V, mask) -> attention output in q's layout
AttendHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class LayerOut(NamedTuple):
    h: torch.Tensor
    """The layer's output residual stream."""
    q: torch.Tensor
    K: torch.Tensor
    V: torch.Tensor
    """Rotated queries, and the keys/values they attended to."""
    attn: torch.Tensor
    mlp: torch.Tensor
    """Sublayer outputs (attention after its output projection; MLP)."""


class DiffusionLM(nn.Module):
    config: ModelConfig

    @property
    def default_stop_ids(self) -> tuple[int, ...]:
        """EOS plus the chat template's end-of-turn token (from the decoding profile)."""
        return self.config.profile.stop_ids

    @property
    def eot_id(self) -> Optional[int]:
        return self.config.profile.eot_id

    # -- family hooks -------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, on only the rows the caller needs."""
        raise NotImplementedError

    # -- shared numerics -----------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta)

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin, self.config.head_dim, self.config.rope_fp32)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
        return attend(q, k, v, self.config.head_dim, mask)

    def layer(self, layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: Optional[torch.Tensor], kv: Optional[KVHook] = None,
              attend: Optional[AttendHook] = None) -> LayerOut:
        """The transformer layer body, written once for every caller: h's positions are the queries;
        `kv(k, v)` (rotated keys and values of those positions) returns the keys/values they attend to,
        e.g. after writing them into a cache (default: attend to themselves). `attend(q, K, V, mask)`
        replaces the attention call (e.g. queries packed across rows, attended per row)."""
        q, k, v = layer.qkv(layer.attn_in(h))
        q, k = self.apply_rope(q, cos, sin), self.apply_rope(k, cos, sin)
        K, V = (k, v) if kv is None else kv(k, v)
        attn = layer.attn_proj((attend or self.attend)(q, K, V, mask))
        h = h + attn
        mlp = layer.ffn(h)
        return LayerOut(h + mlp, q, K, V, attn, mlp)

    def layer_full(self, layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One uncached layer over all of h's positions; also returns its rotated K and V."""
        out = self.layer(layer, h, cos, sin, mask)
        return out.h, out.K, out.V

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, layer_fn: Optional[LayerFn] = None,
                out_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, n_out, V). attn_mask: (B, 1, 1|n, L) bool, True = may attend; None = all.

        out_index (B, n_out) picks the hidden rows that go through the LM head (default: all).
        """
        B, n = input_ids.shape
        if positions is None:
            positions = torch.arange(n, device=input_ids.device).expand(B, n)
        h = self.embed(input_ids)
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.layers):
            if layer_fn is None:
                h = self.layer_full(layer, h, cos, sin, attn_mask)[0]
            else:
                h = layer_fn(i, layer, h, cos, sin)
        if out_index is not None:
            h = h.gather(1, out_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.head(h)


@dataclass(frozen=True)
class Architecture:
    """A weight layout, registered under the exact config.json names that select it."""

    name: str
    model_types: tuple[str, ...]
    """Exact `model_type` values."""
    architectures: tuple[str, ...]
    """Exact `architectures` entries (used when model_type is absent or unknown)."""
    read_config: Callable[[dict[str, Any]], ModelConfig]
    """config.json -> ModelConfig (with its decoding profile)."""
    model_class: type[DiffusionLM]
    profile: DecodingProfile
    """The decoding profile its configs carry."""
