"""A checkpoint folder's content hash: what a job's fingerprint records about its model."""
from __future__ import annotations

import os

from .checkpoint import fingerprint, local_files
from .loading import resolve_path


def model_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint folder: config and tokenizer files in full (streamed in chunks),
    large safetensors files by header and size (checkpoint.fingerprint, which also hashes remote folders)."""
    p = resolve_path(path)
    return fingerprint(local_files(p), lambda name: open(p / name, "rb"))
