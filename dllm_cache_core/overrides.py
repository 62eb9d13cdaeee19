"""Dotted `key=value` overrides for nested config dicts, shared by run_job.py and the eval CLI.

`cache.policy=dllm_cache cache.kp=25` sets nested keys. Values are JSON scalars (`25` -> int, `0.9` -> float, `true` -> bool, `null` -> None), YAML
flow lists/maps (`[task, policy]`, `{a: 1}`), and otherwise the text itself. A section with a short form takes a
bare value: `cache=dual` replaces the whole `cache` section with `{policy: dual}` (as the reference
eval CLIs do), so parameters of the previous policy do not leak into the new one.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Iterable

import yaml

SHORT_FORMS: dict[str, str] = {"cache": "policy"}
"""Sections that accept a bare value, and the key that value sets."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3). Raises ValueError with an example when malformed."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. cache.policy=dual)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ValueError(f"override {item!r}: empty key segment (e.g. cache.policy=dual)")
    return parts, parse_value(raw)


def parse_value(raw: str) -> Any:
    """JSON first (so `yes`/`on` stay text, unlike YAML); `[...]`/`{...}` as YAML flow; else the text."""
    try:
        return json.loads(raw)
    except ValueError:
        pass
    if raw.strip().startswith(("[", "{")):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            pass
    return raw


def _expand_short(key: str, value: Any) -> Any:
    if key in SHORT_FORMS and not isinstance(value, dict) and value is not None:
        return {SHORT_FORMS[key]: value}
    return value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A deep copy of `config` with each `dotted.key=value` applied in order."""
    out = copy.deepcopy(config) if config else {}
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            cur = _expand_short(p, node.get(p)) if i == 0 else node.get(p)
            if cur is None:
                cur = {}
            if not isinstance(cur, dict):
                where = ".".join(parts[: i + 1])
                raise ValueError(f"override {item!r}: {where} is {cur!r}, not a section")
            node[p] = cur
            node = cur
        last = parts[-1]
        node[last] = _expand_short(last, value) if len(parts) == 1 else value
    return out


def normalize_short_forms(config: dict[str, Any]) -> dict[str, Any]:
    """Expand short forms written in YAML (`cache: dual`) the same way as on the command line."""
    return {k: _expand_short(k, v) for k, v in config.items()}
