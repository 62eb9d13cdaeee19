"""Per-actor timing of a job: when each pool actor had its model loaded, and every engine call.

Why: the progress tracker sums over actors, but start-up (model loads) and load balance need the
per-actor view, and "pipeline overhead after start-up" needs to know when the pool was ready. Timing
never fails a job: if the timeline actor cannot answer, the job's report just lacks these fields.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

from .actor import ActorConfig, build_engine


class ActorTimeline:
    """Per actor process: model-load interval, rows, engine calls and seconds (a Ray actor, num_cpus=0).
    The progress tracker sums over actors; start-up and load balance need the per-actor view."""

    MAX_SPANS = 256
    """Engine-call spans (start, end, rows) kept per actor, the first ones: a timeline for benchmark-sized jobs."""

    def __init__(self) -> None:
        self.actors: dict[str, dict[str, Any]] = {}

    def _entry(self, worker: str) -> dict[str, Any]:
        return self.actors.setdefault(worker, {"worker": worker, "load_start": None, "load_end": None, "rows": 0,
                                               "calls": 0, "engine_s": 0.0, "first_call_start": None,
                                               "last_call_end": None, "spans": []})

    def loaded(self, worker: str, start: float, end: float) -> None:
        self._entry(worker).update(load_start=start, load_end=end)

    def ran(self, worker: str, rows: int, engine_s: float, end: float) -> None:
        e = self._entry(worker)
        e["rows"] += rows
        e["calls"] += 1
        e["engine_s"] += engine_s
        e["last_call_end"] = end
        if e["first_call_start"] is None:
            e["first_call_start"] = end - engine_s
        if len(e["spans"]) < self.MAX_SPANS:
            e["spans"].append((round(end - engine_s, 4), round(end, 4), rows))

    def snapshot(self) -> list[dict[str, Any]]:
        return [dict(v) for _, v in sorted(self.actors.items())]


class _TimedEngine:
    """The actor's engine, reporting each generate() call (rows, seconds, end) to the ActorTimeline."""

    def __init__(self, engine: Any, timeline: Any, worker: str):
        self._engine, self._timeline, self._worker = engine, timeline, worker

    def generate(self, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._engine.generate(prompts, *args, **kwargs)
        finally:
            self._timeline.ran.remote(self._worker, len(prompts), time.perf_counter() - t0, time.time())

    def with_cache(self, *args: Any, **kwargs: Any) -> "_TimedEngine":
        """The audit's reference engine (policy `none`) is timed too."""
        return _TimedEngine(self._engine.with_cache(*args, **kwargs), self._timeline, self._worker)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@dataclass(frozen=True)
class TimedFactory:
    """Wraps the engine factory so every pool actor reports its model load and its engine calls."""

    inner: Optional[Any]
    timeline: Any

    def __call__(self, cfg: ActorConfig) -> Any:
        worker, t0 = f"{socket.gethostname()}:{os.getpid()}", time.time()
        engine = (self.inner or build_engine)(cfg)
        self.timeline.loaded.remote(worker, t0, time.time())
        return _TimedEngine(engine, self.timeline, worker)


def timeline_snapshot(timeline: Any) -> list[dict]:
    """The timeline's per-actor entries; [] when it cannot answer (timing never fails a job)."""
    import ray

    try:
        return ray.get(timeline.snapshot.remote(), timeout=10)
    except Exception:  # noqa: BLE001
        return []


def pool_ready_s(actors: list[dict], t0: float, num_actors: int) -> float:
    """Seconds from t0 until the first num_actors model loads had finished (replacements come later)."""
    ends = sorted(a["load_end"] for a in actors if a.get("load_end") is not None)
    return max(0.0, ends[min(num_actors, len(ends)) - 1] - t0) if ends else 0.0
