"""Which rows the audit re-runs with policy `none`: chosen from a hash of the id, so the same rows are
audited on every run and resume, whatever the batching, input order or number of actors."""
from __future__ import annotations

import hashlib


def audit_key(row_id: str) -> float:
    """A uniform number in [0, 1) fixed by the id."""
    h = hashlib.sha256(f"audit:{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def is_audited(row_id: str, fraction: float) -> bool:
    return fraction > 0 and audit_key(row_id) < fraction
