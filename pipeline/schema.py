"""The output table's explicit, typed, nullable schema, and what every column means.

Every part is cast to one schema: the input columns as read, then the columns below. A part holding
only error rows (all generation columns null) therefore reads together with every other part.
Each column is declared once here with its type and its meaning (formula where it is computed);
docs/output.md's table is generated from these declarations (`columns_markdown`) and a test checks
that the two agree, and that the per-sample stats match dllm_cache_core.stats.SampleStats.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    """One output column: name, Arrow type (always nullable) and its meaning."""

    name: str
    type: pa.DataType
    doc: str

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type)


STATS: list[Column] = [
    Column("num_prompt_tokens", pa.int64(), "Real prompt tokens (after the chat template, if any; padding excluded)."),
    Column("num_generated_tokens", pa.int64(),
           "Tokens in `generation_token_ids`: the generated tokens before the first stop token."),
    Column("steps", pa.int64(), "Denoising iterations this row took part in."),
    Column("nfe", pa.int64(),
           "Model forward calls made while this row was active: `steps`, doubled under classifier-free guidance "
           "(its unconditional pass counts)."),
    Column("tokens_per_step", pa.float64(), "`gen_length / steps` (gen_length from the job's generation settings)."),
    Column("token_layers_computed", pa.float64(),
           "Sum over forwards and layers of this row's positions recomputed (padding excluded); what a cache saves."),
    Column("flops", pa.float64(),
           "This row's FLOPs (multiply-add = 2): per layer, 2·(d·q_dim + 2·d·kv_dim + q_dim·d + 3·d·mlp_hidden) per "
           "recomputed position, plus 4·n_heads·head_dim per (query, key) pair of attention, plus 2·d·vocab per "
           "LM-head row computed, plus the policy's own overhead (dLLM-Cache's V projection, d2Cache's rollout)."),
    Column("flops_vanilla", pa.float64(),
           "FLOPs of the same `nfe` as full uncached forwards over the row's whole real sequence: what policy "
           "`none` costs for the same schedule."),
    Column("flops_speedup", pa.float64(), "`flops_vanilla / flops`: the cache's gain alone."),
    Column("flops_speedup_total", pa.float64(),
           "FLOPs of policy `none` at one token per step (`gen_length` full forwards, doubled under guidance) "
           "`/ flops`: cache and parallel decoding together."),
    Column("latency_s", pa.float64(),
           "Seconds: the wall time of the decoding loop that generated this row with the rest of its engine "
           "call (batch) × the row's share of the batch's `token_layers_computed`; the rows of a batch sum to its "
           "decoding time (tokenizing and queueing excluded)."),
    Column("finish_reason", pa.string(), "`stop` (a stop token ended the row), `length` (gen_length reached) or `error`."),
]
OUTPUT: list[Column] = [
    Column("generation", pa.string(), "Generated text (decoded `generation_token_ids`); null on error rows."),
    Column("generation_token_ids", pa.list_(pa.int32()), "Generated token ids, cut before the first stop token."),
    *STATS,
    Column("cache_policy", pa.string(),
           "The cache policy this row ran under: the job's `cache.policy`; under `auto` the calibration's choice, "
           "or the fallback's after a drift (`calibration.on_drift: fallback`)."),
    Column("cache_config", pa.string(),
           "The cache settings this row ran under, as `policy(param=value, ...)` (the calibration table's "
           "candidate label; the parameters set, e.g. `dual(refresh_interval=4)`): tells apart two settings of "
           "one policy."),
    Column("model", pa.string(), "The job's `model.path`."),
    Column("error", pa.string(), "Why the row failed (message naming the cause); null on success."),
    Column("error_type", pa.string(),
           "`empty_prompt`, `too_long`, `bad_input`, `tokenizer`, `oom` or `generation`; null on success."),
    Column("audit_speedup", pa.float64(),
           "Audited rows only (`audit.fraction`, chosen by a hash of the id): wall time of the audit call under "
           "`none` / wall time of the same rows under the job's policy, run back to back."),
    Column("audit_token_agreement", pa.float64(),
           "Audited rows only: positions where the job's output and `none`'s hold the same token (both cut at the "
           "stop token) / the longer length; 1.0 for two empty outputs."),
    Column("score", pa.float64(),
           "With `evaluation`: 1.0 when the scorer finds `generation` right against `evaluation.answer_column`, "
           "else 0.0; null on error rows and rows without a reference."),
    Column("extracted_answer", pa.string(), "With `evaluation`: the answer the scorer extracted from `generation`."),
    Column("input_hash", pa.string(),
           "SHA-256 (first 32 hex digits) of the canonical JSON (sorted keys, no spaces, UTF-8) of "
           "`{\"prompt\": text}` or `{\"messages\": [{\"role\", \"content\"}, ...]}`: the input the row was "
           "generated from. Resume compares it with the input to regenerate rows whose input changed."),
]
STATS_FIELDS: list[pa.Field] = [c.field for c in STATS]
OUTPUT_FIELDS: list[pa.Field] = [c.field for c in OUTPUT]
OUTPUT_COLUMNS = [f.name for f in OUTPUT_FIELDS]
STATS_COLUMNS = [f.name for f in STATS_FIELDS]
INTERNAL_PREFIX = "__"
"""Columns the reader adds for the actor (e.g. `__input_error`); never written."""
INPUT_ERROR = "__input_error"


def columns_markdown() -> str:
    """The Markdown table of the output columns (docs/output.md holds it between generated markers)."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{c.name}` | `{cell(str(c.type))}` | {cell(c.doc)} |" for c in OUTPUT]
    return "\n".join(lines)


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


if __name__ == "__main__":  # regenerate docs/output.md's columns block: python -m pipeline.schema
    print(columns_markdown())
