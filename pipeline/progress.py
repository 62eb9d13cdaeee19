"""Progress: actors report each finished batch to a small tracker actor; the driver polls it and shows
rows done, rows/s, generated tokens/s, errors and ETA (a tqdm bar on a terminal, a log line every
`compute.progress_interval_s` seconds otherwise, as in `ray job logs`).

The tracker also sums the engine time of all actors, from which the run's pipeline overhead is
computed: 1 - engine seconds / (wall seconds x actors).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class ProgressTracker:
    """Counters shared by all actors (run as a Ray actor with num_cpus=0)."""

    def __init__(self) -> None:
        self.rows = 0
        self.tokens = 0
        self.errors: dict[str, int] = {}
        self.engine_s = 0.0
        self.workers: set[str] = set()

    def report(self, rows: int, tokens: int, errors: dict[str, int], engine_s: float, worker: str) -> None:
        self.rows += rows
        self.tokens += tokens
        self.engine_s += engine_s
        self.workers.add(worker)
        for k, v in errors.items():
            self.errors[k] = self.errors.get(k, 0) + v

    def snapshot(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "errors": dict(self.errors),
                "engine_s": self.engine_s, "workers": sorted(self.workers)}


@dataclass
class Snapshot:
    rows: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    engine_s: float = 0.0
    workers: list[str] = field(default_factory=list)


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
    """Polls `fetch()` in a background thread while the job runs; `stop()` returns the last snapshot."""

    def __init__(self, fetch: Callable[[], dict], total: int, interval_s: float = 10.0,
                 stream=None, tty: Optional[bool] = None, poll_s: float = 1.0):
        self.fetch, self.total, self.interval_s, self.poll_s = fetch, total, interval_s, poll_s
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
            self._poll()
            if self._bar is not None:
                self._bar.n = min(self.last.rows, self.total)
                self._bar.refresh()
                self._bar.close()
            print(f"[progress] {format_line(self.last, self.total, time.time() - self.start)}",
                  file=self.stream, flush=True)
        return self.last
