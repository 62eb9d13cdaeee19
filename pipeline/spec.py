"""The YAML job spec: every field's type, default and allowed values in one place.

Validated before any work starts (pydantic v2, unknown keys rejected). `load_spec` raises `SpecError`
whose lines each name the field path and the allowed values. The `cache:` section, the remasking and
schedule values and the model families are derived from the engine (the policy modules' declarations,
the decoding profiles, the architecture registry), so they cannot drift from what the engine accepts.
The module imports no Ray, so the eval harness can reuse it (and `apply_overrides`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from dllm_cache_core.cache.params import Param
from dllm_cache_core.cache.registry import declarations, policy_decl, policy_names
from dllm_cache_core.config import REMASKING, SCHEDULES
from dllm_cache_core.models.registry import architecture, architecture_names
from dllm_cache_core.overrides import apply_overrides, normalize_short_forms

from .fs import overlap

__all__ = ["JobSpec", "SpecError", "load_spec", "spec_from_dict", "apply_overrides", "POLICY_PARAMS"]

AUTO = "auto"
"""Not a policy but a choice among them: the job calibrates (the `calibration` section)."""
POLICY_PARAMS: dict[str, tuple[str, ...]] = {**{d.name: tuple(p.name for p in d.params) for d in declarations()},
                                             AUTO: ()}
"""Cache policy -> its parameters (from the declarations); a parameter of another policy is an error."""
FAMILIES = ("auto", *architecture_names())


class SpecError(ValueError):
    """An invalid job spec; one line per problem, each naming the field path and what is allowed."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid job spec:\n  " + "\n  ".join(self.problems))


class _Section(BaseModel):
    # attribute docstrings become field descriptions: the API docs (pipeline.docs) are rendered from them
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(_Section):
    path: str = "builtin:tiny"
    """Local folder, `builtin:NAME`, or an s3:// / gs:// URI (copied once per node before loading)."""
    family: Literal[FAMILIES] = "auto"  # type: ignore[valid-type]
    """Model architecture; auto reads it from config.json (model_type, architectures)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights/activation dtype; auto = bfloat16 on GPU, float32 on CPU."""


class InputSpec(_Section):
    path: str
    """A file, a folder, or a glob; local, file://, s3:// or gs://."""
    format: Literal["auto", "parquet", "arrow", "jsonl", "hf_disk"] = "auto"
    """auto = from the file extension (a folder with state.json is hf_disk)."""
    prompt_column: str = "prompt"
    """Column holding the prompt text."""
    messages_column: Optional[str] = None
    """Column holding chat messages (list of {role, content}); when set it is used instead of the prompt."""
    id_column: str = "id"
    """Unique row id. When the data has no such column (and it was left at its default) a stable id
    `<file path relative to the input root>#<row index in the file>` is derived into it."""
    chat_template: bool = False
    """Apply the tokenizer's chat template to prompt text too."""
    limit: Optional[int] = Field(default=None, ge=1)
    """Only the first N rows (files in sorted order, rows in file order); null = all."""


class OutputSpec(_Section):
    path: str
    """Output folder; local, file://, s3:// or gs://."""
    on_existing: Literal["resume", "overwrite", "error"] = "resume"
    """What to do when the folder already holds output of a job."""
    min_rows_per_file: int = Field(default=10000, ge=1)
    """Rows buffered per Parquet part (fewer, bigger files vs. less work lost when the driver dies)."""
    shared: bool = False
    """The local output path is a filesystem mounted on every node (NFS, Lustre); without it a local
    path is refused on a multi-node cluster."""


class GenerationSpec(_Section):
    """Mirrors dllm_cache_core.GenerationConfig; null = the engine's default."""

    gen_length: int = Field(default=128, ge=1)
    steps: Optional[int] = Field(default=None, ge=1)
    block_length: Optional[int] = Field(default=None, ge=1)
    remasking: Optional[Literal[REMASKING]] = None  # type: ignore[valid-type]
    alg_temp: float = Field(default=0.0, ge=0.0)
    schedule: Literal[SCHEDULES] = "auto"  # type: ignore[valid-type]
    eps: float = Field(default=1e-3, gt=0.0, lt=1.0)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=1)
    threshold: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    certainty_prior_sigma: Optional[float] = Field(default=None, gt=0.0)
    cfg_scale: float = Field(default=0.0, ge=0.0)
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    stop_token_ids: Optional[list[int]] = None
    stop_at_eos: bool = True
    mask_id: Optional[int] = Field(default=None, ge=0)
    scheduling: Literal["continuous", "static"] = "continuous"
    """continuous: a finished row's slot is refilled at once; static: the batch waits for its slowest
    row (side-by-side measurement). Same tokens either way, so it is not part of the job fingerprint."""
    slots: Optional[int] = Field(default=None, ge=1)
    """Rows each engine decodes at once; null = every row of an actor batch."""

    SCHEDULING_ONLY: ClassVar[frozenset] = frozenset({"scheduling", "slots"})

    @model_validator(mode="after")
    def _blocks(self) -> "GenerationSpec":
        block = self.block_length or self.gen_length
        if self.gen_length % block:
            raise ValueError(f"generation.gen_length={self.gen_length} must be a multiple of "
                             f"generation.block_length={block}; allowed: a multiple of {block}")
        blocks = self.gen_length // block
        steps = self.steps or self.gen_length
        if steps % blocks:
            raise ValueError(f"generation.steps={steps} must divide by the number of blocks ({blocks} = "
                             f"gen_length / block_length); allowed: a multiple of {blocks}")
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for dllm_cache_core.GenerationConfig."""
        d = self.model_dump()
        if d["stop_token_ids"] is not None:
            d["stop_token_ids"] = tuple(d["stop_token_ids"])
        return d


class _CacheSection(_Section):
    """Flat like dllm_cache_core.CacheConfig: `policy` plus every policy's parameters (null = default)."""

    @model_validator(mode="after")
    def _params_belong_to_policy(self) -> "_CacheSection":
        given = self.params_set()
        if self.policy == AUTO:  # type: ignore[attr-defined]
            if given:
                raise ValueError(f"cache.{next(iter(given))} is not a parameter of policy 'auto'; set parameters "
                                 "per candidate in calibration.candidates")
            return self
        policy_decl(self.policy).check(given)  # type: ignore[attr-defined]
        return self

    def params_set(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "policy" and v is not None}

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for dllm_cache_core.CacheConfig (only the parameters that were set)."""
        return {"policy": self.policy, **self.params_set()}  # type: ignore[attr-defined]


def _param_field(decls: list[Param]) -> tuple[Any, Any]:
    """A parameter's spec field; bounds only when every policy declaring it agrees on them (the
    declaration's own check runs for the chosen policy in any case)."""
    first = decls[0]
    same = all((d.type, d.ge, d.gt, d.le) == (first.type, first.ge, first.gt, first.le) for d in decls)
    bounds = {k: v for k, v in (("ge", first.ge), ("gt", first.gt), ("le", first.le)) if v is not None} if same else {}
    typ = first.type if same and first.type is not None else Any
    return Optional[typ], Field(default=None, description=first.doc, **bounds)


def cache_section() -> type[_CacheSection]:
    """The `cache:` section's model, built from the policy declarations."""
    by_name: dict[str, list[Param]] = {}
    for d in declarations():
        for p in d.params:
            by_name.setdefault(p.name, []).append(p)
    fields: dict[str, Any] = {"policy": (Literal[(*policy_names(), AUTO)], Field(
        default="none", description=f"A cache policy, or {AUTO!r}: calibrate on a sample of the job and run the "
                                    "fastest candidate that keeps quality (the `calibration` section)."))}
    fields.update({name: _param_field(decls) for name, decls in by_name.items()})
    return create_model("CacheSpec", __base__=_CacheSection, **fields)


CacheSpec = cache_section()


def cache_help() -> str:
    """The cache policies and their parameters, for --help texts."""
    lines = ["cache policies (cache=NAME or cache.policy=NAME; parameters as cache.PARAM=VALUE):"]
    for d in declarations():
        params = "; ".join(f"{p.name}: {p.allowed()}, default {p.default_text()}" for p in d.params) or "no parameters"
        lines.append(f"  {d.name:<12} {params}")
    return "\n".join(lines)


class CalibrationSpec(_Section):
    """Settings of `cache.policy: auto` (only allowed with it)."""

    candidates: Optional[list[dict[str, Any]]] = None
    """Cache settings to try besides `none` (each like the `cache` section, or a policy name); null =
    every policy at its defaults plus the settings each policy declares for calibration (e.g. dual with
    refresh_interval 4, dllm_cache with kr 1)."""
    min_agreement: float = Field(default=0.98, ge=0.0, le=1.0)
    """Token agreement with `none` on the calibration rows that a candidate must reach."""
    min_score_ratio: Optional[float] = Field(default=None, gt=0.0)
    """With an evaluation scorer: the candidate's score / none's score must reach this; null = not used."""
    calibration_rows: int = Field(default=64, ge=1)
    """Rows in the calibration sample (seeded, stratified by prompt length)."""
    seed: Optional[int] = Field(default=None, ge=0)
    """Seed of the sample; null = the job's seed."""
    on_drift: Literal["flag", "fallback"] = "flag"
    """What happens when the audit's running token agreement of the chosen candidate falls below
    min_agreement by more than two standard errors: flag (the report says so; the job keeps the choice)
    or fallback (the rows started after that run under the next safer candidate of the calibration
    table, down to `none`; each row's `cache_config` says which; needs audit.fraction > 0)."""

    @field_validator("candidates", mode="before")
    @classmethod
    def _candidates(cls, v: Any) -> Any:
        """Each candidate validated as a `cache` section; kept as its engine kwargs."""
        if not isinstance(v, list):
            return v
        out = []
        for i, c in enumerate(v):
            where = f"calibration.candidates[{i}]"
            try:
                cache = CacheSpec.model_validate({"policy": c} if isinstance(c, str) else c)
            except ValidationError as e:
                msgs = [m.removeprefix("Value error, ").replace("cache.", f"{where}.") for m in
                        (f"{'.'.join(map(str, x['loc']))}: {x['msg']}" if x["loc"] else x["msg"] for x in e.errors())]
                text = "; ".join(msgs)
                raise ValueError(text if text.startswith(where) else f"{where}: {text}") from None
            if cache.policy in (AUTO, "none"):
                allowed = ", ".join(n for n in policy_names() if n != "none")
                raise ValueError(f"{where}: {cache.policy!r} is not a candidate (none is always the reference); "
                                 f"allowed: {allowed}, with their parameters")
            out.append(cache.engine_kwargs())
        return out


class ComputeSpec(_Section):
    num_actors: int = Field(default=1, ge=1)
    """Engine replicas (Ray Data actor pool size)."""
    gpus_per_actor: float = Field(default=0.0, ge=0.0)
    """GPUs per actor (fractions allowed); 0 = run on CPU."""
    cpus_per_actor: float = Field(default=1.0, gt=0.0)
    """CPUs reserved per actor."""
    batch_size: int = Field(default=32, ge=1)
    """Rows per engine call."""
    length_grouping: int = Field(default=4, ge=1)
    """Each actor receives batch_size x length_grouping rows, sorts them by prompt length and runs them
    as engine calls of batch_size, so rows of one call have similar lengths (less padding)."""
    batches_in_flight: Optional[int] = Field(default=None, ge=1)
    """Batches (of batch_size x length_grouping rows) each actor works on at once, all feeding one engine
    stream: the next batch's rows take the slots the previous batch's rows free, so the engine does not
    drain at every batch's end. The engine still decodes generation.slots (else batch_size) rows at a
    time, on one thread, in one decode loop whose canvas is as wide as the widest prompt seen (shorter
    prompts ride it; the same tokens). null = 2 under generation.scheduling continuous, 1 under static;
    more than 1 needs continuous scheduling. 1 = one batch at a time, in engine calls of batch_size rows."""
    max_actor_restarts: int = Field(default=3, ge=0)
    """How often Ray recreates a dead actor (finite, so a deterministic crash fails the job)."""
    local_num_cpus: Optional[int] = Field(default=None, ge=1)
    """CPUs of the local Ray started when none is running; null = all."""
    progress_interval_s: float = Field(default=10.0, gt=0.0)
    """Seconds between progress lines when stderr is not a terminal (job logs)."""

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    def in_flight(self, scheduling: str) -> int:
        """batches_in_flight with null resolved for `scheduling` (generation.scheduling)."""
        if self.batches_in_flight is not None:
            return self.batches_in_flight
        return 2 if scheduling == "continuous" else 1


class AuditSpec(_Section):
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Rows (chosen from a hash of the id) also run with policy `none`, in batches of their own."""


class EvaluationSpec(_Section):
    answer_column: str
    """Input column with the reference answer."""
    scorer: Literal["exact", "gsm8k", "regex", "contains"]
    """exact (normalised string match), gsm8k (numeric answer extraction), regex (+ pattern), contains."""
    pattern: Optional[str] = None
    """regex scorer: the answer is group 1 of the last match (or the whole match when no group)."""
    group_by: list[str] = Field(default_factory=list)
    """Input columns to report accuracy by (the cache policy is always reported)."""

    @model_validator(mode="after")
    def _pattern(self) -> "EvaluationSpec":
        if self.scorer == "regex":
            if not self.pattern:
                raise ValueError("evaluation.pattern is required when scorer is 'regex'; allowed: a regular "
                                 "expression (e.g. 'answer: (\\S+)')")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"evaluation.pattern={self.pattern!r} is not a valid regular expression ({e}); "
                                 "allowed: a Python regular expression") from None
        elif self.pattern is not None:
            raise ValueError(f"evaluation.pattern is only used by scorer 'regex', not {self.scorer!r}; "
                             "allowed: remove it, or scorer: regex")
        return self


class JobSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Job name: letters, digits, '.', '_', '-'."""
    seed: int = Field(default=0, ge=0)
    """Base of every row's sampling seed (with the row's id), so a row's output does not depend on its batch."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    input: InputSpec
    output: OutputSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    evaluation: Optional[EvaluationSpec] = None
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_short_form(cls, v: Any) -> Any:
        return {"policy": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _cross(self) -> "JobSpec":
        check_remasking(self.model, self.generation)
        check_in_flight(self.generation, self.compute)
        if "calibration" in self.model_fields_set and self.cache.policy != "auto":
            raise ValueError(f"calibration.* is only used with cache.policy: auto, not {self.cache.policy!r}; "
                             "allowed: remove the calibration section, or cache.policy: auto")
        if self.calibration.on_drift == "fallback" and not self.audit.fraction:
            raise ValueError("calibration.on_drift: fallback needs audited rows to watch the agreement, but "
                             "audit.fraction is 0; allowed: audit.fraction > 0 (e.g. 0.05), or on_drift: flag")
        why = overlap(self.input.path, self.output.path)
        if why:
            raise ValueError(f"output.path must differ from input.path and lie outside it: output.path="
                             f"{self.output.path!r} {why} (compared by real path: symlinks, '.', '..', "
                             "file:// resolved); allowed: a separate folder")
        return self

    @property
    def dtype(self) -> str:
        return resolved_dtype(self.model, self.compute)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_remasking(model: ModelSpec, generation: GenerationSpec) -> None:
    """ValueError when generation.remasking does not belong to an explicit model.family's profile."""
    rem, fam = generation.remasking, model.family
    if rem is not None and fam != "auto":
        allowed = architecture(fam).profile.remasking
        if rem not in allowed:
            raise ValueError(f"generation.remasking={rem!r} is not allowed for model.family={fam!r}; "
                             f"allowed: {', '.join(allowed)}")


def check_in_flight(generation: GenerationSpec, compute: ComputeSpec) -> None:
    """ValueError when several batches in flight meet static scheduling (which admits rows only into an
    empty batch: batches could not share slots)."""
    n = compute.batches_in_flight
    if n is not None and n > 1 and generation.scheduling != "continuous":
        raise ValueError(f"compute.batches_in_flight={n} needs generation.scheduling: continuous, not "
                         f"{generation.scheduling!r}; allowed: 1 or null with static scheduling")


def resolved_dtype(model: ModelSpec, compute: ComputeSpec) -> str:
    """model.dtype, with auto = bfloat16 on GPU and float32 on CPU."""
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if compute.gpus_per_actor > 0 else "float32"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> Optional[list[str]]:
    """The keys allowed at `loc` (the parent of an unknown key), walking the nested sections."""
    cur: Any = model
    for part in loc:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for arg in getattr(ann, "__args__", ()) or ():  # Optional[Section]
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                ann = arg
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cur = ann
    return list(cur.model_fields)


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _problems(err: ValidationError, root: type[BaseModel] = JobSpec) -> list[str]:
    """One line per pydantic error, naming the field path under `root` and what is allowed."""
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, (str, int)))
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            msg = "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error":
            msg = f"{e.get('input')!r} is not allowed; allowed: " + msg.removeprefix("Input should be ")
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{e.get('input')!r} is not allowed; allowed: letters, digits, '.', '_', '-' (starting with a letter or digit)"
        elif e["type"] in _BOUNDS:
            key, sym = _BOUNDS[e["type"]]
            msg = f"{e.get('input')!r} is not allowed; allowed: {sym} {e['ctx'][key]}"
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            msg = f"{e['input']!r} is not allowed: {msg}"
        # model-level validators report at the section; their messages carry the full path themselves
        if e["type"] == "value_error" and msg.split(".", 1)[0].split("=", 1)[0] in root.model_fields:
            out.append(msg)
        else:
            out.append(f"{path}: {msg}")
    return out


def spec_from_dict(data: Any) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError([f"(top level): the job spec must be a mapping, got {type(data).__name__}"])
    try:
        return JobSpec.model_validate(normalize_short_forms(data))
    except ValidationError as e:
        raise SpecError(_problems(e)) from None


def load_spec(path: Union[str, Path, None] = None, overrides: Sequence[str] = (),
              data: Optional[dict[str, Any]] = None) -> JobSpec:
    """Read YAML (or take `data`), apply dotted overrides, validate. Raises SpecError."""
    if data is None:
        try:
            data = yaml.safe_load(Path(path).read_text()) if path is not None else {}
        except FileNotFoundError:
            raise SpecError([f"(file): job spec {str(path)!r} not found"]) from None
        except yaml.YAMLError as e:
            raise SpecError([f"(file): {path} is not valid YAML: {e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([f"(top level): the job spec must be a mapping, got {type(data).__name__}"])
    try:
        data = apply_overrides(data, overrides)
    except ValueError as e:
        raise SpecError([str(e)]) from None
    return spec_from_dict(data)
