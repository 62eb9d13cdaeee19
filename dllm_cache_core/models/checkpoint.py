"""Safetensors files read by their headers: the tensor table, the checks a load makes against the
architecture, a content fingerprint that needs no weight bytes, and a fast reader onto a CUDA device.

Parsing the header ourselves (8-byte length, JSON) lets a checkpoint be checked without touching its
weights, also through any file opener (a remote folder), and lets the CUDA reader use plain reads into
pinned buffers instead of page-faulting through a memory map.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

import torch

from .config import ModelConfig

HEADER_LIMIT = 100 << 20
"""A safetensors header longer than this is not one (real headers are kilobytes to a few MB)."""
FULL_HASH_LIMIT = 64 << 20
"""Files up to this size are hashed in full; larger safetensors files by header and size."""
CHUNK = 1 << 20
"""Files are hashed in chunks of this size, never read whole into memory."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

Opener = Callable[[str], BinaryIO]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Byte offset of the data, from the start of the file."""
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    config: ModelConfig
    num_params: int
    weight_bytes: int
    """Bytes of the weights once loaded in the requested dtype (what one device must hold)."""
    file_bytes: int
    """Bytes of the weight files on disk."""
    fingerprint: str
    files: tuple[str, ...]


def read_header(f: BinaryIO, name: str) -> dict[str, TensorEntry]:
    """The tensor table of one safetensors file (8-byte length, JSON header, then the data)."""
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n <= 0 or n > HEADER_LIMIT:
        raise ValueError(f"{name}: not a safetensors file (header length {n})")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{name}: not a safetensors file (header is not JSON: {e})") from None
    base = 8 + n
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in v["data_offsets"])
            entry = TensorEntry(name, str(v["dtype"]), tuple(int(s) for s in v["shape"]), base + a, base + b)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{name}: malformed safetensors header entry for {key!r}") from None
        if entry.dtype not in DTYPE_BYTES:
            raise ValueError(f"{name}: tensor {key!r} has dtype {entry.dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
        if entry.nbytes != math.prod(entry.shape) * DTYPE_BYTES[entry.dtype]:
            raise ValueError(f"{name}: tensor {key!r} has {entry.nbytes} bytes for shape {entry.shape} {entry.dtype}")
        out[key] = entry
    return out


def weight_names(names: Iterable[str], index: Optional[dict], where: str) -> list[str]:
    """The safetensors files of a checkpoint, from the index when there is one; pickle-only is refused."""
    names = sorted(names)
    if index is not None:
        return sorted(set(index["weight_map"].values()))
    if "model.safetensors" in names:
        return ["model.safetensors"]
    shards = [n for n in names if n.endswith(".safetensors")]
    if shards:
        return shards
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        raise ValueError(f"{where}: only pickle weights (.bin/.pt) found; they can run arbitrary code and are "
                         "refused. Convert them to safetensors (e.g. save_pretrained(safe_serialization=True)).")
    raise ValueError(f"{where}: no safetensors weights found")


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_entry(key: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]], file: str, family: str) -> None:
    """One checkpoint tensor against the architecture (the messages a full load gives)."""
    if key not in expected:
        raise ValueError(f"{file}: unexpected key {key!r} for a {family} model")
    if tuple(shape) != expected[key]:
        raise ValueError(f"{file}: shape mismatch for {key!r}: checkpoint {tuple(shape)}, model {expected[key]}")


def check_complete(seen: Iterable[str], expected: dict[str, tuple[int, ...]], where: str) -> None:
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def fingerprint(entries: Iterable[tuple[str, int]], open_file: Opener) -> str:
    """Content hash of a checkpoint: small files in full (streamed), large safetensors files by header and
    size, so 16 GB need not be read. entries = (file name, size) of every file in the folder."""
    h = hashlib.sha256()
    for name, size in sorted(entries):
        h.update(name.encode())
        with open_file(name) as f:
            if name.endswith(".safetensors") and size > FULL_HASH_LIMIT:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, HEADER_LIMIT)))
                h.update(str(size).encode())
            else:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def local_files(path: Path) -> list[tuple[str, int]]:
    return [(f.name, f.stat().st_size) for f in path.iterdir() if f.is_file()]


TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
STAGING_BYTES = 64 << 20


def read_to_cuda(file: Path, entries: dict[str, TensorEntry], device: torch.device,
                 staging_bytes: int = STAGING_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of one file onto `device`: plain reads into two pinned staging buffers, each copied
    asynchronously while the other fills. Copying out of a memory map page-faults 4 KB at a time
    (about 2.3 GB/s from the page cache on an H100 host); this reads at the file system's speed."""
    bufs = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    views = [memoryview(b.numpy()) for b in bufs]
    events: list[Optional[torch.cuda.Event]] = [None, None]
    out: dict[str, torch.Tensor] = {}
    k = 0
    with open(file, "rb", buffering=0) as f:
        for key, e in sorted(entries.items(), key=lambda kv: kv[1].start):
            dst = torch.empty(e.nbytes, dtype=torch.uint8, device=device)
            f.seek(e.start)
            done = 0
            while done < e.nbytes:
                i, k = k % 2, k + 1
                ev = events[i]
                if ev is not None:
                    ev.synchronize()  # the buffer's previous copy has left it
                n = min(staging_bytes, e.nbytes - done)
                got = 0
                while got < n:
                    r = f.readinto(views[i][got:n])
                    if not r:
                        raise ValueError(f"{file.name}: truncated while reading {key!r}")
                    got += r
                dst[done:done + n].copy_(bufs[i][:n], non_blocking=True)
                events[i] = torch.cuda.Event()
                events[i].record()
                done += n
            out[key] = dst.view(TORCH_DTYPES[e.dtype]).view(e.shape)
    torch.cuda.current_stream(device).synchronize()
    return out
