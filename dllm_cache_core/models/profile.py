"""Decoding profiles: how a model family decodes, apart from how its weights are laid out.

The decoding loop reads the profile on the model's config (`model.config.profile`) and never a family
name. Loading fills in the tokenizer-derived ids (`with_stop_ids`). Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class DecodingProfile:
    name: str
    """For messages only (`remasking=... is not allowed for llada`)."""
    sampler: str
    """Token choice and confidence rules: a key of decoding.sampling.SAMPLERS."""
    remasking: tuple[str, ...]
    """Allowed GenerationConfig.remasking values; the first is the default."""
    schedule: str
    """The schedule `auto` means: a key of decoding.schedule.SCHEDULES."""
    logit_shift: bool
    """The prediction for position j is read from the output at j - 1 (AR heritage)."""
    commit_first_of_block: bool
    """With several blocks, a block's first forward commits only its first position (Fast-dLLM's
    Dream block sampler); the block's schedule then runs on the remaining steps."""
    threshold_remasking: Optional[str] = None
    """Confidence that threshold and certainty-prior decoding rank by (None = `remasking`)."""
    eot_tokens: tuple[str, ...] = ()
    """The chat template's end-of-turn token(s); with EOS they are the default stop tokens."""
    mask_id: int = -1
    eos_id: int = -1
    eot_id: Optional[int] = None
    stop_ids: tuple[int, ...] = ()
    """EOS plus the end-of-turn tokens the tokenizer has (set by loading; (eos_id,) without one)."""

    @property
    def default_remasking(self) -> str:
        return self.remasking[0]

    def with_ids(self, mask_id: int, eos_id: int) -> "DecodingProfile":
        """The profile for a config's mask and EOS ids; stop ids until a tokenizer is known: EOS."""
        return replace(self, mask_id=mask_id, eos_id=eos_id, eot_id=None, stop_ids=(eos_id,))

    def with_stop_ids(self, stop_ids: tuple[int, ...]) -> "DecodingProfile":
        eot = [t for t in stop_ids if t != self.eos_id]
        return replace(self, stop_ids=tuple(stop_ids), eot_id=eot[0] if eot else None)


LLADA = DecodingProfile(
    name="llada", sampler="llada", remasking=("low_confidence", "random"), schedule="llada",
    logit_shift=False, commit_first_of_block=False, eot_tokens=("<|eot_id|>",))
DREAM = DecodingProfile(
    name="dream", sampler="dream", remasking=("entropy", "maskgit_plus", "topk_margin", "origin"),
    schedule="dream", logit_shift=True, commit_first_of_block=True, threshold_remasking="maskgit_plus",
    eot_tokens=("<|im_end|>",))
PROFILES: dict[str, DecodingProfile] = {p.name: p for p in (LLADA, DREAM)}
