"""Per-sample stats and the FLOPs model.

FLOPs model (multiply-add = 2 FLOPs), per row:
- every recomputed position in every layer costs the layer's matmuls:
  2 * (d*q_dim + 2*d*kv_dim + q_dim*d + 3*d*mlp_hidden)                    (``per_token_layer``)
- attention costs 4 * n_heads * head_dim per (query, key) pair per layer (QK^T and AV)  (``per_attn_pair``)
- the LM head costs 2 * d * vocab per row it is applied to (only the rows the sampler reads)
- policy overhead is added by the policy as plain FLOPs (dLLM-Cache's V projection of every response
  token, d2Cache's attention probabilities and rollout).
Padding is never counted. ``flops_vanilla`` prices the same nfe as full forwards over the row's real
sequence, with the same LM-head rows: exactly what policy ``none`` costs for the same schedule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .models.config import ModelConfig


@dataclass
class SampleStats:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    steps: int = 0
    nfe: int = 0
    tokens_per_step: float = 0.0
    token_layers_computed: int = 0
    flops: float = 0.0
    flops_vanilla: float = 0.0
    flops_speedup: float = 1.0
    flops_speedup_total: float = 1.0
    latency_s: float = 0.0
    finish_reason: str = "length"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FlopsModel:
    per_token_layer: float
    per_attn_pair: float
    per_head_row: float
    n_layers: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "FlopsModel":
        d = cfg.d_model
        return cls(
            per_token_layer=2.0 * (d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d + 3 * d * cfg.mlp_hidden),
            per_attn_pair=4.0 * cfg.n_heads * cfg.head_dim,
            per_head_row=2.0 * d * cfg.vocab_size,
            n_layers=cfg.n_layers,
        )

    def full_forward(self, seq_len: torch.Tensor, head_rows: int) -> torch.Tensor:
        """FLOPs of one uncached forward over seq_len real tokens (per row)."""
        L = seq_len.double()
        return self.n_layers * (L * self.per_token_layer + L * L * self.per_attn_pair) + head_rows * self.per_head_row


def _f64(x):
    """A (B,) tensor as float64, a Python number as itself: scalars never become device tensors
    (a host-to-device copy of a scalar would synchronise the step loop with the GPU)."""
    return x.double() if isinstance(x, torch.Tensor) else float(x)


class RowCounters:
    """Per-row counters kept on the device so that the step loop never syncs with the host. Which rows
    a forward is charged to is the step's business (``StepInfo.charge``), never state kept here."""

    def __init__(self, batch: int, device: torch.device, fm: FlopsModel):
        self.fm = fm
        self.token_layers = torch.zeros(batch, dtype=torch.float64, device=device)
        self.flops = torch.zeros(batch, dtype=torch.float64, device=device)

    def forward(self, rows: torch.Tensor, charge: torch.Tensor, q_tokens, keys, head_rows,
                layers: int | None = None, extra=0.0) -> None:
        """Account one forward to `rows` (n,) weighted by `charge` (n,) (1 = the row decodes this step,
        0 = it rides along for a static shape): q_tokens recomputed positions per layer, each attending
        to `keys` keys (scalars or (n,) tensors), over `layers` layers (default all), plus `extra` FLOPs
        of policy overhead."""
        a = charge.double()
        n = self.fm.n_layers if layers is None else layers
        q, k = _f64(q_tokens), _f64(keys)
        self.token_layers.index_add_(0, rows, a * (q * n))
        self.flops.index_add_(0, rows, a * (n * (q * self.fm.per_token_layer + q * k * self.fm.per_attn_pair)
                                            + _f64(head_rows) * self.fm.per_head_row + _f64(extra)))

    def take(self, rows: list[int]) -> tuple[float, float]:
        """(token_layers, flops) summed over `rows` (a decoding row and its CFG twin), then zeroed so
        that the slot's next row starts from nothing."""
        idx = torch.tensor(rows, device=self.flops.device)
        tl, fl = float(self.token_layers[idx].sum()), float(self.flops[idx].sum())
        self.token_layers[idx] = 0
        self.flops[idx] = 0
        return tl, fl


def token_agreement(a: list[int], b: list[int]) -> float:
    """Positions holding the same token, over the longer of the two outputs; 1.0 for two empty ones."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(1 for x, y in zip(a, b) if x == y) / n
