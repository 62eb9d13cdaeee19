"""Policy name -> class, discovered: every module of this package that defines a CachePolicy
subclass with a declaration, plus the modules or classes of the `dllm_cache.policies` entry-point
group (third-party policies). `register` adds a class at run time.

Policy modules never import this one (they only declare), so discovery cannot form an import cycle.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from .base import CachePolicy
from .params import PolicyDecl

ENTRY_POINT_GROUP = "dllm_cache.policies"
_POLICIES: dict[str, type[CachePolicy]] = {}
_DISCOVERED = False


def register(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Make `cls` usable by its declared name (also a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, CachePolicy)) or not cls.decl.name:
        raise TypeError(f"{cls!r} is not a CachePolicy subclass with a name")
    _POLICIES[cls.decl.name] = cls
    return cls


def policies_in(module: ModuleType) -> list[type[CachePolicy]]:
    """The named CachePolicy subclasses defined in `module` (not the ones it imports)."""
    return [v for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, CachePolicy) and v.__module__ == module.__name__
            and v.decl.name]


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    found: list[type[CachePolicy]] = []
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        if not info.name.startswith("_"):
            found += policies_in(importlib.import_module(f"{__package__}.{info.name}"))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        found += policies_in(obj) if isinstance(obj, ModuleType) else [obj]
    for cls in sorted(found, key=lambda c: (c.decl.order, c.decl.name)):
        _POLICIES.setdefault(cls.decl.name, cls)


def _ordered() -> list[type[CachePolicy]]:
    _discover()
    return sorted(_POLICIES.values(), key=lambda c: (c.decl.order, c.decl.name))


def policy_names() -> list[str]:
    return [c.decl.name for c in _ordered()]


def declarations() -> list[PolicyDecl]:
    return [c.decl for c in _ordered()]


def param_names() -> list[str]:
    """Every declared parameter name, over all policies (the flat CacheConfig keys besides policy)."""
    return list(dict.fromkeys(p.name for d in declarations() for p in d.params))


def policy_class(name: str) -> type[CachePolicy]:
    _discover()
    if name not in _POLICIES:
        raise ValueError(f"cache.policy={name!r} is not allowed; allowed: {', '.join(policy_names())}")
    return _POLICIES[name]


def policy_decl(name: str) -> PolicyDecl:
    return policy_class(name).decl


def validate_cache_config(policy: str, given: dict[str, Any]) -> None:
    """Unknown policy, a parameter of another policy or a value out of range: a ValueError naming it
    and the allowed ones."""
    policy_decl(policy).check(given)


def markdown_table() -> str:
    """The README's policy table, from the declarations."""
    rows = ["| policy | parameters (default) | what is reused | exact when |", "|---|---|---|---|"]
    for d in declarations():
        params = ", ".join(f"{p.name} ({p.default_text()})" for p in d.params) or "—"
        rows.append(f"| `{d.name}` | {params} | {d.reuses} | {d.exact_when} |")
    return "\n".join(rows)


def markdown_params() -> str:
    """Every parameter with its allowed values and doc (README, under the table)."""
    out = []
    for d in declarations():
        for p in d.params:
            out.append(f"- `{d.name}.{p.name}`: {p.allowed()}; {p.doc}")
    return "\n".join(out)


def markdown() -> str:
    """The README's policy section body: the table, then every parameter's range and doc."""
    return markdown_table() + "\n\nParameters:\n\n" + markdown_params()
