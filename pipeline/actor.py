"""GenerationActor: the Ray Data callable class that runs the Engine over batches of rows.

One instance per actor: the model is loaded once in __init__ (an object-store model is first copied
to the node's local disk). Each call receives batch_size x length_grouping rows, sorts them by prompt
length and runs engine calls of batch_size rows, so rows of one call pad little. Rows in = rows out,
in the input order. Nothing about a single row can fail the batch: bad input, engine row errors,
out-of-memory on the GPU or the host (the call is split in halves and retried down to one row) and
unexpected exceptions (the call is retried row by row) all become rows with `error`, `error_type`
and finish_reason 'error'.
Every row also gets `input_hash` (pipeline/prompts.py), which resume compares with the input.

StreamingGenerationActor (compute.batches_in_flight > 1) keeps the engine fed across Ray Data batches:
several batches are in flight on the actor (an async __call__; Ray Data runs it under the actor's
max_concurrency), all sharing one EngineStream, whose single thread owns the engine and steps its one
decode loop; each batch submits its rows and awaits them, so the next batch's rows take the slots the
previous batch's rows free instead of the engine draining at every batch's end.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa

from .audit import is_audited
from .prompts import input_hash, normalize_messages, prompt_length, prompt_of  # noqa: F401  (re-exported)
from .schema import INPUT_ERROR, INTERNAL_PREFIX, STATS_COLUMNS, conform, output_schema
from dllm_cache_core.engine import OOM_MESSAGES, StepFailed, free_memory, is_oom  # noqa: F401  (re-exported)
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
        self._meter = threading.Lock()
        self._unreported_s = 0.0
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
            with self._meter:
                self.engine_s += dt
                self._unreported_s += dt
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
            free_memory()
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
        self._switch_to(self._active_level())

    def _active_level(self) -> int:
        """The chain's entry the tracker says is active (the current one without a chain or tracker)."""
        cfg = self.cfg
        if cfg.fallback is None or cfg.progress is None:
            return self._level
        import ray

        try:
            level = int(ray.get(cfg.progress.policy_level.remote(), timeout=60))
        except Exception:  # noqa: BLE001  (a lost tracker must not fail the job: keep the current entry)
            return self._level
        return level if 0 <= level < len(cfg.fallback) else self._level

    def _switch_to(self, level: int) -> None:
        cfg = self.cfg
        if level == self._level:
            return
        if level not in self._engines:
            from dllm_cache_core import CacheConfig

            self._engines[level] = self._engines[cfg.level].with_cache(CacheConfig(**cfg.fallback[level]))
        self._level, self._cache, self.engine = level, dict(cfg.fallback[level]), self._engines[level]
        self._reference = None

    # -- one Ray Data batch ---------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        self._use_active_policy()
        b = self._prepare(batch)
        for group, runner in ((b.normal, self.run_chunk), (b.audit, self.run_audit)):
            self._run_group(b, group, runner)
        return self._finish(batch, b, *self._take_meter())

    def _prepare(self, batch: pa.Table) -> "_Batch":
        """The batch's ids, prompts and input errors; its rows to run, split into normal rows (sorted by
        prompt length) and audited rows."""
        cfg = self.cfg
        n = batch.num_rows
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
        return _Batch(ids, raw, prompts, results, normal, audit, self._level, dict(self._cache), self.engine)

    def _run_group(self, b: "_Batch", group: list[int], runner: Callable) -> None:
        """Rows `group` of the batch through `runner` (run_chunk or run_audit) in engine calls of batch_size."""
        for s in range(0, len(group), self.cfg.batch_size):
            rows = group[s:s + self.cfg.batch_size]
            for i, r in zip(rows, runner([b.prompts[i] for i in rows], [b.ids[i] for i in rows])):
                b.results[i] = r

    def _take_meter(self) -> tuple[float, list[tuple[float, float, int]]]:
        """Engine seconds and engine-call spans since the last take (each reported by exactly one batch)."""
        with self._meter:
            s, spans = self._unreported_s, self._spans
            self._unreported_s, self._spans = 0.0, []
        return s, spans

    def _finish(self, batch: pa.Table, b: "_Batch", engine_s: float, spans: list) -> pa.Table:
        hashes = [input_hash(v, self.cfg.messages_column is not None) for v in b.raw]
        table = self._to_table(batch, b.results, hashes, b.cache)  # type: ignore[arg-type]
        self._report(b.results, engine_s, spans, b.level)  # type: ignore[arg-type]
        return table

    def _to_table(self, batch: pa.Table, results: list[RowResult], hashes: list[str], cache: dict) -> pa.Table:
        """cache: the settings the batch ran under (the fallback chain's entry when it started)."""
        cfg = self.cfg
        cols: dict[str, Any] = {c: batch.column(c) for c in batch.column_names if not c.startswith(INTERNAL_PREFIX)}
        cols["input_hash"] = hashes
        cols["generation"] = [r.text for r in results]
        cols["generation_token_ids"] = [r.token_ids for r in results]
        for s in STATS_COLUMNS:
            cols[s] = [(r.stats or {}).get(s) if r.error_type is None else None for r in results]
        cols["finish_reason"] = ["error" if r.error_type else (r.stats or {}).get("finish_reason") for r in results]
        cols["cache_policy"] = [cache["policy"]] * len(results)
        cols["cache_config"] = [cache_label(cache)] * len(results)
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

    def _report(self, results: list[RowResult], engine_s: float, spans: list, level: int) -> None:
        if self.cfg.progress is None:
            return
        errors: dict[str, int] = {}
        for r in results:
            if r.error_type:
                errors[r.error_type] = errors.get(r.error_type, 0) + 1
        tokens = sum((r.stats or {}).get("num_generated_tokens", 0) or 0 for r in results if r.error_type is None)
        audit = None
        if self.cfg.fallback is not None:
            audit = (level, [r.audit_token_agreement for r in results if r.audit_token_agreement is not None])
        self.cfg.progress.report.remote(rows=len(results), tokens=int(tokens), errors=errors, engine_s=engine_s,
                                        worker=self.worker, spans=spans, audit=audit)


@dataclass
class _Batch:
    """One Ray Data batch on its way through the actor (indices are the batch's row positions)."""

    ids: list[str]
    raw: list[Any]
    prompts: list[Any]
    results: list[Optional[RowResult]]
    normal: list[int]
    """Rows for the engine, by prompt length."""
    audit: list[int]
    """Rows also run under `none` (run_audit)."""
    level: int
    cache: dict
    engine: Any
    """The fallback chain's entry, its cache settings and engine when the batch started: its rows run,
    are stamped and are reported with them."""


class StreamingGenerationActor(GenerationActor):
    """A GenerationActor whose batches share one engine stream (EngineStream), `batches_in_flight` of them
    at once: `__call__` is a coroutine (Ray Data runs it on the actor's event loop, several batches
    concurrently under the actor's max_concurrency), it submits the batch's rows and awaits their outputs.
    The stream's one thread owns the engine (one stepping loop, one decode loop: the same GPU memory as
    batch-at-a-time calls), so rows of the next batch take the slots the previous batch's rows free.

    What stays as in GenerationActor: rows in = rows out in the batch's order, bad input rows, engine row
    errors, scoring, input_hash, progress reports (engine time = the stream's busy time, each second
    reported by one batch), the fallback chain (a batch runs, is stamped and reported under the entry
    active when it started; a switch first lets the rows and calls already in the stream finish, then
    opens a stream on the new entry's engine). Differences: rows are submitted by prompt length, batch by
    batch, and share slots and the canvas width (EngineStream); out of memory retries the failing step's
    rows in halves inside the stream (rows of several batches; a row that runs out of memory alone is an
    'oom' row); another step failure retries the failing step's rows one by one through Engine.generate;
    audited rows run as today (job policy then `none`, back to back, as EngineStream.call: once no row is
    decoding), so their wall-time ratio is not skewed by other rows. An engine without open_stream (a
    test's fake) runs each batch as GenerationActor does, one batch at a time, on one engine thread.

    A killed actor's batches, all of them, are retried by Ray (max_task_retries) on its replacement;
    nothing of a batch is written before the batch returned, so a retry writes each row once."""

    def __init__(self, config: ActorConfig, batches_in_flight: int = 2):
        super().__init__(config)
        self.batches_in_flight = batches_in_flight
        self.stream: Any = None
        self._worker: Optional[ThreadPoolExecutor] = None
        self._loop_state: Optional[tuple[asyncio.AbstractEventLoop, asyncio.Semaphore, asyncio.Lock]] = None
        self._open()

    def _open(self) -> None:
        """A stream on the current engine (a single engine thread for an engine without open_stream)."""
        opener = getattr(self.engine, "open_stream", None)
        if opener is not None:
            slots = (self.cfg.generation or {}).get("slots") or self.cfg.batch_size
            self.stream = opener(slots=slots, chat_template=self.cfg.chat_template)
        elif self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="engine")

    def _on_engine(self, fn: Callable, *args: Any) -> "asyncio.Future":
        """fn(*args) on the engine's thread (the stream's, once no row is decoding), awaitable."""
        fut = self.stream.call(lambda: fn(*args)) if self.stream is not None else self._worker.submit(fn, *args)
        return asyncio.wrap_future(fut)

    async def __call__(self, batch: pa.Table) -> pa.Table:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        if self._loop_state is None or self._loop_state[0] is not loop:  # on the event loop that runs batches
            self._loop_state = (loop, asyncio.Semaphore(self.batches_in_flight), asyncio.Lock())
        async with self._loop_state[1]:
            await self._follow_policy()
            # from here to the submissions nothing awaits: a policy switch cannot come in between
            b = self._prepare(batch)
            audit = self._on_engine(self._run_group, b, b.audit, self.run_audit) if b.audit else None
            if self.stream is None:
                await self._on_engine(self._run_group, b, b.normal,
                                      lambda p, i: self.run_chunk(p, i, b.engine))
            else:
                await self._stream_rows(b)
            if audit is not None:
                await audit
            engine_s, spans = self._take_meter()
            if self.stream is not None:
                busy, busy_spans = self.stream.take_busy()
                with self._meter:
                    self.engine_s += busy
                engine_s, spans = engine_s + busy, busy_spans + spans
            return self._finish(batch, b, engine_s, spans)

    async def _follow_policy(self) -> None:
        """The fallback chain's active entry for the batch about to start: on a switch, the rows and calls
        already submitted finish under the old entry first (its stream is closed), then the new entry's
        engine gets a stream (one engine thread and one decode loop at a time)."""
        if self.cfg.fallback is None or self.cfg.progress is None:
            return
        async with self._loop_state[2]:
            level = await asyncio.to_thread(self._active_level)
            if level == self._level:
                return
            old = self.stream
            if old is not None:
                await asyncio.to_thread(old.close)
                busy, spans = old.take_busy()
                with self._meter:
                    self.engine_s += busy
                    self._unreported_s += busy
                    self._spans += spans
                self.stream = None
            elif self._worker is not None:
                await asyncio.wrap_future(self._worker.submit(lambda: None))
            self._switch_to(level)
            self._open()

    async def _stream_rows(self, b: _Batch) -> None:
        futures = self.stream.submit([(b.ids[i], b.prompts[i]) for i in b.normal])
        outs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        retry = []
        for i, o in zip(b.normal, outs):
            if isinstance(o, StepFailed) and o.oom:
                b.results[i] = RowResult.failed("oom", f"out of memory on a single row: {o}")
            elif isinstance(o, StepFailed):
                retry.append(i)
            elif isinstance(o, BaseException):
                raise o  # the stream itself failed (a bug): the batch fails, Ray Data reports it
            else:
                b.results[i] = RowResult.of(o)
        if retry:  # one by one through the batch's engine, as GenerationActor retries a call that raised
            rows = await self._on_engine(
                lambda: [r for i in retry for r in self.run_chunk([b.prompts[i]], [b.ids[i]], b.engine)])
            for i, r in zip(retry, rows):
                b.results[i] = r
