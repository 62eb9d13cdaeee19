"""docs/config.md is rendered from the config models (pipeline.docs) and must match them."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipeline.docs import DOC_PATH, _section, attribute_docs, field_table, render
from pipeline.processor import ProcessorConfig
from pipeline.spec import JobSpec


def test_committed_reference_is_the_rendering():
    assert DOC_PATH.read_text() == render(), "docs/config.md is out of date: run python -m pipeline.docs"


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def test_every_field_is_documented_from_its_definition():
    text = render()
    rows = {_cells(r)[0]: _cells(r) for r in text.splitlines() if r.startswith("| `")}
    checked = 0
    for model in (ProcessorConfig, JobSpec):
        for name, f in model.model_fields.items():
            sec = _section(f.annotation)
            for sub in (sec.model_fields if sec else [name]):
                path = f"`{name}.{sub}`" if sec else f"`{name}`"
                cells = rows[path]
                assert len(cells) == 5 and (cells[4] or cells[1].startswith("section")), (path, cells)
                checked += 1
    assert checked > 60
    # the generation section mirrors the engine's GenerationConfig: its docstrings fill the spec's gaps
    assert "| `generation.gen_length` | int | `128` | >= 1 | Tokens to generate (the canvas). |" in text


class _Example(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    size: int = Field(default=4, ge=1, lt=10)
    """How many | of them."""
    kind: Optional[Literal["a", "b"]] = None
    names: list[str] = Field(default_factory=list)


def test_field_table_renders_types_defaults_bounds_and_docstrings():
    assert field_table(_Example, "ex.").splitlines() == [
        "| field | type | default | allowed | description |",
        "|---|---|---|---|---|",
        "| `ex.size` | int | `4` | >= 1, < 10 | How many \\| of them. |",
        "| `ex.kind` | one of `a`, `b` or null | null |  |  |",
        "| `ex.names` | list of str | `[]` |  |  |",
    ]
    assert attribute_docs(_Example) == {"size": "How many | of them."}
