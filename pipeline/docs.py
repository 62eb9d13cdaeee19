"""The configuration reference (docs/config.md), rendered from the pydantic models themselves.

Every row comes from a field's definition: its type, default and bounds, and its docstring (the spec's
sections turn attribute docstrings into field descriptions). Generation and cache fields that have no
docstring of their own mirror the engine's `GenerationConfig` / `CacheConfig`, whose docstrings are
used. So a field added, renamed or re-documented in the spec changes the reference, and the test that
compares docs/config.md with `render()` fails until it is regenerated:

    python -m pipeline.docs            # rewrite docs/config.md
    python -m pipeline.docs --check    # exit 1 when docs/config.md is out of date
"""
from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string right after `name: type = ...`) of a class; {} without source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[node.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def _mirrors() -> dict[type, type]:
    """Spec sections that mirror an engine config: their undocumented fields take the engine's docstring."""
    from dllm_cache_core.config import CacheConfig, GenerationConfig

    from .spec import CacheSpec, GenerationSpec

    return {GenerationSpec: GenerationConfig, CacheSpec: CacheConfig}


def _section(ann: Any) -> Optional[type[BaseModel]]:
    """The section model of a field (also inside Optional[...]), or None."""
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def type_text(ann: Any) -> str:
    """A short reader's name for a field's type: `int or null`, `one of a, b`, `list of int`."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in inner)
        return text + " or null" if len(inner) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        return "list of " + type_text(args[0]) if args else "list"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    return f"`{v}`"


def default_text(f: FieldInfo) -> str:
    if f.default_factory is not None:
        return "(below)" if _section(f.annotation) else _value(f.default_factory())
    if f.default is PydanticUndefined:
        return "required"
    return _value(f.default)


def allowed_text(f: FieldInfo) -> str:
    parts = []
    for m in f.metadata:
        parts += [f"{sym} {getattr(m, key)}" for key, sym in _BOUNDS if getattr(m, key, None) is not None]
        if getattr(m, "pattern", None):
            parts.append(f"matches `{m.pattern}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def field_table(model: type[BaseModel], prefix: str = "", notes: Optional[dict[str, str]] = None) -> str:
    """A markdown table of `model`'s fields: name, type, default, allowed values, description."""
    mirror = _mirrors().get(model)
    fallback = attribute_docs(mirror) if mirror else {}
    rows = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, f in model.model_fields.items():
        path = prefix + name
        desc = f.description or fallback.get(name, "")
        if path in (notes or {}):
            desc = f"{desc} {notes[path]}".strip()
        rows.append(f"| `{path}` | {_cell(type_text(f.annotation))} | {_cell(default_text(f))} | "
                    f"{_cell(allowed_text(f))} | {_cell(desc)} |")
    return "\n".join(rows)


def _doc(model: type) -> str:
    d = model.__doc__ or ""
    return "" if d.startswith(("Usage docs:", "!!! abstract")) else inspect.cleandoc(d)  # BaseModel's own


def _sections(model: type[BaseModel], names: list[str], notes: Optional[dict[str, str]] = None) -> list[str]:
    out = []
    for name in names:
        sec = _section(model.model_fields[name].annotation)
        out += [f"### `{name}`", ""]
        if _doc(sec):
            out += [_doc(sec), ""]
        out += [field_table(sec, f"{name}.", notes), ""]
    return out


def render() -> str:
    """The whole reference: ProcessorConfig, the sections it shares with the job spec, the job-only ones."""
    from .processor import JOB_ONLY_FIELDS, ProcessorConfig
    from .spec import JobSpec

    shared = [n for n, f in ProcessorConfig.model_fields.items() if _section(f.annotation)]
    job_only = [n for n, f in JobSpec.model_fields.items() if _section(f.annotation) and n not in shared]
    notes = {p: "(run_job.py only; build_processor ignores it)" for p in JOB_ONLY_FIELDS}
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m pipeline.docs` from pipeline/spec.py and pipeline/processor.py; "
        "do not edit by hand (tests/test_pipeline_docs.py checks it) -->",
        "",
        "Both entry points are configured by the same section classes: `pipeline.ProcessorConfig` (the Ray "
        "Data stage, `build_processor`) and the YAML job spec of `run_job.py` share the `model`, "
        "`generation`, `cache` and `compute` sections, with the same defaults, bounds and error messages. "
        "`null` is YAML's / JSON's None; `(below)` is a section.",
        "",
        "## `ProcessorConfig` (`pipeline.build_processor`)",
        "",
        _doc(ProcessorConfig),
        "",
        field_table(ProcessorConfig, notes=notes),
        "",
        "## Sections shared by `ProcessorConfig` and the job spec",
        "",
        *_sections(ProcessorConfig, shared, notes),
        "## Job spec only (`run_job.py`)",
        "",
        field_table(JobSpec),
        "",
        *_sections(JobSpec, job_only),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Render docs/config.md from the config models.")
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from the rendering")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = DOC_PATH.read_text() if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date; run: python -m pipeline.docs", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
