"""Smoke test of benchmarks/profile_policies.py on a tiny CPU checkpoint: it runs end to end and
writes its per-(policy, batch) profile tables and the summary, with host syncs counted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from engine_fixtures import ckpt  # noqa: E402


def test_profile_policies_smoke(tmp_path):
    import profile_policies as PP

    out = tmp_path / "prof"
    PP.main(["--ckpt", str(ckpt("llada")), "--shape-name", "llada-tiny", "--out-dir", str(out),
             "--dtype", "float32", "--policies", "none,d2cache", "--batches", "2", "--prompt-len", "8",
             "--gen-len", "32", "--block", "16", "--first", "1", "--steps", "2", "--warm", "1",
             "--window-s", "0.05", "--full-max-s", "0", "--env-variants", "none:X=1"])
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["policy"], r["batch"]) for r in summary] == [("none", 2), ("d2cache", 2), ("none[X=1]", 2)]
    for r in summary:
        assert "profile_error" not in r and r.get("error") is None
        assert r["tokens_per_s"] > 0 and r["syncs_per_step"] >= 1  # the runner's one sync per step
        text = (out / f"profile_llada-tiny_{PP.fname(r['policy'])}_b2.txt").read_text()
        assert "host syncs per step" in text and "matmul" in text
    assert "| d2cache | 2 |" in (out / "summary.md").read_text()
