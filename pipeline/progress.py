"""Progress: actors report each finished batch to a small tracker actor; the driver polls it and shows
rows done, rows/s, generated tokens/s, errors and ETA (a tqdm bar on a terminal, a log line every
`compute.progress_interval_s` seconds otherwise, as in `ray job logs`).

The tracker also sums the engine time of all actors, from which the run's pipeline overhead is
computed: 1 - engine seconds / (wall seconds x actors), and keeps each actor's model-load interval
and engine calls (start-up and balance; the pool's ready time separates start-up from steady state).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence


class ProgressTracker:
    """Counters shared by all actors (run as a Ray actor with num_cpus=0), summed and per actor process:
    start-up (model loads) and load balance need the per-actor view."""

    MAX_SPANS = 256
    """Engine-call spans (start, end, rows) kept per actor, the first ones: a timeline for benchmark-sized jobs."""

    def __init__(self, watch: Optional[Any] = None) -> None:
        """watch: a calibrate.DriftWatch (`calibration.on_drift`), fed the audit agreements of each batch;
        actors ask `policy_level` before each batch."""
        self.watch = watch
        self.rows = 0
        self.tokens = 0
        self.errors: dict[str, int] = {}
        self.engine_s = 0.0
        self.actors: dict[str, dict[str, Any]] = {}

    def _actor(self, worker: str) -> dict[str, Any]:
        return self.actors.setdefault(worker, {"worker": worker, "imported": None, "load_start": None, "load_end": None,
                                               "batches": 0, "rows": 0, "calls": 0, "engine_s": 0.0,
                                               "first_call_start": None, "last_call_end": None, "spans": []})

    def loaded(self, worker: str, start: float, end: float, imported: Optional[float] = None) -> None:
        self._actor(worker).update(load_start=start, load_end=end, imported=imported)

    def report(self, rows: int, tokens: int, errors: dict[str, int], engine_s: float, worker: str,
               spans: Sequence[tuple[float, float, int]] = (),
               audit: Optional[tuple[int, list[float]]] = None) -> None:
        """One finished batch; spans = its engine calls (start, end, prompts), wall-clock times; audit =
        (the fallback chain's entry it ran under, its audited rows' token agreements)."""
        self.rows += rows
        if audit is not None and self.watch is not None:
            self.watch.add(audit[0], list(audit[1]), self.rows)
        self.tokens += tokens
        self.engine_s += engine_s
        for k, v in errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        a = self._actor(worker)
        a["batches"] += 1
        a["engine_s"] += engine_s
        for start, end, n in spans:
            a["rows"] += n
            a["calls"] += 1
            a["last_call_end"] = end
            if a["first_call_start"] is None:
                a["first_call_start"] = start
            if len(a["spans"]) < self.MAX_SPANS:
                a["spans"].append((round(start, 4), round(end, 4), n))

    def policy_level(self) -> int:
        """The fallback chain's active entry (0 without a watch)."""
        return self.watch.active if self.watch is not None else 0

    def snapshot(self, actors: bool = False) -> dict[str, Any]:
        """Totals (polled every second); with actors=True also the per-actor entries (at the end)."""
        snap = {"rows": self.rows, "tokens": self.tokens, "errors": dict(self.errors), "engine_s": self.engine_s,
                "workers": sorted(w for w, a in self.actors.items() if a["batches"])}
        if self.watch is not None:
            snap["policy"] = self.watch.state()
        if actors:
            snap["actors"] = [dict(a) for _, a in sorted(self.actors.items())]
        return snap


@dataclass
class Snapshot:
    rows: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    engine_s: float = 0.0
    workers: list[str] = field(default_factory=list)
    actors: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    """With a DriftWatch: the active entry of the fallback chain and the drift events so far."""


def pool_ready_s(actors: list[dict], t0: float, num_actors: int) -> float:
    """Seconds from t0 until the first num_actors model loads had finished (replacements come later)."""
    ends = sorted(a["load_end"] for a in actors if a.get("load_end") is not None)
    return max(0.0, ends[min(num_actors, len(ends)) - 1] - t0) if ends else 0.0


def format_line(snap: Snapshot, total: int, elapsed: float) -> str:
    """'120/500 rows (24.0%) | 3.1 rows/s | 402 tok/s | errors 2 (too_long 2) | ETA 2m03s'"""
    rate = snap.rows / elapsed if elapsed > 0 else 0.0
    tok_rate = snap.tokens / elapsed if elapsed > 0 else 0.0
    n_err = sum(snap.errors.values())
    err = f"errors {n_err}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(snap.errors.items()))})" if n_err else "")
    pct = 100.0 * snap.rows / total if total else 100.0
    eta = (total - snap.rows) / rate if rate > 0 and total >= snap.rows else None
    return (f"{snap.rows}/{total} rows ({pct:.1f}%) | {rate:.2f} rows/s | {tok_rate:.0f} tok/s | {err} | "
            f"ETA {format_duration(eta)}")


def format_duration(s: Optional[float]) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class ProgressMonitor:
    """Polls `fetch()` in a background thread while the job runs; `stop()` returns the last snapshot,
    taken with `final_fetch` when given (a fuller snapshot, fetched once at the end)."""

    def __init__(self, fetch: Callable[[], dict], total: int, interval_s: float = 10.0,
                 stream=None, tty: Optional[bool] = None, poll_s: float = 1.0,
                 final_fetch: Optional[Callable[[], dict]] = None,
                 on_snapshot: Optional[Callable[[Snapshot], None]] = None):
        """on_snapshot: called with every snapshot polled (e.g. to record drift events as they happen)."""
        self.fetch, self.total, self.interval_s, self.poll_s = fetch, total, interval_s, poll_s
        self.on_snapshot = on_snapshot
        self.final_fetch = final_fetch
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.time()
        self.last = Snapshot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="progress")
        self._bar = None

    def __enter__(self) -> "ProgressMonitor":
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="row", file=self.stream, dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _poll(self) -> None:
        try:
            self.last = Snapshot(**self.fetch())
        except Exception:  # noqa: BLE001  (progress must never break the job)
            return
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(self.last)
            except Exception:  # noqa: BLE001  (the runner records the final snapshot again after the pipeline)
                pass

    def _loop(self) -> None:
        last_line = 0.0
        while not self._stop.wait(self.poll_s):
            self._poll()
            elapsed = time.time() - self.start
            if self._bar is not None:
                self._bar.n = min(self.last.rows, self.total)
                self._bar.set_postfix_str(format_line(self.last, self.total, elapsed).split(" | ", 1)[1], refresh=True)
            elif time.time() - last_line >= self.interval_s:
                last_line = time.time()
                print(f"[progress] {format_line(self.last, self.total, elapsed)}", file=self.stream, flush=True)

    def stop(self) -> Snapshot:
        if not self._stop.is_set():
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(timeout=5)
            self.fetch = self.final_fetch or self.fetch
            self._poll()
            if self._bar is not None:
                self._bar.n = min(self.last.rows, self.total)
                self._bar.refresh()
                self._bar.close()
            print(f"[progress] {format_line(self.last, self.total, time.time() - self.start)}",
                  file=self.stream, flush=True)
        return self.last
