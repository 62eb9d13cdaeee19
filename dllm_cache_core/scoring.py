"""Answer scorers shared by evaluation jobs and the eval harness (pure Python: no Ray, no torch).

Each scorer maps (generation, reference) -> Score(score in {0.0, 1.0}, extracted answer or None).
- exact:    the generation, whitespace-collapsed and case-folded, equals the reference likewise.
- gsm8k:    the numeric answer: after the last '####' if present, else after the last 'answer is',
            else the last number in the text; the reference is parsed the same way (GSM8K references
            end in '#### 72'); numbers compare after removing ',', '$' and a trailing '.'.
- regex:    group 1 of the last match of `pattern` (the whole match if it has no group) compared
            like exact.
- contains: the normalised reference occurs in the normalised generation.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["Score", "get_scorer", "SCORERS", "extract_number", "normalize_text"]

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?|-?[$]?\.\d+")


@dataclass(frozen=True)
class Score:
    score: float
    """1.0 correct, 0.0 wrong."""
    extracted: Optional[str]
    """The answer the scorer read from the generation (None when it found none)."""


def normalize_text(s: str) -> str:
    return " ".join(s.split()).casefold()


def _to_float(token: str) -> Optional[float]:
    t = token.replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def extract_number(text: str) -> Optional[str]:
    """The GSM8K-style numeric answer of `text` as a plain number string ('1,234.0' -> '1234'), or None."""
    for marker in ("####", "answer is"):
        idx = text.lower().rfind(marker)
        if idx >= 0:
            found = _NUMBER.findall(text[idx + len(marker):])
            if found:
                return _canonical(found[0])
    found = _NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def _canonical(token: str) -> Optional[str]:
    v = _to_float(token)
    if v is None:
        return None
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def score_exact(generation: str, reference: str) -> Score:
    g = normalize_text(generation)
    return Score(float(g == normalize_text(reference)), g)


def score_gsm8k(generation: str, reference: str) -> Score:
    got = extract_number(generation)
    want = extract_number(reference)
    ok = got is not None and want is not None and math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)
    return Score(float(ok), got)


def score_contains(generation: str, reference: str) -> Score:
    ref = normalize_text(reference)
    found = bool(ref) and ref in normalize_text(generation)
    return Score(float(found), ref if found else None)


def make_regex_scorer(pattern: str) -> Callable[[str, str], Score]:
    rx = re.compile(pattern)

    def score_regex(generation: str, reference: str) -> Score:
        matches = list(rx.finditer(generation))
        if not matches:
            return Score(0.0, None)
        m = matches[-1]
        got = m.group(1) if rx.groups else m.group(0)
        if got is None:
            return Score(0.0, None)
        return Score(float(normalize_text(got) == normalize_text(reference)), got)

    return score_regex


SCORERS = ("exact", "gsm8k", "regex", "contains")


def get_scorer(name: str, pattern: Optional[str] = None) -> Callable[[str, str], Score]:
    """The scorer called `name`; ValueError names the allowed ones."""
    if name == "exact":
        return score_exact
    if name == "gsm8k":
        return score_gsm8k
    if name == "contains":
        return score_contains
    if name == "regex":
        if not pattern:
            raise ValueError("scorer 'regex' needs a pattern")
        return make_regex_scorer(pattern)
    raise ValueError(f"scorer={name!r} is not allowed; allowed: {', '.join(SCORERS)}")


def score_row(scorer: Callable[[str, str], Score], generation: Optional[str], reference) -> Score | None:
    """None when there is nothing to score (error row, or no reference); references may be numbers."""
    if generation is None or reference is None:
        return None
    return scorer(generation, str(reference))
