"""Policy name -> class. A policy registers itself with @register; CacheConfig validates against this."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import CachePolicy

_POLICIES: dict[str, type["CachePolicy"]] = {}
_LOADED = False


def register(cls: type["CachePolicy"]) -> type["CachePolicy"]:
    _POLICIES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        # each file registers itself; this order is the order error messages list them in
        from . import none, prefix, dual, dllm_cache, d2cache  # noqa: F401,I001


def policy_names() -> list[str]:
    _load_builtin()
    return list(_POLICIES)


def policy_class(name: str) -> type["CachePolicy"]:
    _load_builtin()
    if name not in _POLICIES:
        raise ValueError(f"cache.policy={name!r} is not allowed; allowed: {', '.join(_POLICIES)}")
    return _POLICIES[name]


def validate_cache_config(cfg: Any) -> None:
    """Unknown policy, or a parameter of another policy, is an error naming it and the allowed ones."""
    from ..config import _FLAT

    cls = policy_class(cfg.policy)
    given = {k: getattr(cfg, k) for k in _FLAT if getattr(cfg, k) is not None}
    given.update(cfg.extra)
    for k, v in given.items():
        if k not in cls.defaults:
            allowed = ", ".join(cls.defaults) or "none"
            raise ValueError(f"cache.{k} is not a parameter of policy {cfg.policy!r}; its parameters: {allowed}")
        cls.check_param(k, v)
