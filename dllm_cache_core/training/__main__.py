"""CLI: `python -m dllm_cache_core.training {tokenizer,train,export,eval} ...`.

train flags map one to one onto TrainConfig fields (`--max-minutes 7` -> max_minutes=7.0);
`--tokens-per-batch`, `--task-weights '{"sort": 1}'` and `--d-model`-style flags reach the nested
data / arch configs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Optional, Sequence

from .data import DataConfig
from .export import ArchConfig
from .trainer import TrainConfig


def _flags(ap: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field; lists, tuples and dicts are given as JSON."""
    for f in dataclasses.fields(cls):
        if f.name in ("arch", "data"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = type(default) if default is not None else str
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            kind = type(f.default_factory())
        if kind in (list, tuple, dict):
            ap.add_argument("--" + f.name.replace("_", "-"), type=json.loads, default=None, help="JSON")
        elif kind is bool:
            ap.add_argument("--" + f.name.replace("_", "-"), type=lambda s: s.lower() in ("1", "true", "yes"),
                            default=None)
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


def _pick(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
            if getattr(ns, f.name, None) is not None}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dllm_cache_core.training")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tk = sub.add_parser("tokenizer", help="build the tokenizer into a folder")
    tk.add_argument("out")
    tk.add_argument("--vocab-size", type=int, default=512)
    tr = sub.add_parser("train", help="train (or resume), export, evaluate")
    _flags(tr, TrainConfig)
    _flags(tr, ArchConfig)
    _flags(tr, DataConfig)
    ex = sub.add_parser("export", help="export a checkpoint folder to a model folder")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--tokenizer", default=TrainConfig.tokenizer)
    ev = sub.add_parser("eval", help="per-task accuracy of a model folder, vanilla decoding")
    ev.add_argument("model")
    ev.add_argument("--size", type=int, default=100)
    ev.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.cmd == "tokenizer":
        from .tokenizer import build_tokenizer, save_tokenizer, special_ids

        tok = build_tokenizer(a.vocab_size)
        save_tokenizer(tok, a.out)
        print(f"wrote {a.out}: vocab {tok.get_vocab_size()}, special ids {special_ids(tok)}")
    elif a.cmd == "train":
        from .trainer import train

        data = DataConfig(**_pick(a, DataConfig))
        cfg = TrainConfig(**_pick(a, TrainConfig), arch=ArchConfig(**_pick(a, ArchConfig)), data=data)
        train(cfg)
    elif a.cmd == "export":
        from .checkpoint import load_checkpoint
        from .export import config_json, export_model
        from .tokenizer import special_ids
        from tokenizers import Tokenizer

        ck = load_checkpoint(a.ckpt)
        arch = ArchConfig(**ck["meta"]["config"]["arch"])
        tok = Tokenizer.from_file(f"{a.tokenizer}/tokenizer.json")
        sha = export_model(ck["model"], config_json(arch, tok.get_vocab_size(), special_ids(tok)), a.tokenizer, a.out)
        print(f"exported step {ck['meta']['step']} to {a.out}: model.safetensors sha256 {sha}")
    else:
        from .quick_eval import evaluate_tasks

        json.dump(evaluate_tasks(a.model, a.size, a.device), sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
