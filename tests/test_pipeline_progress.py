"""Progress counters and lines (no Ray: the tracker is a plain class that the runner makes an actor)."""
from __future__ import annotations

import io
import time

from pipeline.progress import ProgressMonitor, ProgressTracker, Snapshot, format_duration, format_line


def test_tracker_sums_reports_from_actors():
    t = ProgressTracker()
    t.report(rows=8, tokens=100, errors={"too_long": 1}, engine_s=2.0, worker="h:1")
    t.report(rows=8, tokens=50, errors={"too_long": 1, "oom": 2}, engine_s=1.5, worker="h:2")
    s = t.snapshot()
    assert s == {"rows": 16, "tokens": 150, "errors": {"too_long": 2, "oom": 2}, "engine_s": 3.5, "workers": ["h:1", "h:2"]}


def test_line_has_rows_rates_errors_and_eta():
    line = format_line(Snapshot(rows=120, tokens=4000, errors={"too_long": 2}), total=500, elapsed=40.0)
    assert line == "120/500 rows (24.0%) | 3.00 rows/s | 100 tok/s | errors 2 (too_long 2) | ETA 2m07s"
    assert format_line(Snapshot(), total=10, elapsed=0.0).endswith("errors 0 | ETA ?")
    assert format_duration(3725) == "1h02m05s" and format_duration(None) == "?"


def test_monitor_prints_periodic_lines_when_not_a_terminal():
    state = {"rows": 0, "tokens": 0, "errors": {}, "engine_s": 0.0, "workers": []}
    stream = io.StringIO()
    with ProgressMonitor(lambda: dict(state), total=10, interval_s=0.05, stream=stream, tty=False, poll_s=0.02) as m:
        time.sleep(0.15)
        state.update(rows=10, tokens=30, errors={"oom": 1})
        time.sleep(0.15)
    last = m.stop()
    lines = [l for l in stream.getvalue().splitlines() if l.startswith("[progress]")]
    assert len(lines) >= 3 and lines[0].startswith("[progress] 0/10 rows")
    assert lines[-1].startswith("[progress] 10/10 rows (100.0%)") and "errors 1 (oom 1)" in lines[-1]
    assert last.rows == 10


def test_monitor_survives_a_failing_fetch():
    def boom():
        raise ConnectionError("tracker gone")

    stream = io.StringIO()
    with ProgressMonitor(boom, total=5, interval_s=0.01, stream=stream, tty=False, poll_s=0.01):
        time.sleep(0.05)
    assert "[progress] 0/5 rows" in stream.getvalue()
