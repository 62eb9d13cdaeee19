"""The job's model check before any actor starts, without loading the weights.

config.json, the tokenizer and the safetensors headers are read in the driver (for an object-store
model: the small files are copied to a temporary folder and the headers read by range), so a folder
that would fail to load fails the job here, with the loader's message, in about a second instead of
a throw-away load of the whole model. The weights' size is checked against the actors' GPU memory.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

from dllm_cache_core.models.checkpoint import WEIGHT_SUFFIXES, CheckpointInfo
from dllm_cache_core.models.loading import inspect_checkpoint

from . import fs as fsx

GIB = 1 << 30
MEMORY_HEADROOM = 0.9
"""Share of a GPU's memory the weights may take; the rest holds activations and the cache."""


class PreflightError(RuntimeError):
    """The model cannot run as specified; the message says why."""


@dataclass(frozen=True)
class Preflight:
    model_hash: str
    weight_bytes: int
    num_params: int
    gpu_memory_bytes: Optional[int]
    """Total memory of the smallest GPU an actor may get (None: not checked, e.g. CPU actors)."""


def check_model(path: str, family: str, dtype: str) -> CheckpointInfo:
    """inspect_checkpoint on a local folder, `builtin:NAME`, or an object-store folder."""
    if path.startswith("builtin:") or fsx.is_local(path):
        return inspect_checkpoint(path, family, dtype)  # resolve_path takes builtin: and file:// itself
    import pyarrow.fs as pafs

    fs, root = fsx.resolve(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ValueError(f"model.path={path!r}: not a folder on the object store")
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=False)) if i.type == pafs.FileType.File]
    files = [(i.base_name, i.size) for i in infos]
    tmp = tempfile.mkdtemp(prefix="dllm_model_meta_")
    try:
        for i in infos:
            if not i.base_name.endswith(WEIGHT_SUFFIXES):
                pafs.copy_files(i.path, f"{tmp}/{i.base_name}", source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
        return inspect_checkpoint(tmp, family, dtype, files=files,
                                  open_file=lambda name: fs.open_input_file(f"{root}/{name}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_gpu_memory() -> Optional[list[int]]:
    """Total bytes of each GPU of this machine from nvidia-smi (no CUDA context in the driver), or None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return [int(float(x)) << 20 for x in out.split() if x.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def cluster_gpu_memory(gpus_per_actor: float) -> Optional[int]:
    """The smallest GPU an actor may get: this machine's when it is the only node (or no Ray is up, as
    in a dry run), else a small Ray task on a GPU node asks nvidia-smi there."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    if len(nodes) <= 1:
        mem = local_gpu_memory()
    else:
        task = ray.remote(num_cpus=0, num_gpus=min(gpus_per_actor, 1.0), max_retries=0)(local_gpu_memory)
        try:
            mem = ray.get(task.remote(), timeout=120)
        except Exception:  # noqa: BLE001  (no answer: the actor checks again before it loads)
            mem = None
    return min(mem) if mem else None


def preflight(path: str, family: str, dtype: str, device: str, gpus_per_actor: float) -> Preflight:
    """Check the model folder and that its weights fit the actors' GPUs; PreflightError says why not."""
    try:
        info = check_model(path, family, dtype)
    except Exception as e:  # noqa: BLE001  (any reason the model would not load)
        raise PreflightError(f"model {path!r} failed to load, so the job did not start: {type(e).__name__}: {e}") from None
    gpu_mem = cluster_gpu_memory(gpus_per_actor) if device.startswith("cuda") and gpus_per_actor else None
    if gpu_mem is not None:
        usable = gpu_mem * min(gpus_per_actor, 1.0)  # an actor's model sits on one GPU (or its share of one)
        if info.weight_bytes > MEMORY_HEADROOM * usable:
            raise PreflightError(
                f"model {path!r} needs {info.weight_bytes / GIB:.1f} GiB for its weights in {dtype}, more than "
                f"{MEMORY_HEADROOM:.0%} of the {usable / GIB:.1f} GiB of GPU memory an actor gets "
                f"(compute.gpus_per_actor={gpus_per_actor:g}); allowed: a smaller dtype, larger GPUs, or a "
                "larger share of one GPU per actor")
    return Preflight(info.fingerprint, info.weight_bytes, info.num_params, gpu_mem)
