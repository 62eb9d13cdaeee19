"""`_job.json` (resolved spec, versions, fingerprint, start/end) and `_SUCCESS` in the output folder.

The fingerprint covers everything that changes the rows written: the model files' hash, family and
dtype, the generation and cache settings, the seed, how prompts are built (prompt/messages column,
chat template), the audit fraction and the evaluation settings. Batch size, actor count, input path,
input.limit and output settings are left out: they do not change a row (batching never changes a
greedy result, and sampled rows draw from per-row generators), so a job can be resumed with more
actors or a larger limit.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import subprocess
import uuid
from pathlib import Path
from typing import Any, Optional

from . import fs as fsx
from .spec import JobSpec

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"


class ManifestError(RuntimeError):
    """`_job.json` exists but cannot be read; the message names the file and what to do."""


def new_output_id() -> str:
    """The id that names every part a job writes into a folder (kept across resumes)."""
    return uuid.uuid4().hex[:12]


def fingerprint_components(spec: JobSpec, model_hash: str) -> dict[str, Any]:
    # on_drift changes rows only as fallback: left out at its default, so outputs written before it existed resume
    cal = spec.calibration.model_dump(mode="json", exclude={"on_drift"} if spec.calibration.on_drift == "flag" else None)
    calibration = {"calibration": cal} if spec.cache.policy == "auto" else {}
    return {**calibration,
        "model": model_hash,
        "family": spec.model.family,
        "dtype": spec.dtype,
        # how rows are scheduled changes no token: a job may resume under the other scheduling
        "generation": spec.generation.model_dump(mode="json", exclude=set(spec.generation.SCHEDULING_ONLY)),
        "cache": spec.cache.engine_kwargs(),
        "seed": spec.seed,
        "prompt": {"prompt_column": spec.input.prompt_column, "messages_column": spec.input.messages_column,
                   "chat_template": spec.input.chat_template},
        "audit_fraction": spec.audit.fraction,
        "evaluation": spec.evaluation.model_dump(mode="json") if spec.evaluation else None,
    }


def fingerprint(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:24]


def diff_components(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences, e.g. ["cache.policy: 'dual' -> 'prefix'"]."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_components(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("ray", "torch", "pyarrow", "transformers", "pydantic", "dllm-cache"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        repo = Path(__file__).resolve().parent.parent
        out["git_commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_job(out_uri: str) -> Optional[dict[str, Any]]:
    fs, d = fsx.resolve(out_uri)
    path = fsx.join(d, JOB_FILE)
    if not fsx.exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        job = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e.__class__.__name__} at byte {getattr(e, 'pos', '?')}: "
                            "truncated or edited?), so the output beside it cannot be checked; delete that folder's "
                            "output (or move it away) and run again, or choose a new output.path") from None
    if not isinstance(job, dict):
        raise ManifestError(f"{path} holds {type(job).__name__}, not a job record; delete that folder's output "
                            "(or move it away) and run again, or choose a new output.path")
    return job


def write_job(out_uri: str, record: dict[str, Any]) -> None:
    fs, d = fsx.resolve(out_uri)
    fs.create_dir(d, recursive=True)
    fsx.write_bytes_atomic(fs, fsx.join(d, JOB_FILE), json.dumps(record, indent=1, sort_keys=False).encode())


def mark_success(out_uri: str) -> None:
    fs, d = fsx.resolve(out_uri)
    fsx.write_bytes_atomic(fs, fsx.join(d, SUCCESS_FILE), now().encode())


def is_complete(out_uri: str) -> bool:
    """`_SUCCESS` is there: the last run finished with every id written once (a no-op re-run's test)."""
    fs, d = fsx.resolve(out_uri)
    return fsx.exists(fs, fsx.join(d, SUCCESS_FILE))


def clear_success(out_uri: str) -> None:
    fs, d = fsx.resolve(out_uri)
    if fsx.exists(fs, fsx.join(d, SUCCESS_FILE)):
        fs.delete_file(fsx.join(d, SUCCESS_FILE))
