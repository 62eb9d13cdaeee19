"""What decoding returns for one row (its own module: the runner builds it, generate() returns it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..stats import SampleStats


@dataclass
class GenerationOutput:
    token_ids: list[int]
    """Generated tokens only; ends before the first stop token when stop_at_eos."""
    stats: SampleStats
