"""The README cannot rot: its policy section is what the policy declarations generate, and its
Python example runs as written on the embedded model and prints the output shown under it."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from dllm_cache_core.cache.registry import markdown

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def fenced_after(marker: str) -> str:
    """The body of the first fenced block after the HTML comment `marker`."""
    m = re.search(re.escape(f"<!-- {marker} -->") + r"\s*```\w*\n(.*?)```", README, re.S)
    assert m, f"no fenced block after <!-- {marker} --> in README.md"
    return m.group(1)


def test_policy_section_is_generated_from_the_declarations():
    m = re.search(r"<!-- policy-table: [^>]*-->\n(.*?)\n<!-- /policy-table -->", README, re.S)
    assert m, "no policy table in README.md"
    assert m.group(1) == markdown(), "README policy table is stale: paste `python -m dllm_cache_core.cache`"


def test_python_example_runs_and_prints_what_the_readme_shows():
    code = fenced_after("readme-example")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
    assert out.getvalue() == fenced_after("readme-output")
