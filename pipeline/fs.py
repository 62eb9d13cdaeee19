"""Paths and URIs -> pyarrow filesystems; copying an object-store model to local disk once per node.

Plain paths and `file://` URIs are local; `s3://` and `gs://` use pyarrow's native filesystems
(credentials from the usual environment); any other `scheme://` goes through fsspec when a backend is
installed (e.g. `memory://` in tests, `hf://`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

NATIVE_SCHEMES = ("s3", "gs", "gcs")
MODEL_CACHE_ENV = "DLLM_MODEL_CACHE"
"""Where object-store models are copied on each node (default /tmp/dllm_models)."""


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_local(uri: str) -> bool:
    """Plain paths and file:// URIs; these land on the disk of whichever node writes them."""
    return scheme(uri) in ("", "file")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Local paths become absolute."""
    sch = scheme(uri)
    if sch == "":
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    if sch == "file":
        path = uri[len("file://"):]
        if not path.startswith("/"):
            raise ValueError(f"{uri!r}: a file:// URI needs an absolute path (file:///data/x)")
        return pafs.LocalFileSystem(), path
    if sch in NATIVE_SCHEMES:
        return pafs.FileSystem.from_uri(uri)
    try:
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{uri!r}: no filesystem for scheme {sch!r}; allowed: a local path, file://, "
                         f"s3://, gs:// (or an installed fsspec backend)") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def temp_name(path: str) -> str:
    """A hidden temporary name beside `path` (`.<name>.<uuid>.tmp`): readers skip it, and the owner
    of `path` can recognise its leftovers by the `.<name>.` prefix."""
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"


FAULT_ENV = "DLLM_FAULT_AFTER_TEMP_WRITE"
"""Fault injection for tests: a file path. The first part write that creates that file (exclusively)
kills its own process (os._exit) after the temporary file is complete and before the rename: a
writer killed mid-part. Unset in normal use."""


def _maybe_fault() -> None:
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return
    os._exit(17)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a hidden temporary name beside `path`, then rename over it (atomic on local/POSIX
    filesystems; on object stores the final object appears in one PUT/copy). Replaces `path`: for
    files the project rewrites (markers, `_job.json`, the report); parts use `write_bytes_new`."""
    tmp = temp_name(path)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def move_no_overwrite(fs: pafs.FileSystem, src: str, dst: str) -> bool:
    """Rename `src` to `dst` unless `dst` exists; False (and `src` left in place) when it does.

    Local disks: a hard link, which the kernel refuses atomically when `dst` exists, then the
    temporary name is removed. Object stores have no conditional rename through pyarrow: an existence
    check then a copy, so two writers racing for one name within the same instant could both succeed
    (parts are written by one job at a time, see the output lease; names differ per id set)."""
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            os.link(src, dst)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # a filesystem without hard links: exclusive create of the name, then replace it
            try:
                os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return False
            os.replace(src, dst)
            return True
        os.unlink(src)
        return True
    if exists(fs, dst):
        return False
    fs.move(src, dst)
    return True


def write_bytes_new(fs: pafs.FileSystem, path: str, data: bytes, alternatives) -> str:
    """Write `data` atomically under the first name of [path, *alternatives] that does not exist yet;
    never replaces a file. Returns the path written."""
    tmp = temp_name(path)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    _maybe_fault()
    try:
        for candidate in itertools.chain([path], alternatives):
            if move_no_overwrite(fs, tmp, candidate):
                return candidate
    except BaseException:
        if exists(fs, tmp):
            fs.delete_file(tmp)
        raise
    raise RuntimeError(f"{path}: every candidate name is taken")  # alternatives is unbounded in practice


# ----------------------------------------------------------------------------- comparing locations
def location(uri: str) -> tuple[str, str]:
    """(scheme, normalised path) of a file or folder: local paths with symlinks, `.`, `..`, `~` and a
    trailing `/` resolved (`file://` is the same local path); object-store paths normalised (no
    symlinks there). Two spellings of one place give equal locations."""
    sch = scheme(uri)
    if sch in ("", "file"):
        path = uri[len("file://"):] if sch == "file" else uri
        return "", os.path.realpath(os.path.expanduser(path))
    rest = uri.split("://", 1)[1]
    sch = "gs" if sch == "gcs" else sch
    return sch, posixpath.normpath("/" + rest).lstrip("/")


def glob_root(uri: str) -> str:
    """The part of a path before its first wildcard's folder (the folder a glob searches)."""
    if not any(c in uri for c in "*?["):
        return uri
    head = uri[:min(uri.index(c) for c in "*?[" if c in uri)]
    return head.rsplit("/", 1)[0] if "/" in head else "."


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def overlap(input_uri: str, output_uri: str) -> Optional[str]:
    """Why the output folder must not be used with this input, or None: it is the input, lies inside
    it, or contains it (an overwrite or a part listing there would touch the input's files)."""
    (si, pi), (so, po) = location(glob_root(input_uri)), location(output_uri)
    if si != so:
        return None
    if pi == po:
        return "is the input itself (its real path is the same)"
    if _inside(po, pi):
        return f"lies inside the input {pi!r}"
    if _inside(pi, po):
        return f"contains the input {pi!r}"
    return None


def localize_model(uri: str, cache_dir: str | None = None) -> str:
    """A local folder holding the model: `uri` itself when local/builtin, else a copy made once per node.

    Concurrent actors on one node serialise on a lock file; the copy goes to a temporary folder and is
    renamed into place, so a crashed copy is never mistaken for a complete one.
    """
    if uri.startswith("builtin:") or is_local(uri):
        return uri
    root = Path(cache_dir or os.environ.get(MODEL_CACHE_ENV, "/tmp/dllm_models"))
    root.mkdir(parents=True, exist_ok=True)
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return str(target)
        fs, src = resolve(uri)
        if fs.get_file_info(src).type != pafs.FileType.Directory:
            raise ValueError(f"model.path={uri!r}: not a folder on the object store")
        tmp = root / f".{target.name}.{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            (tmp / ".complete").write_text(uri)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
