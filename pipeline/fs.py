"""Paths and URIs -> pyarrow filesystems; copying an object-store model to local disk once per node.

Plain paths and `file://` URIs are local; `s3://` and `gs://` use pyarrow's native filesystems
(credentials from the usual environment); any other `scheme://` goes through fsspec when a backend is
installed (e.g. `memory://` in tests, `hf://`).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path

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


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a hidden temporary name beside `path`, then rename (atomic on local/POSIX filesystems;
    on object stores the final object appears in one PUT/copy)."""
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


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
