"""Architectures by exact config.json name: `model_type` first, else an `architectures` entry.

Adding a model family is one architecture module (weights + its config reader + `ARCHITECTURE`),
listed here, plus a decoding profile (models/profile.py).
"""
from __future__ import annotations

from typing import Any

from .base import Architecture, DiffusionLM
from .config import ModelConfig
from .dream import ARCHITECTURE as DREAM
from .llada import ARCHITECTURE as LLADA

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLADA, DREAM)}


def architecture_names() -> list[str]:
    return list(ARCHITECTURES)


def detect(cfg: dict[str, Any]) -> Architecture:
    """The architecture registered under config.json's model_type, else under one of its architectures."""
    mt = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for a in ARCHITECTURES.values():
        if mt in a.model_types:
            return a
    for a in ARCHITECTURES.values():
        if any(name in a.architectures for name in archs):
            return a
    known = "; ".join(f"{a.name} (model_type {' / '.join(a.model_types)} or architectures "
                      f"{' / '.join(a.architectures)})" for a in ARCHITECTURES.values())
    raise ValueError(f"config.json: model_type={mt!r} architectures={archs!r} is not a supported architecture; "
                     f"allowed: {known}")


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"model.family={name!r} is not allowed; allowed: auto, {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def model_config(cfg: dict[str, Any], family: str = "auto") -> ModelConfig:
    """config.json (as a dict) -> ModelConfig; family `auto` detects the architecture by name."""
    arch = detect(cfg) if family == "auto" else architecture(family)
    return arch.read_config(cfg)


def build_model(cfg: ModelConfig) -> DiffusionLM:
    """The architecture's module tree for `cfg` (on the current default device; meta for loading)."""
    return ARCHITECTURES[cfg.family].model_class(cfg)
