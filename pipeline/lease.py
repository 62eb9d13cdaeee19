"""One writer per output folder: `_lease.json`, created atomically, refreshed by a heartbeat, released on exit.

The lease names its owner (job name, host, pid, start time, a random token) and carries a heartbeat
(unix time) that a driver thread rewrites every `heartbeat_s` seconds. A second run finds the lease
and refuses, naming the running job. The owner counts as dead, and its lease is taken over, when the
heartbeat is older than `stale_s` (a killed driver on any host), or at once when the owner ran on this
host and its pid is gone (a SIGKILLed driver on this machine).

Guarantees. Local and shared POSIX filesystems: the lease appears with its full content in one step
(a hard link of a complete temporary file, refused by the kernel when the name exists), so exactly one
of two racing runs gets it; a takeover renames the stale lease away and checks that what it moved is
the stale one, so two runs taking over together still end with one owner. Object stores (s3://, gs://
through pyarrow) have no conditional create there: the lease is written after an existence check and
read back after `settle_s` to confirm the token. Two runs started within that window can both proceed;
runs started further apart are refused as on a local disk.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Optional, TextIO

import pyarrow.fs as pafs

from . import fs as fsx

LEASE_FILE = "_lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0
"""A heartbeat this old means the owner is gone (6 missed beats: a busy driver still beats in time)."""


@dataclass
class LeaseOwner:
    token: str
    job: str
    host: str
    pid: int
    started_at: float
    heartbeat: float
    output: str

    def describe(self, now: Optional[float] = None) -> str:
        now = time.time() if now is None else now
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return (f"job {self.job!r} (pid {self.pid} on host {self.host}, started {started}, "
                f"last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)")


class LeaseHeld(RuntimeError):
    """Another live run holds the output folder's lease."""

    def __init__(self, out_uri: str, owner: LeaseOwner, stale_s: float):
        self.owner = owner
        super().__init__(
            f"output.path={out_uri!r} is being written by {owner.describe()}; one run writes a folder at a "
            f"time. Wait for it to finish, stop it, or choose a new output.path (a lease whose owner died is "
            f"taken over once its heartbeat is {stale_s:.0f} s old, at once when it ran on this host)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_dead(owner: LeaseOwner, stale_s: float, now: Optional[float] = None) -> bool:
    """Stale heartbeat, or an owner on this host whose process is gone."""
    now = time.time() if now is None else now
    if now - owner.heartbeat > stale_s:
        return True
    return owner.host == socket.gethostname() and not _pid_alive(owner.pid)


class Lease:
    """The lease of one output folder for this process; a context manager (released on any exit)."""

    def __init__(self, out_uri: str, job: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 settle_s: float = 1.0, warn: TextIO = sys.stderr):
        self.out_uri, self.job = out_uri, job
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.warn = warn
        self.fs, self.dir = fsx.resolve(out_uri)
        self.path = fsx.join(self.dir, LEASE_FILE)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        now = time.time()
        self.owner = LeaseOwner(uuid.uuid4().hex, job, socket.gethostname(), os.getpid(), now, now, out_uri)
        self.held = False
        self.lost: Optional[LeaseOwner] = None
        """Set when the heartbeat found another owner's lease (this run stalled past stale_s)."""
        self.taken_over: Optional[LeaseOwner] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------
    def read(self) -> Optional[LeaseOwner]:
        """The current owner, None when there is no lease. An unreadable lease file (written by
        something else) is reported by its modification time as an unknown owner."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError:
            if not fsx.exists(self.fs, self.path):
                return None
            raise
        try:
            return LeaseOwner(**json.loads(data))
        except (ValueError, TypeError):
            info = self.fs.get_file_info(self.path)
            mtime = info.mtime.timestamp() if info.mtime else 0.0
            return LeaseOwner("", "<unknown: unreadable lease file>", "?", -1, mtime, mtime, self.out_uri)

    def check(self) -> Optional[LeaseOwner]:
        """Without taking it: the live owner (None when the folder is free or its owner is dead)."""
        owner = self.read()
        return owner if owner is not None and not owner_dead(owner, self.stale_s) else None

    # -- taking ----------------------------------------------------------------------------------
    def _data(self) -> bytes:
        return json.dumps(asdict(self.owner), indent=1).encode()

    def _create(self) -> bool:
        tmp = fsx.temp_name(self.path)
        with self.fs.open_output_stream(tmp) as f:
            f.write(self._data())
        try:
            if self.local:
                return fsx.move_no_overwrite(self.fs, tmp, self.path)
            if fsx.exists(self.fs, self.path):
                return False
            self.fs.move(tmp, self.path)
        finally:
            if fsx.exists(self.fs, tmp):
                self.fs.delete_file(tmp)
        time.sleep(self.settle_s)  # object store: another writer's PUT in the same instant wins or loses here
        mine = self.read()
        return mine is not None and mine.token == self.owner.token

    def _remove_stale(self, stale: LeaseOwner) -> None:
        """Move the stale lease away, making sure it was the stale one (not a fresh one of a racing run)."""
        if not self.local:
            self.fs.delete_file(self.path)
            return
        tomb = fsx.temp_name(self.path).replace(".tmp", ".stale")
        try:
            os.rename(self.path, tomb)
        except FileNotFoundError:
            return  # another run removed it first; the create below decides
        try:
            with open(tomb, "rb") as f:
                moved = json.loads(f.read()).get("token", "")
        except (OSError, ValueError):
            moved = ""
        if moved != stale.token:
            try:
                os.link(tomb, self.path)  # put a racing run's fresh lease back
            except FileExistsError:
                pass
        os.unlink(tomb)

    def acquire(self) -> "Lease":
        """Take the lease or raise LeaseHeld; a dead owner's lease is taken over (noted on `warn`)."""
        self.fs.create_dir(self.dir, recursive=True)
        for _ in range(5):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return self
            owner = self.read()
            if owner is None:
                continue
            if not owner_dead(owner, self.stale_s):
                raise LeaseHeld(self.out_uri, owner, self.stale_s)
            self._remove_stale(owner)
            self.taken_over = owner
            print(f"note: taking over the lease of {owner.describe()}: that run is gone", file=self.warn)
        owner = self.read()
        raise LeaseHeld(self.out_uri, owner, self.stale_s) if owner else RuntimeError(
            f"{self.path}: could not create the lease file; check that the output folder is writable")

    # -- heartbeat and release --------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="output-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001  (a failed beat is retried; staleness is the limit)
                print(f"WARNING: could not refresh {self.path}: {type(e).__name__}: {e}", file=self.warn)

    def refresh(self) -> None:
        """Rewrite the heartbeat, unless another run has taken the lease (then `lost` is set)."""
        with self._lock:
            if not self.held:
                return
            current = self.read()
            if current is None or current.token != self.owner.token:
                self.lost = current
                self.held = False
                self._stop.set()
                who = current.describe() if current else "nobody (the file was removed)"
                print(f"WARNING: the lease of {self.out_uri} is now held by {who}; this run stops writing "
                      "at the end of the pipeline", file=self.warn)
                return
            self.owner.heartbeat = time.time()
            fsx.write_bytes_atomic(self.fs, self.path, self._data())

    def release(self) -> None:
        """Delete the lease if it is still ours; stops the heartbeat. Safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if not self.held:
                return
            self.held = False
            current = self.read()
            if current is not None and current.token == self.owner.token:
                self.fs.delete_file(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
