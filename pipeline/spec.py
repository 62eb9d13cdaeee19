"""The YAML job spec of shared/DESIGN.md: every field's type, default and allowed values in one place.

Validated before any work starts (pydantic v2, unknown keys rejected). `load_spec` raises `SpecError`
whose lines each name the field path and the allowed values. The module imports neither Ray nor torch,
so the eval harness can reuse it (and `apply_overrides`) on any machine.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dllm_cache_core.overrides import apply_overrides, normalize_short_forms

__all__ = ["JobSpec", "SpecError", "load_spec", "spec_from_dict", "apply_overrides", "POLICY_PARAMS"]

POLICY_PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "prefix": ("refresh_interval",),
    "dual": ("refresh_interval",),
    "dllm_cache": ("kp", "kr", "rou"),
    "d2cache": ("rollout_p", "current_k", "sigma", "inflate_w"),
}
"""Cache policy -> its parameters (shared/DESIGN.md); a parameter of another policy is an error."""
LLADA_REMASKING = ("low_confidence", "random")
DREAM_REMASKING = ("maskgit_plus", "topk_margin", "entropy", "origin")
INPUT_FORMATS = ("auto", "parquet", "arrow", "jsonl", "hf_disk")
SCORERS = ("exact", "gsm8k", "regex", "contains")


class SpecError(ValueError):
    """An invalid job spec; one line per problem, each naming the field path and what is allowed."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid job spec:\n  " + "\n  ".join(self.problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    path: str = "builtin:tiny"
    """Local folder, `builtin:NAME`, or an s3:// / gs:// URI (copied once per node before loading)."""
    family: Literal["auto", "llada", "dream"] = "auto"
    """Model family; auto reads it from config.json."""
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
    """Mirrors dllm_cache_core.GenerationConfig (shared/DESIGN.md); null = the engine's default."""

    gen_length: int = Field(default=128, ge=1)
    steps: Optional[int] = Field(default=None, ge=1)
    block_length: Optional[int] = Field(default=None, ge=1)
    remasking: Optional[Literal["low_confidence", "random", "maskgit_plus", "topk_margin", "entropy", "origin"]] = None
    alg_temp: float = Field(default=0.0, ge=0.0)
    schedule: Literal["auto", "llada", "dream"] = "auto"
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


class CacheSpec(_Section):
    """Flat like dllm_cache_core.CacheConfig: `policy` plus every policy's parameters (null = default)."""

    policy: Literal["none", "prefix", "dual", "dllm_cache", "d2cache"] = "none"
    refresh_interval: Optional[int] = Field(default=None, ge=1)
    kp: Optional[int] = Field(default=None, ge=1)
    kr: Optional[int] = Field(default=None, ge=1)
    rou: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    rollout_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    current_k: Optional[int] = Field(default=None, ge=1)
    sigma: Optional[float] = Field(default=None, gt=0.0)
    inflate_w: Optional[int] = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _params_belong_to_policy(self) -> "CacheSpec":
        own = POLICY_PARAMS[self.policy]
        for name in self.params_set():
            if name not in own:
                allowed = ", ".join(own) or "none"
                raise ValueError(f"cache.{name} is not a parameter of policy {self.policy!r}; "
                                 f"its parameters: {allowed}")
        return self

    def params_set(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "policy" and v is not None}

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for dllm_cache_core.CacheConfig (only the parameters that were set)."""
        return {"policy": self.policy, **self.params_set()}


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
    max_actor_restarts: int = Field(default=3, ge=0)
    """How often Ray recreates a dead actor (finite, so a deterministic crash fails the job)."""
    local_num_cpus: Optional[int] = Field(default=None, ge=1)
    """CPUs of the local Ray started when none is running; null = all."""
    progress_interval_s: float = Field(default=10.0, gt=0.0)
    """Seconds between progress lines when stderr is not a terminal (job logs)."""

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"


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
    model: ModelSpec = Field(default_factory=ModelSpec)
    input: InputSpec
    output: OutputSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    evaluation: Optional[EvaluationSpec] = None

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_short_form(cls, v: Any) -> Any:
        return {"policy": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _cross(self) -> "JobSpec":
        rem, fam = self.generation.remasking, self.model.family
        if rem is not None and fam != "auto":
            allowed = LLADA_REMASKING if fam == "llada" else DREAM_REMASKING
            if rem not in allowed:
                raise ValueError(f"generation.remasking={rem!r} is not allowed for model.family={fam!r}; "
                                 f"allowed: {', '.join(allowed)}")
        if _norm_path(self.input.path) == _norm_path(self.output.path):
            raise ValueError("output.path must differ from input.path; allowed: a separate folder")
        return self

    @property
    def dtype(self) -> str:
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bfloat16" if self.compute.gpus_per_actor > 0 else "float32"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _norm_path(p: str) -> str:
    return p[len("file://"):].rstrip("/") if p.startswith("file://") else p.rstrip("/")


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


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, (str, int)))
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(JobSpec, loc[:-1])
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
        if e["type"] == "value_error" and msg.split(".", 1)[0].split("=", 1)[0] in JobSpec.model_fields:
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
