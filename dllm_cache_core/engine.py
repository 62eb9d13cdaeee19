"""Engine: tokenizer + model + policy; text (or chat messages) in, text + stats out.

Bad rows never raise: they come back with `error` and `error_type` set, so a batch job can write
them out and go on. Only a whole-batch failure (e.g. CUDA OOM) propagates, for the caller to split.

`Engine.open_stream()` keeps one decode loop fed from any number of threads (EngineStream): rows
submitted at any time join the running slots, each row's future resolves as it finishes.
"""
from __future__ import annotations

import gc
import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .config import CacheConfig, GenerationConfig
from .decoding.generate import DecodeLoop
from .models.fingerprint import model_fingerprint
from .models.loading import load_model, stop_ids_from_tokenizer
from .stats import SampleStats

__all__ = ["Engine", "EngineStream", "StepFailed", "TextOutput", "free_memory", "is_oom", "model_fingerprint",
           "stop_ids_from_tokenizer"]

PROMPT_BUCKET = 64
"""Prompt widths of the engine's kept decode loop are multiples of this (see Engine.loop)."""


@dataclass
class TextOutput:
    text: Optional[str] = None
    token_ids: list[int] = field(default_factory=list)
    stats: Optional[SampleStats] = None
    """None for a row that failed before generation (see error / error_type)."""
    error: Optional[str] = None
    error_type: Optional[str] = None


class Engine:
    """A model, its tokenizer and the generation and cache settings: text in, text and stats out."""

    def __init__(self, model, tokenizer, generation: GenerationConfig, cache: CacheConfig, seed: int = 0,
                 model_path: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.generation, self.cache, self.seed = generation, cache, seed
        self.model_path = model_path
        self._loop: Optional[tuple[tuple[int, int], DecodeLoop]] = None
        self.block_budget: Optional[Callable[[Any], Optional[int]]] = None
        """Benchmarks: row id -> the blocks after which the row ends as if a stop token had come (None =
        no budget), for random-weight models, which never stop on their own (Row.max_blocks)."""

    @classmethod
    def from_spec(cls, model_path: str, generation: GenerationConfig | None = None, cache: CacheConfig | None = None,
                  device: str = "cpu", dtype: str = "float32", family: str = "auto", seed: int = 0) -> "Engine":
        model, tok = load_model(model_path, device=device, dtype=dtype, family=family)
        return cls(model, tok, generation or GenerationConfig(), cache or CacheConfig(), seed, str(model_path))

    def with_cache(self, cache: CacheConfig | str) -> "Engine":
        """The same weights and tokenizer under another cache policy (e.g. the audit's `none`)."""
        cache = CacheConfig(policy=cache) if isinstance(cache, str) else cache
        other = Engine(self.model, self.tokenizer, self.generation, cache, self.seed, self.model_path)
        other.block_budget = self.block_budget
        return other

    def model_fingerprint(self) -> str:
        return model_fingerprint(self.model_path)

    # -- tokenisation ---------------------------------------------------------------------------
    def encode(self, prompt: Any, chat_template: bool = False) -> list[int]:
        """Token ids of one prompt; ValueError/TypeError with an error_type prefix on bad input."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _RowError("empty_prompt", "empty prompt")
            if chat_template:
                prompt = [{"role": "user", "content": prompt}]
            else:
                try:
                    return list(tok(prompt)["input_ids"])
                except Exception as e:  # noqa: BLE001  (any tokenizer failure is this row's error)
                    raise _RowError("tokenizer", f"tokenizer failed: {e}") from e
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise _RowError("bad_input", "chat messages need string 'role' and 'content'")
            if not any(m["content"].strip() for m in prompt):
                raise _RowError("empty_prompt", "empty prompt")
            try:
                text = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
                return list(tok(text, add_special_tokens=False)["input_ids"])
            except Exception as e:  # noqa: BLE001
                raise _RowError("tokenizer", f"chat template / tokenizer failed: {e}") from e
        if prompt is None or (isinstance(prompt, (list, tuple)) and not prompt):
            raise _RowError("empty_prompt", "empty prompt")
        raise _RowError("bad_input", f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")

    # -- generation -----------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Sequence[dict]], row_ids: Optional[Sequence] = None) -> list[TextOutput]:
        """One reply per conversation (a list of {"role", "content"} messages), each through the
        tokenizer's chat template (vLLM's LLM.chat)."""
        for i, c in enumerate(conversations):
            if isinstance(c, (str, dict)):
                raise TypeError(f"conversations[{i}] is a {type(c).__name__}; a conversation is a list of "
                                "{'role', 'content'} messages (plain text goes to Engine.generate)")
        return self.generate([list(c) for c in conversations], row_ids=row_ids)

    def _encode_checked(self, prompt: Any, chat_template: bool) -> list[int]:
        t = self.encode(prompt, chat_template)
        if not t:
            raise _RowError("empty_prompt", "prompt has no tokens")
        limit = self.model.config.max_len - self.generation.gen_length
        if len(t) > limit:
            raise _RowError("too_long", f"prompt has {len(t)} tokens; at most {limit} fit with "
                                        f"gen_length {self.generation.gen_length}")
        return t

    def _text(self, r) -> TextOutput:
        text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        return TextOutput(text=text, token_ids=r.token_ids, stats=r.stats)

    def generate(self, prompts: Sequence[Any], row_ids: Optional[Sequence] = None,
                 chat_template: bool = False) -> list[TextOutput]:
        """Plain-text prompts go in raw (no template, as vLLM's LLM.generate) unless chat_template;
        a prompt that is a list of messages gets the chat template."""
        outs = [TextOutput() for _ in prompts]
        ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        good, good_ids, where = [], [], []
        for i, p in enumerate(prompts):
            try:
                t = self._encode_checked(p, chat_template)
            except _RowError as e:
                outs[i] = TextOutput(error=str(e), error_type=e.kind)
                continue
            good.append(t)
            good_ids.append(ids[i])
            where.append(i)
        if good:
            loop = self.loop(self.generation.slots or len(good), max(len(t) for t in good))
            for j, _, r in loop.run((j, rid, t, self.budget(rid)) for j, (rid, t) in enumerate(zip(good_ids, good))):
                outs[where[j]] = self._text(r)
        return outs

    def budget(self, row_id: Any) -> Optional[int]:
        """The row's block budget (block_budget; None without one)."""
        return None if self.block_budget is None else self.block_budget(row_id)

    def open_stream(self, slots: Optional[int] = None, chat_template: bool = False,
                    prompt_len: Optional[int] = None) -> "EngineStream":
        """A running decode loop that takes rows from any thread at any time (EngineStream): rows submitted
        while others decode join the freed slots. slots: rows decoded at once (default generation.slots,
        else 32). prompt_len: a fixed canvas prompt width (a longer prompt is a too_long row); None = the
        canvas grows to the widest row submitted (see EngineStream). While the stream is open, the
        engine's other calls (generate, and engines of with_cache, which share the kept decode loop)
        go through EngineStream.call."""
        return EngineStream(self, slots or self.generation.slots or 32, chat_template, prompt_len)

    def loop(self, slots: int, prompt_len: int) -> DecodeLoop:
        """The engine's decode loop for `slots` rows and prompts up to `prompt_len` tokens, kept for the
        engine's lifetime: its buffers and static steps (CUDA graphs on GPUs) serve every later call
        that fits it (as many slots or more, a prompt width from prompt_len up to twice it; a wider
        canvas changes no token). Widths are multiples of PROMPT_BUCKET; one loop is kept at a time
        (a call that does not fit frees it before building its own)."""
        limit = self.model.config.max_len - self.generation.gen_length
        width = min(limit, -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET)
        if self._loop is not None:
            (k_slots, k_width), kept = self._loop
            if k_slots >= slots and width <= k_width <= max(2 * width, width + PROMPT_BUCKET):
                return kept
            kept.close()
            self._loop = None  # free the old buffers before the new ones are allocated
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        loop = DecodeLoop(self.model, self.generation, self.cache, self.seed, slots, width, padded=True, keep=True)
        self._loop = ((slots, width), loop)
        return loop

    def stream(self, rows: Iterable[tuple[Any, Any]], chat_template: bool = False, slots: Optional[int] = None,
               prompt_len: Optional[int] = None) -> Iterator[tuple[Any, TextOutput]]:
        """(row_id, prompt) in, (row_id, output) out as rows finish (continuous batching by default):
        rows are read only as slots free up; a bad row comes back at once with its error set.
        slots: rows decoded at once (default generation.slots, else 32). prompt_len: the widest prompt
        the canvas holds (default: the model's max length minus gen_length; every row pays for the
        canvas width, so set it); a longer prompt is a too_long row. One stream (or generate call)
        at a time per engine: they share the engine's kept decode loop."""
        limit = self.model.config.max_len - self.generation.gen_length
        width = min(limit, prompt_len or limit)
        bad: list[tuple[Any, TextOutput]] = []

        def good_rows():
            for rid, p in rows:
                try:
                    t = self._encode_checked(p, chat_template)
                    if len(t) > width:
                        raise _RowError("too_long", f"prompt has {len(t)} tokens; this stream's canvas holds {width}")
                except _RowError as e:
                    bad.append((rid, TextOutput(error=str(e), error_type=e.kind)))
                    continue
                yield rid, t

        loop = self.loop(slots or self.generation.slots or 32, width)
        for _, rid, r in loop.run((j, rid, t, self.budget(rid)) for j, (rid, t) in enumerate(good_rows())):
            while bad:
                yield bad.pop(0)
            yield rid, self._text(r)
        while bad:
            yield bad.pop(0)


class _RowError(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind



# ----------------------------------------------------------------------------- memory failures
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory")
"""Lower-cased fragments of allocator failures: CUDA ("CUDA out of memory"), torch's CPU allocator
("DefaultCPUAllocator: can't allocate memory"), errno 12 ("Cannot allocate memory")."""


def is_oom(e: BaseException) -> bool:
    """True for GPU and CPU out-of-memory failures: both are cured by decoding fewer rows at once."""
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(e, (RuntimeError, OSError)) and any(m in str(e).lower() for m in OOM_MESSAGES)


def free_memory() -> None:
    """Give back what a failed call held (host objects, then CUDA's cache); call it once the exception
    (whose traceback holds the failed call's frames and tensors) is gone."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the stream
class StepFailed(RuntimeError):
    """A row's decoding step raised. kind: the exception's type name; oom: an allocator failure (with
    the row decoding alone: after an OOM the stream retries the failing step's rows in halves)."""

    def __init__(self, message: str, kind: str, oom: bool):
        super().__init__(message)
        self.kind, self.oom = kind, oom


@dataclass
class _Request:
    key: int
    row_id: Any
    prompt: Any
    future: Future
    budget: Optional[int] = None
    tokens: list[int] = field(default_factory=list)
    need: int = 0
    """The canvas prompt width the row needs (a multiple of PROMPT_BUCKET)."""


class EngineStream:
    """One decode loop, stepped by one thread, fed from any thread: `submit(rows)` returns a future per
    row (a TextOutput; a bad row's error is set on it, as in Engine.generate), `call(fn)` runs fn on
    the stepping thread once no row is decoding (the engine's other calls: generate, with_cache engines).

    Rows take slots in the order submitted; a row's tokens and stats do not depend on the rows it
    shares steps with or on when it joined (the decode loop's rule). Tokenisation runs on the stepping
    thread too (tokenizers are not thread-safe).

    Canvas width (prompt_len None): the widest row submitted so far sets it (a multiple of
    PROMPT_BUCKET, as Engine.loop); narrower rows ride it (a wider canvas changes no token). A row wider
    than the canvas waits, and the rows submitted after it, until the running rows finish; the canvas is
    then rebuilt for the widest waiting row. So the width only grows and is the widest a batch-at-a-time
    generate() of the same rows would have built: the same memory, one decode loop at a time.

    Failures: a step that runs out of memory (GPU or host) puts its rows back at the head of the queue
    and decodes at most half as many rows at once until those rows finished (halves again on another
    OOM); a row that runs out of memory decoding alone resolves with StepFailed(oom=True). Any other
    exception in a step resolves the step's rows with StepFailed(oom=False) (the caller may retry them
    one by one through call(): Engine.generate). Rows queued behind a failed step are not affected."""

    def __init__(self, engine: Engine, slots: int, chat_template: bool = False, prompt_len: Optional[int] = None):
        self.engine, self.slots, self.chat_template = engine, slots, chat_template
        self.limit = engine.model.config.max_len - engine.generation.gen_length
        self.fixed = min(self.limit, prompt_len) if prompt_len else None
        self.steps = 0
        """Engine steps run (each advances every slotted row by one step)."""
        self.row_steps = 0
        """Row-steps decoded (useful work; steps x slots is what was paid)."""
        self.rebuilds = 0
        """Times the canvas was (re)built: the first loop, a wider canvas, after call() replaced it."""
        self.oom_retries = 0
        self._cv = threading.Condition()
        self._inbox: deque[_Request] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._closed = False
        self._error: Optional[BaseException] = None
        self._keys = itertools.count()
        # owned by the stepping thread
        self._pending: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._loop: Optional[DecodeLoop] = None
        self._width = 0
        self._cap = slots
        self._retrying: set[int] = set()
        # busy time (a span from the first row taking a slot until the loop is empty again)
        self._meter = threading.Lock()
        self._span_start: Optional[float] = None
        self._span_rows = 0
        self._spans: list[tuple[float, float, int]] = []
        self._busy_s = 0.0
        self._thread = threading.Thread(target=self._main, name="engine-stream", daemon=True)
        self._thread.start()

    # -- any thread -----------------------------------------------------------------------------
    def submit(self, rows: Sequence[tuple[Any, Any]], budgets: Optional[Sequence[Optional[int]]] = None
               ) -> list[Future]:
        """(row_id, prompt) rows in; one future per row, in the same order. budgets: block budgets (benchmarks;
        default the engine's block_budget)."""
        futures = []
        with self._cv:
            self._check_open()
            for j, (rid, prompt) in enumerate(rows):
                fut: Future = Future()
                budget = budgets[j] if budgets is not None else self.engine.budget(rid)
                self._inbox.append(_Request(next(self._keys), rid, prompt, fut, budget))
                futures.append(fut)
            self._cv.notify()
        return futures

    def call(self, fn: Callable[[], Any]) -> Future:
        """fn() on the stepping thread, once no row is decoding (rows submitted meanwhile wait); its result
        or exception on the future."""
        fut: Future = Future()
        with self._cv:
            self._check_open()
            self._jobs.append((fn, fut))
            self._cv.notify()
        return fut

    def take_busy(self) -> tuple[float, list[tuple[float, float, int]]]:
        """Seconds the loop had rows, and its busy spans (start, end, rows finished; wall-clock times), since
        the last call (an open span is cut at now)."""
        with self._meter:
            if self._span_start is not None:
                now = time.time()
                self._cut_span(now)
                self._span_start = now
            busy, spans = self._busy_s, self._spans
            self._busy_s, self._spans = 0.0, []
        return busy, spans

    def close(self) -> None:
        """Finish the rows and calls already submitted, then stop the stepping thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def __enter__(self) -> "EngineStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine stream stopped: {type(self._error).__name__}: {self._error}")
        if self._closed:
            raise RuntimeError("the engine stream is closed")

    # -- the stepping thread --------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while self._cycle():
                pass
        except BaseException as e:  # noqa: BLE001  (a bug: fail every waiting row rather than hang its caller)
            with self._cv:
                self._error = e
                waiting = [*self._inbox, *self._pending, *self._running.values()]
                jobs = list(self._jobs)
                self._inbox.clear()
                self._jobs.clear()
            for r in waiting:
                _settle(r.future, exc=RuntimeError(f"the engine stream stopped: {type(e).__name__}: {e}"))
            for _, fut in jobs:
                _settle(fut, exc=RuntimeError(f"the engine stream stopped: {type(e).__name__}: {e}"))

    def _active(self) -> bool:
        return self._loop is not None and self._loop.rows > 0

    def _cycle(self) -> bool:
        with self._cv:
            while not (self._inbox or self._jobs or self._pending or self._active() or self._closed):
                self._cv.wait()
            if self._closed and not (self._inbox or self._jobs or self._pending or self._active()):
                return False
            inbox, self._inbox = self._inbox, deque()
            job = self._jobs.popleft() if self._jobs and not self._active() else None
            draining = bool(self._jobs)
        for req in inbox:
            self._take(req)
        if job is not None:
            self._run_job(*job)
            return True
        if not draining:
            self._feed()
        if self._active():
            self._step()
        return True

    def _take(self, req: _Request) -> None:
        """Tokenise a submitted row: a bad row resolves now, a good one waits for a slot."""
        if req.future.cancelled():
            return
        try:
            t = self.engine._encode_checked(req.prompt, self.chat_template)
            if self.fixed is not None and len(t) > self.fixed:
                raise _RowError("too_long", f"prompt has {len(t)} tokens; this stream's canvas holds {self.fixed}")
        except _RowError as e:
            _settle(req.future, TextOutput(error=str(e), error_type=e.kind))
            return
        req.tokens = t
        req.need = min(self.limit, -(-len(t) // PROMPT_BUCKET) * PROMPT_BUCKET)
        self._pending.append(req)

    def _run_job(self, fn: Callable[[], Any], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001  (the caller's)
            fut.set_exception(e)
        else:
            fut.set_result(result)
        finally:
            self._loop = None  # fn may have replaced the engine's kept loop: ask Engine.loop again

    def _feed(self) -> None:
        while self._pending and self._pending[0].future.cancelled():
            self._retrying.discard(self._pending.popleft().key)
        if not self._pending:
            return
        loop = self._loop
        if loop is None or loop.rows == 0:
            width = self.fixed or max(self._width, max(r.need for r in self._pending))
            if loop is None or width > loop.prompt_len:
                self._loop = None
                loop = self._build(width)
                if loop is None:
                    return
                self._loop = loop
                self.rebuilds += 1
            loop.begin()
            self._width = max(self._width, loop.prompt_len)
        # at most `slots` rows (the kept loop may have more), fewer after an out-of-memory step (_cap)
        while self._pending and loop.wants_rows() and loop.rows < min(self._cap, self.slots):
            req = self._pending[0]
            if req.future.cancelled():  # its caller gave up on it (e.g. a cancelled Ray task)
                self._retrying.discard(self._pending.popleft().key)
                continue
            if len(req.tokens) > loop.prompt_len:
                break  # a wider canvas is needed: the running rows finish first
            self._pending.popleft()
            self._running[req.key] = req
            loop.add(req.key, req.row_id, req.tokens, req.budget)

    def _build(self, width: int) -> Optional[DecodeLoop]:
        """The engine's decode loop for the stream's slots and `width`. Out of memory building it: half the
        slots from then on (a single slot that does not fit fails the first waiting row); another failure
        fails every waiting row. None when it failed (the stream goes on with what is left)."""
        failure: Optional[tuple[str, str, bool]] = None
        try:
            return self.engine.loop(self.slots, width)
        except Exception as e:  # noqa: BLE001
            failure = (f"{type(e).__name__}: {e}", type(e).__name__, is_oom(e))
        free_memory()
        message, kind, oom = failure
        if oom and self.slots > 1:
            self.slots = self._cap = max(1, self.slots // 2)
            return None
        failed = [self._pending.popleft()] if oom else list(self._pending)
        if not oom:
            self._pending.clear()
        for r in failed:
            _settle(r.future, exc=StepFailed(message, kind, oom))
        return None

    def _step(self) -> None:
        loop = self._loop
        assert loop is not None
        with self._meter:
            if self._span_start is None:
                self._span_start = time.time()
        u = loop.utilisation
        useful = u.useful_queued + u.useful_drain
        failure: Optional[tuple[str, str, bool]] = None
        try:
            done = loop.step(more=bool(self._pending))
        except Exception as e:  # noqa: BLE001  (the step's rows get it; the stream goes on)
            failure = (f"{type(e).__name__}: {e}", type(e).__name__, is_oom(e))
            done = []
        if failure is not None:  # past the except block: the failed step's frames (and tensors) are gone
            self._failed(*failure)
        else:
            self.steps += 1
            self.row_steps += u.useful_queued + u.useful_drain - useful
        for key, _, out in done:
            req = self._running.pop(key)
            self._retrying.discard(key)
            with self._meter:  # counted before its caller can wake up and take the meter
                self._span_rows += 1
            try:
                text = self.engine._text(out)
            except Exception as e:  # noqa: BLE001  (detokenisation: this row's error)
                text = TextOutput(error=f"detokenisation failed: {e}", error_type="tokenizer")
            _settle(req.future, text)
        if not self._retrying:
            self._cap = self.slots
        if loop.rows == 0:
            with self._meter:
                self._cut_span(time.time())

    def _failed(self, message: str, kind: str, oom: bool) -> None:
        loop = self._loop
        assert loop is not None
        slotted, queued = loop.abort()
        free_memory()
        back = [self._running.pop(r.index) for r in sorted(queued, key=lambda r: r.index)]
        step_rows = [self._running.pop(r.index) for r in sorted(slotted, key=lambda r: r.index)]
        if oom and len(step_rows) > 1:
            self.oom_retries += 1
            self._cap = max(1, len(step_rows) // 2)
            self._retrying.update(r.key for r in step_rows)
            back = step_rows + back
        else:
            for r in step_rows:
                self._retrying.discard(r.key)
                _settle(r.future, exc=StepFailed(message, kind, oom))
        self._pending.extendleft(reversed(back))

    def _cut_span(self, now: float) -> None:
        """Close the open span at `now` (the caller holds the meter lock)."""
        if self._span_start is None:
            return
        self._spans.append((self._span_start, now, self._span_rows))
        self._busy_s += now - self._span_start
        self._span_start, self._span_rows = None, 0


def _settle(fut: Future, result: Any = None, exc: Optional[BaseException] = None) -> None:
    """Resolve a future unless its caller gave up on it (cancelled)."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
