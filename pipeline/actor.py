"""GenerationActor: the Ray Data callable class that runs the Engine over batches of rows.

One instance per actor: the model is loaded once in __init__ (an object-store model is first copied
to the node's local disk). Each call receives batch_size x length_grouping rows, sorts them by prompt
length and runs engine calls of batch_size rows, so rows of one call pad little. Rows in = rows out,
in the input order. Nothing about a single row can fail the batch: bad input, engine row errors,
out-of-memory on the GPU or the host (the call is split in halves and retried down to one row) and
unexpected exceptions (the call is retried row by row) all become rows with `error`, `error_type`
and finish_reason 'error'.
Every row also gets `input_hash` (pipeline/prompts.py), which resume compares with the input.
"""
from __future__ import annotations

import gc
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa

from .audit import is_audited
from .prompts import input_hash, normalize_messages, prompt_length, prompt_of  # noqa: F401  (re-exported)
from .schema import INPUT_ERROR, INTERNAL_PREFIX, STATS_COLUMNS, conform, output_schema
from dllm_cache_core.scoring import get_scorer, score_row

IMPORTED_AT = time.time()
"""When this worker process imported the actor's module (start-up: process + imports, before the load)."""


@dataclass(frozen=True)
class ActorConfig:
    """Everything an actor needs, built on the driver; small and picklable."""

    model_path: str
    family: str
    dtype: str
    device: str
    seed: int
    generation: dict
    cache: dict
    prompt_column: str
    messages_column: Optional[str]
    chat_template: bool
    id_column: str
    batch_size: int
    audit_fraction: float
    evaluation: Optional[dict]
    schema: Optional[pa.Schema]
    """Every batch is conformed to it (the job's Parquet parts); None = the input columns as they come,
    then the typed output columns (build_processor, which knows no schema before the data is read)."""
    model_label: str
    progress: Any = None
    """ProgressTracker actor handle (or None)."""
    engine_factory: Optional[Callable[["ActorConfig"], Any]] = None
    """Builds the engine; None = dllm_cache_core.Engine.from_spec (tests pass fakes)."""
    fallback: Optional[tuple] = None
    """`calibration.on_drift` under `cache.policy: auto`: the chain of cache settings (chosen first, `none`
    last), `cache` being its entry `level`. Before each batch the actor asks the progress tracker which
    entry is active (the tracker's DriftWatch moves on when the audit's agreement drifts), runs the
    whole batch with it and stamps its rows with it; None = always `cache`."""
    level: int = 0


def cache_label(cache: dict) -> str:
    """`policy(param=value, ...)` of cache settings: the calibration table's candidate and `cache_config`."""
    params = ", ".join(f"{k}={v}" for k, v in sorted(cache.items()) if k != "policy")
    return f"{cache['policy']}({params})" if params else cache["policy"]


def build_engine(cfg: ActorConfig) -> Any:
    """The real engine, from the (node-local) model folder."""
    from dllm_cache_core import CacheConfig, Engine, GenerationConfig

    from .fs import localize_model

    return Engine.from_spec(localize_model(cfg.model_path), generation=GenerationConfig(**cfg.generation),
                            cache=CacheConfig(**cfg.cache), device=cfg.device, dtype=cfg.dtype,
                            family=cfg.family, seed=cfg.seed)


def reference_engine(engine: Any) -> Any:
    """The same model and settings under policy `none` (for the audit), sharing the weights."""
    return engine.with_cache("none")


OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory")
"""Lower-cased fragments of allocator failures: CUDA ("CUDA out of memory"), torch's CPU allocator
("DefaultCPUAllocator: can't allocate memory"), errno 12 ("Cannot allocate memory")."""


def is_oom(e: BaseException) -> bool:
    """True for GPU and CPU out-of-memory failures: both are cured by a smaller engine call."""
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return isinstance(e, (RuntimeError, OSError)) and any(m in str(e).lower() for m in OOM_MESSAGES)


@dataclass
class RowResult:
    text: Optional[str] = None
    token_ids: Optional[list[int]] = None
    stats: Optional[dict] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    audit_speedup: Optional[float] = None
    audit_token_agreement: Optional[float] = None

    @classmethod
    def failed(cls, error_type: str, error: str) -> "RowResult":
        return cls(error=error, error_type=error_type)

    @classmethod
    def of(cls, out: Any) -> "RowResult":
        if out.error is not None or out.error_type is not None:
            return cls.failed(out.error_type or "generation", out.error or "generation failed")
        return cls(text=out.text, token_ids=list(out.token_ids), stats=out.stats.to_dict() if out.stats else None)


# ----------------------------------------------------------------------------- actor
class GenerationActor:
    def __init__(self, config: ActorConfig):
        self.cfg = config
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        factory = config.engine_factory or build_engine
        t_load = time.time()
        try:
            self.engine = factory(config)
        except Exception as e:  # noqa: BLE001  (re-raised with the context the user needs)
            raise RuntimeError(f"model {config.model_label!r} failed to load on {socket.gethostname()}: "
                               f"{type(e).__name__}: {e}") from e
        if config.progress is not None:
            config.progress.loaded.remote(self.worker, t_load, time.time(), imported=IMPORTED_AT)
        self._spans: list[tuple[float, float, int]] = []
        self._reference: Any = None
        self._level, self._cache = config.level, config.cache
        self._engines = {config.level: self.engine}
        scorer = config.evaluation
        self.scorer = get_scorer(scorer["scorer"], scorer.get("pattern")) if scorer else None
        self.engine_s = 0.0

    # -- engine calls -------------------------------------------------------------------------
    def _generate(self, engine: Any, prompts: Sequence[Any], ids: Sequence[str]) -> list[RowResult]:
        t0, start = time.perf_counter(), time.time()
        try:
            outs = engine.generate(list(prompts), row_ids=list(ids), chat_template=self.cfg.chat_template)
        finally:
            dt = time.perf_counter() - t0
            self.engine_s += dt
            self._spans.append((start, start + dt, len(prompts)))
        if len(outs) != len(prompts):
            raise RuntimeError(f"engine returned {len(outs)} outputs for {len(prompts)} prompts")
        return [RowResult.of(o) for o in outs]

    def run_chunk(self, prompts: Sequence[Any], ids: Sequence[str], engine: Any = None) -> list[RowResult]:
        """One engine call; OOM -> halves (a single row that still OOMs -> 'oom'); any other exception ->
        row by row (a row that still raises -> 'generation')."""
        engine = engine or self.engine
        try:
            return self._generate(engine, prompts, ids)
        except Exception as e:  # noqa: BLE001
            oom, message, kind = is_oom(e), str(e), type(e).__name__
        # past the except block the exception and its traceback are gone, and with them the frames that
        # still held the failed call's tensors: only now can the halves get that memory back
        if oom:
            _free_memory()
            if len(prompts) == 1:
                return [RowResult.failed("oom", f"out of memory on a single row: {message}")]
            h = len(prompts) // 2
            return self.run_chunk(prompts[:h], ids[:h], engine) + self.run_chunk(prompts[h:], ids[h:], engine)
        if len(prompts) == 1:
            return [RowResult.failed("generation", f"{kind}: {message}")]
        return [r for p, i in zip(prompts, ids) for r in self.run_chunk([p], [i], engine)]

    def run_audit(self, prompts: Sequence[Any], ids: Sequence[str]) -> list[RowResult]:
        """The rows under the job's policy, then under `none`, back to back; wall-time ratio and token
        agreement go on the rows (whose outputs are the job-policy ones)."""
        from dllm_cache_core import token_agreement

        if self._reference is None:
            self._reference = reference_engine(self.engine)
        t0 = time.perf_counter()
        main = self.run_chunk(prompts, ids)
        t1 = time.perf_counter()
        ref = self.run_chunk(prompts, ids, self._reference)
        t2 = time.perf_counter()
        speedup = (t2 - t1) / (t1 - t0) if t1 > t0 else None
        for m, r in zip(main, ref):
            if m.error_type is None and r.error_type is None:
                m.audit_speedup = speedup
                m.audit_token_agreement = float(token_agreement(m.token_ids, r.token_ids))
        return main

    # -- the fallback chain ---------------------------------------------------------------------
    def _use_active_policy(self) -> None:
        """The chain's entry the tracker says is active, for the batch about to run (the engines share
        the weights: `with_cache`)."""
        cfg = self.cfg
        if cfg.fallback is None or cfg.progress is None:
            return
        import ray

        try:
            level = int(ray.get(cfg.progress.policy_level.remote(), timeout=60))
        except Exception:  # noqa: BLE001  (a lost tracker must not fail the job: keep the current entry)
            return
        if level == self._level or not 0 <= level < len(cfg.fallback):
            return
        if level not in self._engines:
            from dllm_cache_core import CacheConfig

            self._engines[level] = self._engines[cfg.level].with_cache(CacheConfig(**cfg.fallback[level]))
        self._level, self._cache, self.engine = level, dict(cfg.fallback[level]), self._engines[level]
        self._reference = None

    # -- one Ray Data batch ---------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        n = batch.num_rows
        self._use_active_policy()
        engine_before = self.engine_s
        ids = [str(x) for x in batch.column(cfg.id_column).to_pylist()]
        col = cfg.messages_column or cfg.prompt_column
        raw = batch.column(col).to_pylist() if col in batch.column_names else [None] * n
        input_errors = (batch.column(INPUT_ERROR).to_pylist() if INPUT_ERROR in batch.column_names else [None] * n)
        results: list[Optional[RowResult]] = [None] * n
        prompts: list[Any] = [None] * n
        for i in range(n):
            if input_errors[i]:
                results[i] = RowResult.failed("bad_input", input_errors[i])
                continue
            try:
                prompts[i] = prompt_of(raw[i], cfg.messages_column is not None)
            except ValueError as e:
                results[i] = RowResult.failed("bad_input", str(e))
        todo = [i for i in range(n) if results[i] is None]
        audit = [i for i in todo if is_audited(ids[i], cfg.audit_fraction)]
        audit_set = set(audit)
        normal = sorted((i for i in todo if i not in audit_set), key=lambda i: prompt_length(prompts[i]))
        for group, runner in ((normal, self.run_chunk), (audit, self.run_audit)):
            for s in range(0, len(group), cfg.batch_size):
                rows = group[s:s + cfg.batch_size]
                for i, r in zip(rows, runner([prompts[i] for i in rows], [ids[i] for i in rows])):
                    results[i] = r
        hashes = [input_hash(v, cfg.messages_column is not None) for v in raw]
        table = self._to_table(batch, results, hashes)
        self._report(results, self.engine_s - engine_before)
        return table

    def _to_table(self, batch: pa.Table, results: list[RowResult], hashes: list[str]) -> pa.Table:
        cfg = self.cfg
        cols: dict[str, Any] = {c: batch.column(c) for c in batch.column_names if not c.startswith(INTERNAL_PREFIX)}
        cols["input_hash"] = hashes
        cols["generation"] = [r.text for r in results]
        cols["generation_token_ids"] = [r.token_ids for r in results]
        for s in STATS_COLUMNS:
            cols[s] = [(r.stats or {}).get(s) if r.error_type is None else None for r in results]
        cols["finish_reason"] = ["error" if r.error_type else (r.stats or {}).get("finish_reason") for r in results]
        cols["cache_policy"] = [self._cache["policy"]] * len(results)
        cols["cache_config"] = [cache_label(self._cache)] * len(results)
        cols["model"] = [cfg.model_label] * len(results)
        cols["error"] = [r.error for r in results]
        cols["error_type"] = [r.error_type for r in results]
        if cfg.audit_fraction or cfg.schema is not None:  # a processor (no schema, no audit) leaves them out
            cols["audit_speedup"] = [r.audit_speedup for r in results]
            cols["audit_token_agreement"] = [r.audit_token_agreement for r in results]
        if self.scorer is not None:
            ref_col = cfg.evaluation["answer_column"]
            refs = batch.column(ref_col).to_pylist()
            scores = [score_row(self.scorer, r.text, ref) for r, ref in zip(results, refs)]
            cols["score"] = [s.score if s else None for s in scores]
            cols["extracted_answer"] = [s.extracted if s else None for s in scores]
        types = cfg.schema if cfg.schema is not None else output_schema(pa.schema([]))
        arrays = {k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v, types.field(k).type)
                  for k, v in cols.items()}
        return conform(pa.table(arrays), cfg.schema) if cfg.schema is not None else pa.table(arrays)

    def _report(self, results: list[RowResult], engine_s: float) -> None:
        spans, self._spans = self._spans, []
        if self.cfg.progress is None:
            return
        errors: dict[str, int] = {}
        for r in results:
            if r.error_type:
                errors[r.error_type] = errors.get(r.error_type, 0) + 1
        tokens = sum((r.stats or {}).get("num_generated_tokens", 0) or 0 for r in results if r.error_type is None)
        audit = None
        if self.cfg.fallback is not None:
            audit = (self._level, [r.audit_token_agreement for r in results if r.audit_token_agreement is not None])
        self.cfg.progress.report.remote(rows=len(results), tokens=int(tokens), errors=errors, engine_s=engine_s,
                                        worker=self.worker, spans=spans, audit=audit)


def _free_memory() -> None:
    """Give back what the failed call held before its halves run (host objects, then CUDA's cache)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
