"""Ray start-up and run notices that tell a user of run_job.py nothing they can act on, filtered at the
logger that emits them (everything else from Ray, warnings included, still shows).

- `Token authentication is enabled for this Ray cluster ...` and `Generated new authentication token
  ...`: Ray's default for a local cluster; the token protects it and needs nothing from the user.
- `Progress bars disabled ...`: the runner turns Ray Data's bars off on purpose; its own progress line
  (rows, tokens/s, errors, ETA) replaces them.
- `The Ray cluster currently does not have any available CPUs ...`: Ray Data checks free CPUs when the
  write finishes, while the actor pool still holds them; the runner checks the real condition (actors
  that reserve every CPU) before it starts.
- `... has constructor arguments in the object store and max_restarts > 0 ...`: Ray's core worker logs
  it (C++, straight to the process's stderr) for every restartable actor whose constructor arguments
  are in the object store, and Ray Data always puts its map function there; the operator keeps that
  reference alive for the whole run, so restarts work. `filtered_stderr` drops that one line while
  the pipeline runs; every other line passes through unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Iterator

NOISE: dict[str, tuple[str, ...]] = {
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster", "Generated new authentication token"),
    "ray.data._internal.progress": ("Progress bars disabled", "Progress bars for operators disabled"),
    "ray.data.dataset": ("The Ray cluster currently does not have any available CPUs",),
}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p in msg for p in self.prefixes)


def quiet_ray() -> None:
    """Install the filters (idempotent); call before ray.init and before a dataset runs."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))


STDERR_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


@contextlib.contextmanager
def filtered_stderr(drop: tuple[bytes, ...] = STDERR_NOISE) -> Iterator[None]:
    """Route file descriptor 2 through a pipe whose reader forwards every line but those containing
    one of `drop` (C++ log lines, which Python's logging never sees). Restored on exit."""
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        with os.fdopen(r, "rb", buffering=0) as f:
            pending = b""
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not any(d in line for d in drop):
                        _write_all(real, line + b"\n")
            if pending:
                _write_all(real, pending)

    thread = threading.Thread(target=pump, daemon=True, name="stderr-filter")
    thread.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)  # closes the pipe's last write end: the reader drains and stops
        thread.join(timeout=5)
        os.close(real)
