"""Training checkpoints: one torch file, written atomically and split into parts of at most 15 MiB.

Why parts: checkpoints travel back from short GPU leases whose file transfers are capped per file;
why bf16 optimizer moments: they halve the file (a resumed Adam needs the moments' scale, not their
last bits), while the fp32 master weights stay exact.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

PART_BYTES = 15 << 20
NAME = "ckpt.pt"


def _compact_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    out = {"param_groups": state["param_groups"], "state": {}}
    for k, s in state["state"].items():
        out["state"][k] = {n: (v.detach().to("cpu", torch.bfloat16) if torch.is_tensor(v) and v.dim() > 0 else v)
                           for n, v in s.items()}
    return out


def save_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any]) -> list[Path]:
    """Write folder/ckpt.pt.000, .001, ... (and remove stale parts); returns the part paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = {"model": {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
            "optimizer": _compact_optimizer(optimizer.state_dict()), "meta": meta}
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    parts = []
    for i in range(0, max(len(data), 1), PART_BYTES):
        p = folder / f"{NAME}.{i // PART_BYTES:03d}"
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_bytes(data[i:i + PART_BYTES])
        os.replace(tmp, p)
        parts.append(p)
    for stale in folder.glob(f"{NAME}.[0-9][0-9][0-9]"):
        if stale not in parts:
            stale.unlink()
    return parts


def checkpoint_exists(folder: str | Path) -> bool:
    return (Path(folder) / f"{NAME}.000").exists()


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """{'model', 'optimizer', 'meta'} from the parts in `folder` (tensors on CPU)."""
    parts = sorted(Path(folder).glob(f"{NAME}.[0-9][0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"{folder}: no {NAME}.000 checkpoint parts")
    data = b"".join(p.read_bytes() for p in parts)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
