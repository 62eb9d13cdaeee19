"""A checkpoint folder's content hash: what a job's fingerprint records about its model."""
from __future__ import annotations

import hashlib
import os
from .loading import resolve_path

HEADER_ONLY_ABOVE = 64 << 20
"""Safetensors files larger than this are hashed by header and size (names, dtypes, shapes, offsets),
so that 16 GB of weights need not be read."""
CHUNK = 1 << 20
MAX_HEADER = 100 << 20
"""The safetensors format's own limit on a header; a corrupt length is not read beyond it."""


def model_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint folder: config and tokenizer files in full (streamed in chunks),
    large safetensors files by header and size."""
    p = resolve_path(path)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        n_bytes = f.stat().st_size
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors" and n_bytes > HEADER_ONLY_ABOVE:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, MAX_HEADER)))
                h.update(str(n_bytes).encode())
            else:
                _hash_stream(h, fh)
    return h.hexdigest()[:16]


def _hash_stream(h: "hashlib._Hash", fh) -> None:
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        h.update(chunk)
