"""The output table's explicit, typed, nullable schema.

Every part is cast to one schema: the input columns as read, then the columns below. A part holding
only error rows (all generation columns null) therefore reads together with every other part.
"""
from __future__ import annotations

import pyarrow as pa

STATS_FIELDS: list[pa.Field] = [
    pa.field("num_prompt_tokens", pa.int64()),
    pa.field("num_generated_tokens", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("nfe", pa.int64()),
    pa.field("tokens_per_step", pa.float64()),
    pa.field("token_layers_computed", pa.float64()),
    pa.field("flops", pa.float64()),
    pa.field("flops_vanilla", pa.float64()),
    pa.field("flops_speedup", pa.float64()),
    pa.field("flops_speedup_total", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("finish_reason", pa.string()),
]
OUTPUT_FIELDS: list[pa.Field] = [
    pa.field("generation", pa.string()),
    pa.field("generation_token_ids", pa.list_(pa.int32())),
    *STATS_FIELDS,
    pa.field("cache_policy", pa.string()),
    pa.field("model", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("audit_speedup", pa.float64()),
    pa.field("audit_token_agreement", pa.float64()),
    pa.field("score", pa.float64()),
    pa.field("extracted_answer", pa.string()),
]
OUTPUT_COLUMNS = [f.name for f in OUTPUT_FIELDS]
STATS_COLUMNS = [f.name for f in STATS_FIELDS]
INTERNAL_PREFIX = "__"
"""Columns the reader adds for the actor (e.g. `__input_error`); never written."""
INPUT_ERROR = "__input_error"


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    """Input columns (nullable, internal ones dropped) followed by the output columns."""
    fields = [f.with_nullable(True) for f in input_schema if not f.name.startswith(INTERNAL_PREFIX)]
    return pa.schema(fields + OUTPUT_FIELDS)


def colliding_columns(names: list[str]) -> list[str]:
    """Input column names that an output column would overwrite (a validation error)."""
    return [n for n in names if n in OUTPUT_COLUMNS or n.startswith(INTERNAL_PREFIX)]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in order and types; missing columns become nulls."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)
