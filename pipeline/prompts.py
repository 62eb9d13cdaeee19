"""One row's engine input: the prompt text or the chat messages, checked, and the hash of it.

`input_hash` is what resume compares to find rows whose input changed since they were written; it
covers exactly what the model is given (the text, or each message's role and content), so the same
input gives the same hash whatever the file format (a JSONL string of JSON, a JSONL list, a Parquet
list of structs) or extra keys beside role and content.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

INPUT_HASH_HEX = 32
"""Hex digits of SHA-256 kept in `input_hash` (128 bits)."""


def _text(v: Any, what: str) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not valid UTF-8") from None
    if not isinstance(v, str):
        raise ValueError(f"{what} is {type(v).__name__}, expected a string")
    return v


def normalize_messages(value: Any) -> list[dict[str, str]]:
    """Chat messages as [{role, content}] with text values; ValueError says what is wrong."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(_text(value, "messages"))
        except json.JSONDecodeError as e:
            raise ValueError(f"messages is text but not JSON ({e.msg})") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"messages is {type(value).__name__}, expected a list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] is not a {{role, content}} mapping")
        out.append({"role": _text(m["role"], f"messages[{i}].role"),
                    "content": _text(m["content"], f"messages[{i}].content")})
    return out


def prompt_of(row_value: Any, is_messages: bool) -> Any:
    """The engine input for one row; ValueError for malformed input (-> error_type bad_input)."""
    if row_value is None:
        return None  # the engine reports empty_prompt
    if is_messages:
        return normalize_messages(row_value)
    if isinstance(row_value, bytes):
        return _text(row_value, "prompt")
    return row_value  # strings, and anything else for the engine to judge


def prompt_length(p: Any) -> int:
    """Characters, as a cheap proxy for tokens when grouping rows by length."""
    if isinstance(p, str):
        return len(p)
    if isinstance(p, list):
        return sum(len(m.get("content", "")) for m in p if isinstance(m, dict))
    return 0


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=repr).encode("utf-8", "surrogatepass")


def input_hash(row_value: Any, is_messages: bool) -> str:
    """SHA-256 (first 32 hex digits) of the canonical JSON (sorted keys, no spaces, UTF-8) of
    `{"prompt": text}` or `{"messages": [{"role", "content"}, ...]}`; input the engine would refuse
    is hashed as it was read (`{"raw": value}`, bytes as hex), so editing it is noticed too."""
    try:
        key = prompt_of(row_value, is_messages)
        obj = {"messages" if is_messages else "prompt": key} if (key is None or isinstance(key, (str, list))) else None
    except ValueError:
        obj = None
    if obj is None:
        obj = {"raw": row_value.hex() if isinstance(row_value, bytes) else row_value}
    return hashlib.sha256(_canonical(obj)).hexdigest()[:INPUT_HASH_HEX]
