"""Evaluation scorers (shared with the eval harness; importable without Ray)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dllm_cache_core.scoring import extract_number, get_scorer, score_row


@pytest.mark.parametrize("text,want", [
    ("Janet has 3 eggs... #### 18", "18"),
    ("so the answer is $1,234.", "1234"),
    ("The answer is 7.50 dollars", "7.5"),
    ("first 3 then 4 and finally 12", "12"),
    ("-5 degrees", "-5"),
    ("no number here", None),
    ("#### 72\nthen 99", "72"),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_gsm8k_scorer_against_gsm8k_reference():
    s = get_scorer("gsm8k")
    assert s("Step 1... The answer is 72.", "Natalia sold 48/2 = 24 clips...\n#### 72").score == 1.0
    r = s("I think it is 71", "#### 72")
    assert r.score == 0.0 and r.extracted == "71"
    assert s("no idea", "72").score == 0.0 and s("no idea", "72").extracted is None
    assert s("1,000", "1000").score == 1.0


def test_exact_contains_regex():
    exact = get_scorer("exact")
    assert exact("  Paris \n", "paris").score == 1.0
    assert exact("Paris, France", "paris").score == 0.0
    contains = get_scorer("contains")
    assert contains("The capital is Paris.", "paris").score == 1.0
    assert contains("London", "paris").score == 0.0
    assert contains("anything", "").score == 0.0  # an empty reference never matches
    rx = get_scorer("regex", r"answer:\s*(\w+)")
    r = rx("answer: no ... answer: Yes", "yes")
    assert r.score == 1.0 and r.extracted == "Yes"
    assert rx("nothing", "yes").extracted is None
    assert get_scorer("regex", r"\d+")("a 12 b 34", "34").score == 1.0  # no group: whole last match


def test_score_row_skips_error_rows_and_missing_references():
    s = get_scorer("exact")
    assert score_row(s, None, "x") is None
    assert score_row(s, "x", None) is None
    assert score_row(s, "42", 42).score == 1.0  # numeric references compare as text


def test_unknown_scorer_names_allowed():
    with pytest.raises(ValueError, match="allowed: exact, gsm8k, regex, contains"):
        get_scorer("bleu")


def test_scoring_imports_without_ray():
    code = ("import sys; import dllm_cache_core.scoring, pipeline.spec, dllm_cache_core.overrides; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
