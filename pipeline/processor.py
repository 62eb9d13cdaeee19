"""The engine as a Ray Data stage: `build_processor(config, preprocess, postprocess)(ds) -> ds`.

The shape of `ray.data.llm.build_processor`: an optional `ds.map(preprocess)`, the GenerationActor pool
(`map_batches` over an actor pool: one model per actor, length grouping, OOM split, per-row errors),
an optional `ds.map(postprocess)`. Like any Ray Data transform it is lazy: nothing runs, no actor
starts and no model loads until the returned Dataset is consumed (`write_parquet`, `iter_batches`,
`take`, ...). `generation_stage` is the one place the actor pool is set up; `run_job.py` builds its
pool with it too and adds the job around it (resume, atomic parts, audit, evaluation, report).

Output rows: every input column, then `generation`, `generation_token_ids`, the per-sample stats,
`finish_reason`, `cache_policy`, `cache_config`, `model`, `error`, `error_type`; typed even in a batch of error rows
(an output column replaces an input column of the same name). A bad row (empty, wrong type, too long, tokenizer failure, a row that runs out of memory on its
own) comes out as a row with `error` / `error_type` set; the row count never changes.

Row ids. A row's sampling seed derives from (`seed`, its id), so its output does not depend on the
rows it is batched with. With `id_column` set, that column is the id; without it the id is a hash of
the row's prompt (or messages) value: rows with the same prompt get the same id and so the same output.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import pyarrow as pa
from pydantic import BaseModel, Field, ValidationError, model_validator

from dllm_cache_core.overrides import normalize_short_forms

from .actor import ActorConfig, GenerationActor, StreamingGenerationActor
from .prompts import input_hash
from .schema import INTERNAL_PREFIX
from .spec import (AUTO, CacheSpec, ComputeSpec, GenerationSpec, InputSpec, JobSpec, ModelSpec, SpecError, _problems,
                   _Section, check_in_flight, check_remasking, resolved_dtype)

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["ProcessorConfig", "ProcessorConfigError", "Processor", "build_processor", "generation_stage", "row_id"]

ROW_ID = INTERNAL_PREFIX + "row_id"
"""Internal column the id stage adds for the actor; never in the output (internal columns are dropped)."""


def _same_field(model: type[BaseModel], name: str) -> Any:
    """The job spec's definition of a field (type checks, default, bounds, docstring), reused instead of
    re-declared; a deep copy only because pydantic completes a FieldInfo in place when building a class."""
    return copy.deepcopy(model.model_fields[name])


class ProcessorConfigError(SpecError):
    """An invalid ProcessorConfig; one line per problem, each naming the field and what is allowed (the
    same lines as the job spec's for the shared sections)."""

    def __init__(self, problems: Sequence[str]):
        super().__init__(problems)
        self.args = ("invalid processor config:\n  " + "\n  ".join(self.problems),)


class ProcessorConfig(_Section):
    """Everything the stage needs: the job spec's `model`, `generation`, `cache` and `compute` sections
    (the same classes: same defaults, bounds and error messages) plus where each row's prompt is.

    Sections are given as dicts or as the section classes; `cache` also takes a bare policy name
    (`cache="dual"`). Invalid values raise ProcessorConfigError naming the field.
    """

    model: ModelSpec = Field(default_factory=ModelSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    seed: int = _same_field(JobSpec, "seed")
    prompt_column: str = _same_field(InputSpec, "prompt_column")
    messages_column: Optional[str] = _same_field(InputSpec, "messages_column")
    chat_template: bool = _same_field(InputSpec, "chat_template")
    id_column: Optional[str] = None
    """Column with a unique row id (string or integer); each row's sampling seed derives from `seed` and
    this id. null = the id is a hash of the row's prompt (or messages), so rows with the same prompt get
    the same output; a row whose id is null gets that hash too."""

    def __init__(self, **data: Any) -> None:
        short = normalize_short_forms({k: v for k, v in data.items() if not isinstance(v, BaseModel)})
        try:
            super().__init__(**{**data, **short})
        except ValidationError as e:
            raise ProcessorConfigError(_problems(e, type(self))) from None

    @model_validator(mode="after")
    def _cross(self) -> "ProcessorConfig":
        check_remasking(self.model, self.generation)
        check_in_flight(self.generation, self.compute)
        if self.cache.policy == AUTO:
            raise ValueError(f"cache.policy={AUTO!r} calibrates over a job's input, which a stage does not "
                             "own; allowed: a cache policy (run_job.py for auto)")
        return self

    @property
    def dtype(self) -> str:
        return resolved_dtype(self.model, self.compute)

    @property
    def text_column(self) -> str:
        """The column the engine reads: messages_column when set, else prompt_column."""
        return self.messages_column or self.prompt_column


JOB_ONLY_FIELDS = ("compute.local_num_cpus", "compute.progress_interval_s")
"""ComputeSpec fields that only run_job.py uses (it starts Ray and prints progress); a processor
runs inside the caller's Ray and Ray Data's own progress bars."""


# ----------------------------------------------------------------------------- row ids
def row_id(value: Any, is_messages: bool = False) -> str:
    """Stable id of a prompt (text or messages): the first 16 hex digits of its input_hash, the hash the
    jobs write with every row (messages as a list or as JSON text give the same id)."""
    return input_hash(value, is_messages)[:16]


def add_row_ids(batch: pa.Table, id_column: Optional[str], text_column: str, is_messages: bool = False) -> pa.Table:
    """`batch` plus the internal id column: id_column's values as text, else (or where null) row_id of the
    prompt. A configured id_column missing from the data is a configuration error, not a row error."""
    n = batch.num_rows
    given: list[Any] = [None] * n
    if id_column is not None:
        if id_column not in batch.column_names:
            raise ValueError(f"id_column={id_column!r} is not a column of the data; allowed: one of "
                             f"{', '.join(c for c in batch.column_names if not c.startswith(INTERNAL_PREFIX))}, "
                             "or null (ids are then hashes of the prompts)")
        given = batch.column(id_column).to_pylist()
    texts = batch.column(text_column).to_pylist() if text_column in batch.column_names else [None] * n
    ids = [str(g) if g is not None else row_id(t, is_messages) for g, t in zip(given, texts)]
    if ROW_ID in batch.column_names:
        batch = batch.drop_columns([ROW_ID])
    return batch.append_column(ROW_ID, pa.array(ids, pa.string()))


# ----------------------------------------------------------------------------- the stage
def actor_config(config: ProcessorConfig, engine_factory: Optional[Callable[[ActorConfig], Any]] = None) -> ActorConfig:
    """The GenerationActor settings of a processor: no schema (output columns appended), no audit or scorer."""
    return ActorConfig(
        model_path=config.model.path, family=config.model.family, dtype=config.dtype, device=config.compute.device,
        seed=config.seed, generation=config.generation.engine_kwargs(), cache=config.cache.engine_kwargs(),
        prompt_column=config.prompt_column, messages_column=config.messages_column,
        chat_template=config.chat_template, id_column=ROW_ID, batch_size=config.compute.batch_size,
        audit_fraction=0.0, evaluation=None, schema=None, model_label=config.model.path,
        engine_factory=engine_factory)


def generation_stage(ds: "Dataset", actor: ActorConfig, compute: ComputeSpec, actor_cls: type = GenerationActor,
                     extra_kwargs: Optional[dict[str, Any]] = None, num_actors: Optional[int] = None,
                     batch_size: Optional[int] = None) -> "Dataset":
    """`ds` through a pool of `compute.num_actors` GenerationActors (lazy). The one place the pool is set
    up, for build_processor, the job runner and the calibration of `cache.policy: auto` (which passes
    its own actor class, a smaller pool and engine-call-sized batches).

    With compute.batches_in_flight > 1 (the default under continuous scheduling) a GenerationActor pool
    becomes a StreamingGenerationActor pool: an async __call__ and the actors' max_concurrency set to
    the batches in flight, so Ray Data hands each actor that many batches at once (ray.data.llm's
    max_concurrent_batches). Another actor class (the calibration's) keeps one batch at a time."""
    from ray.data import ActorPoolStrategy

    c = compute
    flight = c.in_flight(actor.generation.get("scheduling", "continuous")) if actor_cls is GenerationActor else 1
    kwargs = {"config": actor, **(extra_kwargs or {})}
    if flight > 1:
        actor_cls, kwargs = StreamingGenerationActor, {**kwargs, "batches_in_flight": flight}
    with warnings.catch_warnings():
        # max_restarts/max_task_retries have no named map_batches parameter yet; Ray 2.60 (our pin) warns
        # that **ray_remote_args goes away in 2.64. Revisit when the pin moves.
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(
            actor_cls, fn_constructor_kwargs=kwargs,
            batch_size=batch_size or c.batch_size * c.length_grouping, batch_format="pyarrow",
            # max_concurrent_calls_per_actor: the actor's Ray max_concurrency (several batches' tasks at once)
            compute=ActorPoolStrategy(size=num_actors or c.num_actors,
                                      max_concurrent_calls_per_actor=flight if flight > 1 else None),
            num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor or None,
            udf_modifying_row_count=actor_cls not in (GenerationActor, StreamingGenerationActor),
            # finite restarts: a crash that repeats fails the Dataset instead of looping (Ray Data's default
            # is -1); the batches in flight on a dead actor (every one of them) are retried on its replacement
            max_restarts=c.max_actor_restarts, max_task_retries=-1 if c.max_actor_restarts else 0)


RowFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Processor:
    """A callable `Dataset -> Dataset` (see build_processor); holds no Ray state, so it can be applied
    to several Datasets."""

    config: ProcessorConfig
    preprocess: Optional[RowFn] = None
    postprocess: Optional[RowFn] = None
    preprocess_map_kwargs: dict[str, Any] = field(default_factory=dict)
    postprocess_map_kwargs: dict[str, Any] = field(default_factory=dict)
    engine_factory: Optional[Callable[[ActorConfig], Any]] = None

    def __call__(self, ds: "Dataset") -> "Dataset":
        c = self.config
        if self.preprocess is not None:
            ds = ds.map(self.preprocess, **self.preprocess_map_kwargs)
        ds = ds.map_batches(add_row_ids, batch_format="pyarrow", udf_modifying_row_count=False,
                            fn_kwargs={"id_column": c.id_column, "text_column": c.text_column,
                                       "is_messages": c.messages_column is not None})
        ds = generation_stage(ds, actor_config(c, self.engine_factory), c.compute)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess, **self.postprocess_map_kwargs)
        return ds


def build_processor(config: Union[ProcessorConfig, dict[str, Any]], preprocess: Optional[RowFn] = None,
                    postprocess: Optional[RowFn] = None, *, preprocess_map_kwargs: Optional[dict[str, Any]] = None,
                    postprocess_map_kwargs: Optional[dict[str, Any]] = None,
                    engine_factory: Optional[Callable[[ActorConfig], Any]] = None) -> Processor:
    """The engine as a Ray Data stage: `build_processor(config, pre, post)(ds)` is a lazy Dataset.

    preprocess / postprocess: row functions (or callable classes) run as `ds.map` stages before and after
    generation, with `preprocess_map_kwargs` / `postprocess_map_kwargs` passed to `ds.map` (e.g.
    `concurrency`, `num_cpus`). preprocess returns the row the engine sees (keep other columns with
    `{**row, ...}`); postprocess receives every column. engine_factory (advanced): builds the engine in
    each actor from its ActorConfig instead of loading `config.model`.
    """
    if not isinstance(config, ProcessorConfig):
        config = ProcessorConfig(**config)
    return Processor(config, preprocess, postprocess, dict(preprocess_map_kwargs or {}),
                     dict(postprocess_map_kwargs or {}), engine_factory)
